"""A run's TensorBoard event files, written as it trains, in the run folder itself.

``tensorboard --logdir results/runs`` then lists every run of a campaign as ``{dataset}/{run}``.
Written (tensorboardX: no TensorFlow needed) at every logged step ``train/loss``, ``train/lr`` and
``train/steps_per_s``; at every validation ``valid/mean_dice`` (the number ``valid.csv`` and
``best.json`` keep), ``valid/dice/{class}`` (each foreground class's Dice, mean over the validation
cases) and ``valid/mid_slice``: the first validation case's middle slice, image | truth |
prediction (:func:`mid_slice_panel`).

One curve per run, whatever happened to it:

* a resumed run continues from its checkpoint, and the killed session may have logged steps after
  that checkpoint; those are written again by the resumed session, so they are first cut from the
  files (:func:`truncate_after`): no step twice, none missing;
* a run started over (its config or data changed) removes the old files (:func:`remove_events`).

Event files are TFRecord files: records of ``length (8 bytes) | crc (4) | data | crc (4)``, each
``data`` an ``Event`` protocol buffer. Cutting keeps the kept records' bytes as they were.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

PATTERN = "events.out.tfevents.*"
PANEL_HEIGHT = 240  # pixels: small volumes' slices are enlarged (nearest) to at least this height


def event_files(run_dir: str | Path) -> list[Path]:
    """The run's event files, oldest first (their names start with the time they were opened)."""
    return sorted(Path(run_dir).glob(PATTERN))


def read_records(path: str | Path) -> Iterator[bytes]:
    """Each whole record of a TFRecord file (its header, payload and footer bytes); a record torn
    by a killed writer at the end is left out."""
    data = Path(path).read_bytes()
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        end = pos + 12 + length + 4
        if end > len(data):
            return
        yield data[pos:end]
        pos = end


def _event(record: bytes):  # -> tensorboardX.proto.event_pb2.Event
    from tensorboardX.proto import event_pb2

    return event_pb2.Event.FromString(record[12:-4])


def truncate_after(run_dir: str | Path, step: int) -> int:
    """Cut the events of steps after ``step`` (and torn records) from the run's files; how many went.

    Each changed file is replaced atomically, so a crash here leaves the old or the new file.
    """
    dropped = 0
    for path in event_files(run_dir):
        records = list(read_records(path))
        kept = [r for r in records if _event(r).step <= step]
        size = sum(map(len, kept))
        if len(kept) == len(records) and size == path.stat().st_size:
            continue
        dropped += len(records) - len(kept)
        tmp = path.with_name(f".{path.name}.cut")  # not matching PATTERN: TensorBoard skips it
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, path)
    return dropped


def remove_events(run_dir: str | Path) -> int:
    """Delete the run's event files (a run started over); how many there were."""
    files = event_files(run_dir)
    for path in files:
        path.unlink()
    return len(files)


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's files: ``{tag: [(step, value), ...]}`` in the order written."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in event_files(run_dir):
        for record in read_records(path):
            event = _event(record)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return out


def read_image_steps(run_dir: str | Path) -> dict[str, list[int]]:
    """The steps of every image of the run's files: ``{tag: [step, ...]}``."""
    out: dict[str, list[int]] = {}
    for path in event_files(run_dir):
        for record in read_records(path):
            event = _event(record)
            for value in event.summary.value:
                if value.HasField("image"):
                    out.setdefault(value.tag, []).append(int(event.step))
    return out


def _gray(image: np.ndarray) -> np.ndarray:
    """A slice ``(H, W)`` scaled to [0, 1] between its 1st and 99th percentiles."""
    lo, hi = np.percentile(image, [1.0, 99.0])
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _overlay(gray: np.ndarray, label: np.ndarray, colors: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """``gray`` ``(H, W)`` with each labelled pixel blended with its class colour; ``(H, W, 3)``."""
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    fg = label > 0
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * colors[label[fg] - 1]
    return rgb


def mid_slice_panel(image: np.ndarray, label: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """image | truth | prediction at the middle slice along Z, as one ``(H, 3W, 3)`` uint8 picture.

    ``image`` ``(X, Y, Z[, C])`` (its first channel is shown), ``label``/``pred`` ``(X, Y, Z)`` class
    ids; rows are Y and columns X (as ``imshow(slice.T)``), classes in the figures' colours.
    """
    from diffseg.colors import class_colors

    z = image.shape[2] // 2
    img = image[..., 0] if image.ndim == 4 else image
    gray = _gray(img[:, :, z].T.astype(np.float64))
    colors = np.asarray(class_colors(max(int(num_classes), 2)), np.float64)[:, :3]
    clip = len(colors)  # a prediction never exceeds the classes, but keep the lookup in range
    truth = _overlay(gray, np.minimum(label[:, :, z].T.astype(np.int64), clip), colors)
    guess = _overlay(gray, np.minimum(pred[:, :, z].T.astype(np.int64), clip), colors)
    white = np.ones((gray.shape[0], 2, 3))  # a thin border between the three
    panel = np.concatenate([np.repeat(gray[..., None], 3, -1), white, truth, white, guess], axis=1)
    scale = max(1, PANEL_HEIGHT // panel.shape[0])
    panel = panel.repeat(scale, axis=0).repeat(scale, axis=1)
    return (panel * 255).round().astype(np.uint8)


class EventLog:
    """Writes a run's summaries into ``run_dir``; every method does nothing when ``enabled`` is False.

    ``session`` names this process's file (``…tfevents.{time}.{host}.{pid}.s{session}``), so two
    sessions never write one file even when started within the same second.
    """

    def __init__(self, run_dir: str | Path, session: int, enabled: bool = True):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(
                logdir=str(run_dir), flush_secs=30, filename_suffix=f".{os.getpid()}.s{session}"
            )

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One point of each curve ``tag`` at ``step``."""
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, float(value), step)

    def image(self, step: int, tag: str, rgb: np.ndarray) -> None:
        """A picture ``(H, W, 3)`` uint8 at ``step``."""
        if self._writer is not None:
            self._writer.add_image(tag, rgb, step, dataformats="HWC")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def class_tags(class_names: Sequence[str]) -> list[str]:
    """``valid/dice/{id}_{name}`` of each foreground class (ids keep TensorBoard's order by class)."""
    width = len(str(len(class_names) - 1))
    return [f"valid/dice/{c:0{width}d}_{name}" for c, name in enumerate(class_names) if c > 0]
