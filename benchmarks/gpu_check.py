"""A run's training step as training builds it, on this machine's device: speed, FLOP/s and memory
against the plan.

The step is ``diffseg.train.step.make_train_step`` with the micro-batch and remat that
``train.micro_batch: auto`` / ``model.remat`` resolve to on this device (``diffseg.train.plan``),
on random volumes of the dataset's shape and class count, so no data is needed. It reports:

- seconds per step (median of ``--steps`` after ``--warmup``) and the FLOP/s achieved, from XLA's
  FLOP count of the same compiled step; against the card's peak dense bf16 (or fp16) tensor
  FLOP/s where the card is known (``diffseg.accelerators.targets``), the model FLOP utilisation;
- the device's peak memory in use (accelerators report it) against XLA's plan of the step
  (``total_bytes``) and the budget ``diffseg.accelerators.memory`` allows.

    python benchmarks/gpu_check.py --configfile config/paper.yaml --dataset prostate_mr --run 3d-diff
    python benchmarks/gpu_check.py --configfile config/config.yaml --dataset phantom_pelvis --run 3d-diff \\
        --set model.channels=[4,8] --steps 2       # a quick look on a CPU

Writes JSON (``--out``); the last line printed is the summary.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from diffseg.config import load_yaml, parse_overrides, resolve_run_config
from diffseg.io import atomic_write_json
from diffseg.parallel import batch_sharding, data_mesh, replicated
from diffseg.train.plan import dataset_classes, xla_plan
from diffseg.train.step import build_optimizer, init_state, make_train_step


def peak_tflops(device_kind: str, bf16: bool) -> float | None:
    """The card's peak dense tensor TFLOP/s for the run's precision, when the card is known."""
    try:
        from diffseg.accelerators.targets import peak_tflops_for_device
    except ImportError:  # pragma: no cover - the targets module ships with diffseg
        return None
    return peak_tflops_for_device(device_kind, bf16)


def check(config: dict[str, Any], dataset: str, run: str, overrides: dict[str, Any], steps: int, warmup: int):
    """Build, run and time the step; returns the measurements as a dict."""
    run_cfg = resolve_run_config(config, dataset, run, overrides)
    classes = dataset_classes(dataset, config["datasets"][dataset], config.get("results", "results"))
    shape = tuple(int(s) for s in config["datasets"][dataset]["shape"])
    num_classes, batch = len(classes), int(run_cfg["train"]["batch_size"])
    t0 = time.perf_counter()
    choice, plan = xla_plan(run_cfg, num_classes, shape)  # this device's compiler, as training resolves it
    plan_seconds = time.perf_counter() - t0
    mesh = data_mesh()
    tx, _ = build_optimizer(run_cfg)
    state = jax.device_put(init_state(choice.model, tx, shape, jax.random.key(0)), replicated(mesh))
    step = make_train_step(choice.model, tx, run_cfg, num_classes, mesh, choice.micro_batch)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.random((batch, *shape), np.float32), batch_sharding(mesh))
    labels = jax.device_put(rng.integers(0, num_classes, (batch, *shape), np.uint8), batch_sharding(mesh))
    key = jax.random.key(1)
    t0 = time.perf_counter()
    state, loss = step(state, images, labels, key)
    jax.block_until_ready(loss)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        state, loss = step(state, images, labels, key)
    jax.block_until_ready(loss)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, loss = step(state, images, labels, key)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    kind = str(device.device_kind)
    bf16 = bool(run_cfg["train"]["bf16"])
    card_peak = peak_tflops(kind, bf16)
    achieved = plan["flops"] / seconds / 1e12  # per device, as the peak it is compared with
    return {
        "dataset": dataset,
        "run": run,
        "backend": jax.default_backend(),
        "device": kind,
        "devices": mesh.size,
        "versions": {"jax": jax.__version__, "jaxlib": __import__("jaxlib").__version__},
        "shape": list(shape),
        "classes": num_classes,
        "batch": batch,
        "bf16": bf16,
        "micro_batch": choice.micro_batch,
        "remat": plan["remat"],
        "plan_seconds": plan_seconds,
        "compile_and_first_step_seconds": first,
        "seconds_per_step": seconds,
        "all_seconds": times,
        "loss": float(loss),
        "flops_per_step": plan["flops_per_step"],  # over every device
        "flops_per_device": plan["flops"],
        "tflops_per_s": achieved,  # per device
        "peak_tflops": card_peak,
        "mfu": achieved / card_peak if card_peak else None,
        "peak_bytes_in_use": peak,
        "bytes_limit": stats.get("bytes_limit"),
        "plan_total_bytes": plan["total_bytes"],
        "plan_budget_bytes": choice.budget,
        "peak_over_plan": peak / plan["total_bytes"] if peak else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configfile", default="config/paper.yaml")
    ap.add_argument("--dataset", default="prostate_mr")
    ap.add_argument("--run", default="3d-diff")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="run-config override")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=1, help="steps after the first, untimed")
    ap.add_argument("--out", type=Path, default=None, help="JSON path")
    args = ap.parse_args(argv)
    result = check(load_yaml(args.configfile), args.dataset, args.run, parse_overrides(args.set),
                   args.steps, args.warmup)  # fmt: skip
    out = args.out or Path(__file__).parent / "results" / f"gpu_check_{result['backend']}_{args.run}.json"
    atomic_write_json(out, result)
    gib = lambda n: "n/a" if n is None else f"{n / 2**30:.2f} GiB"  # noqa: E731
    mfu = f", MFU {result['mfu']:.1%} of {result['peak_tflops']:.0f} TFLOP/s" if result["mfu"] else ""
    print(f"wrote {out}")
    print(
        f"{args.dataset}/{args.run} on {result['devices']}× {result['device']}: micro-batch"
        f" {result['micro_batch']}, remat {'on' if result['remat'] else 'off'};"
        f" {result['seconds_per_step']:.3f} s/step, {result['tflops_per_s']:.3g} TFLOP/s per device{mfu};"
        f" peak memory {gib(result['peak_bytes_in_use'])} vs plan {gib(result['plan_total_bytes'])}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
