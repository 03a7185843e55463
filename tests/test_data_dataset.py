"""Loading a prepared phantom dataset and the JAX augmentation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffseg.data import augment_batch, load_dataset, prepare_dataset
from diffseg.errors import DataError

# The reference's prostate ranges (radians about X, Y, Z; voxels; +- fraction).
AUG = {
    "enabled": True,
    "max_rotation": [0.088, 0.088, 0.088],
    "max_translation": [20, 20, 4],
    "max_scaling": [0.15, 0.15, 0.15],
}


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "phantom_pelvis"
    cfg = {
        "source": "phantom",
        "anatomy": "pelvis",
        "num_cases": 5,
        "seed": 0,
        "spacing": [1.5, 1.5, 2.5],
        "shape": [32, 32, 16],
        "split": {"train": 3, "valid": 1, "test": 1},
    }
    prepare_dataset("phantom_pelvis", cfg, out, out.parent)
    return out


def test_load_dataset(phantom_dir):
    ds = load_dataset(phantom_dir)
    assert ds.num_classes == 9 and ds.class_names[0] == "background" and ds.spacing == (1.5, 1.5, 2.5)
    uids, images, labels = ds.split("train")
    assert len(uids) == 3 and uids == sorted(uids)
    assert images.shape == (3, 32, 32, 16) and images.dtype == np.float32 and labels.dtype == np.uint8
    assert abs(float(images.mean())) < 0.1  # z-scored MR
    assert ds.split("train")[1] is images  # cached
    with pytest.raises(DataError, match="unknown split"):
        ds.split("bogus")


def test_the_memory_mapped_cache_gives_the_nifti_arrays(phantom_dir, tmp_path):
    import os
    import shutil

    for split in ("train", "valid", "test"):
        assert (phantom_dir / "cache" / f"{split}_images.npy").is_file()
    uids, images, labels = load_dataset(phantom_dir).split("train")
    assert isinstance(images, np.memmap) and isinstance(labels, np.memmap) and not images.flags.writeable
    copy = tmp_path / "nifti_only"
    shutil.copytree(phantom_dir, copy)
    shutil.rmtree(copy / "cache")
    uids2, images2, labels2 = load_dataset(copy).split("train")
    assert not isinstance(images2, np.memmap) and uids2 == uids
    np.testing.assert_array_equal(np.asarray(images), images2)
    np.testing.assert_array_equal(np.asarray(labels), labels2)
    assert images.dtype == images2.dtype == np.float32 and labels.dtype == labels2.dtype == np.uint8
    # a NIfTI file changed after the cache was written: the cache is stale, the files are read
    stale = tmp_path / "stale"
    shutil.copytree(phantom_dir, stale)
    path = stale / "images" / f"{uids[0]}.nii.gz"
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not isinstance(load_dataset(stale).split("train")[1], np.memmap)
    assert isinstance(load_dataset(stale).split("valid")[1], np.memmap)  # the other splits still count


def test_missing_file_and_empty_split(phantom_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(phantom_dir, copy)
    ds = load_dataset(copy)
    uid = ds.uids("test")[0]
    (copy / "labels" / f"{uid}.nii.gz").unlink()
    with pytest.raises(DataError, match=f"labels/{uid}.nii.gz: file not found"):
        ds.split("test")
    (copy / "split.csv").write_text("uid,split\ncase_000,train\n")
    with pytest.raises(DataError, match="split 'valid' .*empty|empty"):
        load_dataset(copy).split("valid")
    with pytest.raises(DataError, match="dataset.json"):
        load_dataset(tmp_path / "nowhere")


def test_augment_batch(phantom_dir):
    _, images, labels = load_dataset(phantom_dir).split("train")
    img, lab = jnp.asarray(images), jnp.asarray(labels.astype(np.int32))
    f = jax.jit(lambda k, i, y: augment_batch(k, i, y, AUG))
    out_i, out_l = f(jax.random.key(0), img, lab)
    assert out_i.shape == img.shape and out_l.shape == lab.shape and out_l.dtype == lab.dtype
    assert set(np.unique(np.asarray(out_l)).tolist()) <= set(range(9))
    assert not np.array_equal(np.asarray(out_l), labels)  # something moved
    assert np.asarray(out_i).min() >= images.min() - 1e-5  # padding uses the sample minimum
    # Label and image move together: the mean image intensity per class barely changes.
    for c in (1, 6):
        before = images[labels == c].mean()
        after = np.asarray(out_i)[np.asarray(out_l) == c].mean()
        assert abs(after - before) < 0.5
    same_i, same_l = augment_batch(jax.random.key(0), img, lab, {**AUG, "enabled": False})
    assert same_i is img and same_l is lab


def test_augment_identity_transform(phantom_dir):
    _, images, labels = load_dataset(phantom_dir).split("valid")
    cfg = {"enabled": True, "max_rotation": 0.0, "max_translation": 0.0, "max_scaling": 0.0}
    out_i, out_l = augment_batch(jax.random.key(1), jnp.asarray(images), jnp.asarray(labels), cfg)
    np.testing.assert_array_equal(np.asarray(out_i), images)
    np.testing.assert_array_equal(np.asarray(out_l), labels)


def test_augment_2d():
    img = jnp.ones((4, 16, 16))
    lab = jnp.ones((4, 16, 16), jnp.int32)
    out_i, out_l = augment_batch(jax.random.key(0), img, lab, AUG)
    assert out_i.shape == (4, 16, 16) and out_l.shape == (4, 16, 16)
