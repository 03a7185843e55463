"""Every config value that is one of a fixed set of names, listed once.

The run config's names are ``Literal`` types: :mod:`diffseg.runconfig` annotates its fields with
them and derives from those annotations both the check of a config value and ``RUN_CHOICES``. This
module imports nothing but ``typing``: ``diffseg.config`` (which the Snakefile imports) reads it, and
so do the modules that act on the names. What else names them is checked against it by tests: the
workflow schema's enums (``tests/test_config.py``) and ``diffseg.diffusion``'s ``Prediction`` and
``Variance`` enums (``tests/test_diffusion.py``), which stay out of here so that the Snakefile's
import does not pull in jax.
"""

from __future__ import annotations

from typing import Literal, get_args

# --- run config (diffseg.runconfig's field types) -------------------------------------------------
Arch = Literal["reference", "legacy"]  # model.arch
TimeConditioning = Literal["reference", "after_norm"]  # model.time_conditioning
PredictionName = Literal["x0", "epsilon"]  # diffusion.prediction: diffseg.diffusion.Prediction
VarianceName = Literal["fixed_large", "beta_tilde"]  # diffusion.variance: diffseg.diffusion.Variance
DiceMean = Literal["per_sample", "pooled"]  # loss.dice_mean
Sampling = Literal["epoch", "uniform"]  # train.sampling
Bf16Inputs = Literal["reference", "float32"]  # train.bf16_inputs
Platform = Literal["any", "accelerator", "gpu", "tpu", "cpu"]  # train.platform
NsdEmpty = Literal["nan", "zero"]  # evaluate.nsd_empty
Auto = Literal["auto"]  # "let diffseg choose" (model.remat, train.micro_batch, train.devices)

TIME_CONDITIONINGS: tuple[str, ...] = get_args(TimeConditioning)
PLATFORMS: tuple[str, ...] = get_args(Platform)

# --- dataset entries (the schema's enums of definitions.dataset) ---------------------------------
# A dataset entry's preprocessing switches (diffseg.data.preprocess.PreprocessOptions); the first
# is the default for datasets read from files.
PREPROCESS_CHOICES: dict[str, tuple[str, ...]] = {
    "reorient": ("none", "LPS"),
    "resample": ("reference", "legacy"),
    "normalize": ("reference", "legacy"),
    "crop": ("label_bbox", "centre"),
}

# Every key of a dataset entry that takes a name: the schema's enums of ``definitions.dataset``.
DATASET_CHOICES: dict[str, tuple[str, ...]] = {
    "source": ("phantom", "prostate_mr", "abdominal_ct", "msd"),  # diffseg.data.sources
    "anatomy": ("pelvis", "abdomen"),  # the phantoms (diffseg.data.phantom.CLASSES)
    **PREPROCESS_CHOICES,
}

# `diffseg data --pool`: the workers that prepare cases at once (diffseg.data.prepare).
POOLS = ("thread", "process")
