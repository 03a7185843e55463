"""The reference (ImgX-DiffSeg v0.1.0) affine augmentation: matrix, sampling, resampling, config."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffseg.data import augment_batch
from diffseg.data.augment import (
    affine_matrix,
    apply_affine,
    check_augment_config,
    foreground_range,
    rotation_matrix,
    sample_affine,
)
from diffseg.errors import ConfigError

AUG = {
    "enabled": True,
    "max_rotation": [0.088, 0.088, 0.088],
    "max_translation": [20, 20, 4],
    "max_scaling": [0.15, 0.15, 0.15],
}
ZERO = {"enabled": True, "max_rotation": [0, 0, 0], "max_translation": [0, 0, 0], "max_scaling": [0, 0, 0]}
SHAPE = (12, 10, 6)


def _volumes(batch: int = 3, shape: tuple[int, ...] = SHAPE, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, *shape)).astype(np.float32)
    labels = rng.choice(np.array([0, 2, 5, 7], np.uint8), size=(batch, *shape))
    return images, labels


@pytest.mark.parametrize("shape", [SHAPE, SHAPE[:2]])
def test_identity_when_all_ranges_are_zero(shape):
    images, labels = _volumes(shape=shape)
    out_i, out_l = jax.jit(lambda k, i, y: augment_batch(k, i, y, ZERO))(jax.random.key(3), images, labels)
    assert out_i.dtype == np.float32 and out_l.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(out_i), images)  # bit for bit
    np.testing.assert_array_equal(np.asarray(out_l), labels)


def test_integer_translation_moves_label_and_image_exactly():
    images, labels = _volumes(batch=1)
    img, lab = images[0], labels[0]
    shift = np.array([2, -3, 1])
    out_i, out_l = apply_affine(affine_matrix(jnp.zeros(3), jnp.asarray(shift), jnp.ones(3)), img, lab)
    out_i, out_l = np.asarray(out_i), np.asarray(out_l)
    # out[p] = in[p + t]: the content moves by -t; voxels sampled from outside are padded.
    want_l = np.zeros_like(lab)
    want_i = np.full_like(img, img.min())
    dst = tuple(slice(max(0, -t), n - max(0, t)) for t, n in zip(shift, lab.shape, strict=True))
    src = tuple(slice(max(0, t), n + min(0, t)) for t, n in zip(shift, lab.shape, strict=True))
    want_l[dst], want_i[dst] = lab[src], img[src]
    np.testing.assert_array_equal(out_l, want_l)
    np.testing.assert_array_equal(out_i, want_i)


def test_rotation_90_degrees_about_z_maps_a_known_voxel():
    lab = np.zeros((8, 8, 3), np.int32)
    lab[1, 3, 2] = 5
    img = lab.astype(np.float32)
    affine = affine_matrix(jnp.array([0.0, 0.0, math.pi / 2]), jnp.zeros(3), jnp.ones(3))
    out_i, out_l = apply_affine(affine, jnp.asarray(img), jnp.asarray(lab))
    # q = Rz(90) (p - c) + c, c = 3.5: q = (1, 3) is read by p = (3, 6); z untouched.
    want = np.zeros_like(lab)
    want[3, 6, 2] = 5
    np.testing.assert_array_equal(np.asarray(out_l), want)
    np.testing.assert_allclose(np.asarray(out_i), want.astype(np.float32), atol=1e-5)
    # 2D inputs use the in-plane (Z) rotation.
    out2 = apply_affine(
        affine_matrix(jnp.array([math.pi / 2]), jnp.zeros(2), jnp.ones(2)), img[..., 2], lab[..., 2]
    )
    np.testing.assert_array_equal(np.asarray(out2[1]), want[..., 2])


def test_matrix_composition_is_translation_scaling_rotation():
    r = jnp.array([0.1, -0.05, 0.07])
    rx, ry, rz = (rotation_matrix(jnp.array(a)) for a in ([0.1, 0, 0], [0, -0.05, 0], [0, 0, 0.07]))
    np.testing.assert_allclose(rotation_matrix(r), rz @ ry @ rx, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(rx)[1:, 1:], [[math.cos(0.1), -math.sin(0.1)], [math.sin(0.1), math.cos(0.1)]], atol=1e-6
    )
    a = affine_matrix(r, jnp.array([1.0, 2.0, 3.0]), jnp.array([0.9, 1.0, 1.1]))
    np.testing.assert_allclose(
        a[:3, :3], np.diag([0.9, 1.0, 1.1]) @ np.asarray(rotation_matrix(r)), atol=1e-6
    )
    np.testing.assert_allclose(a[:3, 3], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(a[3], [0, 0, 0, 1])


def test_labels_stay_in_the_label_set():
    images, labels = _volumes(batch=4)
    big = {
        **AUG,
        "max_rotation": [0.5, 0.5, 0.5],
        "max_translation": [3, 3, 2],
        "max_scaling": [0.4, 0.4, 0.4],
    }
    for lab in (labels, labels.astype(np.int32)):
        out_i, out_l = augment_batch(jax.random.key(0), jnp.asarray(images), jnp.asarray(lab), big)
        assert out_l.dtype == lab.dtype and out_l.shape == lab.shape
        assert set(np.unique(np.asarray(out_l)).tolist()) <= {0, 2, 5, 7}
        assert not np.array_equal(np.asarray(out_l), lab)
        assert np.asarray(out_i).min() >= images.min(axis=(1, 2, 3)).min() - 1e-5


def test_per_sample_transforms_differ_and_jit_matches_eager():
    images, labels = _volumes(batch=1)
    images, labels = np.repeat(images, 4, axis=0), np.repeat(labels, 4, axis=0)
    eager = augment_batch(jax.random.key(7), jnp.asarray(images), jnp.asarray(labels), AUG)
    jitted = jax.jit(lambda k, i, y: augment_batch(k, i, y, AUG))(jax.random.key(7), images, labels)
    np.testing.assert_allclose(np.asarray(jitted[0]), np.asarray(eager[0]), atol=1e-5)
    out = np.asarray(jitted[0])
    for a in range(4):
        for b in range(a + 1, 4):
            assert not np.allclose(out[a], out[b])
    other = jax.jit(lambda k, i, y: augment_batch(k, i, y, AUG))(jax.random.key(8), images, labels)
    assert not np.allclose(np.asarray(other[0]), out)


def test_parameter_distributions_and_foreground_clamp():
    lab = np.zeros(SHAPE, np.uint8)
    lab[3:9, 1:5, 2:4] = 1  # foreground range X [3, 8], Y [1, 4], Z [2, 3]
    np.testing.assert_array_equal(np.asarray(foreground_range(jnp.asarray(lab))), [[3, 8], [1, 4], [2, 3]])
    np.testing.assert_array_equal(np.asarray(foreground_range(jnp.zeros(SHAPE))), [[11, 0], [9, 0], [5, 0]])
    cfg = check_augment_config({**AUG, "max_translation": [20, 20, 4]})
    keys = jax.random.split(jax.random.key(0), 4000)
    mats = np.asarray(jax.vmap(lambda k: sample_affine(k, jnp.asarray(lab), cfg))(keys))
    shifts = mats[:, :3, 3]
    # t ~ U(max(-T, -f_min), min(T, n - 1 - f_max)) per axis, as the reference clamps it.
    lo, hi = np.array([-3, -1, -2]), np.array([11 - 8, 9 - 4, 5 - 3])
    assert (shifts >= lo).all() and (shifts <= hi).all()
    np.testing.assert_allclose(shifts.min(0), lo, atol=0.05)
    np.testing.assert_allclose(shifts.max(0), hi, atol=0.05)
    np.testing.assert_allclose(shifts.mean(0), (lo + hi) / 2, atol=0.1)  # uniform
    # Scales are the row norms of S @ R (R orthonormal): U(0.85, 1.15) per axis, independent.
    scales = np.linalg.norm(mats[:, :3, :3], axis=2)
    assert scales.min() >= 0.85 - 1e-5 and scales.max() <= 1.15 + 1e-5
    np.testing.assert_allclose(scales.mean(0), 1.0, atol=0.01)
    assert abs(np.corrcoef(scales[:, 0], scales[:, 1])[0, 1]) < 0.1
    # Rotation only about Z: the angle is U(-0.088, 0.088).
    zonly = check_augment_config({"max_rotation": [0, 0, 0.088]})
    mats = np.asarray(jax.vmap(lambda k: sample_affine(k, jnp.asarray(lab), zonly))(keys))
    angle = np.arctan2(mats[:, 1, 0], mats[:, 0, 0])
    assert np.abs(angle).max() <= 0.088 + 1e-6 and np.abs(angle).max() > 0.087
    np.testing.assert_allclose(np.var(angle), 0.088**2 / 3, rtol=0.1)
    np.testing.assert_allclose(mats[:, 2, :3], np.tile([0, 0, 1], (4000, 1)), atol=1e-6)


def test_config_errors_and_disabled():
    images, labels = _volumes(batch=1)
    with pytest.raises(ConfigError, match="augment.rotation_deg: unknown key"):
        augment_batch(jax.random.key(0), images, labels, {"enabled": True, "rotation_deg": 5.0})
    with pytest.raises(ConfigError, match="augment.max_translation"):
        check_augment_config({"max_translation": [1, 2]})
    with pytest.raises(ConfigError, match="augment.max_scaling"):
        check_augment_config({"max_scaling": [0.1, 1.0, 0.1]})
    with pytest.raises(ConfigError, match="augment.max_rotation"):
        check_augment_config({"max_rotation": [0.1, -0.1, 0.1]})
    with pytest.raises(ConfigError, match="augment.enabled"):
        check_augment_config({"enabled": "yes"})
    with pytest.raises(ConfigError, match="augment.bogus"):
        augment_batch(jax.random.key(0), images, labels, {"enabled": False, "bogus": 1})
    assert check_augment_config({"max_translation": 3})["max_translation"] == (3.0, 3.0, 3.0)
    img, lab = jnp.asarray(images), jnp.asarray(labels)
    same = augment_batch(jax.random.key(0), img, lab, {**AUG, "enabled": False})
    assert same[0] is img and same[1] is lab
