"""What each run cost: training and test wall time, CPU time, peak memory, and the device it ran on.

Read from what the workflow already keeps: Snakemake's ``benchmark:`` file of each train and test
job (``{results}/benchmarks/{stage}/{dataset}/{run}.tsv``: wall seconds ``s``, ``cpu_time``,
``max_rss`` in MB, ...) and the first line each job prints about its devices (``diffseg:
backend gpu: 1 device(s), NVIDIA H100 80GB HBM3 ...``, in ``{results}/logs/{stage}/...log``).
Accelerator seconds are wall seconds × the job's accelerator devices (GPUs, or TPU devices: a v3-8's
8 TensorCores): Snakemake measures host processes, not device time.
A job run before its benchmark file existed (or outside the workflow) has empty cells, never a
guessed number.

A benchmark file holds the *last* job only: a run resumed after an interruption (or re-run to
step N of N) would show that job's minutes. So the training time is the run's own account, from
its ``train_log.csv`` (each session's last ``seconds``, summed over sessions), and the benchmark's
CPU time and peak memory are labelled as the last train job's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

STAGES = ("train", "test")
_BACKEND = re.compile(r"backend (\w+): (\d+) device\(s\), (.*)$")


def read_benchmark(path: str | Path) -> dict[str, float]:
    """A Snakemake benchmark file's wall ``s``, ``cpu_time`` (s) and ``max_rss`` (MB), the last
    repeat's; NaN for a missing file or column (Snakemake writes ``-`` where it measured nothing)."""
    path = Path(path)
    keys = ("s", "cpu_time", "max_rss")
    if not path.is_file():
        return dict.fromkeys(keys, np.nan)
    table = pd.read_csv(path, sep="\t", na_values=["-", "NA"])
    if table.empty:
        return dict.fromkeys(keys, np.nan)
    row = table.iloc[-1]
    return {k: float(row[k]) if k in table.columns and pd.notna(row[k]) else np.nan for k in keys}


def read_device(log: str | Path) -> tuple[str, int]:
    """The job's device line from its log: (``"gpu: NVIDIA H100 ..."``, accelerator devices: GPUs or
    TPU devices, 0 on a CPU) or ("", 0) if absent.
    The last such line counts: a resumed job appends to its log."""
    path = Path(log)
    found = ("", 0)
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            match = _BACKEND.search(line)
            if match:
                backend, count, kind = match.group(1), int(match.group(2)), match.group(3).strip()
                found = (f"{backend}: {count} × {kind}", count if backend in ("gpu", "tpu") else 0)
    return found


def training_seconds(train_log: str | Path) -> tuple[float, int, int]:
    """(seconds, last step, sessions) of a run from its ``train_log.csv``: the wall seconds of
    each training session (its last logged ``seconds``), summed; NaN, 0, 0 if there is no log."""
    path = Path(train_log)
    if not path.is_file():
        return np.nan, 0, 0
    log = pd.read_csv(path)
    if log.empty or not {"step", "seconds", "session"} <= set(log.columns):
        return np.nan, 0, 0  # a log without timings (written by another tool): unknown, not guessed
    per_session = log.groupby("session")["seconds"].max()
    return float(per_session.sum()), int(log["step"].max()), int(per_session.size)


def cost_table(results: str | Path, runs: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """One row per (dataset, run).

    Columns: ``dataset, run``; ``train_s`` (the run's training wall seconds over all its
    sessions, from ``train_log.csv``), ``train_sessions``, ``train_s_per_step``, ``train_accel_s``
    (``train_s`` × accelerator devices); the last train job's ``train_job_s``, ``train_cpu_s``,
    ``train_max_rss_mb`` (its benchmark file); ``test_s``, ``test_cpu_s``, ``test_accel_s``,
    ``test_max_rss_mb``; ``train_device``, ``test_device``.
    """
    results = Path(results)
    rows = []
    for dataset, run in runs:
        row: dict[str, object] = {"dataset": dataset, "run": run}
        seconds, steps, sessions = training_seconds(results / "runs" / dataset / run / "train_log.csv")
        for stage in STAGES:
            bench = read_benchmark(results / "benchmarks" / stage / dataset / f"{run}.tsv")
            device, accel = read_device(results / "logs" / stage / dataset / f"{run}.log")
            wall = seconds if stage == "train" else bench["s"]
            row[f"{stage}_s"] = wall
            if stage == "train":
                row.update(train_sessions=sessions, train_s_per_step=seconds / steps if steps else np.nan)
                row["train_job_s"] = bench["s"]
            row[f"{stage}_cpu_s"] = bench["cpu_time"]
            row[f"{stage}_accel_s"] = wall * accel if accel else (np.nan if device == "" else 0.0)
            row[f"{stage}_max_rss_mb"] = bench["max_rss"]
            row[f"{stage}_device"] = device
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    """The cost table for the report: minutes, GiB, and the device once per row."""
    lines = [
        "| dataset | run | train (min) | s/step | last train job CPU (min) | train GPU/TPU (device-min)"
        " | last train job peak RSS (GiB)"
        " | sessions | test (min) | test peak RSS (GiB) | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def num(value: float, scale: float = 1.0, digits: int = 1) -> str:
        return "—" if pd.isna(value) else f"{value / scale:.{digits}f}"

    for r in table.itertuples(index=False):
        lines.append(
            f"| {r.dataset} | `{r.run}` | {num(r.train_s, 60)} | {num(r.train_s_per_step, digits=2)}"
            f" | {num(r.train_cpu_s, 60)} | {num(r.train_accel_s, 60)} | {num(r.train_max_rss_mb, 1024, 2)}"
            f" | {r.train_sessions} | {num(r.test_s, 60)} | {num(r.test_max_rss_mb, 1024, 2)}"
            f" | {r.train_device or '—'} |"
        )
    return "\n".join(lines) + "\n"
