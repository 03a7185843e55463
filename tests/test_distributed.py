"""One run as several processes (``diffseg.distributed``): two CPU processes on this machine.

JAX's distributed runtime over localhost, the gradient all-reduce by gloo (JAX's CPU collectives):
a run trained by 2 processes of 1 device each must end with the parameters of 1 process with 2
host devices; killing one process must end the other at once with one line, and the rerun
resume exactly; SIGTERM on both must save once, at the same step. The end-to-end checks start
real processes (about a minute each on 2 cores): ``pytest -m slow``. The launch decisions are
checked without starting JAX.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest
from test_provenance import latest_params
from test_train import TINY, toy_data  # noqa: F401 (a fixture)

from diffseg.config import resolve_run_config, save_run_config
from diffseg.distributed import Processes, add_arguments, launch_of
from diffseg.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 12, 4
LR = TINY["training"]["optim"]["learning_rate"]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


# what srun sets in each task of a job step (the count, SLURM_NTASKS, per test)
SLURM_STEP = {
    "SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
}  # fmt: skip


def test_a_process_alone_joins_nothing(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert launch_of(_args(), {}) is None
    # a SLURM job of one task (the plugin's `srun -n1` of an ordinary job) is alone too
    assert launch_of(_args(), {**SLURM_STEP, "SLURM_NTASKS": "1"}) is None
    assert Processes().writer and Processes().describe() == "process 0 of 1 (one process)"
    assert not Processes(1, 2, "x").writer


def test_a_hand_launch_needs_all_three_values(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    kwargs, how = launch_of(_args("--coordinator", "h:1234", "--num-processes", "2", "--process-id", "1"), {})
    assert kwargs == {"coordinator_address": "h:1234", "num_processes": 2, "process_id": 1}
    assert "h:1234" in how
    with pytest.raises(InputError, match="together"):
        launch_of(_args("--coordinator", "h:1234"), {})
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "e:9")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert launch_of(_args(), {})[0] == {"coordinator_address": "e:9", "num_processes": 4, "process_id": 3}


def test_a_slurm_step_of_several_tasks_joins_with_jax_s_detection(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    kwargs, how = launch_of(_args(), {**SLURM_STEP, "SLURM_NTASKS": "2"})
    assert kwargs == {"local_device_ids": None} and how == "SLURM job 77, 2 tasks"
    # every GPU SLURM bound to the task, not JAX's one GPU numbered by SLURM_LOCALID
    env = {**SLURM_STEP, "SLURM_NTASKS": "2", "CUDA_VISIBLE_DEVICES": "2,3"}
    assert launch_of(_args(), env)[0] == {"local_device_ids": [0, 1]}
    assert launch_of(_args("--distributed"), {})[0] == {}  # everything from JAX's detection


# -- two real processes -------------------------------------------------------------------------


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp: Path, steps: int = STEPS) -> Path:
    cfg = resolve_run_config(TINY, "toy", "3d-diff", {"train.steps": steps, "train.checkpoint_every": EVERY})
    save_run_config(cfg, tmp / "run.yaml")
    return tmp / "run.yaml"


def _env(devices: int = 1) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "DIFFSEG_ALLOW_CPU": "1", "PYTHONPATH": str(ROOT),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}  # fmt: skip


def _train(config: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "diffseg.cli", "train", "--run-config", str(config), "--data", str(data),
            "--out", str(out), *extra]  # fmt: skip


def _two(config: Path, data: Path, out: Path) -> list[subprocess.Popen]:
    """``diffseg train`` as processes 0 and 1 of one run, launched by hand; stderr to out.pI.err."""
    port = _port()
    return [
        subprocess.Popen(
            _train(
                config,
                data,
                out,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ),
            env=_env(),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(f"{out}.p{i}.err", "w"),  # noqa: SIM115
        )  # fmt: skip
        for i in range(2)
    ]


def _wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    return [p.wait(timeout) for p in procs]


def assert_same_up_to_rounding(a, b, steps: int, peak_lr: float) -> None:
    """Parameters ``a``, ``b`` from the same run trained over a different split of the arithmetic.

    The all-reduce's order differs, so sums round differently: weights agree to float rounding.
    The reference network's time layers (``.../time/...``) get a gradient that is zero but for
    rounding (its time conditioning cancels, docs/FIDELITY.md), which AdamW's normalised update
    turns into steps of up to the learning rate: those agree to ``steps × peak_lr``."""
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    for (path, x), y in zip(flat_a, jax.tree.leaves(b), strict=True):
        name = jax.tree_util.keystr(path)
        atol = 1.01 * steps * peak_lr if "'time'" in name else 1e-6
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=atol, err_msg=name)


def _one_process_two_devices(config: Path, data: Path, out: Path) -> None:
    res = subprocess.run(_train(config, data, out), env=_env(2), cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


def _err(out: Path, i: int) -> str:
    return Path(f"{out}.p{i}.err").read_text()


@pytest.mark.slow
def test_two_processes_train_as_one_process_on_two_devices(toy_data, tmp_path):  # noqa: F811
    config = _config(tmp_path)
    two, one = tmp_path / "two", tmp_path / "one"
    assert _wait(_two(config, toy_data, two)) == [0, 0], _err(two, 0)[-3000:] + _err(two, 1)[-3000:]
    first = [_err(two, i).splitlines()[0] for i in range(2)]
    assert [line.split(" (coordinator 127.0.0.1:")[0] for line in first] == [
        f"diffseg: process {i} of 2" for i in range(2)
    ], first
    assert "using the 2 devices of the run's 2 processes" in _err(two, 0)
    assert "step 12/12" not in _err(two, 1)  # process 1 keeps quiet; process 0 speaks for the run
    _one_process_two_devices(config, toy_data, one)
    # the same update: 2 processes' all-reduce by gloo against 1 process's over 2 host devices
    assert_same_up_to_rounding(latest_params(two)[0], latest_params(one)[0], STEPS, LR)
    a, b = pd.read_csv(two / "train_log.csv"), pd.read_csv(one / "train_log.csv")
    assert list(a["step"]) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    assert list(pd.read_csv(two / "valid.csv")["step"]) == [4, 8, 12]
    # tested and predicted by one process: the same masks as the one-process run's
    scan = toy_data / "images" / "case5.nii.gz"
    for run in (two, one):
        res = subprocess.run([sys.executable, "-m", "diffseg.cli", "predict", str(scan), "--run", str(run),
                              "-o", str(run / "mask.nii.gz")], env=_env(), cwd=ROOT, capture_output=True,
                             text=True)  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
    import nibabel as nib

    np.testing.assert_array_equal(
        np.asarray(nib.load(two / "mask.nii.gz").dataobj), np.asarray(nib.load(one / "mask.nii.gz").dataobj)
    )


@pytest.mark.slow
def test_a_killed_process_ends_the_run_with_one_line_and_the_rerun_resumes(toy_data, tmp_path):  # noqa: F811
    config = _config(tmp_path)
    run, ref = tmp_path / "run", tmp_path / "ref"
    procs = _two(config, toy_data, run)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / str(EVERY)).is_dir() or f"step {EVERY + 1}/" not in _err(run, 0):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _err(run, 0)[-3000:]
        time.sleep(0.1)
    procs[1].kill()
    killed = time.monotonic()
    assert procs[0].wait(60) == 1
    took = time.monotonic() - killed
    print(f"process 0 ended {took:.2f} s after process 1 was killed")
    assert took < 60
    last = _err(run, 0).strip().splitlines()[-1]
    assert last.startswith("diffseg train: process 0 of 2") and "another process of the run stopped" in last
    assert "run the same command again to resume" in last
    procs[1].wait(10)
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert _wait(_two(config, toy_data, run)) == [0, 0], _err(run, 0)[-3000:]
    assert f"resuming {run} from step {saved[-1]} of {STEPS} (session 1)" in _err(run, 0)
    log = pd.read_csv(run / "train_log.csv")
    assert list(log["step"]) == list(range(1, STEPS + 1))
    assert set(log.loc[log["step"] > saved[-1], "session"]) == {1}
    _one_process_two_devices(config, toy_data, ref)
    assert_same_up_to_rounding(latest_params(run)[0], latest_params(ref)[0], STEPS, LR)


@pytest.mark.slow
def test_sigterm_on_every_process_saves_once_at_the_same_step(toy_data, tmp_path):  # noqa: F811
    config = _config(tmp_path, steps=40)
    run = tmp_path / "run"
    procs = _two(config, toy_data, run)
    deadline = time.monotonic() + 300
    while "step 6/" not in _err(run, 0):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _err(run, 0)[-3000:]
        time.sleep(0.1)
    procs[0].send_signal(signal.SIGTERM)
    time.sleep(0.3)  # the other process's signal a little later, at another step: they still agree
    procs[1].send_signal(signal.SIGTERM)
    assert _wait(procs, 120) == [143, 143]
    steps = {int(_err(run, i).split("checkpoint saved at step ")[1].split(";")[0]) for i in range(2)}
    assert len(steps) == 1 and 6 <= next(iter(steps)) < 40, steps
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == next(iter(steps))
    assert len(pd.read_csv(run / "train_log.csv")) == saved[-1]
