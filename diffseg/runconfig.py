"""A run's settings as one typed, frozen object: every key, its type, default and allowed values.

The dataclasses below are the paper's method in code (the defaults are the reference's, with the
reason beside each), and the one statement of what a run-config key may hold: ``diffseg.config``
derives ``BASE`` (the defaults, as the plain mapping the YAML overrides merge into) and its checks
of every override from them, so a key, its type and its choices are written once.

A run's jobs build :class:`RunConfig` once from its resolved mapping (``results/runs/D/R/config.yaml``)
with :meth:`RunConfig.from_dict`, which checks the keys, the types, the names and the run-level
rules, and then read attributes (``cfg.train.batch_size``), never ``int(cfg["train"][...])``.
:meth:`RunConfig.to_dict` gives the mapping back unchanged (the saved YAML and the fingerprint of
the trained parameters are computed from it, so they do not depend on this class).

Like ``diffseg.config`` this module stays free of jax: the Snakefile imports it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import numbers
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin

import numpy as np

from diffseg.choices import (
    Arch,
    Auto,
    Bf16Inputs,
    DiceMean,
    NsdEmpty,
    Platform,
    PredictionName,
    Sampling,
    TimeConditioning,
    VarianceName,
)
from diffseg.errors import ConfigError

Axes = float | tuple[float, ...]  # one number for every axis, or one per axis (X, Y, Z)


class Section:
    """A run-config section: frozen, typed; ``to_dict()`` gives its plain mapping."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


@dataclass(frozen=True)
class ModelConfig(Section):
    # reference: ImgX-DiffSeg v0.1.0's U-Net (docs/FIDELITY.md); legacy: diffseg's earlier U-Net
    # (GroupNorm, SiLU, average pooling, concatenated skips).
    arch: Arch = "reference"
    spatial_dims: int = 3
    channels: tuple[int, ...] = (32, 64, 128, 256)
    # reference: t added just before an InstanceNorm, which removes it again (the reference's
    # placement: the network ignores t); after_norm: added after it (t is used).
    time_conditioning: TimeConditioning = "reference"
    # Rematerialise each block in the backward pass (less memory, more compute); auto: only where
    # the step does not fit without it (diffseg.train.plan).
    remat: bool | Auto = False
    time_embed_dim: int = 128  # legacy network only; the reference's is 4 * channels[0]


@dataclass(frozen=True)
class DiffusionConfig(Section):
    enabled: bool = True
    prediction: PredictionName = "x0"
    # The reference's 1001-step linear schedule (num_timesteps_beta), so that 5 steps keep
    # t = 1, 251, 501, 751, 1001 exactly as its code; the paper's text says T = 1000.
    num_timesteps: int = 1001
    beta_start: float = 1e-4
    beta_end: float = 0.02
    train_steps: int = 5  # K used for training
    sample_steps: int = 5  # K used for inference
    recycle: bool = True
    # Sampling variance: fixed_large (sigma^2 = beta_k, the reference code) or beta_tilde (the
    # posterior variance, the paper's text).
    variance: VarianceName = "fixed_large"
    # epsilon prediction: x0_hat = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar) clipped to
    # [-x0_limit, x0_limit]; 0 = unclipped, the reference's x_limit: 0 (1: diffseg <= 0.1's clip).
    x0_limit: float = 0.0
    # Floor of the probabilities (x0_hat + 1) / 2 before their log, when x0_hat is not the
    # network's own softmax (epsilon prediction): the reference's EPS.
    log_eps: float = 1.0e-5


@dataclass(frozen=True)
class LossConfig(Section):
    cross_entropy: bool = True
    dice: bool = True
    eps_l2_weight: float = 0.1
    # per_sample: each sample's present classes, then the samples (the reference with one sample
    # per core); pooled: all (sample, class) pairs of the batch at once.
    dice_mean: DiceMean = "per_sample"


@dataclass(frozen=True)
class OptimConfig(Section):
    init_learning_rate: float = 1e-5
    learning_rate: float = 1e-4
    end_learning_rate: float = 1e-6
    warmup_steps: int = 100
    # Cosine decay ends here (warm-up included, as optax counts it), then the rate is held: 10 000
    # of the 12 500 steps in the reference. None: decay over all train.steps.
    decay_steps: int | None = 10000
    weight_decay: float = 1e-8
    grad_clip: float = 1.0


@dataclass(frozen=True)
class AugmentConfig(Section):
    # The reference's prostate ranges; datasets.abdominal_ct.training sets AMOS's.
    enabled: bool = True
    max_rotation: Axes = (0.088, 0.088, 0.088)  # radians about X, Y, Z
    max_translation: Axes = (20, 20, 4)  # voxels
    max_scaling: Axes = (0.15, 0.15, 0.15)  # +- fraction per axis


@dataclass(frozen=True)
class TrainConfig(Section):
    steps: int = 12500
    batch_size: int = 8  # volumes per step, in 2D too (the 2D network sees all their slices)
    # Volumes per device per pass, gradients accumulated to batch_size: None = all at once;
    # auto = the largest that fits the device (XLA's compiled memory analysis, 10 % headroom).
    micro_batch: int | None | Auto = None
    # Devices to train on: auto = the most local devices that split batch_size (and whole
    # micro-batches) evenly, e.g. 2 of 3 GPUs for a batch of 8; or an integer, exactly that many.
    devices: int | Auto = "auto"
    # Which volumes a step takes: epoch = each once per epoch in a fresh order (the reference's
    # tf.data repeat/shuffle/batch); uniform = with replacement per step.
    sampling: Sampling = "epoch"
    checkpoint_every: int = 500
    log_every: int = 10
    bf16: bool = False
    # bf16 runs: reference = the image cast to bfloat16 before augmentation, the one-hot mask and
    # the noise built in bfloat16 (as the reference); float32 = all float32 until the network's
    # input casts it.
    bf16_inputs: Bf16Inputs = "reference"
    # Where it may train: any (what JAX finds), accelerator (a GPU or a TPU), gpu, tpu or cpu; a run
    # asking for an accelerator stops on a CPU-only machine rather than train there for days
    # (DIFFSEG_ALLOW_CPU=1 lets it).
    platform: Platform = "any"
    # TensorBoard event files in the run folder as it trains (loss, lr, steps/s, validation Dice
    # per class, a mid slice at each validation): `tensorboard --logdir results/runs`.
    tensorboard: bool = True
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class EvaluateConfig(Section):
    tolerance_mm: float = 1.0
    # NSD of a class empty in exactly one mask (a miss or a false positive): nan, so left out of
    # the means as the reference averages it, or zero. Misses are counted either way.
    nsd_empty: NsdEmpty = "nan"
    batch_size: int = 1
    window_overlap: float = 0.5  # sliding windows of the training shape: the share neighbours overlap


SECTIONS = ("model", "diffusion", "loss", "optim", "train", "evaluate")
IDENTITY = ("dataset", "run", "dim", "variant", "seed")  # set by diffseg.config.resolve_run_config


@dataclass(frozen=True)
class RunConfig:
    """One run's resolved settings (sections as above) and, once resolved, its identity.

    Build it with :meth:`from_dict` (checked) rather than the constructor (not checked); change a
    copy with :meth:`replace` (``cfg.replace("diffusion.sample_steps", 1)``).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    dataset: str | None = None
    run: str | None = None
    dim: str | None = None
    variant: str | None = None
    seed: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "") -> RunConfig:
        """Build and check a run config from its mapping (every section's every key, as
        ``diffseg.config.resolve_run_config`` writes it; the identity keys may be left out).

        Raises ``ConfigError`` naming ``where`` (a file), the key path and the problem: an unknown
        or missing key, a value of the wrong type or name, or a run-level rule broken (the step
        counts within the schedule, a loss with at least one term).
        """
        prefix = f"{where}: " if where else ""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{prefix}a run config must be a mapping, got {show(data)}")
        try:
            cfg = _build(cls, data, "")
        except ConfigError as err:
            raise ConfigError(f"{prefix}{err}") from None
        cfg.check()
        return cfg

    @classmethod
    def of(cls, cfg: RunConfig | Mapping[str, Any]) -> RunConfig:
        """What the library's functions accept: ``cfg`` itself, or a mapping read as overrides of
        the defaults (``{"model": {"channels": [8, 16]}}``; the keys it gives are checked)."""
        return cfg if isinstance(cfg, RunConfig) else cls.from_dict(_merged(RunConfig().to_dict(), cfg))

    def to_dict(self) -> dict[str, Any]:
        """The plain mapping, keys in order, lists as lists; identity keys only where set."""
        out = _plain(self)
        return {k: v for k, v in out.items() if not (k in IDENTITY and v is None)}

    def replace(self, dotted: str, value: Any) -> RunConfig:
        """A copy with one key changed (``"diffusion.sample_steps"``), checked like ``from_dict``."""
        data = self.to_dict()
        *parents, last = dotted.split(".")
        node: Any = data
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            raise ConfigError(f"{dotted}: not a key of the run config")
        node[last] = value
        return RunConfig.from_dict(data)

    def check(self) -> None:
        """The rules across keys that a type cannot state (``ConfigError`` names the run)."""
        diff, loss = self.diffusion, self.loss
        for key in ("train_steps", "sample_steps"):
            if not 1 <= getattr(diff, key) <= diff.num_timesteps:
                raise ConfigError(
                    f"run {self.run!r}: diffusion.{key}={getattr(diff, key)} must lie in [1, num_timesteps]"
                )
        if not (loss.cross_entropy or loss.dice or diff.prediction == "epsilon"):
            raise ConfigError(f"run {self.run!r}: the loss is empty (no cross_entropy, dice or epsilon L2)")

    @property
    def network_multiple(self) -> int:
        """Each spatial axis the network halves must be a multiple of this: ``2**len(channels)`` for
        the reference network (a strided convolution before every level), ``2**(len(channels) - 1)``
        for the legacy one. In 2D only X and Y are halved."""
        return 2**self.halvings

    @property
    def halvings(self) -> int:
        """How many times the network halves X and Y (and Z in 3D)."""
        levels = len(self.model.channels)
        return levels if self.model.arch == "reference" else levels - 1


# What the library's functions accept: a RunConfig, or a mapping they build one from (RunConfig.of).
RunConfigLike = typing.Union[RunConfig, Mapping[str, Any]]  # noqa: UP007 (a runtime alias)


# --- Types: what a key may hold, read from the annotations above ----------------------------------
# A kind is what a config check says: "integer", "number list", "null", "auto", ...
DESCRIBE = {
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
_SCALARS = {bool: "bool", int: "integer", float: "number", str: "string", type(None): "null"}


def _kinds_and_names(tp: Any) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """``(kinds, names)`` of an annotation: ``int | None | Auto`` -> ``(("integer", "null", "auto"),
    None)``; ``Literal["x0", "epsilon"]`` -> ``(("string",), ("x0", "epsilon"))``."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        kinds: tuple[str, ...] = ()
        names = None
        for arg in get_args(tp):
            k, n = _kinds_and_names(arg)
            kinds, names = kinds + k, n or names
        return kinds, names
    if origin is Literal:
        args = get_args(tp)
        return (("auto",), None) if args == ("auto",) else (("string",), args)
    if origin is tuple:
        return (f"{_SCALARS[get_args(tp)[0]]} list",), None
    return (_SCALARS[tp],), None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


S = TypeVar("S", bound=Section)
KeyType = tuple[tuple[str, ...], tuple[str, ...] | None]  # (kinds, names)


def _leaves(cls: type = RunConfig, prefix: str = "") -> dict[str, KeyType]:
    out = {}
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaves(tp, f"{prefix}{f.name}."))
        elif prefix:  # the sections' keys, not the identity
            out[prefix + f.name] = _kinds_and_names(tp)
    return out


# "train.micro_batch" -> (("integer", "null", "auto"), None): every run-config key's kinds and names.
KEY_TYPES = _leaves()
# ("diffusion", "prediction") -> ("x0", "epsilon"): every key that takes a name.
RUN_CHOICES: dict[tuple[str, ...], tuple[str, ...]] = {
    tuple(key.split(".")): names for key, (_, names) in KEY_TYPES.items() if names
}


def as_section(cls: type[S], value: S | Mapping[str, Any]) -> S:
    """``value`` itself, or the section ``cls`` built from a mapping with ``cls``'s defaults for the
    keys it leaves out (a library caller's ``{"num_timesteps": 1000, ...}``), checked like a run's."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a {cls.__name__} or a mapping of its keys, got {show(value)}")
    prefix = {c: f"{name}." for name, c in _hints(RunConfig).items()}.get(cls, "train.augment.")
    return _build(cls, {**_plain(cls()), **value}, prefix)


def defaults() -> dict[str, Any]:
    """Every section's defaults as a plain mapping (``diffseg.config.BASE``)."""
    return {k: v for k, v in RunConfig().to_dict().items() if k in SECTIONS}


def is_kind(value: Any, kind: str) -> bool:
    """Whether ``value`` is of ``kind`` (YAML's true is not the integer 1; an integer is a number)."""
    if kind == "null":
        return value is None
    if kind == "auto":
        return value == "auto"
    if kind == "bool":
        return isinstance(value, bool | np.bool_)
    if isinstance(value, bool | np.bool_):
        return False
    if kind == "integer":
        return isinstance(value, numbers.Integral)
    if kind == "number":
        return isinstance(value, numbers.Real)
    if kind == "string":
        return isinstance(value, str)
    if kind.endswith(" list"):
        item = kind.removesuffix(" list")
        return isinstance(value, list | tuple) and all(is_kind(v, item) for v in value)
    raise AssertionError(kind)


def show(value: Any) -> str:
    """``str 'ten'``, ``int 3``, ``null``: a value for an error message (numpy scalars as Python's)."""
    if value is None:
        return "null"
    if isinstance(value, np.generic):
        value = value.item()
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _yaml_float(text: str) -> str:
    """``1e-4`` -> ``1.0e-4``: how YAML 1.1 (PyYAML, Snakemake) reads the number as a float."""
    mantissa, _, exponent = text.strip().lower().partition("e")
    if exponent and "." not in mantissa:
        mantissa += ".0"
    if exponent and exponent[0] not in "+-":
        exponent = "+" + exponent
    return f"{mantissa}e{exponent}" if exponent else mantissa


def check_value(value: Any, key: str, where: str) -> None:
    """``value`` for the run-config key ``key`` (``"train.steps"``): its type and, where the key
    takes a name, one of its names; ``ConfigError`` says ``where`` and what was expected."""
    kinds, names = KEY_TYPES[key]
    if not any(is_kind(value, kind) for kind in kinds):
        msg = f"{where} must be {' or '.join(DESCRIBE[k] for k in kinds)}, got {show(value)}"
        if isinstance(value, str) and any(k in ("number", "integer") for k in kinds):
            try:
                float(value)
            except ValueError:
                pass
            else:  # YAML 1.1 reads 1e-4 (no dot, unsigned exponent) as a string
                msg += f" (YAML reads {value} as a string: write {_yaml_float(value)})"
        raise ConfigError(msg)
    if names is not None and isinstance(value, str) and value not in names:
        raise ConfigError(f"{where} must be one of {', '.join(names)}, got {value!r}")


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{prefix}{key}"
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(names)}")
    values = {}
    for name in names:
        path = f"{prefix}{name}"
        tp = _hints(cls)[name]
        if name not in data:
            if cls is RunConfig and name in IDENTITY:
                continue
            raise ConfigError(f"{path}: missing (a run config states every key; see diffseg.runconfig)")
        value = data[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path} must be a mapping of {name} keys, got {show(value)}")
            values[name] = _build(tp, value, f"{path}.")
        elif cls is RunConfig:  # identity: a name, or the seed
            values[name] = value
        else:
            check_value(value, path, path)
            values[name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


# Settings that change what is logged, validated or how long it trains, not the parameters of a
# given step: changing them continues the run instead of starting it over. ``devices`` only splits
# a step's arithmetic (the same update up to float rounding): a run continues on another count.
NOT_HASHED = {"train": ("steps", "log_every", "checkpoint_every", "platform", "devices", "tensorboard")}


def config_hash(run_cfg: RunConfigLike) -> str:
    """What the trained parameters of a step depend on (not logging, evaluation or run length).

    Computed on the plain mapping (:meth:`RunConfig.to_dict`), as saved in ``config.yaml``; the
    workflow's status reads it without jax, training stores it with every checkpoint."""
    if isinstance(run_cfg, RunConfig):
        run_cfg = run_cfg.to_dict()
    keys = ("model", "diffusion", "loss", "optim", "train", "dataset")
    chosen = {k: run_cfg.get(k) for k in keys}
    for section, names in NOT_HASHED.items():
        chosen[section] = {k: v for k, v in (chosen.get(section) or {}).items() if k not in names}
    text = json.dumps(chosen, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _merged(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over``'s keys over ``base``'s, section by section (a value that is not a section replaces)."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, Mapping) and isinstance(base.get(key), dict)
        out[key] = _merged(base[key], value) if both else value
    return out


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    return obj
