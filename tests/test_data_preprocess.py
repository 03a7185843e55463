"""Preprocessing: NIfTI round trip, resampling, normalisation, and every bad input."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from diffseg.data import crop_or_pad, normalize_intensity, preprocess_case, read_nifti, resample, write_nifti
from diffseg.data.preprocess import read_image
from diffseg.errors import DataError

ARGS = {"num_classes": 9, "spacing": (0.75, 0.75, 2.5), "shape": (16, 16, 8), "modality": "MR"}


def test_nifti_round_trip(tmp_path):
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    write_nifti(tmp_path / "a.nii.gz", arr, (0.75, 0.5, 2.5))
    back, spacing = read_nifti(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(back, arr)
    assert spacing == (0.75, 0.5, 2.5)
    img = nib.load(tmp_path / "a.nii.gz")
    np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), (0.75, 0.5, 2.5))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # the preprocessing's array order
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]  # no temporary left


def test_resample_known_volume():
    arr = np.zeros((40, 30, 10), np.float32)  # (X, Y, Z)
    arr[10:30, 5:25, 2:8] = 1
    img = sitk.GetImageFromArray(arr.transpose(2, 1, 0))
    img.SetSpacing((0.5, 1.0, 3.0))
    out = resample(img, (1.0, 1.0, 1.5), is_label=False)
    assert out.GetSize() == (20, 30, 20) and out.GetSpacing() == (1.0, 1.0, 1.5)
    lab = resample(sitk.Cast(img, sitk.sitkUInt8), (1.0, 1.0, 1.5), is_label=True)
    vals = np.unique(sitk.GetArrayFromImage(lab))
    assert set(vals.tolist()) <= {0, 1}  # nearest neighbour: no new label values
    # The physical volume of the box is preserved (up to the border voxels).
    vol_in = arr.sum() * 0.5 * 1.0 * 3.0
    vol_out = sitk.GetArrayFromImage(lab).sum() * 1.0 * 1.0 * 1.5
    assert abs(vol_out - vol_in) / vol_in < 0.15


def test_normalize_and_crop():
    rng = np.random.default_rng(0)
    ct = rng.uniform(-2000, 2000, (8, 8, 4)).astype(np.float32)
    n = normalize_intensity(ct, "CT", (-991, 362))
    assert n.min() == -1 and n.max() == 1
    mr = rng.normal(500, 50, (8, 8, 4)).astype(np.float32)
    mr[0, 0, 0] = 1e6  # a hot spot does not dominate the z-score
    z = normalize_intensity(mr, "MR")
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3 and z.max() < 5
    a = np.arange(6 * 4 * 2).reshape(6, 4, 2)
    c = crop_or_pad(a, (4, 6, 2), -1)
    assert c.shape == (4, 6, 2) and (c[:, 0] == -1).all() and (c[:, 1:5] == a[1:5]).all()


def test_preprocess_case(tmp_path, make_case):
    make_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")
    image, label = preprocess_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", **ARGS)
    assert image.shape == label.shape == (16, 16, 8)
    assert image.dtype == np.float32 and label.dtype == np.uint8 and label.max() <= 8


def _rewrite(path, fn):
    img = sitk.ReadImage(str(path))
    out = fn(img)
    sitk.WriteImage(out, str(path))


def test_geometry_mismatch(tmp_path, make_case):
    make_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")
    _rewrite(tmp_path / "l.nii.gz", lambda im: (im.SetSpacing((0.6, 0.7, 3.0)), im)[1])
    with pytest.raises(DataError) as err:
        preprocess_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", **ARGS)
    assert "i.nii.gz" in str(err.value) and "l.nii.gz" in str(err.value) and "spacing" in str(err.value)


def test_label_values_outside_classes(tmp_path, make_case):
    make_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", num_classes=12)
    with pytest.raises(DataError) as err:
        preprocess_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", **ARGS)
    assert "l.nii.gz" in str(err.value) and "9, 10, 11" in str(err.value)


def test_nan_voxels(tmp_path, make_case):
    make_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")

    def add_nan(im):
        arr = sitk.GetArrayFromImage(im)
        arr[1, 2, 3] = np.nan
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(im)
        return out

    _rewrite(tmp_path / "i.nii.gz", add_nan)
    with pytest.raises(DataError, match=r"i\.nii\.gz: 1 NaN/Inf voxels"):
        preprocess_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", **ARGS)


def test_nan_voxels_in_other_formats(tmp_path):
    arr = np.zeros((4, 5, 6), np.float32)
    arr[1, 2, 3] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "i.mha"))
    with pytest.raises(DataError, match=r"i\.mha: 1 NaN/Inf voxels"):
        read_image(tmp_path / "i.mha")


def test_truncated_file(tmp_path, make_case):
    make_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")
    data = (tmp_path / "i.nii.gz").read_bytes()
    (tmp_path / "i.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"i\.nii\.gz: cannot read"):
        preprocess_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", **ARGS)
    (tmp_path / "l.nii.gz").write_bytes(gzip.compress(b"not a nifti"))
    with pytest.raises(DataError, match=r"l\.nii\.gz"):
        read_nifti(tmp_path / "l.nii.gz")
