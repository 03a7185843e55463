"""``diffseg plan``: what a run will train, and what one step costs, before any accelerator time is spent.

For a workflow config, a dataset and a run it prints the resolved run config, the network and
its parameter count (``parameters: N``), what one training step consumes (volumes, slices,
shape, forward passes) and XLA's compiled plan of that step on this machine's default backend,
without running it: FLOPs and the bytes per device (arguments, outputs, temporaries).

The step is compiled on abstract arrays (``jax.ShapeDtypeStruct``), so nothing of the size of
the data is allocated, and the dataset need not be downloaded: shapes and classes come from
the config (or from the prepared ``dataset.json`` when it exists). Convolutions are compiled
with ``conv_impl="xla"``: the CPU's oneDNN custom calls are opaque to XLA's cost analysis, and
on a GPU the plan is that of the convolutions training would use anyway.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffseg.accelerators.memory import Budget, budget_for, step_budget
from diffseg.config import resolve_run
from diffseg.data.phantom import CLASSES
from diffseg.diffusion import GaussianDiffusion
from diffseg.errors import ConfigError
from diffseg.parallel import batch_sharding, data_mesh, replicated, training_devices
from diffseg.runconfig import RunConfig, RunConfigLike
from diffseg.runs import build_model, count_parameters, init_params
from diffseg.train.step import build_optimizer, check_micro_batch, init_state, make_train_step

# Training cases of the downloaded datasets (docs/DEFINITIONS.md, Datasets), for the plan's data bytes.
KNOWN_TRAIN_CASES = {"prostate_mr": 411, "abdominal_ct": 200}
UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20,
         "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_bytes(text: str) -> int:
    """``"24GB"`` → 24e9, ``"16GiB"`` → 16·2^30, ``"80 GB"``, ``"1e9"``; errors name the value."""
    s = str(text).strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number) :]
    try:
        if unit not in UNITS:
            raise ValueError
        return int(float(number) * UNITS[unit])
    except ValueError:
        raise ConfigError(f"--device-memory {text!r}: expected a size such as 24GB or 16GiB") from None


def dataset_classes(name: str, ds_cfg: Mapping[str, Any], results: str | Path) -> list[str]:
    """Class names (background first): the prepared ``dataset.json`` if any, else from the source."""
    prepared = Path(results) / "data" / name / "dataset.json"
    if prepared.is_file():
        return list(json.loads(prepared.read_text())["classes"])
    source = ds_cfg.get("source")
    if source == "phantom":
        return list(CLASSES[ds_cfg.get("anatomy", "pelvis")])
    if source == "prostate_mr":
        return list(CLASSES["pelvis"])  # the record's 8 classes, as the prostate source lists them
    if source == "abdominal_ct":
        return list(CLASSES["abdomen"])  # AMOS's 15 organs
    if source == "msd":
        from diffseg.data.sources import msd_source

        return msd_source(name, ds_cfg).classes
    raise ConfigError(f"datasets.{name}.source: {source!r} is not a known source")


def train_cases(name: str, ds_cfg: Mapping[str, Any], results: str | Path) -> int:
    """Number of training volumes (the prepared split, the config's counts, or the known split)."""
    prepared = Path(results) / "data" / name / "dataset.json"
    if prepared.is_file():
        return int(json.loads(prepared.read_text())["splits"]["train"])
    split = ds_cfg.get("split")
    if isinstance(split, Mapping) and "train" in split:
        return int(split["train"])
    if ds_cfg.get("source") in KNOWN_TRAIN_CASES:
        return KNOWN_TRAIN_CASES[ds_cfg["source"]]
    raise ConfigError(f"datasets.{name}.split.train: needed to plan (or prepare the dataset first)")


def device_memory_bytes(device: Any = None) -> int | None:
    """What XLA's allocator holds on ``device`` (default: the first local one).

    An accelerator's ``memory_stats()["bytes_limit"]`` (a GPU's: already the allocator's share of
    the card; a TPU's: the HBM a program may use; ``diffseg.accelerators.memory``); on the CPU the
    machine's physical memory. ``None`` when
    neither is known.
    """
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def card_budget(card_bytes: int) -> int:
    """Bytes a step may plan on a GPU card of ``card_bytes`` (``--device-memory``): the
    allocator's share of the card, less headroom. Training on that card reads the allocator's
    share back (``device_memory_bytes``) and reaches the same number (``device_budget``)."""
    return budget_for(card_bytes).bytes


def device_budget(device: Any = None) -> int | None:
    """Bytes a step may plan on the local ``device`` (training's ``micro_batch: auto``)."""
    limit = device_memory_bytes(device)
    return None if limit is None else step_budget(limit, (device or jax.local_devices()[0]).platform)


def _hlo_cost(lowered: Any) -> dict[str, float]:
    """XLA's cost analysis of the step's HLO before optimisation (the math as written, remat's
    recomputation included), by the CPU client: a compile-only GPU device has none."""
    from jax._src.lib import _jax

    module = lowered.compiler_ir("hlo").as_hlo_module()
    return dict(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module))


def _abstract(tree: Any, sharding: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


# The TPU compiler's words for a program larger than the HBM, e.g. "RESOURCE_EXHAUSTED: Ran out of
# memory on HBM, the total memory required for HLO temporaries (18.00G) exceeds available HBM
# (15.48G)" (libtpu 0.0.42), or "Used 20.61G of 15.48G hbm" (older releases).
_NEEDED = re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available|Used ([\d.]+)([KMGT]?) of")
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory(error: Exception) -> int | None:
    """The bytes a program needs when its compiler refused it for want of device memory (0 when it
    did not say how many), else ``None``.

    The TPU compiler assigns every buffer at compile time and refuses a program larger than the
    HBM: for a plan, that is a step that does not fit, not a failure."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    found = _NEEDED.search(text)
    if not found:
        return 0
    number, unit = (found.group(1), found.group(2)) if found.group(1) else (found.group(3), found.group(4))
    return int(float(number) * _UNIT[unit])


def _compile(lowered: Any, compiler_options: dict[str, Any] | None) -> tuple[Any, int | None]:
    """``(compiled, None)``, or ``(None, bytes needed)`` when the compiler ran out of device memory."""
    try:
        return lowered.compile(compiler_options=compiler_options), None
    except Exception as err:  # the TPU compiler's out-of-memory is a JaxRuntimeError
        needed = out_of_memory(err)
        if needed is None:
            raise
        return None, needed


def step_memory(
    model: Any,
    tx: Any,
    run_cfg: RunConfigLike,
    num_classes: int,
    mesh: Any,
    volume_shape: tuple[int, ...],
    micro_batch: int,
    compiler_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compile (never run) the train step with ``micro_batch`` volumes per device per pass, on
    abstract arrays placed on ``mesh`` (this machine's devices, or a target's compile-only devices,
    ``diffseg.accelerators.targets.target_mesh``); the compiler's FLOPs and bytes per device
    (``argument``: the state and the device's share of the step's ``B`` volumes ``(B, X, Y, Z)``;
    ``temp``: what one micro-batch pass needs; ``total`` counts the donated, aliased state once).

    ``flops`` is per device (XLA's count of the partitioned program, times the passes),
    ``flops_per_step`` over every device. ``estimate_s`` is the compiler's own estimate of the
    step's time where it gives one (the TPU compiler's ``optimal_seconds``), ``None`` otherwise or
    when not positive. A program the compiler refuses for want of memory (the TPU's) is a row with
    ``compiled: False`` and the bytes it said it needs."""
    run_cfg = RunConfig.of(run_cfg)
    step = make_train_step(model, tx, run_cfg, num_classes, mesh, micro_batch)
    whole = replicated(mesh)
    state = _abstract(jax.eval_shape(lambda: init_state(model, tx, volume_shape, jax.random.key(0))), whole)
    batch = run_cfg.train.batch_size
    split = batch_sharding(mesh)
    images = jax.ShapeDtypeStruct((batch, *volume_shape), jnp.float32, sharding=split)
    labels = jax.ShapeDtypeStruct((batch, *volume_shape), jnp.uint8, sharding=split)
    key = _abstract(jax.eval_shape(lambda: jax.random.key(0)), whole)
    lowered = step.lower(state, images, labels, key)
    passes = batch // (mesh.size * int(micro_batch))
    out: dict[str, Any] = {
        "backend": mesh.devices.flat[0].platform,
        "devices": mesh.size,
        "micro_batch": int(micro_batch),
        "passes": passes,
        "remat": bool(getattr(model, "remat", False)),
    }
    compiled, needed = _compile(lowered, compiler_options)
    if compiled is None:
        nothing = {f"{n}_bytes": 0 for n in ("argument", "output", "temp", "alias")}
        return {**out, **nothing, "total_bytes": needed, "compiled": False, "flops": None,
                "flops_per_step": None, "flops_of": "none", "estimate_s": None}  # fmt: skip
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    flops_of = "compiled"
    if "flops" not in cost:  # the GPU compiler without a GPU has no cost analysis: count the HLO's
        cost = {**_hlo_cost(lowered), "optimal_seconds": None}
        flops_of = "lowered"
    # XLA's cost analysis counts a loop's body once: the micro-batch scan runs it ``passes`` times.
    out["flops"] = float(cost.get("flops", np.nan)) * passes
    out["flops_per_step"] = out["flops"] * mesh.size
    out["flops_of"] = flops_of
    seconds = cost.get("optimal_seconds")
    out["estimate_s"] = float(seconds) * passes if seconds is not None and seconds > 0 else None
    memory = compiled.memory_analysis()
    for name in ("argument", "output", "temp", "alias"):
        out[f"{name}_bytes"] = int(getattr(memory, f"{name}_size_in_bytes", 0) or 0)
    # Donated state is aliased to the output: count it once.
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    out["compiled"] = True
    return out


@dataclass
class MicroBatchChoice:
    """What ``choose_micro_batch`` settled on: volumes per device per pass, the network to build
    the step with (remat as resolved), and the compiler's plan of that step when compiled."""

    micro_batch: int
    model: Any
    how: str  # "config" | "auto"
    budget: int | None = None  # bytes a step may plan per device (diffseg.accelerators.memory)
    xla: dict[str, Any] | None = None
    tried: list[dict[str, Any]] = field(default_factory=list)
    rule: Budget | None = None  # how a target's budget was reached

    @property
    def fits(self) -> bool | None:
        if self.budget is None or self.xla is None:
            return None
        return _fits(self.xla, self.budget)

    def describe(self) -> str:
        """One line for a training job's log: the micro-batch, remat, and auto's memory."""
        remat = bool(getattr(self.model, "remat", False))
        text = (
            f"micro-batch: {self.micro_batch} volume(s) per device per pass, remat {'on' if remat else 'off'}"
        )
        if self.how == "auto" and self.xla is not None:
            text += f" (auto: {_gib(self.xla['total_bytes'])} of {_gib(self.budget or 0)} per device)"
        return text


def _fits(row: dict[str, Any], budget: int) -> bool:
    return bool(row.get("compiled", True)) and row["total_bytes"] <= budget


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _remat_options(model: Any, value: Any) -> list[bool]:
    """``model.remat`` values to consider, preferred first: ``auto`` tries off, then on."""
    if not hasattr(model, "remat") or not hasattr(model, "clone"):
        return [False]  # the legacy network has no remat
    if value == "auto":
        return [False, True]
    return [bool(value)]


def _row(plan: dict[str, Any]) -> str:
    needs = "" if plan.get("compiled", True) else " (the compiler ran out of memory)"
    return (
        f"{plan['micro_batch']} volume(s) per pass, remat {'on' if plan['remat'] else 'off'}: "
        f"{_gib(plan['total_bytes'])}{needs}"
    )


class _Planner:
    """Compiles the step for (network, micro-batch) pairs once each, remembering every plan."""

    def __init__(self, measure: Any) -> None:
        self.measure = measure
        self.tried: list[dict[str, Any]] = []

    def __call__(self, net: Any, m: int) -> dict[str, Any]:
        remat = bool(getattr(net, "remat", False))
        done = [t for t in self.tried if t["micro_batch"] == m and t["remat"] == remat]
        if done:
            return done[0]
        plan = self.measure(net, m)
        self.tried.append(plan)
        return plan


def _search(planner: _Planner, nets: list[Any], candidates: list[int], budget: int, every: bool):
    """The first (network, micro-batch, plan) whose plan fits ``budget``, preferring the first
    networks and the largest micro-batches; ``None`` when nothing fits.

    One volume per pass gives a linear guess (fixed bytes + m × one volume's temporaries) for the
    largest m, which is then compiled to check, and lowered until it fits."""
    for net in nets:
        smallest = planner(net, candidates[-1])
        if not _fits(smallest, budget):
            continue
        fixed = smallest["total_bytes"] - smallest["temp_bytes"]
        per_volume = max(smallest["temp_bytes"] // candidates[-1], 1)
        guess = max(candidates[-1], int((budget - fixed) // per_volume))
        for m in candidates:
            if m > guess and m != candidates[-1] and not every:
                continue
            plan = planner(net, m)
            if _fits(plan, budget):
                return net, m, plan
    return None


def choose_micro_batch(
    model: Any,
    tx: Any,
    run_cfg: RunConfigLike,
    num_classes: int,
    mesh: Any,
    volume_shape: tuple[int, ...],
    device_memory: int | None = None,
    budget: int | None = None,
    every: bool = False,
    compiler_options: dict[str, Any] | None = None,
) -> MicroBatchChoice:
    """Resolve ``train.micro_batch`` and ``model.remat`` together.

    Integers/booleans are taken as they are (validated; nothing compiled). ``auto`` compiles the
    step (never runs it) and takes, preferring remat off (it costs a second forward pass), the
    largest micro-batch dividing ``batch_size / devices`` whose plan fits ``budget`` bytes per
    device: by default the local device's (``device_budget``), or that of a GPU card of
    ``device_memory`` bytes (``card_budget``): one rule, ``diffseg.accelerators.memory``. Remat is
    switched on only when no micro-batch fits without it. Nothing fitting is a ``ConfigError``
    with the numbers. ``every`` compiles every candidate (``diffseg plan``'s table) instead of the
    few the search needs.
    """
    run_cfg = RunConfig.of(run_cfg)
    micro, remat_value = run_cfg.train.micro_batch, run_cfg.model.remat
    rematted = _remat_options(model, remat_value)
    nets = [model.clone(remat=r) if hasattr(model, "remat") else model for r in rematted]
    per_device = check_micro_batch(run_cfg.replace("train.micro_batch", None), mesh.size)
    if micro == "auto":
        candidates = _divisors_desc(per_device)
    else:
        candidates = [check_micro_batch(run_cfg, mesh.size, micro)]
    auto = micro == "auto" or remat_value == "auto"
    if budget is None and device_memory is not None:
        budget = card_budget(device_memory)
    if not auto and not every:
        return MicroBatchChoice(candidates[0], nets[0], "config", budget)
    budget = device_budget() if budget is None else budget
    if budget is None:
        raise ConfigError("train.micro_batch/model.remat: auto needs the device's memory, unknown here")
    planner = _Planner(
        lambda net, m: step_memory(net, tx, run_cfg, num_classes, mesh, volume_shape, m, compiler_options)
    )
    if every:  # the table shows both remat settings and every micro-batch
        others = [model.clone(remat=not rematted[0])] if hasattr(model, "remat") and len(nets) == 1 else []
        for net in nets + others:
            for m in _divisors_desc(per_device):
                planner(net, m)
    if not auto:
        return MicroBatchChoice(candidates[0], nets[0], "config", budget, planner(nets[0], candidates[0]),
                                planner.tried)  # fmt: skip
    found = _search(planner, nets, candidates, budget, every)
    if found is not None:
        net, m, plan = found
        return MicroBatchChoice(m, net, "auto", budget, plan, planner.tried)
    # A refusal that did not say the bytes it needed (0) is no candidate for "the smallest".
    sized = [t for t in planner.tried if t["compiled"] or t["total_bytes"]]
    best = min(sized or planner.tried, key=lambda t: t["total_bytes"])
    raise ConfigError(
        f"train.micro_batch/model.remat: no plan of the step fits {_gib(budget)} per device "
        f"(the smallest: {_row(best)}); tried "
        + "; ".join(_row(t) for t in planner.tried)
        + ". Lower train.batch_size, shrink datasets.*.shape, or use a larger device"
    )


def xla_plan(
    run_cfg: RunConfigLike,
    num_classes: int,
    volume_shape: tuple[int, ...],
    device_memory: int | None = None,
    target: Any = None,
    every: bool = False,
) -> tuple[MicroBatchChoice, dict[str, Any]]:
    """The run's step as training would build it (micro-batch and remat resolved for a card of
    ``device_memory`` bytes, for a ``diffseg.accelerators.targets`` target over all its devices,
    or for this machine), compiled, never run; the compiler's FLOPs and bytes per device."""
    run_cfg = RunConfig.of(run_cfg)
    model = build_model(run_cfg, num_classes, conv_impl="xla")
    tx, _ = build_optimizer(run_cfg)
    rule, options = None, None
    if target is not None:
        from diffseg.accelerators.targets import compiler_options, target_mesh

        mesh, options = target_mesh(target), compiler_options(target)
        rule = target_budget(target, mesh)
    else:
        mesh = data_mesh(training_devices(run_cfg)[0])  # the devices training would use
        if device_memory is not None:
            rule = budget_for(device_memory)
    budget = None if rule is None else rule.bytes
    choice = choose_micro_batch(
        model, tx, run_cfg, num_classes, mesh, volume_shape, device_memory, budget, every, options
    )
    choice.rule = rule
    if choice.xla is None:
        choice.xla = step_memory(
            choice.model, tx, run_cfg, num_classes, mesh, volume_shape, choice.micro_batch, options
        )
    return choice, choice.xla


def target_budget(target: Any, mesh: Any) -> Budget:
    """A target's step budget per device: a card's memory × JAX's allocator share × (1 − headroom);
    a TPU slice's usable HBM as libtpu says it (its spec HBM if libtpu does not) × (1 − headroom)."""
    if target.platform != "tpu":
        return budget_for(target.memory_bytes, target.platform)
    from diffseg.accelerators.tpu import usable_hbm

    usable = usable_hbm(target, mesh)
    if usable is None:
        return budget_for(
            target.memory_bytes, "tpu", source="the spec's HBM; libtpu did not say what is usable"
        )
    return budget_for(usable, "tpu", source=f"libtpu's usable HBM of {target.memory_bytes / 2**30:.0f} GiB")


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


# --- the plan of one run: its facts, then their text (diffseg.train.plan_text) ----------------------


def _run_facts(config: Mapping[str, Any], dataset: str, run: str, run_cfg: RunConfig) -> dict[str, Any]:
    """What the run trains: its config, network, parameters and one step's consumption."""
    ds_cfg = config["datasets"][dataset]
    classes = dataset_classes(dataset, ds_cfg, config.get("results", "results"))
    shape = tuple(int(s) for s in ds_cfg.get("shape") or ())
    if len(shape) != 3:
        raise ConfigError(f"datasets.{dataset}.shape: needed to plan, as [X, Y, Z] voxels")
    model = build_model(run_cfg, len(classes))
    params = jax.eval_shape(lambda: init_params(model, shape, jax.random.key(0)))
    diff_cfg, train_cfg = run_cfg.diffusion, run_cfg.train
    batch, dims = train_cfg.batch_size, run_cfg.model.spatial_dims
    facts: dict[str, Any] = {
        "dataset": dataset, "run": run, "classes": len(classes), "parameters": count_parameters(params),
        "volumes_per_step": batch, "volume_shape": list(shape),
        "slices_per_step": batch * shape[2] if dims == 2 else None,
        "run_config": run_cfg.to_dict(),
        "network": {"arch": run_cfg.model.arch, "dims": dims, "diffusion": diff_cfg.enabled,
                    "channels": list(run_cfg.model.channels),
                    "time_conditioning": run_cfg.model.time_conditioning},
        "bf16": train_cfg.bf16, "steps": train_cfg.steps,
    }  # fmt: skip
    if diff_cfg.enabled:
        d = GaussianDiffusion.from_config(diff_cfg)
        facts["diffusion"] = {"steps": d.num_steps, "timesteps": [int(t) for t in d.timesteps],
                              "recycle": diff_cfg.recycle}  # fmt: skip
        facts["forward_passes"] = 2 if diff_cfg.recycle else 1
    return facts


def _compiled_facts(run_cfg: RunConfig, facts: dict[str, Any], config: Mapping[str, Any],
                    device_memory: int | None, target: Any, every: bool) -> dict[str, Any]:  # fmt: skip
    """The compiler's plan of the step (every micro-batch when ``every`` and a device's memory is known)."""
    dataset = facts["dataset"]
    ds_cfg = config["datasets"][dataset]
    n_train = train_cases(dataset, ds_cfg, config.get("results", "results"))
    shape = tuple(facts["volume_shape"])
    card = target.memory_bytes if target is not None else device_memory
    choice, xla = xla_plan(
        run_cfg, facts["classes"], shape, device_memory, target, every and card is not None
    )
    out: dict[str, Any] = {
        "xla": xla, "micro_batch": choice.micro_batch, "remat": xla["remat"],
        "host_data_bytes": n_train * int(np.prod(shape)) * 5,  # float32 images + uint8 labels
        "train_cases": n_train,
        "micro_batch_how": "auto" if run_cfg.train.micro_batch == "auto" else "config",
        "remat_how": "auto" if run_cfg.model.remat == "auto" else "config",
        "tried": [
            {k: t[k] for k in ("micro_batch", "remat", "temp_bytes", "total_bytes", "flops", "flops_per_step",
                               "estimate_s", "compiled")}
            for t in (choice.tried or [xla])
        ],
    }  # fmt: skip
    if choice.rule is not None:
        rule = choice.rule
        out.update(card_bytes=card, usable_bytes=int(rule.device_bytes * rule.share), budget_bytes=rule.bytes,
                   budget_rule=rule.explain(), fits=_fits(xla, rule.bytes))  # fmt: skip
    if xla.get("estimate_s"):
        out["estimate_hours"] = xla["estimate_s"] * run_cfg.train.steps / 3600
    return out


def plan(
    config: Mapping[str, Any],
    dataset: str,
    run: str,
    overrides: Mapping[str, Any] | None = None,
    compile_step: bool = True,
    device_memory: int | None = None,
    target: Any = None,
    every: bool = True,
) -> tuple[dict[str, Any], str]:
    """The plan of one run: ``(facts, text)``; ``facts`` holds every number the text prints, and
    the text is made from the facts alone (``diffseg.train.plan_text.render``).

    ``device_memory`` (a GPU card's bytes) or ``target`` (a ``diffseg.accelerators.targets``
    card or TPU slice, compiled for here by its own compiler) also plans every micro-batch, with
    and without remat (``every=False``: only those the choice needs), and says which training's
    ``auto`` would take there."""
    from diffseg.train.plan_text import render

    if device_memory is not None and target is not None:
        raise ConfigError("--device-memory and --target: give one (a target knows its memory)")
    run_cfg = resolve_run(config, dataset, run, overrides)
    facts = _run_facts(config, dataset, run, run_cfg)
    if target is not None:
        facts["target"] = target.facts()
        facts["compiled_by"] = target.compiler
        facts["target_summary"] = target.summary()
        facts["versions"] = _versions(target.platform)
        if run_cfg.train.bf16 and not target.has_bf16:
            facts["bf16_warning"] = True
    if compile_step:
        facts.update(_compiled_facts(run_cfg, facts, config, device_memory, target, every))
    return facts, render(facts)


def _versions(platform: str) -> dict[str, str | None]:
    """jax's version and that of the package holding the target's compiler, for the record."""
    from importlib.metadata import PackageNotFoundError, version

    package = "libtpu" if platform == "tpu" else "jax-cuda12-plugin"
    try:
        compiler = version(package)
    except PackageNotFoundError:  # not installed: the target path needs it, so this is only for the record
        compiler = None
    return {"jax": jax.__version__, "tpu_compiler" if platform == "tpu" else "cuda_plugin": compiler}
