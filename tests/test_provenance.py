"""Provenance and change without loss: what a run resumes, restarts, refuses and recomputes.

One tiny run (``base_run``, 6 steps, checkpoints at 3 and 6) is trained once; each test works
on a copy of it, so a test that restarts the run by mistake shows in its ``session`` column.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose
from test_train import TINY, toy_data  # noqa: F401 (toy_data is a fixture)

from diffseg.config import resolve_run_config
from diffseg.errors import ConfigError, DataError
from diffseg.io import read_nifti, write_nifti
from diffseg.progress import Progress
from diffseg.runs import RunCheckpoints, build_model
from diffseg.runs.checkpoint import CorruptCheckpointWarning
from diffseg.train.step import build_optimizer, init_state


def run_cfg(run: str = "3d-diff", **train) -> dict:
    return resolve_run_config(TINY, "toy", run, {f"train.{k}": v for k, v in train.items()})


def latest_params(run_dir: Path):
    """The latest checkpoint's ``(params, step)``."""
    ckpt = RunCheckpoints(run_dir)
    model = build_model(run_cfg(), 3)
    tx, _ = build_optimizer(run_cfg())
    like = init_state(model, tx, (16, 16, 8), jax.random.key(0))
    state, _ = ckpt.restore(jax.tree.map(np.asarray, like))
    ckpt.close()
    return state["params"], int(state["step"])


def assert_same_params(a, b) -> None:
    jax.tree.map(lambda x, y: assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7), a, b)


@pytest.fixture(scope="module")
def base_run(toy_data, tmp_path_factory) -> Path:  # noqa: F811
    """``3d-diff`` trained uninterrupted for 6 steps (checkpoints 3 and 6). Do not modify: copy."""
    from diffseg.train import train_run

    run_dir = tmp_path_factory.mktemp("base") / "run"
    train_run(run_cfg(), toy_data, run_dir)
    return run_dir


@pytest.fixture
def copy_of(tmp_path):
    def copy(run_dir: Path) -> Path:
        return Path(shutil.copytree(run_dir, tmp_path / "run"))

    return copy


def test_progress_is_plain_lines_off_a_terminal():
    out = io.StringIO()  # not a terminal, like a Snakemake log file
    progress = Progress(10, "train 3d-diff", initial=2, stream=out)
    progress.update(2)
    progress.log(loss=0.5, lr=1e-4)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in out.getvalue()
    assert lines[0].startswith("train 3d-diff: step 4/10 loss=0.5000 lr=1.00e-04 |")
    assert "step/s ETA" in lines[0]


def _curve(run_dir: Path, tag: str = "train/loss") -> list[int]:
    """The steps of a TensorBoard curve of the run, as written (a step twice would show twice)."""
    from diffseg.train.tensorboard import read_scalars

    return [step for step, _ in read_scalars(run_dir).get(tag, [])]


def test_a_run_writes_tensorboard_curves_and_its_status(base_run):
    from diffseg.train.tensorboard import read_image_steps, read_scalars

    tags = read_scalars(base_run)
    assert _curve(base_run) == [1, 2, 3, 4, 5, 6] and _curve(base_run, "valid/mean_dice") == [3, 6]
    assert {"train/lr", "train/steps_per_s", "valid/dice/1_box", "valid/dice/2_ball"} <= set(tags)
    assert read_image_steps(base_run) == {"valid/mid_slice": [3, 6]}
    best = json.loads((base_run / "best.json").read_text())
    assert dict(tags["valid/mean_dice"])[best["step"]] == pytest.approx(best["mean_dice"])
    status = json.loads((base_run / "status.json").read_text())
    assert (status["state"], status["step"], status["saved_step"], status["total"]) == ("done", 6, 6, 6)
    assert status["run_id"] == best["run_id"] and status["accelerators"] == 0


def test_log_and_checkpoint_interval_changes_do_not_restart(base_run, copy_of, toy_data, capfd):  # noqa: F811
    from diffseg.train import train_run

    run_dir = copy_of(base_run)
    before = pd.read_csv(run_dir / "train_log.csv")
    best = train_run(run_cfg(log_every=2, checkpoint_every=2), toy_data, run_dir)
    assert "resuming" in capfd.readouterr().err
    after = pd.read_csv(run_dir / "train_log.csv")
    pd.testing.assert_frame_equal(before, after)  # a restart would log steps 2, 4, 6 only
    assert best == json.loads((base_run / "best.json").read_text())


def test_raising_steps_continues_from_the_last_checkpoint(base_run, copy_of, toy_data):  # noqa: F811
    from diffseg.train import train_run

    run_dir = copy_of(base_run)
    train_run(run_cfg(steps=9, tensorboard=False), toy_data, run_dir)
    assert _curve(run_dir) == [1, 2, 3, 4, 5, 6]  # train.tensorboard: false writes no more events
    log = pd.read_csv(run_dir / "train_log.csv")
    assert list(log["step"]) == list(range(1, 10))
    assert list(log["session"]) == [0] * 6 + [1] * 3  # the second process ran steps 7-9 only
    base_log = pd.read_csv(base_run / "train_log.csv")
    assert_allclose(log["loss"][:6], base_log["loss"])
    assert list(pd.read_csv(run_dir / "valid.csv")["step"]) == [3, 6, 9]
    assert latest_params(run_dir)[1] == 9


def test_steps_lowered_below_the_latest_checkpoint_is_an_error(base_run, copy_of, toy_data):  # noqa: F811
    from diffseg.train import train_run

    run_dir = copy_of(base_run)
    with pytest.raises(ConfigError, match="trained to step 6, beyond train.steps=3"):
        train_run(run_cfg(steps=3), toy_data, run_dir)
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [3, 6]


def test_out_on_another_runs_folder_is_refused(base_run, copy_of, toy_data):  # noqa: F811
    from diffseg.train import train_run

    run_dir = copy_of(base_run)
    with pytest.raises(ConfigError, match=r"holds the checkpoints of run '3d-diff'.*refusing"):
        train_run(run_cfg("3d-seg"), toy_data, run_dir)
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [3, 6]
    assert (run_dir / "best").is_dir()


def _corrupt(step_dir: Path) -> None:
    for path in step_dir.joinpath("state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")  # truncated by a full disk or a kill


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(base_run, copy_of, toy_data):  # noqa: F811
    from diffseg.train import train_run

    run_dir = copy_of(base_run)
    _corrupt(run_dir / "checkpoints" / "6")
    with pytest.warns(CorruptCheckpointWarning, match=r"checkpoints/6 deleted; resuming from step 3"):
        train_run(run_cfg(), toy_data, run_dir)
    log = pd.read_csv(run_dir / "train_log.csv")
    assert list(log["session"]) == [0, 0, 0, 1, 1, 1]
    assert_same_params(latest_params(run_dir)[0], latest_params(base_run)[0])
    # Steps 4-6 were logged by the first session too: cut before they were trained again, so
    # TensorBoard (its own reader here) has one curve, one point per step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from diffseg.train.tensorboard import event_files, read_image_steps

    assert _curve(run_dir) == [1, 2, 3, 4, 5, 6] and len(event_files(run_dir)) == 2  # a file per session
    assert read_image_steps(run_dir) == {"valid/mid_slice": [3, 6]}
    board = EventAccumulator(str(run_dir))
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]

    _corrupt(run_dir / "checkpoints" / "3")
    _corrupt(run_dir / "checkpoints" / "6")
    with pytest.raises(DataError, match=rf"{run_dir / 'checkpoints'}: no readable checkpoint"):
        train_run(run_cfg(), toy_data, run_dir)


def test_changed_data_retrains_and_stale_predictions_are_recomputed(
    base_run,
    copy_of,
    toy_data,  # noqa: F811
    tmp_path,
    monkeypatch,
    capfd,
):
    import diffseg.train.loop as loop
    from diffseg.evaluate.testset import evaluate_run
    from diffseg.train import train_run

    run_dir = copy_of(base_run)
    evaluate_run(run_dir, toy_data)
    first = json.loads((run_dir / "best.json").read_text())
    metrics = pd.read_csv(run_dir / "test" / "metrics.csv")
    assert (metrics["data_fingerprint"] == first["data_fingerprint"]).all()
    assert (metrics["config_hash"] == first["config_hash"]).all()
    prediction = run_dir / "test" / "predictions" / "case5.nii.gz"
    marker = (np.indices((16, 16, 8)).sum(0) % 3).astype(np.uint8)  # no network predicts this
    write_nifti(prediction, marker, (1.0, 1.0, 2.0))

    fixed = Path(shutil.copytree(toy_data, tmp_path / "fixed"))  # a label fixed by hand
    label, spacing = read_nifti(fixed / "labels" / "case0.nii.gz")
    label[:3] = 0
    write_nifti(fixed / "labels" / "case0.nii.gz", label.astype(np.uint8), spacing)
    # The retrained run's best at the same step as before: only the identity tells them apart.
    scores = iter([1.0, 0.0] if first["step"] == 3 else [0.0, 1.0])
    blank = np.zeros((16, 16, 8), np.uint8)  # the first case's prediction, for TensorBoard's picture
    monkeypatch.setattr(loop, "validate", lambda *args: (np.full((1, 2), next(scores)), blank))
    capfd.readouterr()
    best = train_run(run_cfg(), fixed, run_dir)
    err = capfd.readouterr().err
    assert "prepared data" in err and "changed" in err and "starting over" in err
    assert list(pd.read_csv(run_dir / "train_log.csv")["session"]) == [0] * 6  # from step 0
    assert _curve(run_dir) == [1, 2, 3, 4, 5, 6]  # the old experiment's curves were deleted
    assert best["step"] == first["step"] and best["data_fingerprint"] != first["data_fingerprint"]

    evaluate_run(run_dir, fixed)
    assert not np.array_equal(read_nifti(prediction)[0], marker)  # recomputed, not reused
    stamp = json.loads((prediction.parent / "checkpoint.json").read_text())
    assert stamp["data_fingerprint"] == best["data_fingerprint"] and stamp["run_id"] == best["run_id"]
    metrics = pd.read_csv(run_dir / "test" / "metrics.csv")
    assert (metrics["data_fingerprint"] == best["data_fingerprint"]).all()


def test_a_nonfinite_state_is_never_checkpointed(toy_data, tmp_path, monkeypatch):  # noqa: F811
    """The step skips non-finite updates; parameters broken anyway stop the run before any save."""
    import jax
    import jax.numpy as jnp

    import diffseg.train.loop as loop

    def nan_params_at_step_2(*args, **kwargs):
        def step(state, *rest):  # no network: the loop's check before saving is what is tested
            params = state["params"]
            if int(state["step"]) == 1:
                params = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
            return {**state, "params": params, "step": state["step"] + 1}, jnp.asarray(1.0)

        return step

    monkeypatch.setattr(loop, "make_train_step", nan_params_at_step_2)
    with pytest.raises(FloatingPointError, match="parameters not finite at step 3; nothing was saved"):
        loop.train_run(run_cfg(log_every=100), toy_data, tmp_path)  # no logging step before the save
    assert RunCheckpoints(tmp_path).latest_step() is None


@pytest.mark.parametrize("how", ["skipped", "params"])
def test_a_nonfinite_stop_closes_the_feeder_progress_and_checkpoints(toy_data, tmp_path, monkeypatch, how):  # noqa: F811
    """Both ``FloatingPointError`` stops (updates skipped in a row; parameters not finite before a
    save) leave by the run's one exit: progress bar, feeder thread and checkpoints closed, in that
    order, and the signal handlers restored."""
    import signal

    import jax.numpy as jnp

    import diffseg.train.loop as loop

    closed = []

    class Checkpoints(loop.RunCheckpoints):
        def close(self):
            closed.append("checkpoints")
            super().close()

    class Feeder(loop.BatchFeeder):
        def close(self):
            super().close()
            closed.append("feeder thread alive" if self._thread.is_alive() else "feeder")

    class Bar(loop.Progress):
        def close(self):
            closed.append("progress")
            super().close()

    def nonfinite(*args, **kwargs):
        def step(state, *rest):  # no network: a NaN loss, the update skipped, or NaN parameters
            params = state["params"]
            if how == "params":
                params = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
            skipped = state["skipped"] + (1 if how == "skipped" else 0)
            new = {**state, "params": params, "step": state["step"] + 1, "skipped": skipped}
            return new, jnp.asarray(jnp.nan)

        return step

    patches = {"RunCheckpoints": Checkpoints, "BatchFeeder": Feeder, "Progress": Bar,
               "make_train_step": nonfinite, "MAX_SKIPPED_IN_A_ROW": 2}  # fmt: skip
    for name, value in patches.items():
        monkeypatch.setattr(loop, name, value)
    handler = signal.getsignal(signal.SIGTERM)
    match = "the last 2 updates skipped" if how == "skipped" else "parameters not finite at step 3"
    with pytest.raises(FloatingPointError, match=match):
        loop.train_run(run_cfg(log_every=1 if how == "skipped" else 100), toy_data, tmp_path)
    # (the feeder's iterator closes it once more when it is collected: a no-op)
    assert list(dict.fromkeys(closed)) == ["progress", "feeder", "checkpoints"]
    assert signal.getsignal(signal.SIGTERM) is handler


def test_prepared_data_fingerprint_follows_the_content(tmp_path):
    from diffseg.data.prepare import compute_fingerprint, prepare_dataset, source_files

    entry = {
        "source": "phantom", "anatomy": "pelvis", "num_cases": 3, "seed": 0,
        "spacing": [0.75, 0.75, 2.5], "shape": [16, 16, 8], "split": {"train": 1, "valid": 1, "test": 1},
    }  # fmt: skip
    a = prepare_dataset("p", entry, tmp_path / "a", tmp_path)["fingerprint"]
    again = prepare_dataset("p", entry, tmp_path / "again", tmp_path)["fingerprint"]
    seed1 = prepare_dataset("p", {**entry, "seed": 1}, tmp_path / "b", tmp_path)["fingerprint"]
    assert a == again == compute_fingerprint(tmp_path / "a") and a != seed1
    assert json.loads((tmp_path / "a" / "dataset.json").read_text())["fingerprint"] == a

    own = tmp_path / "own"
    (own / "labelsTr").mkdir(parents=True)
    (own / "labelsTr" / "x.nii.gz").write_bytes(b"")
    (own / "dataset.json").write_text("{}")
    (own / "._x.nii.gz").write_bytes(b"")  # macOS metadata: not an input
    assert source_files({"source": "msd", "path": str(own)}) == [
        str(own / "dataset.json"), str(own / "labelsTr" / "x.nii.gz"),
    ]  # fmt: skip
    assert source_files(entry) == []


def test_temporaries_of_killed_writers_are_found_and_removed(tmp_path):
    from diffseg.io import atomic_path, remove_temporaries

    with atomic_path(tmp_path / "train_log.csv") as tmp:  # what a kill at this point leaves
        tmp.write_text("partial")
        left = tmp_path / "left" / tmp.name
        left.parent.mkdir()
        left.write_text("partial")
    (tmp_path / "left" / "6.orbax-checkpoint-tmp-1234").mkdir()
    (tmp_path / "left" / "train_log.csv").write_text("kept")
    removed = remove_temporaries(tmp_path / "left")
    assert {p.name for p in removed} == {left.name, "6.orbax-checkpoint-tmp-1234"}
    assert [p.name for p in (tmp_path / "left").iterdir()] == ["train_log.csv"]
