"""Numbers in error messages are plain text: never numpy reprs (``np.float64(2.0)``, ``array([...])``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_case

from diffseg.data.dataset import load_dataset
from diffseg.data.preprocess import check_finite, normalize_intensity, preprocess_case
from diffseg.errors import DataError, fmt_mm, fmt_num, fmt_point, fmt_shape
from diffseg.evaluate.metrics import segmentation_metrics
from diffseg.io import write_nifti

NUMPY_REPR = ("np.", "array(", "float64", "float32", "int64", "dtype=")


def _plain(message: str) -> str:
    for needle in NUMPY_REPR:
        assert needle not in message, message
    return message


def test_formatting_helpers():
    assert fmt_mm(np.array([2.0, 2.0, 2.0])) == "2.0 × 2.0 × 2.0 mm"
    assert fmt_mm((np.float64(0.75), np.float32(0.75), 2.5)) == "0.75 × 0.75 × 2.5 mm"
    assert fmt_shape((np.int64(48), 48, 16)) == "48 × 48 × 16"
    assert fmt_point(np.array([-12.5, 3.0, 0.0])) == "(-12.5, 3.0, 0.0) mm"
    assert [fmt_num(v) for v in (np.float64("nan"), np.int64(3), np.float32(0.1), 1e-7)] == [
        "nan",
        "3",
        "0.1",
        "1e-07",
    ]


def test_geometry_mismatch(tmp_path):
    """An image and a label on different grids (the issue's "affine mismatch")."""
    write_case(tmp_path / "img.nii.gz", tmp_path / "x.nii.gz", shape=(8, 8, 4), spacing=(2.0, 2.0, 2.0))
    write_case(tmp_path / "y.nii.gz", tmp_path / "lab.nii.gz", shape=(8, 8, 5), spacing=(2.0, 2.0, 2.5))
    lab = sitk.ReadImage(str(tmp_path / "lab.nii.gz"))
    lab.SetOrigin((0.0, -12.5, 3.0))
    sitk.WriteImage(lab, str(tmp_path / "lab.nii.gz"))
    with pytest.raises(DataError) as err:
        preprocess_case(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", 9, (2, 2, 2), (8, 8, 4), "MR")
    msg = _plain(str(err.value))
    assert "size 8 × 8 × 4 vs 8 × 8 × 5 voxels" in msg
    assert "spacing 2.0 × 2.0 × 2.0 mm vs 2.0 × 2.0 × 2.5 mm" in msg
    assert "origin (0.0, 0.0, 0.0) mm vs (0.0, -12.5, 3.0) mm" in msg


def test_shape_mismatch_and_spacing_of_metrics():
    a, b = np.zeros((4, 4, 2), np.uint8), np.zeros((4, 5, 2), np.uint8)
    with pytest.raises(ValueError) as err:
        segmentation_metrics(a, b, 2, np.array([1.0, 1.0, 2.0]))
    # Array shapes are tuples of Python ints: plain already.
    assert "pred shape (4, 4, 2) and label shape (4, 5, 2) differ" in _plain(str(err.value))
    with pytest.raises(ValueError) as err:
        segmentation_metrics(a, a, 2, np.array([1.0, np.nan, 2.0]))
    assert "got 1.0 × nan × 2.0 mm" in _plain(str(err.value))
    with pytest.raises(ValueError) as err:
        segmentation_metrics(a, a, 2, np.array([1.0, 2.0]))
    assert "got 1.0 × 2.0 mm" in _plain(str(err.value))
    with pytest.raises(ValueError) as err:
        segmentation_metrics(a, a, 2, (1, 1, 2), tolerance_mm=np.float64(-1.5))
    assert "got -1.5" in _plain(str(err.value))


def test_non_finite_voxels_and_clip_range():
    arr = np.ones((3, 3, 3), np.float32)
    arr[0, 0, 0], arr[1, 1, 1] = np.nan, np.inf
    with pytest.raises(DataError) as err:
        check_finite(arr, "scan.nii.gz")
    assert _plain(str(err.value)) == "scan.nii.gz: 2 NaN/Inf voxels"
    # A constant CT without a clip range: the percentile range is empty (numpy scalars).
    with pytest.raises(DataError) as err:
        normalize_intensity(np.full((3, 3, 3), 40.0, np.float32), "CT", None, "legacy")
    assert "got [40.0, 40.0]" in _plain(str(err.value))


def test_prepared_shape_mismatch(tmp_path):
    info = {"classes": ["bg", "a"], "num_classes": 2, "spacing": [1.0, 1.0, 2.0], "shape": [4, 4, 2]}
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    (tmp_path / "split.csv").write_text("uid,split\nc1,test\n")
    for sub in ("images", "labels"):
        write_nifti(tmp_path / sub / "c1.nii.gz", np.zeros((4, 5, 2), np.float32), (1.0, 1.0, 2.0))
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path).split("test")
    assert "shape 4 × 5 × 2, expected 4 × 4 × 2 from dataset.json" in _plain(str(err.value))
