"""TensorBoard event files: cutting a killed session's events, read back by TensorBoard's own
reader; the mid-slice picture. What training writes through resumes and restarts is tested with
the runs of tests/test_provenance.py, in a browser by tests/test_tensorboard_browser.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.testing import assert_array_equal

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
