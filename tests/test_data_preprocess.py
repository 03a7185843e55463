"""Preprocessing: NIfTI round trip, resampling, normalisation, the reference pipeline, every bad input."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from diffseg.data import (
    PreprocessOptions,
    crop_or_pad,
    normalize_intensity,
    preprocess_case,
    preprocess_scan,
    resample,
)
from diffseg.data.preprocess import apply_window, crop_start, read_image, to_array
from diffseg.errors import ConfigError, DataError
from diffseg.io import read_affine, read_nifti, write_nifti

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
    out = resample(img, (1.0, 1.0, 1.5), is_label=False, mode="legacy")
    assert out.GetSize() == (20, 30, 20) and out.GetSpacing() == (1.0, 1.0, 1.5)
    lab = resample(sitk.Cast(img, sitk.sitkUInt8), (1.0, 1.0, 1.5), is_label=True, mode="legacy")
    vals = np.unique(sitk.GetArrayFromImage(lab))
    assert set(vals.tolist()) <= {0, 1}  # nearest neighbour: no new label values
    # The physical volume of the box is preserved (up to the border voxels).
    vol_in = arr.sum() * 0.5 * 1.0 * 3.0
    vol_out = sitk.GetArrayFromImage(lab).sum() * 1.0 * 1.0 * 1.5
    assert abs(vol_out - vol_in) / vol_in < 0.15


def test_normalize_and_crop():
    rng = np.random.default_rng(0)
    ct = rng.uniform(-2000, 2000, (8, 8, 4)).astype(np.float32)
    n = normalize_intensity(ct, "CT", (-991, 362), method="legacy")
    assert n.min() == -1 and n.max() == 1
    mr = rng.normal(500, 50, (8, 8, 4)).astype(np.float32)
    mr[0, 0, 0] = 1e6  # a hot spot does not dominate the z-score
    z = normalize_intensity(mr, "MR", method="legacy")
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3 and z.max() < 5
    a = np.arange(6 * 4 * 2).reshape(6, 4, 2)
    c = crop_or_pad(a, (4, 6, 2), -1)
    assert c.shape == (4, 6, 2) and (c[:, 0] == -1).all() and (c[:, 1:5] == a[1:5]).all()


def test_preprocess_case(tmp_path, make_case):
    make_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")
    for options in (PreprocessOptions(), PreprocessOptions.legacy()):
        image, label, affine = preprocess_case(
            tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", **ARGS, options=options
        )
        assert image.shape == label.shape == (16, 16, 8) and affine.shape == (4, 4)
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


# --- the reference pipeline (ImgX-DiffSeg v0.1.0, imgx/datasets/preprocess.py and util.py) ---


def _write(path, array_xyz, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return img


@pytest.mark.parametrize(
    ("size", "shape", "first", "last", "start"),
    [
        (10, 4, 6, 8, 5),  # centre (6 + 8) / 2 = 7: window 5..8
        (10, 4, 7, 8, 6),  # centre 7.5: ceil(7.5 - 2) = 6 (a half voxel rounds up)
        (10, 4, 8, 9, 6),  # would start at 7: shifted back inside, 6..9
        (10, 4, 0, 1, 0),  # would start at -1: shifted to 0
        (10, 4, 2, 9, 4),  # bbox of 8 > window of 4: centred at 5.5 -> 4..7, the ends are lost
        (4, 4, 1, 2, 0),  # no crop
        (3, 6, 0, 2, -1),  # pad 3: 1 before, 2 after
        (3, 7, 0, 2, -2),  # pad 4: 2 before, 2 after
    ],
)
def test_crop_window_by_hand(size, shape, first, last, start):
    label = np.zeros((size, 1, 1), np.uint8)
    label[first : last + 1] = 1
    assert crop_start((size, 1, 1), (shape, 1, 1), label)[0] == start
    # without a label (or an empty one) the window is centred
    assert crop_start((size, 1, 1), (shape, 1, 1))[0] == crop_start((size, 1, 1), (shape, 1, 1), label * 0)[0]
    centred = (size - shape) // 2 if size > shape else -((shape - size) // 2)
    assert crop_start((size, 1, 1), (shape, 1, 1))[0] == centred


def test_apply_window_pads_and_crops():
    a = np.arange(5 * 3).reshape(5, 3, 1)
    w = apply_window(a, (3, -1, 0), (4, 4, 1), -7)
    assert w.shape == (4, 4, 1)
    np.testing.assert_array_equal(w[:2, 1:, 0], a[3:5, :, 0])
    assert (w[2:] == -7).all() and (w[:, 0] == -7).all()


def test_bbox_crop_keeps_every_labelled_voxel_off_centre(tmp_path):
    # Labels near one corner of a 40 x 36 x 12 volume; the 16 x 16 x 8 crop keeps them all,
    # while a crop centred on the volume cuts them off.
    label = np.zeros((40, 36, 12), np.uint8)
    label[2:12, 27:35, 8:12] = 1
    label[5:8, 30:33, 9:11] = 2
    image = (np.random.default_rng(0).normal(200, 20, label.shape) + 100 * label).astype(np.float32)
    _write(tmp_path / "i.nii.gz", image, (0.75, 0.75, 2.5))
    _write(tmp_path / "l.nii.gz", label, (0.75, 0.75, 2.5))
    args = (tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", 3, (0.75, 0.75, 2.5), (16, 16, 8), "MR")
    out = preprocess_case(*args)
    np.testing.assert_array_equal(
        np.bincount(out.label.ravel(), minlength=3)[1:], np.bincount(label.ravel())[1:]
    )
    # the window is label[0:16, 20:36, 4:12]: starts ceil((2 + 11 - 16) / 2) = -1 -> 0, 23 -> 20 (end), 6 -> 4
    np.testing.assert_array_equal(out.label, label[0:16, 20:36, 4:12])
    centred = preprocess_case(*args, options=PreprocessOptions(crop="centre"))
    assert np.count_nonzero(centred.label) < np.count_nonzero(label)


def test_reference_normalisation_by_hand():
    # MR: z-score then [0, 1]: (x - min) / (max - min) = 0, 0.1, 0.2, 1.
    mr = np.array([0, 1, 2, 10], np.float32).reshape(4, 1, 1)
    np.testing.assert_allclose(
        normalize_intensity(mr, "MR", method="reference").ravel(), [0, 0.1, 0.2, 1], atol=1e-7
    )
    # CT: clip to [-991, 362] first: -2000 -> -991, 1000 -> 362; then 0 HU -> 991 / 1353.
    ct = np.array([-2000, -991, 0, 362, 1000], np.int16).reshape(5, 1, 1)
    expect = [0, 0, 991 / 1353, 1, 1]
    got = normalize_intensity(ct, "CT", (-991, 362), method="reference").ravel()
    np.testing.assert_allclose(got, expect, atol=1e-7)
    # The same as SimpleITK's Clamp -> Normalize -> RescaleIntensity(0, 1), the reference's filters.
    rng = np.random.default_rng(1)
    vol = rng.normal(-200, 400, (6, 5, 4)).astype(np.int16)
    img = sitk.Clamp(sitk.GetImageFromArray(vol.transpose(2, 1, 0)), lowerBound=-991, upperBound=362)
    ref = to_array(sitk.Cast(sitk.RescaleIntensity(sitk.Normalize(img), 0, 1), sitk.sitkFloat32))
    np.testing.assert_allclose(
        normalize_intensity(vol, "CT", (-991, 362), method="reference"), ref, atol=1e-6
    )
    assert (normalize_intensity(np.ones((2, 2, 2)), "MR", method="reference") == 0).all()  # constant


def test_reference_pads_with_zero_before_normalising(tmp_path):
    # A 6 x 4 x 2 MR image with values 50..150 padded to 8 x 8 x 4: the padding is raw 0, which becomes
    # the minimum, so every voxel v maps to v / 150 and the padding to 0.
    image = np.linspace(50, 150, 6 * 4 * 2, dtype=np.float32).reshape(6, 4, 2)
    label = np.zeros(image.shape, np.uint8)
    label[1:3, 1:3, :] = 1
    _write(tmp_path / "i.nii", image)
    _write(tmp_path / "l.nii", label)
    out = preprocess_case(tmp_path / "i.nii", tmp_path / "l.nii", 2, (1.0, 1.0, 1.0), (8, 8, 4), "MR")
    expect = np.zeros((8, 8, 4))
    expect[1:7, 2:6, 1:3] = image / 150.0  # pads 2 -> (1, 1), 4 -> (2, 2), 2 -> (1, 1)
    np.testing.assert_allclose(out.image, expect, atol=1e-6)
    assert out.label[1:7, 2:6, 1:3].sum() == label.sum()
    # CT: padding is 0 HU (inside the clip range): (0 + 991) / 1353 once -991 and 362 are reached.
    ct = np.full((6, 4, 2), 40, np.int16)
    ct[0, 0, 0], ct[5, 3, 1] = -1500, 2000
    _write(tmp_path / "c.nii", ct)
    out = preprocess_case(
        tmp_path / "c.nii", tmp_path / "l.nii", 2, (1.0, 1.0, 1.0), (8, 8, 4), "CT", (-991, 362)
    )
    assert out.image[0, 0, 0] == pytest.approx(991 / 1353, abs=1e-6)
    assert out.image[1, 2, 1] == 0 and out.image[6, 5, 2] == 1
    assert out.image[3, 3, 1] == pytest.approx(1031 / 1353, abs=1e-6)


def test_reference_resample_by_hand():
    # [0, 3, -3, 5] at 1 mm -> 0.5 mm: origin -0.25 (= 0 + 0.5 * (0.5 - 1)), int16 kept, values truncated
    # toward zero: at x = 0.25, 0.75: 0.75 -> 0 and 2.25 -> 2; at x = 1.75: 3 - 4.5 = -1.5 -> -1.
    img = sitk.GetImageFromArray(np.array([0, 3, -3, 5], np.int16).reshape(1, 1, 4))
    out = resample(img, (0.5, 1.0, 1.0), is_label=False, mode="reference")
    assert out.GetSize() == (8, 1, 1) and out.GetPixelID() == sitk.sitkInt16
    assert out.GetOrigin() == pytest.approx((-0.25, 0.0, 0.0))
    np.testing.assert_array_equal(to_array(out).ravel(), [0, 0, 2, 1, -1, -1, 3, 5])
    legacy = resample(img, (0.5, 1.0, 1.0), is_label=False, mode="legacy")
    assert legacy.GetOrigin() == (0.0, 0.0, 0.0) and legacy.GetPixelID() == sitk.sitkFloat32
    # The shift is added per physical axis, whatever the direction: with x flipped it is still +.
    img.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert resample(img, (0.5, 1.0, 1.0), False, "reference").GetOrigin() == pytest.approx((-0.25, 0, 0))
    # At the target spacing the grid and values are unchanged.
    same = resample(img, (1.0, 1.0, 1.0), False, "reference")
    np.testing.assert_array_equal(to_array(same), to_array(img))


def _physical_centroid(img, value):
    idx = np.argwhere(to_array(img) == value).mean(axis=0)
    return np.array(img.TransformContinuousIndexToPhysicalPoint([float(i) for i in idx]))


@pytest.mark.parametrize("reorient", ["none", "LPS"])
def test_written_files_sit_where_the_scan_was(tmp_path, reorient):
    # A scan with permuted and flipped axes, an origin and another spacing: the written label's
    # structures lie at the same physical points as in the scan (viewers and predict rely on it).
    label = np.zeros((30, 20, 10), np.uint8)
    label[3:9, 12:18, 2:5] = 1
    label[20:26, 2:6, 6:9] = 2
    image = (label * 50 + 100).astype(np.float32)
    direction = (0, 0, 1, -1, 0, 0, 0, -1, 0)
    for arr, name in ((image, "i.nii.gz"), (label, "l.nii.gz")):
        _write(tmp_path / name, arr, (0.8, 0.8, 2.0), (12.0, -30.0, 5.0), direction)
    options = PreprocessOptions(reorient=reorient)
    out = preprocess_case(
        tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", 3, (0.8, 0.8, 2.0), (24, 24, 12), "MR", options=options
    )
    write_nifti(tmp_path / "o.nii.gz", out.label, (0.8, 0.8, 2.0), out.affine)
    written, scan = sitk.ReadImage(str(tmp_path / "o.nii.gz")), sitk.ReadImage(str(tmp_path / "l.nii.gz"))
    # none: the scan is on the target spacing, nothing moves. LPS permutes the spacing, so the labels are
    # resampled (nearest, on the reference's shifted grid) and move by less than half a 2 mm voxel;
    # a flipped or misplaced affine would move them by centimetres.
    tol = 1e-3 if reorient == "none" else 1.0
    for value in (1, 2):
        np.testing.assert_allclose(
            _physical_centroid(written, value), _physical_centroid(scan, value), atol=tol
        )
    assert read_nifti(tmp_path / "o.nii.gz")[1] == pytest.approx((0.8, 0.8, 2.0))  # float32 header
    np.testing.assert_allclose(read_affine(tmp_path / "o.nii.gz"), out.affine, atol=1e-5)
    if reorient == "none":  # the scan's own index order: the window is a plain slice of the label
        # x: bbox 3..25 in 30 -> ceil((3 + 25 - 24) / 2) = 2; y: 20 -> 24 pads 2 before; z: 10 -> 12 pads 1
        np.testing.assert_array_equal(out.label, apply_window(label, (2, -2, -1), (24, 24, 12), 0))
        np.testing.assert_allclose(written.GetDirection(), direction, atol=1e-6)
    else:
        np.testing.assert_allclose(written.GetDirection(), np.eye(3).ravel(), atol=1e-6)


def test_without_a_label_the_window_is_centred(tmp_path, make_case):
    make_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", shape=(30, 18, 6))
    out = preprocess_case(tmp_path / "i.nii.gz", None, **ARGS)
    assert out.label is None and out.image.shape == (16, 16, 8)


def test_preprocess_scan_follows_the_runs_dataset_json(tmp_path, make_case):
    make_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", spacing=(0.6, 0.9, 3.0))
    scan = read_image(tmp_path / "i.nii.gz")
    scan.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    info = {"spacing": [0.75, 0.75, 2.5], "modality": "MR"}
    # No recorded options: data of the legacy pipeline (LPS, legacy resampling and intensities).
    volume, grid = preprocess_scan(scan, info)
    legacy = resample(sitk.DICOMOrient(scan, "LPS"), info["spacing"], is_label=False, mode="legacy")
    np.testing.assert_array_equal(volume, normalize_intensity(to_array(legacy), "MR", method="legacy"))
    assert grid.GetDirection() == legacy.GetDirection() and grid.GetOrigin() == legacy.GetOrigin()
    # The reference options: the scan's own axes, reference resampling, [0, 1].
    volume, grid = preprocess_scan(scan, {**info, **PreprocessOptions().as_dict()})
    ref = resample(scan, info["spacing"], is_label=False, mode="reference")
    np.testing.assert_allclose(volume, normalize_intensity(to_array(ref), "MR", method="reference"))
    assert grid.GetDirection() == scan.GetDirection() and volume.min() == 0 and volume.max() == 1


def test_a_prepared_file_comes_back_as_it_was_trained_on(tmp_path, make_case):
    # What `diffseg predict` sees for a file the data stage wrote equals the training array.
    make_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", shape=(30, 18, 6))
    scan = read_image(tmp_path / "i.nii.gz")
    scan.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    sitk.WriteImage(scan, str(tmp_path / "i.nii.gz"))
    lab = read_image(tmp_path / "l.nii.gz")
    lab.SetDirection(scan.GetDirection())
    sitk.WriteImage(lab, str(tmp_path / "l.nii.gz"))
    options = PreprocessOptions()
    out = preprocess_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", **ARGS, options=options)
    write_nifti(tmp_path / "p.nii.gz", out.image, ARGS["spacing"], out.affine)
    volume, _ = preprocess_scan(tmp_path / "p.nii.gz", {"spacing": ARGS["spacing"], **options.as_dict()})
    np.testing.assert_allclose(volume, out.image, atol=1e-5)


def test_bad_options():
    with pytest.raises(
        ConfigError, match=r"datasets\.x\.crop: 'middle' is not one of \['label_bbox', 'centre'\]"
    ):
        PreprocessOptions.from_config({"crop": "middle"}, "datasets.x")
    with pytest.raises(ConfigError, match=r"datasets\.x\.reorient: 'RAS'"):
        PreprocessOptions.from_config({"reorient": "RAS"}, "datasets.x")
    assert PreprocessOptions.from_info({}) == PreprocessOptions.legacy()
    assert PreprocessOptions.from_config({}, "d") == PreprocessOptions(
        "none", "reference", "reference", "label_bbox"
    )


def test_public_defaults_are_the_pipelines():
    """``resample`` and ``normalize_intensity`` default to what a dataset read from files gets."""
    import inspect

    options = PreprocessOptions()
    assert inspect.signature(resample).parameters["mode"].default == options.resample
    assert inspect.signature(normalize_intensity).parameters["method"].default == options.normalize
