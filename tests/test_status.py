"""``diffseg status``: each run's state from the files runs write, stale against the config or the
data, a killed process told from a live one, the test metrics of the right training; fast."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from diffseg.config import resolve_run_config
from diffseg.matrix import runs_needed
from diffseg.report.status import campaign_status, run_status, to_markdown, to_text
from diffseg.runconfig import config_hash
from diffseg.runs import heartbeat

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def _beat(run_dir: Path, **fields) -> None:
    base = {"state": "training", "host": socket.gethostname(), "pid": os.getpid(), "dataset": "d",
            "run": "r", "total": 200, "accelerators": 0, "log_every": 10, "config_hash": "h1",
            "data_fingerprint": "f1",
            "run_id": "id1", "step": 40, "saved_step": 0, "seconds": 20.0, "s_per_step": 0.5}  # fmt: skip
    heartbeat.write(run_dir, {**base, **fields})


def _train_log(run_dir: Path, steps: int, sessions=(0,)) -> None:
    def session(step: int) -> int:  # the sessions split the steps evenly
        return sessions[min(step * len(sessions) // (steps + 1), len(sessions) - 1)]

    rows = [[s, 1.0 / s, 1e-3, 0.5 * s, 2.0, session(s), 0] for s in range(10, steps + 1, 10)]
    cols = ["step", "loss", "lr", "seconds", "steps_per_s", "session", "skipped"]
    pd.DataFrame(rows, columns=cols).to_csv(run_dir / "train_log.csv", index=False)


def _best(run_dir: Path, step=200, dice=0.6, chash="h1", run_id="id1") -> None:
    best = {"step": step, "mean_dice": dice, "config_hash": chash, "data_fingerprint": "f1", "run_id": run_id}
    (run_dir / "best.json").write_text(json.dumps(best))


def _metrics(run_dir: Path, run_id="id1") -> None:
    rows = [{"uid": u, "class": c, "dice": d, "nsd": d, "hd95": 2.0 * c, "cd": 1.0, "missed": False,
             "step": 200, "config_hash": "h1", "data_fingerprint": "f1", "run_id": run_id}
            for u, ds in (("a", (0.8, 0.6)), ("b", (0.4, 0.2)))
            for c, d in zip((1, 2), ds, strict=True)]  # fmt: skip
    (run_dir / "test").mkdir()
    pd.DataFrame(rows).to_csv(run_dir / "test" / "metrics.csv", index=False)


def test_states_from_the_files_a_run_writes(tmp_path):
    def status(name, **kw):
        return run_status(tmp_path / name, kw.get("expected", "h1"), 200, kw.get("fp", "f1"))

    assert status("none")["state"] == "not started"

    live = tmp_path / "live"
    live.mkdir()
    _beat(live)  # this very process: alive
    row = status("live")
    assert row["state"] == "training" and row["step"] == 40
    assert row["eta_s"] == pytest.approx(160 * 0.5)

    dead = tmp_path / "dead"
    dead.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _beat(dead, pid=gone.pid, step=70, saved_step=50)  # SIGKILL leaves "training" behind
    row = status("dead")
    assert row["state"] == "stopped" and row["step"] == 70 and row["saved"] == 50
    assert "gone" in row["note"] and np.isnan(row["eta_s"])

    away = tmp_path / "away"
    away.mkdir()
    _beat(away, host="node-7", pid=1)
    assert status("away")["state"] == "training"  # updated just now by another host
    assert run_status(away, "h1", 200, "f1", now=time.time() + 3600)["state"] == "stopped"

    done = tmp_path / "done"
    done.mkdir()
    _beat(done, state="done", step=200, saved_step=200, seconds=100.0, accelerators=8)
    _best(done)
    _metrics(done)
    row = status("done")
    assert row["state"] == "done" and row["best_dice"] == 0.6 and row["best_step"] == 200
    assert row["test_dice"] == pytest.approx(np.mean([0.7, 0.3])) and row["test_hd95"] == pytest.approx(3.0)
    assert row["accel_h"] == pytest.approx(100 * 8 / 3600)
    assert (
        status("done", expected="h2")["state"] == "stale"
        and "config" in status("done", expected="h2")["note"]
    )
    assert status("done", fp="f2")["state"] == "stale" and "data" in status("done", fp="f2")["note"]
    assert status("done", fp=None)["state"] == "done"  # data not prepared yet: cannot be stale

    failed = tmp_path / "failed"
    failed.mkdir()
    _beat(failed, state="failed", message="FloatingPointError: loss is nan")
    assert (status("failed")["state"], status("failed")["note"]) == (
        "failed",
        "FloatingPointError: loss is nan",
    )

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    _beat(
        stopped,
        state="interrupted",
        step=120,
        saved_step=120,
        message="x: SIGTERM received; checkpoint saved",
    )
    assert status("stopped")["state"] == "stopped" and status("stopped")["note"] == "x: SIGTERM received"


def test_old_runs_without_a_status_file_and_tests_of_an_earlier_training(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    _train_log(run, 200, sessions=(0, 1))
    _best(run, run_id="id2")
    _metrics(run, run_id="id1")
    row = run_status(run, "h1", 200, "f1")
    assert row["state"] == "done" and row["step"] == 200
    assert row["train_s"] == pytest.approx(50.0 + 100.0)  # each session's last seconds, summed
    assert np.isnan(row["test_dice"]) and "earlier training" in row["note"]
    assert run_status(run, "h1", 400, "f1")["state"] == "stopped"  # train.steps raised since


def test_campaign_status_of_the_demo_config_and_its_text(tmp_path):
    config = {**DEMO, "results": str(tmp_path)}
    runs = runs_needed(config)
    dataset, run = runs[0]
    cfg = resolve_run_config(config, dataset, run)
    run_dir = tmp_path / "runs" / dataset / run
    run_dir.mkdir(parents=True)
    _beat(run_dir, state="done", step=200, config_hash=config_hash(cfg))
    _best(run_dir, chash=config_hash(cfg))

    table = campaign_status(config)

    assert list(zip(table["dataset"], table["run"], strict=True)) == runs
    assert table["state"].iloc[0] == "done" and set(table["state"].iloc[1:]) == {"not started"}
    text = to_text(table)
    assert f"1 done, {len(runs) - 1} not started (of {len(runs)} runs)" in text
    assert "| dataset | run | state |" in to_markdown(table)

    # One variant's setting edited: its runs, and only they, are stale.
    variant = run.split("-", 1)[1]
    edited = {**config, "variants": {variant: {"optim": {"learning_rate": 0.5}}}}
    assert campaign_status(edited)["state"].iloc[0] == "stale"


def test_diffseg_status_answers_fast_and_never_loads_jax(tmp_path):
    config = {**DEMO, "results": str(tmp_path)}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    # CPU time, not wall time: under 2 s on this 2-core VM even when every core is busy with tests.
    code = (
        "import sys, time; from diffseg.cli import main;"
        f" rc = main(['status', '--configfile', {str(path)!r}]);"
        " print('jax' in sys.modules, time.process_time()); sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    jax_loaded, seconds = out.splitlines()[-1].split()
    assert jax_loaded == "False"
    assert "not started" in out
    assert float(seconds) < 2.0, out


def test_watch_refreshes_until_ctrl_c(tmp_path):
    import signal

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**DEMO, "results": str(tmp_path)}))
    cmd = [sys.executable, "-m", "diffseg.cli", "status", "--configfile", str(path), "--watch", "0.2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 60
    lines = []
    while sum("not started (of" in line for line in lines) < 2 and time.time() < deadline:
        lines.append(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    assert sum("not started (of" in line for line in lines) >= 2  # printed again, unchanged
