"""What each run cost: training and test wall time, CPU time, peak memory, and the device it ran on.

Read from what the workflow already keeps: Snakemake's ``benchmark:`` file of each train and test
job (``{results}/benchmarks/{stage}/{dataset}/{run}.tsv``: wall seconds ``s``, ``cpu_time``,
``max_rss`` in MB, ...) and the first line each job prints about its devices (``diffseg:
backend gpu: 1 device(s), NVIDIA H100 80GB HBM3 ...``, in ``{results}/logs/{stage}/...log``). GPU
seconds are wall seconds × the job's GPUs: Snakemake measures host processes, not device time.
A job run before its benchmark file existed (or outside the workflow) has empty cells, never a
guessed number.
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
    """The job's device line from its log: (``"gpu: NVIDIA H100 ..."``, GPUs) or ("", 0) if absent.
    The last such line counts: a resumed job appends to its log."""
    path = Path(log)
    found = ("", 0)
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            match = _BACKEND.search(line)
            if match:
                backend, count, kind = match.group(1), int(match.group(2)), match.group(3).strip()
                found = (f"{backend}: {count} × {kind}", count if backend == "gpu" else 0)
    return found


def cost_table(results: str | Path, runs: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """One row per (dataset, run): per stage wall/CPU/GPU seconds, peak RSS (MB) and device.

    Columns: ``dataset, run, {stage}_s, {stage}_cpu_s, {stage}_gpu_s, {stage}_max_rss_mb,
    {stage}_device`` for stage in train, test; then ``train_s_per_step`` where the run's config
    gives ``train.steps``.
    """
    import yaml

    results = Path(results)
    rows = []
    for dataset, run in runs:
        row: dict[str, object] = {"dataset": dataset, "run": run}
        for stage in STAGES:
            bench = read_benchmark(results / "benchmarks" / stage / dataset / f"{run}.tsv")
            device, gpus = read_device(results / "logs" / stage / dataset / f"{run}.log")
            row[f"{stage}_s"] = bench["s"]
            row[f"{stage}_cpu_s"] = bench["cpu_time"]
            row[f"{stage}_gpu_s"] = bench["s"] * gpus if gpus else (np.nan if device == "" else 0.0)
            row[f"{stage}_max_rss_mb"] = bench["max_rss"]
            row[f"{stage}_device"] = device
        cfg_path = results / "runs" / dataset / run / "config.yaml"
        run_cfg = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else {}
        steps = (run_cfg.get("train") or {}).get("steps")
        row["train_s_per_step"] = row["train_s"] / int(steps) if steps else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    """The cost table for the report: minutes, GiB, and the device once per row."""
    lines = [
        "| dataset | run | train (min) | s/step | train CPU (min) | train GPU (min) | train peak RSS (GiB)"
        " | test (min) | test peak RSS (GiB) | device |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def num(value: float, scale: float = 1.0, digits: int = 1) -> str:
        return "—" if pd.isna(value) else f"{value / scale:.{digits}f}"

    for r in table.itertuples(index=False):
        lines.append(
            f"| {r.dataset} | `{r.run}` | {num(r.train_s, 60)} | {num(r.train_s_per_step, digits=2)}"
            f" | {num(r.train_cpu_s, 60)} | {num(r.train_gpu_s, 60)} | {num(r.train_max_rss_mb, 1024, 2)}"
            f" | {num(r.test_s, 60)} | {num(r.test_max_rss_mb, 1024, 2)} | {r.train_device or '—'} |"
        )
    return "\n".join(lines) + "\n"
