"""Run configuration: one base, per-dimension and per-variant overrides, resolved once.

The paper's method lives in code, once: ``BASE`` holds the paper's settings (the defaults of
``diffseg.runconfig``'s dataclasses, which also declare each key's type and names), ``DIMS``
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
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from diffseg.errors import ConfigError
from diffseg.runconfig import RunConfig, check_value, defaults, show

# The defaults of every run-config key: diffseg.runconfig's dataclasses, as the plain mapping the
# overrides below merge into (the reason for each value is written beside it there).
BASE: dict[str, Any] = defaults()

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
# The run-config keys are BASE's (a key added to diffseg.runconfig is valid everywhere at once) and
# their types and names are its annotations (diffseg.runconfig.KEY_TYPES).
# The workflow-level keys and the dataset entries' keys (per source) are the schema's.
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"
_RUN_CONFIG_REF = "#/definitions/overrides"  # the schema's marker of a run-config section


def _unknown(path: str, key: Any, valid: Any, what: str = "") -> ConfigError:
    """``path: unknown key 'key'; did you mean 'x'?`` (the nearest valid key), else the valid keys."""
    valid = sorted(str(v) for v in valid)
    lower = {v.lower(): v for v in valid}  # case-blind: 3D -> 3d
    close = difflib.get_close_matches(str(key).lower(), list(lower), n=1, cutoff=0.6)
    hint = f"did you mean {lower[close[0]]!r}?" if close else f"valid keys: {', '.join(valid) or 'none'}"
    return ConfigError(f"{path}: unknown key {key!r}{what}; {hint}")


def check_run_section(value: Any, path: str, base: Mapping[str, Any] = BASE, rel: str = "") -> None:
    """Check run-config overrides (``training``, a variant, ``--set model=...``) against ``BASE``.

    Every key must be one of ``base``'s, a section a mapping and a value of its key's type
    (``diffseg.runconfig``'s annotation); ``ConfigError`` names the full key path
    (``path`` is where ``value`` lies, ``rel`` its place in the run config).
    """
    if value is None and not rel:
        return  # an empty override section (``variants: {mine: }``)
    what = f" {rel} keys" if rel else " run-config sections"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path} must be a mapping of{what}, got {show(value)}")
    for key, sub in value.items():
        where = f"{path}.{key}" if path else str(key)
        here = f"{rel}.{key}" if rel else str(key)
        if key not in base:
            raise _unknown(where, key, base)
        if isinstance(base[key], Mapping):
            check_run_section(sub, where, base[key], here)
        else:
            _check_leaf(sub, here, where)


def _check_leaf(value: Any, rel: str, where: str) -> None:
    """A run-config value: its key's type, and one of its names where it takes one."""
    check_value(value, rel, where)


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
        _check_leaf(value, rel, f"{where} {dotted}")


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
        raise ConfigError(f"{prefix}expected a mapping at the top level, got {show(config)}")
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


def resolve_run(
    config: Mapping[str, Any],
    dataset: str,
    run: str,
    overrides: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Resolve the full configuration of one run, checked once, as the typed frozen object.

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
        The run's :class:`RunConfig`: sections ``model, diffusion, loss, optim, train, evaluate``
        and the run's identity ``dataset, run, dim, variant, seed``.
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
    typed = RunConfig.from_dict(cfg)  # every key, type, name and run-level rule
    check_constraints(typed, datasets[dataset] or {})
    return typed


def resolve_run_config(
    config: Mapping[str, Any],
    dataset: str,
    run: str,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`resolve_run` as the plain mapping the workflow saves as the run's ``config.yaml``
    (and compares, as a rerun trigger): sections ``model, diffusion, loss, optim, train, evaluate``
    and the run's identity ``dataset, run, dim, variant, seed``."""
    return resolve_run(config, dataset, run, overrides).to_dict()


def _nearest_multiple(n: int, factor: int) -> int:
    return max(factor, factor * int(n / factor + 0.5))  # ties go up: a larger crop keeps more


def _nearest_divisors(n: int, value: int) -> str:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    best = min(abs(d - value) for d in divisors)
    return " or ".join(str(d) for d in divisors if abs(d - value) == best)


def check_constraints(cfg: RunConfig, ds_cfg: Mapping[str, Any]) -> None:
    """What a run's train and test jobs would assert, checked on the resolved config before any job.

    Each ``ConfigError`` names the key path, the value, the rule and the nearest valid value:
    the dataset's ``shape`` against the network's halvings, ``train.batch_size`` against
    ``train.micro_batch``, the step counts, and ``evaluate.window_overlap``.
    """
    train = cfg.train
    where = f"(run {cfg.run!r} of dataset {cfg.dataset!r})"
    for key in ("steps", "batch_size", "checkpoint_every", "log_every"):
        if getattr(train, key) < 1:
            raise ConfigError(f"train.{key} {getattr(train, key)} {where}: must be 1 or more; nearest: 1")
    shape = ds_cfg.get("shape")
    if shape:
        factor, levels = cfg.network_multiple, len(cfg.model.channels)
        halved = 2 if cfg.model.spatial_dims == 2 else 3  # 2D: depth is never halved
        if any(int(n) % factor for n in list(shape)[:halved]):
            nearest = [_nearest_multiple(int(n), factor) for n in list(shape)[:halved]] + list(shape)[halved:]
            axes = "X and Y" if halved == 2 else "every axis"
            raise ConfigError(
                f"datasets.{cfg.dataset}.shape {list(shape)}: {axes} must be divisible by {factor} for the"
                f" {cfg.halvings} halvings of the {halved}D network of run {cfg.run!r} (model.channels has"
                f" {levels} levels); nearest: {nearest}"
            )
    batch, micro = train.batch_size, train.micro_batch
    if isinstance(micro, int) and not isinstance(micro, bool) and (micro < 1 or batch % micro):
        raise ConfigError(
            f"train.micro_batch {micro} {where}: must be a positive divisor of train.batch_size {batch}"
            f" (volumes per pass, gradients accumulated over the passes);"
            f" nearest: {_nearest_divisors(batch, micro)}"
        )
    overlap = float(cfg.evaluate.window_overlap)
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(
            f"evaluate.window_overlap {overlap} {where}: must lie in [0, 1) (the share neighbouring"
            f" windows overlap); nearest: {min(max(overlap, 0.0), 0.9)}"
        )


def complete_run_config(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A run config read back from a run folder, with any BASE key it lacks (a folder saved before
    the key existed) at BASE's value, as the code then behaved; so readers index it like a resolved one."""
    return deep_merge(BASE, saved)


def save_run_config(cfg: Mapping[str, Any], path: str | Path) -> None:
    """Write the resolved run config as YAML, atomically."""
    from diffseg.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(dict(cfg), sort_keys=False))
