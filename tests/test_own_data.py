"""A user's own data in both layouts: MSD (a 4D multi-channel NIfTI, the ``training`` list) and
nnU-Net v2 (``_0000``/``_0001`` channel files), told apart by ``dataset.json``; several input channels
trained, tested and predicted; non-contiguous label values remapped and mapped back by ``predict``."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest

from diffseg.cli import main
from diffseg.config import resolve_run_config, save_run_config
from diffseg.data import list_source, load_dataset, prepare_dataset
from diffseg.errors import DataError
from diffseg.evaluate import inference
from diffseg.io import read_nifti

VALUES = [0, 1, 2, 5]  # label values in the files: 5 is the third foreground class
NAMES = ["background", "gland", "zone", "lesion"]
UIDS = [f"case_{i:04d}" for i in range(1, 7)]  # case_0001 ends like a channel suffix
GEOM = {"spacing": [1.0, 1.0, 2.0], "shape": [16, 16, 8]}
SPLIT = {"train": 4, "valid": 1, "test": 1}
AFFINE = np.diag([-1.0, -1.0, 2.0, 1.0])


def _case(seed: int, shape=(18, 18, 8), lesion: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Two channels ``(X, Y, Z, 2)`` and a label with values 0, 1, 2 and ``lesion``.

    Channel 1 is channel 0 on another scale (x 1000 + 50), so each channel, normalised on its own,
    comes out the same; normalised together they would not.
    """
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    x, y = rng.integers(2, 6, 2)
    label[x : x + 6, y : y + 6, 2:6] = 1
    label[x + 7 : x + 11, y + 1 : y + 5, 2:6] = 2
    label[x + 1 : x + 3, y + 1 : y + 3, 3:5] = lesion
    lut = np.zeros(lesion + 1, np.float32)
    lut[[1, 2, lesion]] = [1.5, -1.5, 3.0]
    ch0 = (rng.normal(0, 0.3, shape) + lut[label]).astype(np.float32)
    return np.stack([ch0, ch0 * 1000.0 + 50.0], axis=-1), label


def _save(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))


def write_msd(root, labels=None, channels=2, lesion=5, uids=UIDS, stray=True):
    """An MSD task folder: 4D ``imagesTr/{uid}.nii.gz``, ``modality`` and the ``training`` list.

    A stray image that the ``training`` list does not name lies in ``imagesTr/`` too. With
    ``channels=1`` the images are 3D (channel 0).
    """
    meta = {
        "name": "Toy",
        "modality": {"0": "T2", "1": "ADC"} if channels == 2 else {"0": "MRI"},
        "labels": labels or {str(v): n for v, n in zip([0, 1, 2, lesion], NAMES, strict=True)},
        "numTraining": len(uids),
        "training": [{"image": f"./imagesTr/{u}.nii.gz", "label": f"./labelsTr/{u}.nii.gz"} for u in uids],
        "test": [],
    }
    for i, uid in enumerate(uids):
        image, label = _case(i, lesion=lesion)
        _save(root / "imagesTr" / f"{uid}.nii.gz", image if channels == 2 else image[..., 0].copy())
        _save(root / "labelsTr" / f"{uid}.nii.gz", label)
    if stray:
        _save(root / "imagesTr" / "stray_0001.nii.gz", np.zeros((4, 4, 4), np.float32))
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def write_nnunet(root):
    """An nnU-Net v2 dataset: ``imagesTr/{uid}_0000.nii.gz``, ``_0001``, ``labels`` name -> value."""
    meta = {
        "channel_names": {"0": "T2", "1": "ADC"},
        "labels": dict(zip(NAMES, VALUES, strict=True)),
        "numTraining": len(UIDS),
        "file_ending": ".nii.gz",
    }
    for i, uid in enumerate(UIDS):
        image, label = _case(i)
        for c in range(2):
            _save(root / "imagesTr" / f"{uid}_{c:04d}.nii.gz", np.ascontiguousarray(image[..., c]))
        _save(root / "labelsTr" / f"{uid}.nii.gz", label)
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _cfg(root):
    return {"source": "msd", "path": str(root), "seed": 0, **GEOM, "split": SPLIT}


@pytest.fixture(scope="module")
def msd_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("msd")
    root = write_msd(tmp / "Task05_Toy")
    prepare_dataset("toy2", _cfg(root), tmp / "data", tmp / "res")
    return tmp / "data"


def test_msd_two_channels_and_label_values(msd_data):
    info = json.loads((msd_data / "dataset.json").read_text())
    assert info["channels"] == 2 and info["channel_names"] == ["T2", "ADC"]
    assert info["label_values"] == VALUES and info["classes"] == NAMES and info["num_classes"] == 4
    ds = load_dataset(msd_data)
    uids = sorted(u for s in ("train", "valid", "test") for u in ds.uids(s))
    assert uids == UIDS  # the training list's uids as they are; the stray file is no case
    _, images, labels = ds.split("train")
    assert images.shape == (4, 16, 16, 8, 2) and labels.shape == (4, 16, 16, 8)
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}  # 5 -> class 3
    # Each channel normalised on its own: both in [0, 1], and alike despite their scales.
    for c in range(2):
        assert images[..., c].min() == 0.0 and images[..., c].max() == 1.0
    np.testing.assert_allclose(images[..., 0], images[..., 1], atol=1e-4)
    # The same spatial crop for both channels and the label: the lesion is brightest in each.
    for c in range(2):
        assert images[..., c][labels == 3].mean() > images[..., c][labels == 1].mean()


def test_nnunet_layout_prepares_as_msd(tmp_path, msd_data):
    root = write_nnunet(tmp_path / "Dataset005_Toy")
    src = list_source("t", _cfg(root), tmp_path)
    assert [c.uid for c in src.cases] == UIDS and src.channels == 2 and src.label_values == VALUES
    info = prepare_dataset("toy2", _cfg(root), tmp_path / "data", tmp_path / "res")
    assert info["channels"] == 2 and info["label_values"] == VALUES
    mine, msd = load_dataset(tmp_path / "data"), load_dataset(msd_data)
    for split in ("train", "test"):
        a, b = mine.split(split), msd.split(split)
        assert a[0] == b[0]
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[2], b[2])


def test_layout_comes_from_dataset_json(tmp_path):
    # MSD names with a _0001 ending are uids (one channel, so nothing else could refuse them).
    msd = write_msd(tmp_path / "msd", channels=1, lesion=3)
    assert [c.uid for c in list_source("t", _cfg(msd), tmp_path).cases] == UIDS
    # nnU-Net's files are channels: a missing one is named.
    nn = write_nnunet(tmp_path / "nn")
    (nn / "imagesTr" / "case_0003_0001.nii.gz").unlink()
    with pytest.raises(DataError) as err:
        list_source("t", _cfg(nn), tmp_path)
    assert "case_0003_0001.nii.gz" in str(err.value) and "channel 1 of case case_0003" in str(err.value)
    meta = json.loads((nn / "dataset.json").read_text())
    del meta["channel_names"]
    (nn / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="neither 'channel_names' .* nor 'modality'"):
        list_source("t", _cfg(nn), tmp_path)


def test_nnunet_file_list_and_case_count(tmp_path):
    root = write_nnunet(tmp_path / "nn")
    meta = json.loads((root / "dataset.json").read_text())
    for c in range(2):  # a whole case gone: only numTraining tells
        (root / "imagesTr" / f"case_0006_{c:04d}.nii.gz").unlink()
    with pytest.raises(DataError, match=r"numTraining is 6, but .*imagesTr holds 5 cases"):
        list_source("t", _cfg(root), tmp_path)
    # A "dataset" key lists each case's files (here under other names) instead of imagesTr/.
    meta["dataset"] = {
        u: {
            "images": [f"imagesTr/{u}_0001.nii.gz", f"imagesTr/{u}_0000.nii.gz"],
            "label": f"labelsTr/{u}.nii.gz",
        }
        for u in UIDS[:5]
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    src = list_source("t", _cfg(root), tmp_path)
    assert [c.uid for c in src.cases] == UIDS[:5]
    assert src.cases[0].image_files[0].name == "case_0001_0001.nii.gz"
    meta["dataset"]["case_0006"] = {"images": ["a.nii.gz", "b.nii.gz"], "label": "c.nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"dataset\.case_0006 lists .*a\.nii\.gz, which does not exist"):
        list_source("t", _cfg(root), tmp_path)


def test_nnunet_v1_listed_names_with_channel_files(tmp_path, msd_data):
    # nnU-Net v1: an MSD-style training list whose images lie as {uid}_0000/_0001 files.
    root = write_nnunet(tmp_path / "Task005_Toy")
    meta = json.loads(write_msd(tmp_path / "msd").joinpath("dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps(meta))
    src = list_source("t", _cfg(root), tmp_path)
    assert [c.uid for c in src.cases] == UIDS and all(len(c.image_files) == 2 for c in src.cases)


def test_data_figure_shows_the_first_channel(msd_data, tmp_path):
    from diffseg.data.cli import data_figure

    assert data_figure(msd_data, tmp_path / "fig.png", cases=2) == UIDS[:2]
    assert (tmp_path / "fig.png").stat().st_size > 0


def test_augment_moves_every_channel_alike():
    import jax
    import jax.numpy as jnp

    from diffseg.data import augment_batch

    image, label = _case(3, shape=(16, 16, 8))
    images = jnp.asarray(np.stack([image, image])[..., 0] + 2.0)  # positive: the minimum scales
    two = jnp.stack([images, 2.0 * images], axis=-1)  # (B, X, Y, Z, 2)
    labels = jnp.asarray(np.stack([label, label]).astype(np.int32))
    cfg = {"max_rotation": 0.3, "max_translation": 3.0, "max_scaling": 0.1}
    key = jax.random.key(7)
    out_two, lab_two = augment_batch(key, two, labels, cfg)
    out_one, lab_one = augment_batch(key, images, labels, cfg)
    assert out_two.shape == two.shape and lab_two.shape == labels.shape
    np.testing.assert_array_equal(np.asarray(lab_two), np.asarray(lab_one))
    np.testing.assert_allclose(np.asarray(out_two[..., 0]), np.asarray(out_one), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out_two[..., 1]), 2.0 * np.asarray(out_one), rtol=1e-5)
    assert not np.array_equal(np.asarray(lab_two), np.asarray(labels))  # something moved


def test_msd_listed_file_missing_is_named(tmp_path):
    # One channel, plain uids: only reading the training list can tell.
    root = write_msd(tmp_path / "T", channels=1, lesion=3, uids=[f"pt{i}" for i in range(1, 7)], stray=False)
    (root / "imagesTr" / "pt4.nii.gz").unlink()
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        prepare_dataset("t", _cfg(root), out, tmp_path)
    message = str(err.value)
    assert "training[3]" in message and str(root / "imagesTr" / "pt4.nii.gz") in message
    assert "does not exist" in message and not out.exists()


def test_msd_image_with_the_wrong_channel_count(tmp_path):
    root = write_msd(tmp_path / "T")
    _save(root / "imagesTr" / "case_0002.nii.gz", _case(1)[0][..., 0])
    with pytest.raises(DataError, match=r"case_0002\.nii\.gz: 1 channel\(s\), expected 2"):
        prepare_dataset("t", _cfg(root), tmp_path / "out", tmp_path)


def test_absent_class_warns_by_name(tmp_path, caplog):
    # One channel, values 0..3 in the files and a class 4 that no case holds.
    labels = {**{str(v): n for v, n in enumerate(NAMES)}, "4": "ghost"}
    root = write_msd(
        tmp_path / "T", labels=labels, channels=1, lesion=3, uids=[f"pt{i}" for i in range(6)], stray=False
    )
    with caplog.at_level(logging.WARNING):
        info = prepare_dataset("t", _cfg(root), tmp_path / "out", tmp_path)
    assert info["classes"] == [*NAMES, "ghost"] and "label_values" not in info and "channels" not in info
    warned = [r.getMessage() for r in caplog.records if "absent from every training case" in r.getMessage()]
    assert len(warned) == 1 and "'ghost'" in warned[0] and "label value 4" in warned[0]


TINY = {
    "datasets": {"toy2": {"source": "phantom"}},
    "training": {
        "model": {"channels": [4, 8]},
        "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 2, "log_every": 1},
        "optim": {"warmup_steps": 1},
    },
}


@pytest.fixture(scope="module")
def two_channel_run(msd_data, tmp_path_factory):
    """A tiny 3D diffusion run trained 2 steps (augmentation on) on the 2-channel data."""
    from diffseg.train import train_run

    run_dir = tmp_path_factory.mktemp("run2ch")
    cfg = resolve_run_config(TINY, "toy2", "3d-diff", {})
    save_run_config(cfg, run_dir / "config.yaml")
    train_run(cfg, msd_data, run_dir)
    return run_dir


def test_two_channel_run_trains_and_tests(two_channel_run, msd_data):
    log = (two_channel_run / "train_log.csv").read_text().splitlines()
    assert len(log) == 3 and all("nan" not in line for line in log)
    assert json.loads((two_channel_run / "dataset.json").read_text())["channels"] == 2
    assert main(["test", "--run-dir", str(two_channel_run), "--data", str(msd_data)]) == 0
    pred, _ = read_nifti(next((two_channel_run / "test" / "predictions").glob("*.nii.gz")))
    assert pred.shape == (16, 16, 8) and pred.max() <= 3


def test_predict_takes_the_channels_and_maps_labels_back(two_channel_run, tmp_path, monkeypatch, capsys):
    image, _ = _case(42, shape=(20, 17, 9))
    four_d = tmp_path / "scan.nii.gz"
    _save(four_d, image)
    files = []
    for c in range(2):
        files.append(tmp_path / f"scan_{c:04d}.nii.gz")
        _save(files[-1], np.ascontiguousarray(image[..., c]))
    run = ["--run", str(two_channel_run)]
    # The real network, from one 4D NIfTI: the mask carries the files' label values.
    assert main(["predict", str(four_d), *run, "-o", str(tmp_path / "a.nii.gz")]) == 0
    a = read_nifti(tmp_path / "a.nii.gz")[0]
    assert a.shape == (20, 17, 9) and set(np.unique(a).tolist()) <= set(VALUES)

    # A segmenter that sees both channels and labels class 3 where channel 1 is brightest: the
    # written mask carries the file's value 5 there; two files in channel order give the same.
    seen = []

    def threshold(self, volume, key):
        seen.append(volume)
        return np.where(volume[..., 1] > np.percentile(volume[..., 1], 99), 3, 0).astype(np.uint8)

    monkeypatch.setattr(inference.Segmenter, "segment", threshold)
    assert main(["predict", str(four_d), *run, "-o", str(tmp_path / "c.nii.gz")]) == 0
    assert main(["predict", *map(str, files), *run, "-o", str(tmp_path / "b.nii.gz")]) == 0
    mask = read_nifti(tmp_path / "c.nii.gz")[0]
    assert seen[0].shape[-1] == 2 and set(np.unique(mask).tolist()) == {0, 5}
    bright = image[..., 1] > np.percentile(image[..., 1], 99)
    assert (mask[bright] == 5).mean() > 0.9
    np.testing.assert_array_equal(seen[0], seen[1])
    np.testing.assert_array_equal(mask, read_nifti(tmp_path / "b.nii.gz")[0])

    # The wrong number of channels is one clear line naming the file.
    capsys.readouterr()
    assert main(["predict", str(files[0]), *run, "-o", str(tmp_path / "d.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert str(files[0]) in err and "takes 2 channel(s)" in err
