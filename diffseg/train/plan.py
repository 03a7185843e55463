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

from diffseg.config import resolve_run_config
from diffseg.data.phantom import CLASSES
from diffseg.diffusion import GaussianDiffusion
from diffseg.errors import ConfigError
from diffseg.parallel import batch_sharding, data_mesh
from diffseg.runs import build_model, count_parameters, init_params
from diffseg.train.step import build_optimizer, check_micro_batch, init_state, make_train_step

# Training cases of the downloaded datasets (DESIGN.md, Datasets), for the plan's data bytes.
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


HEADROOM = 0.10  # share of a device's memory left free by micro_batch auto (fragmentation, workspaces)


def device_memory_bytes(device: Any = None) -> int | None:
    """The memory of ``device`` (default: the first local one) that XLA may allocate.

    An accelerator's ``memory_stats()["bytes_limit"]``; on the CPU the machine's physical memory.
    ``None`` when neither is known.
    """
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def step_memory(
    model: Any,
    tx: Any,
    run_cfg: dict[str, Any],
    num_classes: int,
    mesh: Any,
    volume_shape: tuple[int, ...],
    micro_batch: int,
) -> dict[str, Any]:
    """Compile (never run) the train step with ``micro_batch`` volumes per device per pass, on
    abstract arrays; XLA's FLOPs and bytes per device (``argument``: the state and the step's
    ``B`` volumes; ``temp``: what one micro-batch pass needs; ``total`` counts the donated,
    aliased state once)."""
    step = make_train_step(model, tx, run_cfg, num_classes, mesh, micro_batch)
    state = jax.eval_shape(lambda: init_state(model, tx, volume_shape, jax.random.key(0)))
    batch = int(run_cfg["train"]["batch_size"])
    split = batch_sharding(mesh)
    images = jax.ShapeDtypeStruct((batch, *volume_shape), jnp.float32, sharding=split)
    labels = jax.ShapeDtypeStruct((batch, *volume_shape), jnp.uint8, sharding=split)
    key = jax.eval_shape(lambda: jax.random.key(0))
    compiled = step.lower(state, images, labels, key).compile()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    memory = compiled.memory_analysis()
    out = {
        "backend": jax.default_backend(),
        "devices": mesh.size,
        "micro_batch": int(micro_batch),
        "passes": batch // (mesh.size * int(micro_batch)),
        "remat": bool(getattr(model, "remat", False)),
        # XLA's cost analysis counts a loop's body once: the micro-batch scan runs it ``passes`` times.
        "flops": float(cost.get("flops", np.nan)) * (batch // (mesh.size * int(micro_batch))),
    }
    for name in ("argument", "output", "temp", "alias"):
        out[f"{name}_bytes"] = int(getattr(memory, f"{name}_size_in_bytes", 0) or 0)
    # Donated state is aliased to the output: count it once.
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


@dataclass
class MicroBatchChoice:
    """What ``choose_micro_batch`` settled on: volumes per device per pass, the network to build
    the step with (remat possibly switched on), and XLA's plan of that step when compiled."""

    micro_batch: int
    model: Any
    how: str  # "config" | "auto"
    budget: int | None = None  # bytes auto had: device memory minus headroom
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


def choose_micro_batch(
    model: Any,
    tx: Any,
    run_cfg: dict[str, Any],
    num_classes: int,
    mesh: Any,
    volume_shape: tuple[int, ...],
    device_memory: int | None = None,
    headroom: float = HEADROOM,
) -> MicroBatchChoice:
    """Resolve ``train.micro_batch``: an integer or null is taken as is (validated); ``auto`` is
    the largest divisor of ``batch_size / devices`` whose compiled step (XLA's memory analysis,
    on this backend) fits ``device_memory`` (default: the device's, ``device_memory_bytes``)
    minus ``headroom``.

    Auto first compiles one volume per pass with the configured ``model.remat``; its bytes give
    a linear guess (state and batch + m × one volume's temporaries) for the largest m, which is
    then compiled to check (and lowered until it fits). Only when a single volume does not fit
    without remat does auto switch ``model.remat`` on (the reference network only), since remat
    costs a second forward pass. If nothing fits, it returns 1 volume per pass (remat on where
    possible) and ``fits`` is False.
    """
    value = run_cfg["train"].get("micro_batch")
    if value != "auto":
        return MicroBatchChoice(check_micro_batch(run_cfg, mesh.size, value), model, "config")
    per_device = check_micro_batch({"train": {**run_cfg["train"], "micro_batch": None}}, mesh.size)
    memory = device_memory if device_memory is not None else device_memory_bytes()
    if memory is None:
        raise ConfigError("train.micro_batch: auto needs the device's memory, which is unknown here")
    budget = int(memory * (1.0 - headroom))
    models = [model]
    if not getattr(model, "remat", True) and hasattr(model, "clone"):
        models.append(model.clone(remat=True))
    tried: list[dict[str, Any]] = []

    def measure(net: Any, m: int) -> dict[str, Any]:
        plan = step_memory(net, tx, run_cfg, num_classes, mesh, volume_shape, m)
        tried.append(plan)
        return plan

    for net in models:
        one = measure(net, 1)
        if one["total_bytes"] > budget:
            continue
        fixed = one["total_bytes"] - one["temp_bytes"]
        guess = max(1, int((budget - fixed) // max(one["temp_bytes"], 1)))
        for m in _divisors_desc(per_device):
            if m == 1:
                return MicroBatchChoice(1, net, "auto", budget, one, tried)
            if m > guess:
                continue
            plan = measure(net, m)
            if plan["total_bytes"] <= budget:
                return MicroBatchChoice(m, net, "auto", budget, plan, tried)
    return MicroBatchChoice(1, models[-1], "auto", budget, tried[-1], tried)


def xla_plan(
    run_cfg: dict[str, Any],
    num_classes: int,
    volume_shape: tuple[int, ...],
    device_memory: int | None = None,
) -> tuple[MicroBatchChoice, dict[str, Any]]:
    """The run's step as training would build it (micro-batch and remat resolved for
    ``device_memory``), compiled, never run; XLA's FLOPs and bytes per device."""
    model = build_model(run_cfg, num_classes, conv_impl="xla")
    tx, _ = build_optimizer(run_cfg)
    mesh = data_mesh()
    choice = choose_micro_batch(model, tx, run_cfg, num_classes, mesh, volume_shape, device_memory)
    if choice.xla is None:
        choice.xla = step_memory(
            choice.model, tx, run_cfg, num_classes, mesh, volume_shape, choice.micro_batch
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
) -> tuple[dict[str, Any], str]:
    """The plan of one run: ``(facts, text)``; ``facts`` holds every number the text prints."""
    run_cfg = resolve_run_config(config, dataset, run, overrides)
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
    diff_cfg, train_cfg = run_cfg["diffusion"], run_cfg["train"]
    batch, dims = int(train_cfg["batch_size"]), int(run_cfg["model"]["spatial_dims"])
    facts: dict[str, Any] = {
        "dataset": dataset, "run": run, "classes": num_classes, "parameters": n_params,
        "volumes_per_step": batch, "volume_shape": list(shape),
        "slices_per_step": batch * shape[2] if dims == 2 else None,
    }  # fmt: skip
    lines = [f"# diffseg plan: {dataset}/{run}", "", "## resolved run config", ""]
    lines += yaml.safe_dump(dict(run_cfg), sort_keys=False).rstrip().splitlines()
    arch = run_cfg["model"].get("arch", "reference")
    kind = "diffusion (image + noisy mask, step t)" if diff_cfg["enabled"] else "segmentation"
    lines += ["", "## network", "", f"architecture: {arch} U-Net, {dims}D, {kind}"]
    lines += [f"channels: {list(run_cfg['model']['channels'])}, classes: {num_classes} (with background)"]
    if diff_cfg["enabled"] and arch == "reference":
        tc = run_cfg["model"]["time_conditioning"]
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
    if diff_cfg["enabled"]:
        d = GaussianDiffusion.from_config(diff_cfg)
        passes = "1 forward + 1 backward pass"
        if diff_cfg["recycle"]:
            passes = "2 forward passes (recycling: one without gradient) + 1 backward"
        lines.append(
            f"diffusion: K = {d.num_steps} training steps, t = {[int(t) for t in d.timesteps]}; {passes}"
        )
        facts["forward_passes"] = 2 if diff_cfg["recycle"] else 1
    precision = "bfloat16 compute, float32 parameters" if train_cfg["bf16"] else "float32"
    lines.append(f"precision: {precision}; steps: {train_cfg['steps']}")
    if compile_step:
        n_train = train_cases(dataset, ds_cfg, results)
        host = n_train * int(np.prod(shape)) * 5  # float32 images + uint8 labels
        choice, xla = xla_plan(run_cfg, num_classes, shape, device_memory)
        facts["xla"] = xla
        facts["micro_batch"] = choice.micro_batch
        facts["remat"] = xla["remat"]
        facts["host_data_bytes"] = host
        facts["tried"] = [
            {k: t[k] for k in ("micro_batch", "remat", "temp_bytes", "total_bytes")} for t in choice.tried
        ]
        m, passes = xla["micro_batch"], xla["passes"]
        how = "train.micro_batch: auto" if choice.how == "auto" else "train.micro_batch"
        lines += [
            "",
            f"## XLA's plan of one step (compiled for {xla['backend']}, {xla['devices']} device(s), not run)",
            "",
            f"micro-batch: {m} volume(s) per device per pass, {passes} pass(es) per step ({how}); "
            f"remat: {'on' if xla['remat'] else 'off'}",
        ]
        for t in choice.tried if choice.how == "auto" else []:
            lines.append(
                f"  auto tried {t['micro_batch']} volume(s) per pass, remat {'on' if t['remat'] else 'off'}: "
                f"{_gib(t['total_bytes'])}"
            )
        lines += [
            f"FLOPs: {xla['flops'] / 1e12:.3f} TFLOP per step"
            + (f" (XLA's count of one pass × {passes} passes)" if passes > 1 else ""),
            f"arguments: {_gib(xla['argument_bytes'])} per device (state + the step's {batch} volumes;"
            f" the {n_train} training volumes, {_gib(host)}, stay on the host)",
            f"temporaries: {_gib(xla['temp_bytes'])} per device (one pass of {m} volume(s):"
            f" {_gib(xla['temp_bytes'] / m)} per volume)",
            f"outputs: {_gib(xla['output_bytes'])} (donated state aliased: {_gib(xla['alias_bytes'])})",
            f"total: {_gib(xla['total_bytes'])} per device",
        ]
        if device_memory is not None:
            budget = int(device_memory * (1.0 - HEADROOM))
            fits = xla["total_bytes"] <= budget
            facts["fits"] = fits
            lines.append(
                f"fits {_gib(device_memory)} (less {HEADROOM:.0%} headroom: {_gib(budget)}): "
                + ("yes" if fits else "no")
                + (
                    ""
                    if fits
                    else " (set train.micro_batch: auto or lower, model.remat: true, or a larger device)"
                )
            )
    return facts, "\n".join(lines) + "\n"
