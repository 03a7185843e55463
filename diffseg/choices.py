"""Every config value that is one of a fixed set of names, listed once.

This module imports nothing: ``diffseg.config`` (which the Snakefile imports) reads it, and so do
the modules that act on the names. What else names them is checked against it by tests: the
workflow schema's enums (``tests/test_config.py``) and ``diffseg.diffusion``'s ``Prediction`` and
``Variance`` enums (``tests/test_diffusion.py``), which stay out of here so that the Snakefile's
import does not pull in jax.
"""

from __future__ import annotations

# Run-config keys (BASE's sections, diffseg.config) -> their allowed values; BASE holds the default.
RUN_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("model", "arch"): ("reference", "legacy"),
    ("model", "time_conditioning"): ("reference", "after_norm"),
    ("diffusion", "prediction"): ("x0", "epsilon"),  # diffseg.diffusion.Prediction
    ("diffusion", "variance"): ("fixed_large", "beta_tilde"),  # diffseg.diffusion.Variance
    ("train", "sampling"): ("epoch", "uniform"),
    ("train", "platform"): ("any", "gpu", "tpu", "cpu"),
    ("evaluate", "nsd_empty"): ("nan", "zero"),
    ("train", "bf16_inputs"): ("reference", "float32"),
    ("loss", "dice_mean"): ("per_sample", "pooled"),
}

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
