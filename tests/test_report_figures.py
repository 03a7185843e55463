"""Figures 2 and 3 from synthetic NIfTI volumes and metrics (they are drawn and saved)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from diffseg.errors import DataError
from diffseg.report.figures import figure2, figure3


def _nii(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([0.75, 0.75, 2.5, 1.0])), str(path))


@pytest.fixture
def results(tmp_path):
    rng = np.random.default_rng(0)
    label = np.zeros((16, 16, 4), np.uint8)
    label[4:10, 4:10, 2] = 1
    label[11:13, 11:13, 1:3] = 2
    for uid in ("c1", "c2"):
        _nii(tmp_path / "data/ds/images" / f"{uid}.nii.gz", rng.normal(size=label.shape).astype(np.float32))
        _nii(tmp_path / "data/ds/labels" / f"{uid}.nii.gz", label)
        for run, shift in (("3d-seg", 1), ("3d-diff", 0)):
            _nii(tmp_path / "runs/ds" / run / "test/predictions" / f"{uid}.nii.gz", np.roll(label, shift, 0))
    for run in ("3d-seg", "3d-diff"):
        rows = [
            (u, c, f"class{c}", d, d, 1.0, 1.0, False, s)
            for u in ("c1", "c2")
            for c, d, s in ((1, 0.9, 0.05), (2, 0.4, 0.002), (3, 0.7, 0.02))
        ]
        m = pd.DataFrame(
            rows,
            columns=["uid", "class", "class_name", "dice", "nsd", "hd95", "cd", "missed", "volume_share"],
        )
        (tmp_path / "runs/ds" / run / "test").mkdir(parents=True, exist_ok=True)
        m.to_csv(tmp_path / "runs/ds" / run / "test/metrics.csv", index=False)
    return tmp_path


def test_figure2(results, tmp_path):
    outs = [tmp_path / "fig/f2.png", tmp_path / "fig/f2.pdf"]
    shown = figure2(results, [{"dataset": "ds", "seg_run": "3d-seg", "diff_run": "3d-diff"}], outs, cases=2)
    assert shown == [("ds", "c1"), ("ds", "c2")]
    assert all(p.stat().st_size > 1000 for p in outs)
    (results / "runs/ds/3d-diff/test/predictions/c1.nii.gz").unlink()
    with pytest.raises(DataError, match="c1.nii.gz"):
        figure2(results, [{"dataset": "ds", "seg_run": "3d-seg", "diff_run": "3d-diff"}], outs)


def test_figure3(results, tmp_path):
    outs = [tmp_path / "f3.png"]
    data = figure3(results / "runs", [("ds", "3d-seg"), ("ds", "3d-diff")], outs)
    assert len(data) == 6
    assert data.set_index(["run", "class"]).loc[("3d-seg", 2), "volume_share"] == pytest.approx(0.002)
    assert outs[0].stat().st_size > 1000


# --- Radiological display (diffseg.report.orient): one convention for every figure -------------

SPACING = (0.5, 2.0, 3.0)  # anisotropic in-plane, so a swapped aspect shows


def _marked(codes: str) -> tuple[np.ndarray, np.ndarray]:
    """A 6×5×4 volume stored in ``codes`` order with one voxel at the patient's right-anterior-
    superior corner, and its affine (voxel sizes ``SPACING`` along the array axes)."""
    vol = np.zeros((6, 5, 4), np.uint8)
    # Towards R, A, S is the last index where the axis code names that side, else the first.
    vol[tuple(-1 if c in "RAS" else 0 for c in codes)] = 1
    affine = np.diag([*(s if c in "RAS" else -s for c, s in zip(codes, SPACING, strict=True)), 1.0])
    return vol, affine


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "RPI"])
def test_radiological_puts_right_anterior_at_top_left(codes):
    from diffseg.report.orient import radiological

    vol, affine = _marked(codes)
    assert "".join(nib.aff2axcodes(affine)) == codes
    d = radiological(vol, affine)
    # rows A -> P (y, 2.0 mm), columns R -> L (x, 0.5 mm), slices I -> S.
    assert d.data.shape == (5, 6, 4) and d.spacing == SPACING[1::-1] + SPACING[2:]
    assert d.aspect == pytest.approx(4.0)
    k = d.num_slices - 1  # the most superior slice
    assert np.argwhere(d.slice(k)).tolist() == [[0, 0]]  # top-left: anterior up, patient's right left
    assert vol[..., d.source_index(k)].any()  # the file's own index of that slice


def test_radiological_follows_the_affine_not_the_array_order():
    """Array axis 0 along A-P (2 mm), axis 1 along R-L (0.5 mm), axis 2 towards inferior."""
    from diffseg.report.orient import radiological

    vol = np.zeros((5, 6, 4), np.uint8)
    vol[-1, -1, 0] = 1  # most anterior, rightmost, most superior
    affine = np.array([[0, 0.5, 0, 0], [2.0, 0, 0, 0], [0, 0, -3.0, 0], [0, 0, 0, 1]])
    assert nib.aff2axcodes(affine) == ("A", "R", "I")
    d = radiological(vol, affine)
    assert d.spacing == (2.0, 0.5, 3.0) and d.aspect == pytest.approx(4.0)
    assert np.argwhere(d.data).tolist() == [[0, 0, 3]]
    assert (d.source_axis, d.source_flipped, d.source_index(3)) == (2, True, 0)


def _shown(monkeypatch) -> list:
    """Capture the figures the drawing code closes (the first image of each axes)."""
    import matplotlib.pyplot as plt

    figs, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figs.append(fig), close(fig)))
    return figs


@pytest.mark.parametrize("codes", ["RAS", "LPS"])
def test_every_figure_shows_the_same_orientation(tmp_path, monkeypatch, codes):
    """Figure 2 and the data figure put the marker at the top-left with the same aspect."""
    import json

    from diffseg.data.cli import data_figure

    vol, affine = _marked(codes)
    # A block of foreground (so Figure 2 picks the superior slice) around the marker's corner.
    label = np.zeros_like(vol)
    label[tuple(slice(-2, None) if c in "RAS" else slice(0, 2) for c in codes[:2])] = 1
    label[..., :3] = 0
    label[vol > 0] = 2
    image = (10.0 * vol).astype(np.float32)
    data = tmp_path / "data/ds"
    for sub, arr in (("images", image), ("labels", label)):
        (data / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr, affine), str(data / sub / "c1.nii.gz"))
    columns = ["uid", "class", "class_name", "dice", "nsd", "hd95", "cd", "missed", "volume_share"]
    for run in ("3d-seg", "3d-diff"):
        test = tmp_path / "runs/ds" / run / "test"
        (test / "predictions").mkdir(parents=True)
        nib.save(nib.Nifti1Image(label, affine), str(test / "predictions/c1.nii.gz"))
        metrics = pd.DataFrame([("c1", 1, "a", 1.0, 1.0, 0.0, 0.0, False, 0.1)], columns=columns)
        metrics.to_csv(test / "metrics.csv", index=False)
    info = {"classes": ["bg", "a", "b"], "num_classes": 3, "spacing": list(SPACING), "shape": [6, 5, 4]}
    (data / "dataset.json").write_text(json.dumps(info))
    (data / "split.csv").write_text("uid,split\nc1,test\n")
    figs = _shown(monkeypatch)
    figure2(tmp_path, [{"dataset": "ds", "seg_run": "3d-seg", "diff_run": "3d-diff"}], [tmp_path / "f2.png"])
    data_figure(data, tmp_path / "ph.png", cases=1)
    assert len(figs) == 2
    for fig in figs:
        images = [ax.images for ax in fig.axes if ax.images]
        assert images
        for ims in images:
            shown = np.asarray(ims[0].get_array())
            assert shown.shape == (5, 6)
            assert np.unravel_index(np.argmax(shown), shown.shape) == (0, 0)  # the marker: top-left
            assert ims[0].origin == "upper" and ims[0].axes.get_aspect() == pytest.approx(4.0)
