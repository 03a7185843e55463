"""Evaluation: votes and entropy, test-split metrics of a trained run, and ``diffseg predict``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from numpy.testing import assert_allclose, assert_array_equal
from test_train import TINY, toy_data  # noqa: F401 (toy_data is a fixture)

from diffseg.cli import main
from diffseg.config import resolve_run_config, save_run_config
from diffseg.data.preprocess import to_array
from diffseg.evaluate import inference
from diffseg.evaluate.inference import vote_and_entropy
from diffseg.evaluate.metrics import dice
from diffseg.io import read_nifti


def test_vote_and_entropy_by_hand():
    samples = np.array([[[[0]], [[1]]], [[[0]], [[2]]], [[[0]], [[2]]], [[[0]], [[1]]]])  # (4, 2, 1, 1)
    vote, entropy = vote_and_entropy(samples, 3)
    assert_array_equal(vote[:, 0, 0], [0, 1])  # a 2-2 tie goes to the lower class
    assert_allclose(entropy[:, 0, 0], [0.0, np.log(2)], rtol=1e-6)


@pytest.fixture(scope="module")
def trained_run(toy_data, tmp_path_factory):  # noqa: F811
    """A tiny 3D diffusion run trained for a few steps on the toy dataset."""
    from diffseg.train import train_run

    run_dir = tmp_path_factory.mktemp("run")
    cfg = resolve_run_config(TINY, "toy", "3d-diff", {"train.steps": 2, "train.checkpoint_every": 2})
    save_run_config(cfg, run_dir / "config.yaml")
    train_run(cfg, toy_data, run_dir)
    return run_dir


def test_test_split_writes_metrics_and_predictions(trained_run, toy_data):  # noqa: F811
    assert main(["test", "--run-dir", str(trained_run), "--data", str(toy_data)]) == 0
    metrics = pd.read_csv(trained_run / "test" / "metrics.csv")
    assert list(metrics.columns[:9]) == [
        "uid",
        "class",
        "class_name",
        "dice",
        "nsd",
        "hd95",
        "cd",
        "missed",
        "volume_share",
    ]
    assert set(metrics["uid"]) == {"case5"} and list(metrics["class"]) == [1, 2]
    assert list(metrics["class_name"]) == ["box", "ball"]
    assert (metrics["checkpoint_step"] == 2).all()
    pred, spacing = read_nifti(trained_run / "test" / "predictions" / "case5.nii.gz")
    label, label_spacing = read_nifti(toy_data / "labels" / "case5.nii.gz")
    assert pred.shape == label.shape and spacing == label_spacing
    # the stored prediction is the one the metrics were computed from
    assert_allclose(metrics["dice"], [dice(pred == c, label == c) for c in (1, 2)])


def _write_scan(path, array_xyz, spacing, origin, direction):
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))


def test_predict_maps_the_mask_back_onto_the_input_grid(trained_run, tmp_path, monkeypatch):
    # An asymmetric bright box in a scan with another spacing, an origin and flipped axes:
    # a "segmenter" that thresholds the preprocessed intensities must give back the box.
    shape, spacing = (30, 26, 9), (0.8, 0.9, 1.7)
    scan = np.random.default_rng(0).normal(0, 0.1, shape).astype(np.float32)
    scan[3:12, 14:24, 2:6] += 3.0
    path = tmp_path / "scan.nii.gz"
    _write_scan(path, scan, spacing, (10.0, -5.0, 3.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))

    def threshold(self, volume, key):
        return (volume > 1.0).astype(np.uint8)

    monkeypatch.setattr(inference.Segmenter, "segment", threshold)
    out = tmp_path / "mask.nii.gz"
    assert main(["predict", str(path), "--run", str(trained_run), "-o", str(out)]) == 0
    mask_img, scan_img = sitk.ReadImage(str(out)), sitk.ReadImage(str(path))
    assert mask_img.GetSize() == scan_img.GetSize()
    assert_allclose(mask_img.GetSpacing(), scan_img.GetSpacing())
    assert_allclose(mask_img.GetOrigin(), scan_img.GetOrigin())
    assert_allclose(mask_img.GetDirection(), scan_img.GetDirection())
    assert dice(to_array(mask_img) == 1, scan > 1.5) > 0.85


def test_predict_samples_on_a_resampled_phantom_write_vote_and_entropy(trained_run, tmp_path):
    from diffseg.data import generate_phantom
    from diffseg.data.preprocess import resample

    image, _ = generate_phantom("pelvis", (32, 32, 8), (0.75, 0.75, 2.5), seed=3, index=0)
    native = sitk.GetImageFromArray(np.ascontiguousarray(image.transpose(2, 1, 0)))
    native.SetSpacing((0.75, 0.75, 2.5))
    native.SetOrigin((-12.0, 4.0, 30.0))
    scan = resample(native, (1.1, 0.9, 2.0), is_label=False, mode="legacy")  # another grid than the run's
    path = tmp_path / "scan.nii"
    sitk.WriteImage(scan, str(path))
    out = tmp_path / "mask.nii.gz"
    assert main(["predict", str(path), "--run", str(trained_run), "-o", str(out), "--samples", "3"]) == 0
    mask_img = sitk.ReadImage(str(out))
    entropy_img = sitk.ReadImage(str(tmp_path / "mask_entropy.nii.gz"))
    for written in (mask_img, entropy_img):
        assert written.GetSize() == scan.GetSize()
        assert_allclose(written.GetSpacing(), scan.GetSpacing())
        assert_allclose(written.GetOrigin(), scan.GetOrigin())
    mask, entropy = to_array(mask_img), to_array(entropy_img)
    assert mask.max() < 3 and entropy.min() >= 0 and entropy.max() <= np.log(3) + 1e-5


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [("notes.txt", b"hello", "not a NIfTI"), ("bad.nii.gz", b"\x1f\x8b garbage", "not a readable NIfTI")],
)
def test_predict_bad_input_is_one_clear_line(trained_run, tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["predict", str(path), "--run", str(trained_run), "-o", str(tmp_path / "m.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err


def test_predict_refuses_several_modalities(trained_run, tmp_path, capsys):
    import nibabel as nib

    path = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.float32), np.eye(4)), str(path))
    assert main(["predict", str(path), "--run", str(trained_run), "-o", str(tmp_path / "m.nii.gz")]) == 2
    assert "2 volumes/modalities" in capsys.readouterr().err


def test_predict_on_a_preprocessed_case_sees_it_as_training_did(trained_run, toy_data, tmp_path, monkeypatch):  # noqa: F811
    # The data stage's own files must come back in the array order the network was trained on,
    # not mirrored by a header that disagrees with the preprocessing's orientation.
    seen = {}

    def record(self, volume, key):
        seen["volume"] = volume
        return np.zeros(volume.shape, np.uint8)

    monkeypatch.setattr(inference.Segmenter, "segment", record)
    path = toy_data / "images" / "case5.nii.gz"
    assert main(["predict", str(path), "--run", str(trained_run), "-o", str(tmp_path / "m.nii.gz")]) == 0
    trained_on, _ = read_nifti(path)
    assert seen["volume"].shape == trained_on.shape
    assert np.corrcoef(seen["volume"].ravel(), trained_on.ravel())[0, 1] > 0.99
