"""Run configuration: one base, per-dimension and per-variant overrides, resolved once.

The paper's method lives here, in code, once: ``BASE`` holds the paper's settings, ``DIMS``
the 2D/3D switches and ``VARIANTS`` the six run variants of the paper. A YAML config
(``config/config.yaml``) overrides any of them and may add new variants, so an ablation is a
few lines of config. Resolution order (later wins)::

    BASE <- config.training <- DIMS[dim] <- config.dims[dim]
         <- VARIANTS[variant] <- config.variants[variant]
         <- config.datasets[dataset].training <- overrides (CLI ``--set``)

Run names are ``{dim}-{variant}`` (``3d-diff``), optionally suffixed ``-seed{N}``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from diffseg.errors import ConfigError

BASE: dict[str, Any] = {
    "model": {
        # "reference": ImgX-DiffSeg v0.1.0's U-Net (docs/FIDELITY.md); "legacy": diffseg's
        # earlier U-Net (GroupNorm, SiLU, average pooling, concatenated skips).
        "arch": "reference",
        "spatial_dims": 3,
        "channels": [32, 64, 128, 256],
        # reference: t added just before an InstanceNorm, which removes it again (the
        # reference's placement: the network ignores t); after_norm: added after it (t is used).
        "time_conditioning": "reference",
        "remat": False,  # rematerialise each block in the backward pass (less memory, more compute)
        "time_embed_dim": 128,  # legacy network only; the reference's is 4 * channels[0]
    },
    "diffusion": {
        "enabled": True,
        "prediction": "x0",  # x0 | epsilon
        # The reference's 1001-step linear schedule (num_timesteps_beta), so that 5 steps keep
        # t = 1, 251, 501, 751, 1001 exactly as its code; the paper's text says T = 1000.
        "num_timesteps": 1001,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "train_steps": 5,  # K used for training
        "sample_steps": 5,  # K used for inference
        "recycle": True,
        # Sampling variance: fixed_large (sigma^2 = beta_k, the reference code) or beta_tilde
        # (the posterior variance, the paper's text).
        "variance": "fixed_large",
    },
    "loss": {"cross_entropy": True, "dice": True, "eps_l2_weight": 0.1},
    "optim": {
        "init_learning_rate": 1e-5,
        "learning_rate": 1e-4,
        "end_learning_rate": 1e-6,
        "warmup_steps": 100,
        # Cosine decay ends here (warm-up included, as optax counts it), then the rate is held:
        # 10 000 of the 12 500 steps in the reference. null: decay over all train.steps.
        "decay_steps": 10000,
        "weight_decay": 1e-8,
        "grad_clip": 1.0,
    },
    "train": {
        "steps": 12500,
        "batch_size": 8,  # volumes per step, in 2D too (the 2D network sees all their slices)
        # Volumes per device per pass, gradients accumulated to batch_size: null = all at once;
        # auto = the largest that fits the device (XLA's compiled memory analysis, 10 % headroom).
        "micro_batch": None,
        "checkpoint_every": 500,
        "log_every": 10,
        "bf16": False,
        "seed": 0,
        # The reference's prostate ranges; datasets.abdominal_ct.training sets AMOS's.
        "augment": {
            "enabled": True,
            "max_rotation": [0.088, 0.088, 0.088],  # radians about X, Y, Z
            "max_translation": [20, 20, 4],  # voxels
            "max_scaling": [0.15, 0.15, 0.15],  # +- fraction per axis
        },
    },
    "evaluate": {
        "tolerance_mm": 1.0,
        "batch_size": 1,
        "window_overlap": 0.5,  # sliding windows of the training shape: the share neighbours overlap
    },
}

DIMS: dict[str, dict[str, Any]] = {
    "2d": {"model": {"spatial_dims": 2}},
    "3d": {"model": {"spatial_dims": 3}},
}

VARIANTS: dict[str, dict[str, Any]] = {
    "seg": {"diffusion": {"enabled": False}},
    "diff": {},
    "diff-noise": {"diffusion": {"prediction": "epsilon"}},
    "diff-nodice": {"loss": {"dice": False}},
    "diff-norecycle": {"diffusion": {"recycle": False}},
    "diff-t1000": {"diffusion": {"train_steps": 1000}},
    # Beyond the paper: what the reference code changed against its text (table5).
    "diff-time": {"model": {"time_conditioning": "after_norm"}},
    "diff-betatilde": {"diffusion": {"variance": "beta_tilde"}},
}

RUN_NAME = re.compile(
    r"^(?P<dim>2d|3d)-(?P<variant>[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*?)(?:-seed(?P<seed>\d+))?$"
)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base``; lists and scalars replace."""
    out = copy.deepcopy(dict(base))
    for key, value in (override or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with an error that names the file when it is not one."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_run_name(run: str) -> tuple[str, str, int | None]:
    """Split ``3d-diff-nodice-seed1`` into ``("3d", "diff-nodice", 1)``."""
    match = RUN_NAME.match(run)
    if not match:
        raise ConfigError(f"run name {run!r} is not of the form {{2d|3d}}-{{variant}}[-seed{{N}}]")
    seed = match["seed"]
    return match["dim"], match["variant"], int(seed) if seed is not None else None


def variants(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The built-in variants updated with those the config adds or overrides."""
    return {**VARIANTS, **{k: v or {} for k, v in (config.get("variants") or {}).items()}}


def _set_dotted(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = cfg
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section of the run config")
        node = node[key]
    if keys[-1] not in node:
        raise ConfigError(f"override {dotted!r}: unknown key {keys[-1]!r}")
    node[keys[-1]] = value


def apply_overrides(cfg: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Set dotted keys (``{"train.steps": 10}``) in ``cfg`` in place; unknown keys are errors."""
    for key, value in (overrides or {}).items():
        _set_dotted(cfg, key, value)
    return cfg


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["train.steps=10", "model.channels=[8,16]"]`` -> ``{"train.steps": 10, ...}`` (YAML values)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def resolve_run_config(
    config: Mapping[str, Any],
    dataset: str,
    run: str,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Resolve the full configuration of one run.

    Args:
        config: the workflow config (``config/config.yaml`` loaded).
        dataset: a key of ``config["datasets"]``.
        run: ``{dim}-{variant}[-seed{N}]``.
        overrides: dotted keys to values (``{"train.steps": 10}``), applied last.

    Returns:
        A plain dict with sections ``model, diffusion, loss, optim, train, evaluate`` and the
        run's identity ``dataset, run, dim, variant, seed``.
    """
    dim, variant, seed = parse_run_name(run)
    all_variants = variants(config)
    if variant not in all_variants:
        raise ConfigError(
            f"run {run!r}: unknown variant {variant!r}; known: {', '.join(sorted(all_variants))}"
        )
    datasets = config.get("datasets") or {}
    if dataset not in datasets:
        raise ConfigError(f"unknown dataset {dataset!r}; configured: {', '.join(sorted(datasets))}")

    cfg = deep_merge(BASE, config.get("training"))
    cfg = deep_merge(cfg, DIMS[dim])
    cfg = deep_merge(cfg, (config.get("dims") or {}).get(dim))
    cfg = deep_merge(cfg, VARIANTS.get(variant, {}))
    cfg = deep_merge(cfg, (config.get("variants") or {}).get(variant))
    cfg = deep_merge(cfg, (datasets[dataset] or {}).get("training"))
    apply_overrides(cfg, overrides)
    if seed is not None:
        cfg["train"]["seed"] = seed
    cfg.update(dataset=dataset, run=run, dim=dim, variant=variant, seed=cfg["train"]["seed"])
    _check(cfg, run)
    return cfg


CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("model", "arch"): ("reference", "legacy"),
    ("model", "time_conditioning"): ("reference", "after_norm"),
    ("diffusion", "prediction"): ("x0", "epsilon"),
    ("diffusion", "variance"): ("fixed_large", "beta_tilde"),
}


def _check(cfg: Mapping[str, Any], run: str) -> None:
    for (section, key), allowed in CHOICES.items():
        if cfg[section][key] not in allowed:
            raise ConfigError(
                f"run {run!r}: {section}.{key} must be one of {', '.join(allowed)}, got {cfg[section][key]!r}"
            )
    diff = cfg["diffusion"]
    for key in ("train_steps", "sample_steps"):
        if not 1 <= int(diff[key]) <= int(diff["num_timesteps"]):
            raise ConfigError(f"run {run!r}: diffusion.{key}={diff[key]} must lie in [1, num_timesteps]")
    if not (cfg["loss"]["cross_entropy"] or cfg["loss"]["dice"] or diff["prediction"] == "epsilon"):
        raise ConfigError(f"run {run!r}: the loss is empty (no cross_entropy, dice or epsilon L2)")


def save_run_config(cfg: Mapping[str, Any], path: str | Path) -> None:
    """Write the resolved run config as YAML, atomically."""
    from diffseg.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(dict(cfg), sort_keys=False))
