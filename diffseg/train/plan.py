"""``diffseg plan``: what a run will train, and what one step costs, before any GPU time is spent.

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from diffseg.accelerators.memory import (
    HEADROOM,
    MEM_FRACTION_VAR,
    allocator_bytes,
    memory_fraction,
    step_budget,
)
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

    An accelerator's ``memory_stats()["bytes_limit"]`` (already the allocator's share of the card,
    ``diffseg.accelerators.memory``); on the CPU the machine's physical memory. ``None`` when
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
    """Bytes a step may plan on a card of ``card_bytes`` (``--device-memory``, ``--target``): the
    allocator's share of the card, less headroom. Training on that card reads the allocator's
    share back (``device_memory_bytes``) and reaches the same number (``device_budget``)."""
    return step_budget(allocator_bytes(card_bytes))


def device_budget(device: Any = None) -> int | None:
    """Bytes a step may plan on the local ``device`` (training's ``micro_batch: auto``)."""
    limit = device_memory_bytes(device)
    return None if limit is None else step_budget(limit)


def _hlo_cost(lowered: Any) -> dict[str, float]:
    """XLA's cost analysis of the step's HLO before optimisation (the math as written, remat's
    recomputation included), by the CPU client: a compile-only GPU device has none."""
    from jax._src.lib import _jax

    module = lowered.compiler_ir("hlo").as_hlo_module()
    return dict(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module))


def _abstract(tree: Any, sharding: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


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
    abstract arrays placed on ``mesh`` (this machine's devices, or a GPU target's compile-only
    device, ``diffseg.accelerators.targets.target_mesh``); XLA's FLOPs and bytes per device
    (``argument``: the state and the step's ``B`` volumes ``(B, X, Y, Z)``; ``temp``: what one
    micro-batch pass needs; ``total`` counts the donated, aliased state once)."""
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
    compiled = lowered.compile(compiler_options=compiler_options)
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    flops_of = "compiled"
    if "flops" not in cost:  # the GPU compiler without a GPU has no cost analysis: count the HLO's
        cost = _hlo_cost(lowered)
        flops_of = "lowered"
    memory = compiled.memory_analysis()
    passes = batch // (mesh.size * int(micro_batch))
    out = {
        "backend": mesh.devices.flat[0].platform,
        "devices": mesh.size,
        "micro_batch": int(micro_batch),
        "passes": passes,
        "remat": bool(getattr(model, "remat", False)),
        # XLA's cost analysis counts a loop's body once: the micro-batch scan runs it ``passes`` times.
        "flops": float(cost.get("flops", np.nan)) * passes,
        "flops_of": flops_of,
    }
    for name in ("argument", "output", "temp", "alias"):
        out[f"{name}_bytes"] = int(getattr(memory, f"{name}_size_in_bytes", 0) or 0)
    # Donated state is aliased to the output: count it once.
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


@dataclass
class MicroBatchChoice:
    """What ``choose_micro_batch`` settled on: volumes per device per pass, the network to build
    the step with (remat as resolved), and XLA's plan of that step when compiled."""

    micro_batch: int
    model: Any
    how: str  # "config" | "auto"
    budget: int | None = None  # bytes a step may plan per device (diffseg.accelerators.memory.step_budget)
    xla: dict[str, Any] | None = None
    tried: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        if self.budget is None or self.xla is None:
            return None
        return self.xla["total_bytes"] <= self.budget

    def describe(self) -> str:
        remat = bool(getattr(self.model, "remat", False))
        text = (
            f"micro-batch: {self.micro_batch} volume(s) per device per pass, remat {'on' if remat else 'off'}"
        )
        if self.how == "auto" and self.xla is not None:
            text += f" (auto: {_gib(self.xla['total_bytes'])} of {_gib(self.budget or 0)} per device)"
        return text


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
    return (
        f"{plan['micro_batch']} volume(s) per pass, remat {'on' if plan['remat'] else 'off'}: "
        f"{_gib(plan['total_bytes'])}"
    )


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
    device: by default the local device's (``device_budget``), or that of a card of
    ``device_memory`` bytes (``card_budget``): one rule, ``diffseg.accelerators.memory``. Remat is switched
    on only when no micro-batch fits without it. Nothing fitting is a ``ConfigError`` with the
    numbers. ``every`` compiles every candidate (``diffseg plan``'s table) instead of the few the
    search needs: one volume per pass gives a linear guess (fixed bytes + m × one volume's
    temporaries) for the largest m, which is then compiled to check, and lowered until it fits.
    """
    run_cfg = RunConfig.of(run_cfg)
    micro = run_cfg.train.micro_batch
    remat_value = run_cfg.model.remat
    rematted = _remat_options(model, remat_value)
    nets = [model.clone(remat=r) if hasattr(model, "remat") else model for r in rematted]
    per_device = check_micro_batch(run_cfg.replace("train.micro_batch", None), mesh.size)
    if micro == "auto":
        candidates = _divisors_desc(per_device)
    else:
        candidates = [check_micro_batch(run_cfg, mesh.size, micro)]
    auto = micro == "auto" or remat_value == "auto"
    if budget is None:
        budget = card_budget(device_memory) if device_memory is not None else None
    if not auto and not every:
        return MicroBatchChoice(candidates[0], nets[0], "config", budget)
    if budget is None:
        budget = device_budget()
    if budget is None:
        raise ConfigError("train.micro_batch/model.remat: auto needs the device's memory, unknown here")
    if every and hasattr(model, "remat") and len(nets) == 1:  # the table shows both
        nets = nets + [model.clone(remat=not rematted[0])]
    tried: list[dict[str, Any]] = []

    def measure(net: Any, m: int) -> dict[str, Any]:
        plan = step_memory(net, tx, run_cfg, num_classes, mesh, volume_shape, m, compiler_options)
        tried.append(plan)
        return plan

    if every:
        for net in nets:
            for m in _divisors_desc(per_device):
                measure(net, m)
    if not auto:
        config = next(t for t in tried if t["micro_batch"] == candidates[0] and t["remat"] == rematted[0])
        return MicroBatchChoice(candidates[0], nets[0], "config", budget, config, tried)

    def plan_of(net: Any, m: int) -> dict[str, Any]:
        remat = bool(getattr(net, "remat", False))
        done = [t for t in tried if t["micro_batch"] == m and t["remat"] == remat]
        return done[0] if done else measure(net, m)

    for net in nets[: len(rematted)]:
        smallest = plan_of(net, candidates[-1])
        if smallest["total_bytes"] > budget:
            continue
        fixed = smallest["total_bytes"] - smallest["temp_bytes"]
        per_volume = max(smallest["temp_bytes"] // candidates[-1], 1)
        guess = max(candidates[-1], int((budget - fixed) // per_volume))
        for m in candidates:
            if m > guess and m != candidates[-1] and not every:
                continue
            plan = plan_of(net, m)
            if plan["total_bytes"] <= budget:
                return MicroBatchChoice(m, net, "auto", budget, plan, tried)
    best = min(tried, key=lambda t: t["total_bytes"])
    raise ConfigError(
        f"train.micro_batch/model.remat: no plan of the step fits {_gib(budget)} per device "
        f"(the smallest: {_row(best)}); tried "
        + "; ".join(_row(t) for t in tried)
        + ". Lower train.batch_size, shrink datasets.*.shape, or use a larger device"
    )


def _flops_how(passes: int, lowered: bool) -> str:
    """How the plan's FLOPs were counted, in one bracket."""
    how = [f"XLA's count of one pass × {passes} passes"] if passes > 1 else []
    how += ["counted on the step's HLO before optimisation"] if lowered else []
    return f" ({'; '.join(how)})" if how else ""


def xla_plan(
    run_cfg: RunConfigLike,
    num_classes: int,
    volume_shape: tuple[int, ...],
    device_memory: int | None = None,
    target: Any = None,
    every: bool = False,
) -> tuple[MicroBatchChoice, dict[str, Any]]:
    """The run's step as training would build it (micro-batch and remat resolved for a card of
    ``device_memory`` bytes, for a ``diffseg.accelerators.targets.GpuTarget``, or for this machine),
    compiled, never run; XLA's FLOPs and bytes per device."""
    run_cfg = RunConfig.of(run_cfg)
    model = build_model(run_cfg, num_classes, conv_impl="xla")
    tx, _ = build_optimizer(run_cfg)
    budget, options = None, None
    if target is not None:
        from diffseg.accelerators.targets import COMPILER_OPTIONS, target_mesh

        mesh, budget, options = target_mesh(target), card_budget(target.memory_bytes), COMPILER_OPTIONS
    else:
        mesh = data_mesh(training_devices(run_cfg)[0])  # the devices training would use
    choice = choose_micro_batch(
        model, tx, run_cfg, num_classes, mesh, volume_shape, device_memory, budget, every, options
    )
    if choice.xla is None:
        choice.xla = step_memory(
            choice.model, tx, run_cfg, num_classes, mesh, volume_shape, choice.micro_batch, options
        )
    return choice, choice.xla


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def plan(
    config: Mapping[str, Any],
    dataset: str,
    run: str,
    overrides: Mapping[str, Any] | None = None,
    compile_step: bool = True,
    device_memory: int | None = None,
    target: Any = None,
) -> tuple[dict[str, Any], str]:
    """The plan of one run: ``(facts, text)``; ``facts`` holds every number the text prints.

    ``device_memory`` (a card's bytes) or ``target`` (a ``diffseg.accelerators.targets.GpuTarget``, compiled
    for with XLA's GPU compiler here) also plans every micro-batch, with and without remat, and
    says which training's ``auto`` would take on that card."""
    if device_memory is not None and target is not None:
        raise ConfigError("--device-memory and --target: give one (a target knows its memory)")
    run_cfg = resolve_run(config, dataset, run, overrides)
    ds_cfg = config["datasets"][dataset]
    results = config.get("results", "results")
    classes = dataset_classes(dataset, ds_cfg, results)
    num_classes = len(classes)
    shape = tuple(int(s) for s in ds_cfg.get("shape") or ())
    if len(shape) != 3:
        raise ConfigError(f"datasets.{dataset}.shape: needed to plan, as [X, Y, Z] voxels")
    model = build_model(run_cfg, num_classes)
    params = jax.eval_shape(lambda: init_params(model, shape, jax.random.key(0)))
    n_params = count_parameters(params)
    diff_cfg, train_cfg = run_cfg.diffusion, run_cfg.train
    batch, dims = train_cfg.batch_size, run_cfg.model.spatial_dims
    facts: dict[str, Any] = {
        "dataset": dataset, "run": run, "classes": num_classes, "parameters": n_params,
        "volumes_per_step": batch, "volume_shape": list(shape),
        "slices_per_step": batch * shape[2] if dims == 2 else None,
    }  # fmt: skip
    lines = [f"# diffseg plan: {dataset}/{run}", "", "## resolved run config", ""]
    lines += yaml.safe_dump(run_cfg.to_dict(), sort_keys=False).rstrip().splitlines()
    arch = run_cfg.model.arch
    kind = "diffusion (image + noisy mask, step t)" if diff_cfg.enabled else "segmentation"
    lines += ["", "## network", "", f"architecture: {arch} U-Net, {dims}D, {kind}"]
    lines += [f"channels: {list(run_cfg.model.channels)}, classes: {num_classes} (with background)"]
    if diff_cfg.enabled and arch == "reference":
        tc = run_cfg.model.time_conditioning
        note = " (the reference's placement: the output does not depend on t)" if tc == "reference" else ""
        lines.append(f"time conditioning: {tc}{note}")
    lines += [f"parameters: {n_params}", "", "## one training step", ""]
    if dims == 2:
        lines.append(
            f"consumes: {batch} volumes of {'×'.join(map(str, shape))} = {batch * shape[2]} slices of "
            f"{shape[0]}×{shape[1]} through the 2D network; loss on the reassembled volumes"
        )
    else:
        lines.append(f"consumes: {batch} volumes of {'×'.join(map(str, shape))}")
    if diff_cfg.enabled:
        d = GaussianDiffusion.from_config(diff_cfg)
        passes = "1 forward + 1 backward pass"
        if diff_cfg.recycle:
            passes = "2 forward passes (recycling: one without gradient) + 1 backward"
        lines.append(
            f"diffusion: K = {d.num_steps} training steps, t = {[int(t) for t in d.timesteps]}; {passes}"
        )
        facts["forward_passes"] = 2 if diff_cfg.recycle else 1
    precision = "bfloat16 compute, float32 parameters" if train_cfg.bf16 else "float32"
    lines.append(f"precision: {precision}; steps: {train_cfg.steps}")
    if target is not None:
        cc = ".".join(map(str, target.compute_capability))
        facts["target"] = {
            "name": target.name, "description": target.description, "memory_bytes": target.memory_bytes,
            "compute_capability": list(target.compute_capability), "has_bf16": target.has_bf16,
            "peak_bf16_tflops": target.peak_bf16_tflops, "peak_fp16_tflops": target.peak_fp16_tflops,
            "spec_file": str(target.source) if target.source else None,
        }  # fmt: skip
        facts["versions"] = {"jax": jax.__version__, "cuda_plugin": _plugin_version()}
        if train_cfg.bf16 and not target.has_bf16:
            facts["bf16_warning"] = True
            lines.append(
                f"warning: {target.name} (compute capability {cc}) has no bf16 tensor cores:"
                " bf16 convolutions run as float32 on this card; set train.bf16: false"
            )
    if compile_step:
        n_train = train_cases(dataset, ds_cfg, results)
        host = n_train * int(np.prod(shape)) * 5  # float32 images + uint8 labels
        card = target.memory_bytes if target is not None else device_memory
        choice, xla = xla_plan(run_cfg, num_classes, shape, device_memory, target, every=card is not None)
        facts["xla"] = xla
        facts["micro_batch"] = choice.micro_batch
        facts["remat"] = xla["remat"]
        facts["host_data_bytes"] = host
        facts["tried"] = [
            {k: t[k] for k in ("micro_batch", "remat", "temp_bytes", "total_bytes", "flops")}
            for t in choice.tried
        ]
        m, passes = xla["micro_batch"], xla["passes"]
        how = "train.micro_batch: auto" if train_cfg.micro_batch == "auto" else "train.micro_batch"
        remat_how = "model.remat: auto" if run_cfg.model.remat == "auto" else "model.remat"
        if target is not None:
            compiled_for = (
                f"{target.name} ({target.description}, compute capability {cc}, {_gib(target.memory_bytes)})"
                f" by XLA's GPU compiler on this machine"
            )
        else:
            compiled_for = xla["backend"]
        lines += [
            "",
            f"## XLA's plan of one step (compiled for {compiled_for}, {xla['devices']} device(s), not run)",
            "",
        ]
        if card is not None:
            budget = card_budget(card)
            facts["card_bytes"], facts["budget_bytes"] = card, budget
            lines.append(
                f"budget per device: {_gib(budget)} = {_gib(card)} × {memory_fraction():.2f}"
                f" (JAX's allocator, {MEM_FRACTION_VAR}) × {1 - HEADROOM:.2f} (headroom)"
            )
            lines.append("micro-batch  remat  total/device  temporaries  FLOPs/step  fits")
            for t in sorted(choice.tried, key=lambda t: (t["remat"], -t["micro_batch"])):
                lines.append(
                    f"{t['micro_batch']:>11}  {'on' if t['remat'] else 'off':>5}"
                    f"  {_gib(t['total_bytes']):>12}  {_gib(t['temp_bytes']):>11}"
                    f"  {t['flops'] / 1e12:>7.3f} TF  " + ("yes" if t["total_bytes"] <= budget else "no")
                )
            facts["fits"] = xla["total_bytes"] <= budget
        lines += [
            f"chosen: micro-batch {m} volume(s) per device per pass, {passes} pass(es) per step ({how}); "
            f"remat: {'on' if xla['remat'] else 'off'} ({remat_how})",
            f"FLOPs: {xla['flops'] / 1e12:.3f} TFLOP per step"
            + _flops_how(passes, xla["flops_of"] == "lowered"),
            f"arguments: {_gib(xla['argument_bytes'])} per device (state + the step's {batch} volumes;"
            f" the {n_train} training volumes, {_gib(host)}, stay on the host)",
            f"temporaries: {_gib(xla['temp_bytes'])} per device (one pass of {m} volume(s):"
            f" {_gib(xla['temp_bytes'] / m)} per volume)",
            f"outputs: {_gib(xla['output_bytes'])} (donated state aliased: {_gib(xla['alias_bytes'])})",
            f"total: {_gib(xla['total_bytes'])} per device",
        ]
        if card is not None:
            lines.append(
                f"fits {_gib(facts['budget_bytes'])}: "
                + ("yes" if facts["fits"] else "no (set train.micro_batch: auto or lower, model.remat: auto)")
            )
    return facts, "\n".join(lines) + "\n"


def _plugin_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("jax-cuda12-plugin")
    except Exception:  # not installed: the target path needs it, so this is only for the record
        return None
