"""Benchmark: how many paper-shaped batches per second training's host feed delivers.

The host side of a training step is ``diffseg.train.feed.BatchFeeder``, as ``diffseg/train/loop.py``
builds it: each step's volume indices drawn from ``(seed, step)`` (*sample*), those volumes gathered
from the data stage's memory-mapped cache (*read*), and ``jax.device_put`` with the training
sharding (*transfer*), one step ahead in a background thread. Augmentation runs on the device,
inside the jitted step, so it is not part of the host's work. 2D runs are fed the same way (the
same ``B`` volumes; the 2D network folds the slices into its batch on the device), so one
measurement per dataset covers both dims.

The datasets are made as the pipeline makes them: ``diffseg data`` on a workflow config whose
entries are ``config/rehearsal.yaml``'s phantoms (the paper's shapes, spacings and classes) with
``--cases`` training cases; a dataset already prepared with the same entry in ``--work`` is reused.
For each dataset it measures, after ``--warmup`` steps:

* ``stages``: each stage on its own, synchronously, as ``BatchFeeder.batch`` runs them, per step
  (page cache warm: after the first epoch the whole training split is in the page cache of a
  host with the RAM for it, as a TPU VM's);
* ``cold``: the same, each step with the cache files evicted from the page cache first (``posix_fadvise``
  ``DONTNEED``): the first epoch's reads, from this machine's disk;
* ``feed``: the feeder itself, free-running (a device that takes no time): the interval between
  the batches it hands over, in ``--repeats`` rounds of ``--steps`` steps;
* ``stall``: the feeder beside a simulated device step of ``--step-seconds`` (a sleep, as the
  host waits while a TPU computes): how long each step waits for its batch (0 = the feed keeps up).

Arrays go to ``--devices`` devices split along the batch as in training (``batch_sharding``): on a
CPU these are XLA's host-platform devices (8 by default, as a v3-8's cores), so the transfer here is
a host memory copy, not a PCIe/DMA transfer to a TPU.

Run:  python benchmarks/feed_rate.py [--steps 30] [--warmup 3] [--repeats 3] [--cases 16]
          [--datasets phantom_pelvis phantom_abdomen] [--devices 8] [--step-seconds 0.3]
          [--work results/feed_rate] [--tiny] [--out benchmarks/results/feed_rate_cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from timing import cpu_model

ROOT = Path(__file__).resolve().parents[1]
REHEARSAL = ROOT / "config/rehearsal.yaml"
# The paper: 12,500 steps of 8 volumes in about 11 h on a TPU v3-8, validation included.
PAPER_STEP_S = 11 * 3600 / 12_500
TARGET_S = 0.3  # s per batch the host must beat (the brief: faster than any plausible v3-8 step)
COLD_STEPS = 10  # steps timed from an empty page cache
TINY_SHAPES = {"phantom_pelvis": [32, 32, 16], "phantom_abdomen": [32, 32, 16]}


def stats(values: Sequence[float]) -> dict[str, float]:
    """``{median_s, min_s, max_s, n}`` of per-step seconds (rounded to 10 µs)."""
    return {
        "median_s": round(statistics.median(values), 5),
        "min_s": round(min(values), 5),
        "max_s": round(max(values), 5),
        "n": len(values),
    }


def dataset_entry(name: str, cases: int, tiny: bool) -> dict[str, Any]:
    """``config/rehearsal.yaml``'s entry ``name`` with ``cases`` training cases (+1 valid, +1 test).

    ``tiny``: the shape shrunk to ``TINY_SHAPES`` (tests); otherwise the paper's shape.
    """
    entry = dict(yaml.safe_load(REHEARSAL.read_text())["datasets"][name])
    entry.pop("training", None)  # run settings, not the data's
    entry["num_cases"] = cases + 2
    entry["split"] = {"train": cases, "valid": 1, "test": 1}
    if tiny:
        entry["shape"] = TINY_SHAPES[name]
    return entry


def prepare(work: Path, name: str, entry: dict[str, Any], threads: int) -> Path:
    """``work/results/data/{name}``, prepared by ``diffseg data`` from ``entry`` unless already there.

    Reused when its ``config.yaml`` holds the same entry and its training split's cache is up to
    date (``Dataset.cached``); else prepared again (the data stage replaces the folder atomically).
    """
    from diffseg.cli import main as diffseg_main
    from diffseg.data import load_dataset

    config = work / f"config_{name}.yaml"
    data_dir = work / "results" / "data" / name
    cfg = {"results": str(work / "results"), "resources": str(work / "resources"), "datasets": {name: entry}}
    text = yaml.safe_dump(cfg, sort_keys=False)
    if config.is_file() and config.read_text() == text and (data_dir / "dataset.json").is_file():
        if load_dataset(data_dir).cached("train") is not None:
            print(f"{name}: reusing {data_dir}", flush=True)
            return data_dir
    work.mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    print(
        f"{name}: preparing {entry['num_cases']} phantoms of {entry['shape']} (diffseg data) ...", flush=True
    )
    t0 = time.perf_counter()
    rc = diffseg_main(["data", "--config", str(config), "--dataset", name, "--threads", str(threads)])
    if rc:
        raise SystemExit(f"diffseg data failed for {name} (exit {rc})")
    print(f"{name}: prepared in {time.perf_counter() - t0:.1f} s", flush=True)
    return data_dir


def evict(data_dir: Path) -> None:
    """Drop the training cache files' pages from the page cache (clean pages of files nobody maps).

    ``DONTNEED`` leaves dirty pages alone, so a file just written by the data stage is flushed first.
    """
    for path in sorted((data_dir / "cache").glob("train_*.npy")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_stages(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    sharding: Any,
    steps: range,
    sampling: str,
) -> dict[str, list[float]]:
    """Per-step seconds of each host stage, run one after the other as ``BatchFeeder.batch`` runs them.

    sample: ``batch_indices`` ``(B,)``; read: ``gather`` into ``(B, X, Y, Z)`` arrays; transfer:
    ``device_put`` with ``sharding`` until the device arrays are ready; total: the three.
    """
    import jax

    from diffseg.train.feed import batch_indices, gather

    out: dict[str, list[float]] = {"sample": [], "read": [], "transfer": [], "total": []}
    for step in steps:
        t0 = time.perf_counter()
        index = batch_indices(seed, step, batch_size, len(images), sampling)
        t1 = time.perf_counter()
        image, label = gather(images, labels, index)
        t2 = time.perf_counter()
        jax.block_until_ready((jax.device_put(image, sharding), jax.device_put(label, sharding)))
        t3 = time.perf_counter()
        for key, value in zip(out, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
            out[key].append(value)
        del image, label
    return out


def time_feeder(
    feeder_args: Callable[[int, int], tuple[tuple[Any, ...], dict[str, Any]]],
    first: int,
    warmup: int,
    steps: int,
    step_seconds: float,
) -> tuple[list[float], float]:
    """Run a ``BatchFeeder`` over steps ``first .. first + warmup + steps - 1`` as the loop does.

    Returns each timed step's seconds and the timed steps' wall time. With ``step_seconds`` 0 the
    seconds are the intervals between batches (the feed's own rate); otherwise a sleep of that long
    stands for the device's step after each batch, and the seconds are the waits for the next batch.
    """
    import jax

    from diffseg.train.feed import BatchFeeder

    args, kwargs = feeder_args(first, first + warmup + steps)
    times: list[float] = []
    with BatchFeeder(*args, **kwargs) as feeder:
        batches = iter(feeder)
        for _ in range(warmup):
            jax.block_until_ready(next(batches))
            time.sleep(step_seconds)
        start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            jax.block_until_ready(next(batches))  # a step needs its inputs on the device
            times.append(time.perf_counter() - t0)
            time.sleep(step_seconds)
        wall = time.perf_counter() - start
    return times, wall


def measure(data_dir: Path, args: argparse.Namespace, devices: list[Any]) -> dict[str, Any]:
    """Every measurement of one prepared dataset (see the module's docstring)."""
    from diffseg.data import load_dataset
    from diffseg.parallel import batch_sharding, data_mesh

    sharding = batch_sharding(data_mesh(devices))  # as train/loop.py: the batch split over the mesh
    batch, seed, sampling = args.batch_size, args.seed, args.sampling

    def split() -> tuple[np.ndarray, np.ndarray]:
        """The training split as training loads it: a fresh ``Dataset``, so a fresh memory map."""
        _, images, labels = load_dataset(data_dir).split("train")
        return images, labels

    images, labels = split()
    if not isinstance(images, np.memmap):
        raise SystemExit(f"{data_dir}: no up-to-date cache; training would read NIfTI into memory")
    shape, n = list(images.shape[1:]), len(images)
    batch_bytes = batch * (images[0].nbytes + labels[0].nbytes)
    name = data_dir.name
    print(f"{name}: {n} training volumes {shape}, batch {batch} = {batch_bytes / 2**20:.1f} MiB", flush=True)

    # Cold first, one step at a time from an empty page cache: the files leave it only while
    # nothing maps them, so the split is unmapped, evicted and mapped again before each step.
    cold: dict[str, list[float]] = {}
    for step in range(min(args.steps, COLD_STEPS)):
        del images, labels
        gc.collect()
        evict(data_dir)
        images, labels = split()
        for key, value in time_stages(
            images, labels, batch, seed, sharding, range(step, step + 1), sampling
        ).items():
            cold.setdefault(key, []).extend(value)
    print(f"{name}: cold (page cache dropped): {stats(cold['total'])['median_s']:.4f} s/batch", flush=True)

    # Warm the page cache with one pass over the split, then time the stages on their own.
    time_stages(images, labels, batch, seed, sharding, range(0, math.ceil(n / batch) + args.warmup), sampling)
    warm = time_stages(
        images, labels, batch, seed, sharding, range(args.warmup, args.warmup + args.steps), sampling
    )
    print(
        f"{name}: stages: " + ", ".join(f"{k} {stats(v)['median_s']:.4f} s" for k, v in warm.items()),
        flush=True,
    )

    def feeder_args(first: int, last: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (images, labels, batch, seed, sharding, first, last), {"sampling": sampling}

    rounds, intervals = [], []
    for r in range(args.repeats):
        first = r * (args.warmup + args.steps)
        times, wall = time_feeder(feeder_args, first, args.warmup, args.steps, 0.0)
        intervals += times
        rounds.append({"first_step": first, "batches_per_s": round(args.steps / wall, 3), **stats(times)})
        print(
            f"{name}: feed round {r + 1}/{args.repeats}: {rounds[-1]['batches_per_s']} batches/s", flush=True
        )
    rates = [r["batches_per_s"] for r in rounds]
    feed = {
        "seconds_per_batch": stats(intervals),
        "batches_per_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates)},
        "rounds": rounds,
    }

    stall = None
    if args.step_seconds > 0:
        # Back on the first steps (warm): the device's step and the host's next batch overlap.
        waits, wall = time_feeder(feeder_args, 0, args.warmup, args.stall_steps, args.step_seconds)
        stall = {
            "step_seconds": args.step_seconds,
            "wait": stats(waits),
            "steps_per_s": round(args.stall_steps / wall, 3),
        }
        print(
            f"{name}: beside a {args.step_seconds} s step: median wait {stall['wait']['median_s']:.4f} s",
            flush=True,
        )
    return {
        "shape": shape,
        "train_volumes": n,
        "image_dtype": str(images.dtype),
        "label_dtype": str(labels.dtype),
        "batch_bytes": int(batch_bytes),
        "storage": "memmap (the data stage's cache/train_*.npy)",
        "dims": {"3d": "measured", "2d": "the same feed (the same B volumes; slices fold on the device)"},
        "stages": {k: stats(v) for k, v in warm.items()},
        "cold": {k: stats(v) for k, v in cold.items()},
        "feed": feed,
        "stall": stall,
        # Warm: the median interval of the free-running feed; cold: the first epoch's median batch.
        "keeps_up": bool(
            feed["seconds_per_batch"]["median_s"] < TARGET_S and stats(cold["total"])["median_s"] < TARGET_S
        ),
    }


def machine() -> dict[str, Any]:
    """CPU model, core count, memory and Python/numpy/jax versions."""
    import jax

    model = cpu_model()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 0
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "jax": jax.__version__,
    }


def use_devices(count: int) -> list[Any]:
    """The first ``count`` local devices, asking XLA for that many CPU devices if JAX has not started.

    Fewer when JAX already started with fewer (e.g. inside a test session): the result says so.
    One device needs no flag (the CPU's default), so a caller's process is left as it was.
    """
    flag = f"--xla_force_host_platform_device_count={count}"
    if count > 1 and flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax

    return jax.local_devices()[:count]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per round (after --warmup)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the free-running feed")
    p.add_argument("--cases", type=int, default=16, help="training cases per dataset")
    p.add_argument(
        "--datasets", nargs="+", default=["phantom_pelvis", "phantom_abdomen"], choices=list(TINY_SHAPES)
    )
    p.add_argument("--batch-size", type=int, default=8, help="volumes per step (the paper's 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampling", default="epoch", choices=("epoch", "uniform"))
    p.add_argument("--devices", type=int, default=8, help="devices the batch is split over (a v3-8: 8)")
    p.add_argument("--step-seconds", type=float, default=0.3, help="simulated device step; 0: skip")
    p.add_argument("--stall-steps", type=int, default=10, help="timed steps beside the simulated step")
    p.add_argument("--threads", type=int, default=2, help="diffseg data --threads")
    p.add_argument("--work", type=Path, default=ROOT / "results/feed_rate", help="prepared data (reused)")
    p.add_argument("--tiny", action="store_true", help=f"shapes {TINY_SHAPES['phantom_pelvis']} (tests)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/feed_rate_cpu.json")
    args = p.parse_args(argv)
    if min(args.steps, args.repeats, args.cases, args.batch_size, args.devices) < 1 or args.warmup < 0:
        p.error("--steps, --repeats, --cases, --batch-size and --devices must be >= 1, --warmup >= 0")
    if args.batch_size % args.devices:
        p.error(f"--batch-size {args.batch_size} must split evenly over --devices {args.devices}")
    load_start = [round(x, 2) for x in os.getloadavg()]
    from diffseg.host_memory import reuse_freed_memory

    # As `diffseg train` does first (diffseg/cli.py): freed buffers are reused, not page-faulted anew.
    reuse = reuse_freed_memory()
    devices = use_devices(args.devices)
    import jax

    from diffseg.io import atomic_write_json

    datasets = {}
    for name in args.datasets:
        data_dir = prepare(args.work, name, dataset_entry(name, args.cases, args.tiny), args.threads)
        datasets[name] = measure(data_dir, args, devices)
    given = argv if argv is not None else sys.argv[1:]
    result = {
        "benchmark": "feed_rate",
        "command": " ".join(["python benchmarks/feed_rate.py", *given]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "malloc_reuse_freed_memory": reuse,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "paper_step_s": round(PAPER_STEP_S, 3),
        # The bar the host must clear: a batch per 0.3 s, faster than any plausible v3-8 step.
        "target_s_per_batch": TARGET_S,
        "datasets": datasets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    parts = []
    for name, d in datasets.items():
        rate, spb = d["feed"]["batches_per_s"], d["feed"]["seconds_per_batch"]
        parts.append(
            f"{name} {d['shape']} (3D and 2D): {rate['median']:.2f} batches/s"
            f" ({spb['median_s']:.4f} s/batch, {spb['min_s']:.4f}-{spb['max_s']:.4f})"
        )
    load = " ".join(f"{x:.2f}" for x in result["load_average_end"])
    print(f"feed_rate: {'; '.join(parts)}; paper step {PAPER_STEP_S:.2f} s; load average {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
