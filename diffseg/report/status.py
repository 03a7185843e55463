"""Where a campaign stands: one row for every run a config's targets need (``diffseg status``).

Read only from what the runs write, never starting work: each run folder's ``status.json`` (the
training process's heartbeat, :mod:`diffseg.runs.heartbeat`), ``train_log.csv``, ``best.json``
and ``test/metrics.csv``, and the prepared data's ``dataset.json`` (its fingerprint). No jax:
the 20 runs of the demo take a fraction of a second.

A run's ``state``:

* ``not started``: nothing written yet;
* ``training``: its process runs (on this host: its pid exists; elsewhere: ``status.json`` was
  updated lately: :data:`SILENT_AFTER_S`, or 10 logging windows when longer);
* ``stopped``: it ended before its last step (SIGTERM or Ctrl-C, the job's time limit, a kill);
  the same command resumes it from ``saved`` (its last checkpoint);
* ``failed``: an error ended it (``note``: the error);
* ``done``: trained to the config's ``train.steps``;
* ``stale``: trained for another config or other data than the config now gives (what the
  workflow would retrain), whatever it is doing.

``s/step`` is the last logging window's (validation not counted; for runs trained before
``status.json`` existed, their mean over the run) and ``ETA`` is the steps left at that speed.
``time`` is the training wall time of all the run's sessions; ``accel_h`` that time × its
accelerator devices (GPUs or TPU devices; 0 on a CPU). ``test_dice`` is the mean over the test
cases of the mean foreground Dice (``test_hd95`` likewise, in mm), as the tables average them;
blank when the test was of an earlier training of the run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diffseg.config import resolve_run_config
from diffseg.errors import DataError
from diffseg.matrix import runs_needed
from diffseg.report.cost import training_seconds
from diffseg.report.tables import per_case, read_metrics
from diffseg.runconfig import config_hash
from diffseg.runs import heartbeat

STATES = ("done", "training", "stopped", "failed", "stale", "not started")
SILENT_AFTER_S = 900.0  # a heartbeat older than this from another host: the process is presumed gone
COLUMNS = [
    "dataset", "run", "state", "step", "total", "saved", "best_dice", "best_step", "s_per_step",
    "eta_s", "train_s", "accel_h", "test_dice", "test_hd95", "note",
]  # fmt: skip


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _test_metrics(run_dir: Path, best: dict[str, Any] | None) -> tuple[float, float, str]:
    """The test split's mean Dice and HD95 (as the tables average them), and a note when the
    metrics are of another training of the run or unreadable."""
    path = run_dir / "test" / "metrics.csv"
    if not path.is_file():
        return np.nan, np.nan, ""
    try:
        metrics = read_metrics(path)
    except DataError as err:
        return np.nan, np.nan, str(err)
    if best is not None and "run_id" in metrics.columns:
        if set(metrics["run_id"].astype(str)) != {str(best.get("run_id"))}:
            return np.nan, np.nan, "its test is of an earlier training"
    cases = per_case(metrics)
    return float(cases["dice"].mean()), float(cases["hd95"].mean()), ""


def _state(
    beat: dict[str, Any] | None, step: int | None, total: int, stale: str, now: float
) -> tuple[str, str]:
    """The run's state and a note saying why (see the module's docstring)."""
    if beat is None and step is None:
        return "not started", ""
    if beat is not None and beat.get("state") == "training":
        window = float(beat.get("s_per_step") or 0.0) * float(beat.get("log_every") or 1) * 10
        alive, how = heartbeat.liveness(beat, max(SILENT_AFTER_S, window), now)
        if stale:
            return "stale", f"{stale}{'; still training the old one' if alive else ''}"
        return ("training", how) if alive else ("stopped", how)
    if stale:
        return "stale", stale
    if beat is not None and beat.get("state") == "failed":
        return "failed", str(beat.get("message", ""))
    if step is not None and step >= total:
        return "done", ""
    if beat is not None and beat.get("state") == "interrupted":
        return "stopped", str(beat.get("message", "interrupted")).split(";")[0]
    return "stopped", f"train.steps is {total}" if step else ""


def run_status(
    run_dir: str | Path, expected_hash: str, total: int, fingerprint: str | None, now: float | None = None
) -> dict[str, Any]:
    """One run's row (:data:`COLUMNS` but ``dataset`` and ``run``) from its folder.

    ``expected_hash``: :func:`~diffseg.runconfig.config_hash` of the run's config as the workflow
    config now resolves it; ``total`` its ``train.steps``; ``fingerprint`` the prepared data's now
    (None when not prepared: the data cannot make the run stale then).
    """
    run_dir, now = Path(run_dir), time.time() if now is None else now
    beat, best = heartbeat.read(run_dir), _json(run_dir / "best.json")
    # Snakemake deletes a failed job's outputs (best.json among them); the heartbeat keeps the best.
    best = best or (beat or {}).get("best")
    # A run's own account of its time (each session's last `seconds`, summed), as the cost table's.
    log_seconds, log_step, sessions = training_seconds(run_dir / "train_log.csv")
    trained = beat if beat is not None and beat.get("config_hash") else best or {}
    stale = ""
    if trained.get("config_hash") and trained["config_hash"] != expected_hash:
        stale = "its config changed"
    elif fingerprint and trained.get("data_fingerprint") and trained["data_fingerprint"] != fingerprint:
        stale = "its data changed"
    beat_step = beat.get("step") if beat is not None else None
    step = beat_step if beat_step is not None else (log_step if sessions else None)
    state, note = _state(beat, step, total, stale, now)
    seconds = (beat or {}).get("seconds") or log_seconds
    # Runs trained before status.json: their mean over the run (validation included).
    s_per_step = (beat or {}).get("s_per_step") or (log_seconds / log_step if log_step else np.nan)
    test, hd95, test_note = _test_metrics(run_dir, best)
    best = best or {}
    return {
        "state": state, "step": step, "total": total, "saved": (beat or {}).get("saved_step"),
        "best_dice": best.get("mean_dice", np.nan), "best_step": best.get("step"),
        "s_per_step": s_per_step, "eta_s": (total - step) * s_per_step if state == "training" else np.nan,
        "train_s": seconds, "accel_h": seconds * beat.get("accelerators", 0) / 3600 if beat else np.nan,
        "test_dice": test, "test_hd95": hd95, "note": "; ".join(n for n in (note, test_note) if n),
    }  # fmt: skip


def campaign_status(config: Mapping[str, Any], results: str | Path | None = None) -> pd.DataFrame:
    """Every run the config's tables, studies and experiments need, one row each (:data:`COLUMNS`)."""
    results = Path(results if results is not None else config.get("results", "results"))
    fingerprints: dict[str, str | None] = {}
    rows, now = [], time.time()
    for dataset, run in runs_needed(config):
        if dataset not in fingerprints:
            info = _json(results / "data" / dataset / "dataset.json") or {}
            fingerprints[dataset] = info.get("fingerprint")
        cfg = resolve_run_config(config, dataset, run)
        row = run_status(
            results / "runs" / dataset / run,
            config_hash(cfg),
            int(cfg["train"]["steps"]),
            fingerprints[dataset],
            now,
        )
        rows.append({"dataset": dataset, "run": run, **row})
    return pd.DataFrame(rows, columns=COLUMNS)


def _duration(seconds: Any) -> str:
    if seconds is None or not np.isfinite(seconds):
        return ""
    seconds = int(round(float(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _number(value: Any, fmt: str) -> str:
    return (
        "" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, fmt)
    )


def display_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Headers and text cells of the table as people read it (times as h:mm:ss, Dice to 3 digits)."""
    headers = ["dataset", "run", "state", "step", "best Dice (step)", "s/step", "ETA", "time", "accel h",
               "test Dice", "test HD95", "note"]  # fmt: skip
    out = []
    for r in table.to_dict("records"):
        step = "" if r["step"] is None or pd.isna(r["step"]) else f"{int(r['step'])}/{r['total']}"
        best = "" if pd.isna(r["best_dice"]) else f"{r['best_dice']:.3f} ({int(r['best_step'])})"
        out.append([
            r["dataset"], r["run"], r["state"], step, best, _number(r["s_per_step"], ".3g"),
            _duration(r["eta_s"]), _duration(r["train_s"]), _number(r["accel_h"], ".2f"),
            _number(r["test_dice"], ".3f"), _number(r["test_hd95"], ".2f"), str(r["note"] or ""),
        ])  # fmt: skip
    return headers, out


def to_text(table: pd.DataFrame) -> str:
    """Aligned columns for a terminal, with a count of runs by state below."""
    headers, rows = display_rows(table)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]
    ]
    counts = table["state"].value_counts()
    said = [f"{counts[s]} {s}" for s in STATES if s in counts]
    lines.append(", ".join(said) + f" (of {len(table)} runs)")
    return "\n".join(lines) + "\n"


def to_markdown(table: pd.DataFrame, when: float | None = None) -> str:
    """The table in Markdown, headed by the time it describes."""
    headers, rows = display_rows(table)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(when if when is not None else time.time()))
    lines = [f"Status of the campaign's {len(table)} runs at {stamp} (`diffseg status`).", ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
