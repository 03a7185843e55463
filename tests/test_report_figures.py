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
        rows = [(u, c, f"class{c}", d, d, 1.0, 1.0, False, s)
                for u in ("c1", "c2") for c, d, s in ((1, 0.9, 0.05), (2, 0.4, 0.002), (3, 0.7, 0.02))]
        m = pd.DataFrame(rows, columns=["uid", "class", "class_name", "dice", "nsd", "hd95", "cd",
                                        "missed", "volume_share"])
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
