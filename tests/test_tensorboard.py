"""TensorBoard event files of a run: one curve per run through resumes and restarts, read back
by TensorBoard's own reader; the mid-slice picture; the switch that turns them off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from test_provenance import base_run, run_cfg  # noqa: F401 (base_run is a fixture)
from test_train import toy_data  # noqa: F401 (a fixture)

from diffseg.train.tensorboard import (
    EventLog,
    class_tags,
    event_files,
    mid_slice_panel,
    read_image_steps,
    read_scalars,
    remove_events,
    truncate_after,
)


def _steps(run_dir: Path, tag: str) -> list[int]:
    return [s for s, _ in read_scalars(run_dir).get(tag, [])]


def _accumulated(run_dir: Path):
    """What TensorBoard itself loads from the folder (its event accumulator, purging as it does)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


def test_truncate_after_cuts_later_steps_and_a_torn_record(tmp_path):
    log = EventLog(tmp_path, session=0)
    for step in range(1, 11):
        log.scalars(step, {"train/loss": 1.0 / step})
    for step in (5, 10):
        log.image(step, "valid/mid_slice", np.full((4, 6, 3), 200, np.uint8))
    log.close()
    (path,) = event_files(tmp_path)
    with path.open("ab") as f:  # a writer killed in the middle of a record
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x01\x02")
    assert _steps(tmp_path, "train/loss") == list(range(1, 11))  # the torn tail is skipped on reading

    dropped = truncate_after(tmp_path, 6)

    assert dropped == 5  # steps 7-10 and the image of step 10 (the torn bytes are no record)
    assert _steps(tmp_path, "train/loss") == list(range(1, 7))
    assert read_image_steps(tmp_path) == {"valid/mid_slice": [5]}
    acc = _accumulated(tmp_path)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 7))
    assert [e.step for e in acc.Images("valid/mid_slice")] == [5]
    assert truncate_after(tmp_path, 6) == 0  # nothing left to cut: the file is not rewritten
    assert remove_events(tmp_path) == 1 and event_files(tmp_path) == []


def test_event_log_disabled_writes_nothing(tmp_path):
    log = EventLog(tmp_path, session=0, enabled=False)
    log.scalars(1, {"train/loss": 1.0})
    log.image(1, "x", np.zeros((2, 2, 3), np.uint8))
    log.close()
    assert event_files(tmp_path) == []


def test_mid_slice_panel_is_image_truth_prediction_in_class_colours():
    from diffseg.colors import class_colors

    image = np.zeros((8, 6, 5), np.float32)
    image[:, :, 2] = np.linspace(0, 1, 8)[:, None]
    label = np.zeros((8, 6, 5), np.uint8)
    label[1, 2, 2] = 2  # X=1, Y=2 of the middle slice (Z=2)
    pred = np.zeros_like(label)

    panel = mid_slice_panel(image, label, pred, num_classes=3)

    scale = 240 // 6  # rows are Y (6), enlarged to at least 240 pixels
    assert panel.shape == (6 * scale, (3 * 8 + 4) * scale, 3) and panel.dtype == np.uint8
    gray, truth, guess = (panel[:, i * (8 + 2) * scale : (i * (8 + 2) + 8) * scale] for i in range(3))
    assert_array_equal(gray, guess)  # nothing predicted: the prediction panel is the image
    px = truth[2 * scale, 1 * scale].astype(float) / 255  # the labelled pixel
    colour = np.array(class_colors(3)[1][:3])
    underlying = gray[2 * scale, 1 * scale, 0] / 255
    np.testing.assert_allclose(px, 0.45 * underlying + 0.55 * colour, atol=1 / 255)
    assert_array_equal(
        np.delete(truth, slice(2 * scale, 3 * scale), axis=0),
        np.delete(gray, slice(2 * scale, 3 * scale), axis=0),
    )


def test_class_tags_keep_class_order():
    names = ["background"] + [f"c{i}" for i in range(1, 12)]
    tags = class_tags(names)
    assert tags[0] == "valid/dice/01_c1" and tags[-1] == "valid/dice/11_c11" and tags == sorted(tags)


def test_a_resumed_run_has_one_curve_and_a_restarted_one_only_its_new_curves(base_run, toy_data, tmp_path):  # noqa: F811
    from diffseg.train import train_run

    run_dir = Path(shutil.copytree(base_run, tmp_path / "run"))
    tags = read_scalars(run_dir)
    assert _steps(run_dir, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert _steps(run_dir, "valid/mean_dice") == [3, 6]
    assert {"train/lr", "train/steps_per_s", "valid/dice/1_box", "valid/dice/2_ball"} <= set(tags)
    assert read_image_steps(run_dir) == {"valid/mid_slice": [3, 6]}
    valid = json.loads((run_dir / "best.json").read_text())
    assert any(v == pytest.approx(valid["mean_dice"]) for _, v in tags["valid/mean_dice"])
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["step"] == 6 and status["saved_step"] == 6

    # As if killed after logging steps 4-6 but before checkpoint 6 was written: resumed from 3.
    shutil.rmtree(run_dir / "checkpoints" / "6")
    train_run(run_cfg(), toy_data, run_dir)
    assert _steps(run_dir, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert read_image_steps(run_dir) == {"valid/mid_slice": [3, 6]}
    assert len(event_files(run_dir)) == 2  # one file per session
    acc = _accumulated(run_dir)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run_dir / "status.json").read_text())["session"] == 1

    # Another experiment in the same folder (a hashed setting changed): the old curves go.
    cfg = run_cfg(steps=2, checkpoint_every=2, tensorboard=True)
    cfg["optim"]["learning_rate"] = 1e-3
    train_run(cfg, toy_data, run_dir)
    assert _steps(run_dir, "train/loss") == [1, 2]
    assert _steps(run_dir, "valid/mean_dice") == [2]


def test_tensorboard_false_writes_no_events(toy_data, tmp_path):  # noqa: F811
    from diffseg.train import train_run

    train_run(run_cfg(steps=1, checkpoint_every=1, tensorboard=False), toy_data, tmp_path / "run")
    assert event_files(tmp_path / "run") == []
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "done"
