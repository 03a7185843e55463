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
import difflib
import functools
import numbers
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from diffseg.choices import RUN_CHOICES
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
        # epsilon prediction: x0_hat = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar) clipped to
        # [-x0_limit, x0_limit]; 0 = unclipped, the reference's x_limit: 0 (1: diffseg <= 0.1's clip).
        "x0_limit": 0.0,
        # floor of the probabilities (x0_hat + 1) / 2 before their log, when x0_hat is not the
        # network's own softmax (epsilon prediction): the reference's EPS.
        "log_eps": 1.0e-5,
    },
    # dice_mean: per_sample (each sample's present classes, then the samples: the reference with
    # one sample per core) or pooled (all (sample, class) pairs of the batch at once).
    "loss": {"cross_entropy": True, "dice": True, "eps_l2_weight": 0.1, "dice_mean": "per_sample"},
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
        # Devices to train on: auto = the most local devices that split batch_size (and whole
        # micro-batches) evenly, e.g. 2 of 3 GPUs for a batch of 8; or an integer, exactly that many.
        "devices": "auto",
        # Which volumes a step takes: epoch = each once per epoch in a fresh order (the
        # reference's tf.data repeat/shuffle/batch); uniform = with replacement per step.
        "sampling": "epoch",
        "checkpoint_every": 500,
        "log_every": 10,
        "bf16": False,
        # bf16 runs: reference = the image cast to bfloat16 before augmentation, the one-hot mask
        # and the noise built in bfloat16 (as the reference); float32 = all float32 until the
        # network's input casts it.
        "bf16_inputs": "reference",
        # Where it may train: any (what JAX finds), gpu, tpu or cpu; a run asking for gpu stops on
        # a CPU-only machine rather than train there for days (DIFFSEG_ALLOW_CPU=1 lets it).
        "platform": "any",
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
        # NSD of a class empty in exactly one mask (a miss or a false positive): nan, so left out
        # of the means as the reference averages it, or zero. Misses are counted either way.
        "nsd_empty": "nan",
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


# --- Strict config -------------------------------------------------------------------------------
# The run-config keys are BASE's (a key added to BASE is valid everywhere at once) and their types
# are inferred from BASE's values, except where a value's type does not say everything:
VALUE_TYPES: dict[str, tuple[str, ...]] = {
    "model.remat": ("bool", "auto"),  # auto: off where the step fits without it (diffseg.train.plan)
    "optim.decay_steps": ("integer", "null"),  # null: decay over all train.steps
    "train.micro_batch": ("integer", "null", "auto"),  # null: the whole batch at once; auto: fit the device
    "train.devices": ("integer", "auto"),  # auto: as many as split the batch evenly
    "train.augment.max_rotation": ("number", "number list"),  # one number: every axis
    "train.augment.max_translation": ("number", "number list"),
    "train.augment.max_scaling": ("number", "number list"),
}
_DESCRIBE = {
    "bool": "true or false",
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "null": "null",
    "auto": "auto",
    "integer list": "a list of integers",
    "number list": "a list of numbers",
    "string list": "a list of strings",
}
# The workflow-level keys and the dataset entries' keys (per source) are the schema's.
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"
_RUN_CONFIG_REF = "#/definitions/overrides"  # the schema's marker of a run-config section


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "any":
        return True
    if kind == "null":
        return value is None
    if kind == "auto":
        return value == "auto"
    if kind == "bool":
        return isinstance(value, bool | np.bool_)
    if isinstance(value, bool | np.bool_):
        return False  # YAML's true is not the integer 1
    if kind == "integer":
        return isinstance(value, numbers.Integral)
    if kind == "number":
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind.endswith(" list"):
        item = kind.removesuffix(" list")
        return isinstance(value, list | tuple) and all(_is_kind(v, item) for v in value)
    raise AssertionError(kind)


def _infer_kinds(value: Any) -> tuple[str, ...]:
    """The type of a BASE value: its kind (a list's from its items); None says nothing (any)."""
    if value is None:
        return ("any",)
    for kind in ("bool", "integer", "number", "string"):
        if _is_kind(value, kind):
            return (kind,)
    if isinstance(value, list | tuple):
        for kind in ("integer list", "number list", "string list"):
            if _is_kind(value, kind):
                return (kind,)
    return ("any",)


def _show(value: Any) -> str:
    """``str 'ten'``, ``int 3``, ``null``: a value for an error message (numpy scalars as Python's)."""
    if value is None:
        return "null"
    if isinstance(value, np.generic):
        value = value.item()
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _unknown(path: str, key: Any, valid: Any, what: str = "") -> ConfigError:
    """``path: unknown key 'key'; did you mean 'x'?`` (the nearest valid key), else the valid keys."""
    valid = sorted(str(v) for v in valid)
    lower = {v.lower(): v for v in valid}  # case-blind: 3D -> 3d
    close = difflib.get_close_matches(str(key).lower(), list(lower), n=1, cutoff=0.6)
    hint = f"did you mean {lower[close[0]]!r}?" if close else f"valid keys: {', '.join(valid) or 'none'}"
    return ConfigError(f"{path}: unknown key {key!r}{what}; {hint}")


def _yaml_float(text: str) -> str:
    """``1e-4`` -> ``1.0e-4``: how YAML 1.1 (PyYAML, Snakemake) reads the number as a float."""
    mantissa, _, exponent = text.strip().lower().partition("e")
    if exponent and "." not in mantissa:
        mantissa += ".0"
    if exponent and exponent[0] not in "+-":
        exponent = "+" + exponent
    return f"{mantissa}e{exponent}" if exponent else mantissa


def _check_value(value: Any, kinds: tuple[str, ...], path: str) -> None:
    if any(_is_kind(value, kind) for kind in kinds):
        return
    msg = f"{path} must be {' or '.join(_DESCRIBE.get(k, k) for k in kinds)}, got {_show(value)}"
    if isinstance(value, str) and any(k in ("number", "integer") for k in kinds):
        try:
            float(value)
        except ValueError:
            pass
        else:  # YAML 1.1 reads 1e-4 (no dot, unsigned exponent) as a string
            msg += f" (YAML reads {value} as a string: write {_yaml_float(value)})"
    raise ConfigError(msg)


def check_run_section(value: Any, path: str, base: Mapping[str, Any] = BASE, rel: str = "") -> None:
    """Check run-config overrides (``training``, a variant, ``--set model=...``) against ``BASE``.

    Every key must be one of ``base``'s, a section a mapping and a value of its key's type
    (``VALUE_TYPES``, else inferred from BASE's value); ``ConfigError`` names the full key path
    (``path`` is where ``value`` lies, ``rel`` its place in the run config).
    """
    if value is None and not rel:
        return  # an empty override section (``variants: {mine: }``)
    what = f" {rel} keys" if rel else " run-config sections"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path} must be a mapping of{what}, got {_show(value)}")
    for key, sub in value.items():
        where = f"{path}.{key}" if path else str(key)
        here = f"{rel}.{key}" if rel else str(key)
        if key not in base:
            raise _unknown(where, key, base)
        if isinstance(base[key], Mapping):
            check_run_section(sub, where, base[key], here)
        else:
            _check_leaf(sub, here, base[key], where)


def _check_leaf(value: Any, rel: str, base_value: Any, where: str) -> None:
    """A run-config value: its key's type, and one of its choices where it has them (``RUN_CHOICES``)."""
    _check_value(value, VALUE_TYPES.get(rel) or _infer_kinds(base_value), where)
    allowed = RUN_CHOICES.get(tuple(rel.split(".")))
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{where} must be one of {', '.join(allowed)}, got {value!r}")


def _check_dotted(dotted: str, value: Any, where: str) -> None:
    """One ``--set`` override ``train.steps=10``: a BASE key path and a value of its type."""
    node: Any = BASE
    rel = ""
    for key in dotted.split("."):
        if not isinstance(node, Mapping):
            raise ConfigError(f"{where} {dotted}: {rel} is not a section of the run config")
        if key not in node:
            raise _unknown(f"{where} {dotted}", key, node)
        node, rel = node[key], f"{rel}.{key}" if rel else key
    if isinstance(node, Mapping):
        check_run_section(value, f"{where} {dotted}", node, rel)
    else:
        _check_leaf(value, rel, node, f"{where} {dotted}")


@functools.cache
def load_schema() -> dict[str, Any] | None:
    """The workflow config's JSON schema (``workflow/schemas/config.schema.yaml``); None when absent
    (diffseg installed without the workflow: only the run-config sections are checked then)."""
    if not SCHEMA_PATH.is_file():
        return None
    return yaml.safe_load(SCHEMA_PATH.read_text())


@functools.cache
def _validator() -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(load_schema())


def _deref(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    while "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _source_keys(schema: Mapping[str, Any], value: Mapping[str, Any]) -> tuple[str, list[str]] | None:
    """``(source, its keys)`` from an ``allOf: [{if: {properties: {source: {const}}}, then: ...}]``."""
    for rule in schema.get("allOf", ()):
        const = (((rule.get("if") or {}).get("properties") or {}).get("source") or {}).get("const")
        names = ((rule.get("then") or {}).get("propertyNames") or {}).get("enum")
        if const is not None and names is not None and value.get("source") == const:
            return const, list(names)
    return None


def _walk(schema: Mapping[str, Any], value: Any, path: str, root: Mapping[str, Any]) -> None:
    """Unknown keys, with the schema's ``properties`` (and per-source key lists) as the valid ones."""
    if schema.get("$ref") == _RUN_CONFIG_REF:
        check_run_section(value, path)
        return
    schema = _deref(schema, root)
    for branch in (*schema.get("oneOf", ()), *schema.get("anyOf", ())):
        branch = _deref(branch, root)
        if isinstance(value, Mapping) and "object" in str(branch.get("type", "")):
            _walk(branch, value, path, root)
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            _walk(schema["items"], item, f"{path}[{i}]", root)
    if not isinstance(value, Mapping):
        return
    props = schema.get("properties") or {}
    patterns = schema.get("patternProperties") or {}
    extra = schema.get("additionalProperties", True)
    names = (schema.get("propertyNames") or {}).get("enum")
    per_source = _source_keys(schema, value)
    for key, sub in value.items():
        where = f"{path}.{key}" if path else str(key)
        if names is not None and key not in names:
            raise _unknown(where, key, names)
        if per_source is not None and key not in per_source[1]:
            raise _unknown(where, key, per_source[1], f" for source {per_source[0]!r}")
        if key in props:
            _walk(props[key], sub, where, root)
        elif any(re.search(p, str(key)) for p in patterns):
            _walk(next(s for p, s in patterns.items() if re.search(p, str(key))), sub, where, root)
        elif isinstance(extra, Mapping):
            _walk(extra, sub, where, root)
        elif extra is False:
            raise _unknown(where, key, props)


def _json_path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validate_config(config: Mapping[str, Any], where: str | Path | None = None) -> None:
    """Check a workflow config strictly; ``ConfigError`` names the key path and the problem.

    Unknown keys anywhere (the top level, ``training``, ``dims.<dim>``, ``variants.<name>``, a
    dataset entry and its ``training``) are errors with the nearest valid key; run-config values
    must have BASE's types; the rest of the schema (types, choices) is checked with jsonschema.
    Keys the schema requires of a whole workflow config (``tables``) are not required here, so a
    config for ``diffseg data``/``plan`` alone may leave them out. ``where`` (the file) prefixes
    the message.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{prefix}expected a mapping at the top level, got {_show(config)}")
    schema = load_schema()
    try:
        if schema is None:  # no schema: the run-config sections only
            check_run_section(config.get("training"), "training")
            for section in ("dims", "variants"):
                for name, sub in (config.get(section) or {}).items():
                    check_run_section(sub, f"{section}.{name}")
            for name, entry in (config.get("datasets") or {}).items():
                check_run_section((entry or {}).get("training"), f"datasets.{name}.training")
            return
        _walk(schema, config, "", schema)
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}") from None
    import jsonschema

    errors = [
        e for e in _validator().iter_errors(dict(config)) if not (e.validator == "required" and not e.path)
    ]
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        raise ConfigError(f"{prefix}{_json_path(err.absolute_path) or 'config'}: {err.message}")


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


def apply_overrides(
    cfg: dict[str, Any], overrides: Mapping[str, Any] | None, where: str = "override"
) -> dict[str, Any]:
    """Set dotted keys (``{"train.steps": 10}``) in ``cfg`` in place.

    Each key must be a key path of ``BASE`` and its value of that key's type (``ConfigError``
    naming ``{where} {key}`` and the nearest valid key); a section's value (``model={...}``) is
    merged into the section rather than replacing it.
    """
    for dotted, value in (overrides or {}).items():
        _check_dotted(str(dotted), value, where)
        *parents, last = str(dotted).split(".")
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        if isinstance(value, Mapping) and isinstance(node.get(last), Mapping):
            node[last] = deep_merge(node[last], value)
        else:
            node[last] = copy.deepcopy(value)
    return cfg


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["train.steps=10", "model.channels=[8,16]"]`` -> ``{"train.steps": 10, ...}`` (YAML values)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from None
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

    Raises:
        ConfigError: the config is not valid (:func:`validate_config`: an unknown key anywhere,
            with its full path and the nearest valid key, or a value of the wrong type), or the
            run, its dataset or the resolved settings are not.

    Returns:
        A plain dict with sections ``model, diffusion, loss, optim, train, evaluate`` and the
        run's identity ``dataset, run, dim, variant, seed``.
    """
    validate_config(config)
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
    check_constraints(cfg, datasets[dataset] or {})
    return cfg


def _check(cfg: Mapping[str, Any], run: str) -> None:
    for (section, key), allowed in RUN_CHOICES.items():
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


def network_multiple(run_cfg: Mapping[str, Any]) -> int:
    """Each spatial axis the network halves must be a multiple of this: ``2**len(channels)`` for
    the reference network (a strided convolution before every level), ``2**(len(channels) - 1)``
    for the legacy one. In 2D only X and Y are halved."""
    levels = len(run_cfg["model"]["channels"])
    return 2 ** (levels if run_cfg["model"].get("arch", "reference") == "reference" else levels - 1)


def _nearest_multiple(n: int, factor: int) -> int:
    return max(factor, factor * int(n / factor + 0.5))  # ties go up: a larger crop keeps more


def _nearest_divisors(n: int, value: int) -> str:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    best = min(abs(d - value) for d in divisors)
    return " or ".join(str(d) for d in divisors if abs(d - value) == best)


def check_constraints(cfg: Mapping[str, Any], ds_cfg: Mapping[str, Any]) -> None:
    """What a run's train and test jobs would assert, checked on the resolved config before any job.

    Each ``ConfigError`` names the key path, the value, the rule and the nearest valid value:
    the dataset's ``shape`` against the network's halvings, ``train.batch_size`` against
    ``train.micro_batch``, the step counts, and ``evaluate.window_overlap``.
    """
    run, dataset, train = cfg.get("run"), cfg.get("dataset"), cfg["train"]
    where = f"(run {run!r} of dataset {dataset!r})"
    for key in ("steps", "batch_size", "checkpoint_every", "log_every"):
        if int(train[key]) < 1:
            raise ConfigError(f"train.{key} {train[key]} {where}: must be 1 or more; nearest: 1")
    shape = ds_cfg.get("shape")
    if shape:
        factor = network_multiple(cfg)
        levels = len(cfg["model"]["channels"])
        halvings = levels if cfg["model"].get("arch", "reference") == "reference" else levels - 1
        halved = 2 if int(cfg["model"]["spatial_dims"]) == 2 else 3  # 2D: depth is never halved
        if any(int(n) % factor for n in list(shape)[:halved]):
            nearest = [_nearest_multiple(int(n), factor) for n in list(shape)[:halved]] + list(shape)[halved:]
            axes = "X and Y" if halved == 2 else "every axis"
            raise ConfigError(
                f"datasets.{dataset}.shape {list(shape)}: {axes} must be divisible by {factor} for the"
                f" {halvings} halvings of the {halved}D network of run {run!r} (model.channels has {levels}"
                f" levels); nearest: {nearest}"
            )
    batch, micro = int(train["batch_size"]), train.get("micro_batch")
    if isinstance(micro, int) and not isinstance(micro, bool) and (micro < 1 or batch % micro):
        raise ConfigError(
            f"train.micro_batch {micro} {where}: must be a positive divisor of train.batch_size {batch}"
            f" (volumes per pass, gradients accumulated over the passes);"
            f" nearest: {_nearest_divisors(batch, micro)}"
        )
    overlap = float(cfg["evaluate"]["window_overlap"])
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(
            f"evaluate.window_overlap {overlap} {where}: must lie in [0, 1) (the share neighbouring"
            f" windows overlap); nearest: {min(max(overlap, 0.0), 0.9)}"
        )


def save_run_config(cfg: Mapping[str, Any], path: str | Path) -> None:
    """Write the resolved run config as YAML, atomically."""
    from diffseg.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(dict(cfg), sort_keys=False))
