"""What the collective costs: ``diffseg train`` as 2 processes against 1 process with 2 devices.

The same run (a 3D diffusion run on random phantom-like volumes; the same global batch, split
one volume per device) trained by ``diffseg train`` twice over, alternately, ``--rounds`` times:

* 1 process with 2 host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=2``): the
  gradient all-reduce inside one process;
* 2 processes of 1 device each, launched by hand on localhost (``diffseg.distributed``): the
  all-reduce by gloo over TCP between processes, each process gathering only its own volumes.

A step's time is read from the run's ``train_log.csv`` (``steps_per_s`` per logged window of
``--log-every`` steps; the first window, which holds the compilation, is dropped; validation
and checkpoints happen only at the last step, outside every window): the median over windows.

    python benchmarks/distributed_step.py                       # 32×32×16, batch 2, 60 steps, 2 rounds
    python benchmarks/distributed_step.py --shape 64 64 16 --steps 40

Writes ``benchmarks/results/distributed_step.json`` (``--out``); the last line printed is the
ratio of the 2-process step time to the 1-process one.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from timing import cpu_model

from diffseg.config import resolve_run_config, save_run_config
from diffseg.io import write_nifti

ROOT = Path(__file__).resolve().parents[1]


def write_data(root: Path, shape: tuple[int, int, int], cases: int = 6) -> Path:
    """``cases`` volumes ``shape`` (a bright box and a dark ball on noise) in the data stage's layout."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(cases):
        label = np.zeros(shape, np.uint8)
        x, y = rng.integers(0, shape[0] // 2, 2)
        label[x : x + shape[0] // 3, y : y + shape[1] // 3, 2:-2] = 1
        label[-shape[0] // 3 :, -shape[1] // 3 :, 3:-3] = 2
        image = rng.normal(0, 0.3, shape).astype(np.float32) + np.choose(label, [0.0, 1.5, -1.5])
        write_nifti(root / "images" / f"case{i}.nii.gz", image.astype(np.float32), (1.0, 1.0, 2.0))
        write_nifti(root / "labels" / f"case{i}.nii.gz", label, (1.0, 1.0, 2.0))
        rows.append((f"case{i}", "train" if i < cases - 2 else "valid" if i == cases - 2 else "test"))
    pd.DataFrame(rows, columns=["uid", "split"]).to_csv(root / "split.csv", index=False)
    info = {"name": "bench", "source": "phantom", "modality": "MR", "classes": ["background", "box", "ball"],
            "num_classes": 3, "spacing": [1.0, 1.0, 2.0], "shape": list(shape), "num_cases": cases,
            "splits": {"train": cases - 2, "valid": 1, "test": 1}}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def step_seconds(run_dir: Path) -> float:
    """Median seconds per step over the logged windows after the first (compilation)."""
    rates = pd.read_csv(run_dir / "train_log.csv")["steps_per_s"].to_numpy()[1:]
    return float(statistics.median(1.0 / rates))


def train(config: Path, data: Path, out: Path, processes: int) -> float:
    """Train the run as ``processes`` processes (1: with 2 host devices); its median s/step."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "DIFFSEG_ALLOW_CPU": "1", "DIFFSEG_JAX_CACHE": "0",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={2 // processes}"}  # fmt: skip
    cmd = [sys.executable, "-m", "diffseg.cli", "train", "--run-config", str(config), "--data", str(data),
           "--out", str(out)]  # fmt: skip
    if processes == 1:
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        hand = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes)]
        procs = [subprocess.Popen([*cmd, *hand, "--process-id", str(i)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE) for i in range(processes)]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode:
            raise SystemExit(f"diffseg train failed ({p.returncode}):\n{err.decode()[-3000:]}")
    return step_seconds(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 32, 16])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed_step.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_data(tmp / "data", tuple(args.shape))
        train_cfg = {"steps": args.steps, "batch_size": 2, "log_every": args.log_every,
                     "checkpoint_every": args.steps, "augment": {"enabled": False}}  # fmt: skip
        settings = {"datasets": {"bench": {"source": "phantom"}},
                    "training": {"model": {"channels": [8, 16]}, "train": train_cfg}}  # fmt: skip
        save_run_config(resolve_run_config(settings, "bench", "3d-diff"), tmp / "run.yaml")
        times: dict[str, list[float]] = {"1 process, 2 devices": [], "2 processes, 1 device each": []}
        for r in range(args.rounds):
            for processes, key in ((1, "1 process, 2 devices"), (2, "2 processes, 1 device each")):
                seconds = train(tmp / "run.yaml", data, tmp / f"run{processes}_{r}", processes)
                times[key].append(seconds)
                print(f"round {r}: {key}: {seconds * 1000:.1f} ms/step", flush=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["2 processes, 1 device each"] / medians["1 process, 2 devices"]
    facts = {"cpu": cpu_model(), "cores": os.cpu_count(), "shape": args.shape, "batch": 2,
             "steps": args.steps, "log_every": args.log_every, "seconds_per_step": times,
             "median_seconds_per_step": medians, "ratio_2proc_over_1proc": ratio}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(facts, indent=1) + "\n")
    for k, v in medians.items():
        print(f"{k}: {v * 1000:.1f} ms/step ({1 / v:.2f} steps/s)")
    print(f"2 processes / 1 process: {ratio:.2f}")


if __name__ == "__main__":
    main()
