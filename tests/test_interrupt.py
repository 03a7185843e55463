"""Real interruption of ``diffseg train`` in a subprocess: SIGKILL during a checkpoint save, SIGTERM.

Each killed run is resumed and compared with the uninterrupted ``base_run`` (same config):
the same parameters, and its ``train_log.csv`` ``session`` column shows the resumed process
ran only the steps after the checkpoint it resumed from. Before the resume ``diffseg status``
says it stopped (and where); after it TensorBoard's files hold one curve.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from test_provenance import assert_same_params, base_run, latest_params, run_cfg  # noqa: F401
from test_train import toy_data  # noqa: F401 (a fixture)

from diffseg.config import save_run_config

ROOT = Path(__file__).resolve().parents[1]

# The child is `diffseg train` with one hook: `kill-in-save N` holds orbax's final rename of
# checkpoints/N (the parent then SIGKILLs it with the temporary folder on disk); `sigterm N`
# sends the process SIGTERM while it runs step N.
CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    mode, at = sys.argv[1], int(sys.argv[2])
    if mode == "kill-in-save":
        from orbax.checkpoint._src.path import atomicity
        real = atomicity.AtomicRenameTemporaryPath.finalize
        async def finalize(self):
            if self._final_path.name == str(at) and self._final_path.parent.name == "checkpoints":
                print("saving", flush=True)
                time.sleep(300)
            return await real(self)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    else:
        import diffseg.train.loop as loop
        real = loop.make_train_step
        def make(*args, **kwargs):
            step_fn = real(*args, **kwargs)
            def step(state, *rest):
                if int(state["step"]) == at - 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                return step_fn(state, *rest)
            return step
        loop.make_train_step = make
    from diffseg.cli import main
    sys.exit(main(sys.argv[3:]))
    """
)


def _start(mode: str, at: int, data: Path, run_dir: Path, err: Path) -> subprocess.Popen:
    config = run_dir.parent / "run.yaml"
    save_run_config(run_cfg(), config)
    cmd = [sys.executable, "-c", CHILD, mode, str(at), "train", "--run-config", str(config),
           "--data", str(data), "--out", str(run_dir)]  # fmt: skip
    env = {**os.environ, "DIFFSEG_JAX_CACHE": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err.open("w"), text=True)


def _status(run_dir: Path) -> dict:
    from diffseg.report.status import run_status
    from diffseg.runconfig import config_hash

    return run_status(run_dir, config_hash(run_cfg()), 6, None)


def _loss_steps(run_dir: Path) -> list[int]:
    from diffseg.train.tensorboard import read_scalars

    return [step for step, _ in read_scalars(run_dir)["train/loss"]]


def _resume_and_compare(run_dir: Path, data: Path, base: Path, resumed_from: int) -> None:
    from diffseg.train import train_run

    train_run(run_cfg(), data, run_dir)
    log = pd.read_csv(run_dir / "train_log.csv")
    assert list(log["step"]) == [1, 2, 3, 4, 5, 6]
    assert list(log["session"]) == [0] * resumed_from + [1] * (6 - resumed_from)
    assert_same_params(latest_params(run_dir)[0], latest_params(base)[0])
    assert list(pd.read_csv(run_dir / "valid.csv")["step"]) == [3, 6]
    assert not [p for p in run_dir.rglob("*") if "tmp" in p.name]  # the kill's temporaries are gone
    assert _loss_steps(run_dir) == [1, 2, 3, 4, 5, 6]  # TensorBoard: one curve, no step twice
    assert _status(run_dir)["state"] == "done"


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_then_resume(base_run, toy_data, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    child = _start("kill-in-save", 6, toy_data, run_dir, tmp_path / "err.txt")
    try:
        assert child.stdout.readline().strip() == "saving", (tmp_path / "err.txt").read_text()[-3000:]
        assert list((run_dir / "checkpoints").glob("6.orbax-checkpoint-tmp*"))
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(60)
    assert child.returncode == -signal.SIGKILL
    assert latest_params(run_dir)[1] == 3
    # What `diffseg status` says of it: stopped at the step it reached, resumable from checkpoint 3.
    status = _status(run_dir)
    assert (status["state"], status["step"], status["saved"]) == ("stopped", 6, 3), status
    assert "gone" in status["note"]
    assert _loss_steps(run_dir) == [1, 2, 3, 4, 5, 6]  # logged by the killed session, past checkpoint 3
    _resume_and_compare(run_dir, toy_data, base_run, resumed_from=3)


@pytest.mark.slow
def test_sigterm_saves_exits_nonzero_and_resumes(base_run, toy_data, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    child = _start("sigterm", 5, toy_data, run_dir, tmp_path / "err.txt")
    child.wait(600)
    err = (tmp_path / "err.txt").read_text()
    assert child.returncode == 143, err[-3000:]
    assert "SIGTERM received; checkpoint saved at step 5" in err
    assert latest_params(run_dir)[1] == 5  # the step running when the signal came, then saved
    assert list(pd.read_csv(run_dir / "train_log.csv")["step"]) == [1, 2, 3, 4, 5]
    status = _status(run_dir)
    assert (status["state"], status["step"], status["saved"]) == ("stopped", 5, 5), status
    assert "SIGTERM" in status["note"]
    _resume_and_compare(run_dir, toy_data, base_run, resumed_from=5)
