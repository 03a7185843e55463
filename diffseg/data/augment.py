"""Random affine augmentation in pure JAX, as ImgX-DiffSeg v0.1.0 ran it.

The reference (``imgx/datasets/augmentation.py`` at tag v0.1.0) draws, per sample and per axis,
independent uniform parameters

- rotation ``r_d ~ U(-max_rotation_d, max_rotation_d)`` radians about the X, Y and Z axes,
- scaling ``s_d ~ U(1 - max_scaling_d, 1 + max_scaling_d)``,
- translation ``t_d ~ U(lo_d, hi_d)`` voxels with ``lo_d = max(-max_translation_d, -f_min_d)`` and
  ``hi_d = min(max_translation_d, n_d - 1 - f_max_d)``, where ``[f_min_d, f_max_d]`` is the sample's
  foreground (label != 0) bounding box along axis d and ``n_d`` the axis length,

builds one matrix ``A = T(t) @ S(s) @ Rz(r_z) @ Ry(r_y) @ Rx(r_x)`` and resamples the volume at
``q = A (p - c) + c`` for every output voxel ``p``, ``c = (n - 1) / 2`` the volume centre, all in
voxel indices (not mm: with anisotropic voxels the rotation is not rigid in mm, as in the
reference). The image is interpolated linearly, the label by nearest neighbour, both with the same
coordinates and constant padding outside the volume: the label with 0 (background), the image with
the sample's minimum (the reference pads with 0, which is the minimum of its [0, 1]-rescaled
images; diffseg's images are z-scored MR or [-1, 1] CT, so 0 would be mid-grey there).

Because ``A`` maps output to input coordinates, a translation ``t`` moves the content by ``-t``,
while the foreground clamp above bounds ``t`` as if the content moved by ``+t``: the reference's
clamp protects the side the content moves away from. It is reproduced as the reference ran it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from diffseg.errors import ConfigError

AUGMENT_KEYS = ("enabled", "max_rotation", "max_translation", "max_scaling")
_RANGE_KEYS = AUGMENT_KEYS[1:]


def check_augment_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an ``augment`` config and return it with every range as a tuple of 3 floats.

    Keys: ``enabled`` (bool, default true), ``max_rotation`` (radians about X, Y, Z),
    ``max_translation`` (voxels along X, Y, Z), ``max_scaling`` (± fraction along X, Y, Z, < 1).
    A range is a list of 3 non-negative numbers or one number for all axes; a missing range is 0.

    Raises:
        ConfigError: naming the unknown or bad key.
    """
    unknown = sorted(set(cfg) - set(AUGMENT_KEYS))
    if unknown:
        raise ConfigError(f"augment.{unknown[0]}: unknown key (expected one of {list(AUGMENT_KEYS)})")
    enabled = cfg.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"augment.enabled: expected true or false, got {enabled!r}")
    out: dict[str, Any] = {"enabled": enabled}
    for key in _RANGE_KEYS:
        value = cfg.get(key, 0.0)
        values = [value] * 3 if isinstance(value, int | float) and not isinstance(value, bool) else value
        if (
            not isinstance(values, Sequence)
            or isinstance(values, str)
            or len(values) != 3
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        ):
            raise ConfigError(f"augment.{key}: expected a list of 3 numbers (X, Y, Z), got {value!r}")
        if not all(0.0 <= float(v) < float("inf") for v in values):
            raise ConfigError(f"augment.{key}: expected finite values >= 0, got {value!r}")
        if key == "max_scaling" and not all(float(v) < 1.0 for v in values):
            raise ConfigError(f"augment.max_scaling: expected values < 1 (so 1 - value > 0), got {value!r}")
        out[key] = tuple(float(v) for v in values)
    return out


def rotation_matrix(radians: jax.Array) -> jax.Array:
    """Rotation ``(n, n)`` from ``radians`` ``(3,)`` (about X, Y, Z; n = 3) or ``(1,)`` (in-plane; n = 2).

    3D: ``Rz @ Ry @ Rx`` (X applied first), ``Rx = [[1, 0, 0], [0, c, -s], [0, s, c]]``,
    ``Ry = [[c, 0, s], [0, 1, 0], [-s, 0, c]]``, ``Rz = [[c, -s, 0], [s, c, 0], [0, 0, 1]]``.
    2D: ``[[c, -s], [s, c]]`` (the Z rotation restricted to the X-Y plane).
    """
    radians = jnp.asarray(radians, jnp.float32)
    cos, sin = jnp.cos(radians), jnp.sin(radians)
    one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
    if radians.shape == (1,):
        return jnp.stack([jnp.stack([cos[0], -sin[0]]), jnp.stack([sin[0], cos[0]])])
    if radians.shape != (3,):
        raise ValueError(f"rotation_matrix: expected 1 or 3 angles, got shape {radians.shape}")

    def mat(rows: list[list[jax.Array]]) -> jax.Array:
        return jnp.stack([jnp.stack(r) for r in rows])

    (cx, cy, cz), (sx, sy, sz) = cos, sin
    rx = mat([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
    ry = mat([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    rz = mat([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
    return rz @ ry @ rx


def affine_matrix(radians: jax.Array, shifts: jax.Array, scales: jax.Array) -> jax.Array:
    """Homogeneous ``(n + 1, n + 1)`` matrix ``T(shifts) @ S(scales) @ R(radians)``.

    Args:
        radians: ``(3,)`` about X, Y, Z for n = 3, or ``(1,)`` for n = 2 (see ``rotation_matrix``).
        shifts: ``(n,)`` voxels. scales: ``(n,)``.

    The matrix maps centred output voxel coordinates to centred input ones (see ``apply_affine``).
    """
    shifts = jnp.asarray(shifts, jnp.float32)
    n = shifts.shape[0]
    linear = jnp.asarray(scales, jnp.float32)[:, None] * rotation_matrix(radians)  # S @ R
    top = jnp.concatenate([linear, shifts[:, None]], axis=1)
    bottom = jnp.zeros((1, n + 1), jnp.float32).at[0, n].set(1.0)
    return jnp.concatenate([top, bottom], axis=0)


def foreground_range(label: jax.Array) -> jax.Array:
    """Per axis the first and last index holding a nonzero label: ``(n, 2)`` int32 for ``label`` ``(*S)``.

    An empty label gives ``[n_d - 1, 0]``, which leaves the translation unclamped.
    """
    nonzero = label != 0
    rows = []
    for d, size in enumerate(label.shape):
        hit = jnp.any(nonzero, axis=tuple(a for a in range(label.ndim) if a != d))
        first = jnp.argmax(hit)
        last = size - 1 - jnp.argmax(hit[::-1])
        rows.append(jnp.where(hit.any(), jnp.stack([first, last]), jnp.array([size - 1, 0])))
    return jnp.stack(rows).astype(jnp.int32)


def sample_affine(key: jax.Array, label: jax.Array, cfg: Mapping[str, Any]) -> jax.Array:
    """One random ``(n + 1, n + 1)`` affine for one sample with label ``(*S)``, ``n = len(S)`` in {2, 3}.

    ``cfg`` as returned by ``check_augment_config``. In 2D (an axial slice) the rotation is the one
    about Z and the translation and scaling use the X and Y entries.
    """
    n = label.ndim
    max_rot = jnp.array(cfg["max_rotation"] if n == 3 else cfg["max_rotation"][2:], jnp.float32)
    max_shift = jnp.array(cfg["max_translation"][:n], jnp.float32)
    max_scale = jnp.array(cfg["max_scaling"][:n], jnp.float32)
    fg = foreground_range(label).astype(jnp.float32)
    size = jnp.array(label.shape, jnp.float32)
    lo = jnp.maximum(-max_shift, -fg[:, 0])
    hi = jnp.minimum(max_shift, size - 1.0 - fg[:, 1])
    k_rot, k_shift, k_scale = jax.random.split(key, 3)
    radians = jax.random.uniform(k_rot, max_rot.shape, minval=-max_rot, maxval=max_rot)
    shifts = jax.random.uniform(k_shift, (n,), minval=lo, maxval=hi)
    scales = jax.random.uniform(k_scale, (n,), minval=1.0 - max_scale, maxval=1.0 + max_scale)
    return affine_matrix(radians, shifts, scales)


def apply_affine(affine: jax.Array, image: jax.Array, label: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Resample one sample: ``out[p] = in[A (p - c) + c]`` with ``c = (shape - 1) / 2``, in voxels.

    Args:
        affine: ``(n + 1, n + 1)`` (or ``(n, n + 1)``) from ``affine_matrix``.
        image: ``(*S)`` float, ``len(S) = n``. label: ``(*S)`` integer.

    Returns:
        ``(image, label)`` with the input shapes and dtypes: the image interpolated linearly and
        padded with its minimum, the label by nearest neighbour (ties rounded away from zero) and
        padded with 0. The coordinates are computed on the fly from the matrix (no stored grid).
    """
    spatial = image.shape
    n = len(spatial)
    centre = [(s - 1) / 2.0 for s in spatial]
    axes = [
        jnp.arange(s, dtype=jnp.float32).reshape([s if a == d else 1 for a in range(n)]) - centre[d]
        for d, s in enumerate(spatial)
    ]
    coords = []
    for i in range(n):
        c = affine[i, n] + centre[i]
        for j in range(n):
            c = c + affine[i, j] * axes[j]
        coords.append(jnp.broadcast_to(c, spatial))
    # Constant padding with a traced value (map_coordinates' cval is static): pad with 0, then add
    # the minimum times the interpolation weight that fell outside the volume. Per axis that
    # in-volume weight is clip(min(q + 1, n - q), 0, 1) for linear interpolation. Where it is 1
    # the interpolated value is kept as is, so an identity transform returns the image bit for bit.
    # (Written as a select: on XLA:CPU the plain arithmetic form split the 8-corner gather out of
    # its fused loop and made a batch of 8 volumes 256x256x48 about 4x slower.)
    inside = jnp.ones((), jnp.float32)
    for c, s in zip(coords, spatial, strict=True):
        inside = inside * jnp.clip(jnp.minimum(c + 1.0, s - c), 0.0, 1.0)
    out = jax.scipy.ndimage.map_coordinates(image, coords, order=1, mode="constant", cval=0.0)
    out = out.astype(jnp.float32)
    out = jnp.where(inside < 1.0, out + image.min().astype(jnp.float32) * (1.0 - inside), out)
    lab = jax.scipy.ndimage.map_coordinates(label, coords, order=0, mode="constant", cval=0)
    return out.astype(image.dtype), lab.astype(label.dtype)


def augment_batch(
    key: jax.Array, images: jax.Array, labels: jax.Array, cfg: Mapping[str, Any]
) -> tuple[jax.Array, jax.Array]:
    """Random affine per sample (rotation, scaling, translation; see the module docstring); jit-able.

    Args:
        key: a PRNG key; each sample gets its own split of it.
        images: ``(B, X, Y, Z)`` (or ``(B, X, Y)``: axial slices, rotated about Z only) float, or
            with a trailing channel axis ``(B, X, Y, Z, C)``: every channel of a sample moves with
            the same transform (each padded with its own minimum).
        labels: ``(B, X, Y, Z)`` (or ``(B, X, Y)``) integer.
        cfg: ``enabled``, ``max_rotation`` [rx, ry, rz] radians, ``max_translation`` [tx, ty, tz]
            voxels, ``max_scaling`` [sx, sy, sz] ± fraction; static Python values.

    Returns:
        ``(images, labels)`` with the input shapes and dtypes.

    Raises:
        ConfigError: an unknown or bad ``cfg`` key.
    """
    checked = check_augment_config(cfg)
    if not checked["enabled"]:
        return images, labels
    channels = images.ndim == labels.ndim + 1
    if (
        images.shape[: labels.ndim] != labels.shape
        or labels.ndim not in (3, 4)
        or images.ndim > labels.ndim + 1
    ):
        raise ValueError(
            f"augment_batch: expected images (B, X, Y, Z[, C]) or (B, X, Y[, C]) and labels of their "
            f"spatial shape, got {images.shape} and {labels.shape}"
        )

    def one(k: jax.Array, img: jax.Array, lab: jax.Array) -> tuple[jax.Array, jax.Array]:
        affine = sample_affine(k, lab, checked)
        if not channels:
            return apply_affine(affine, img, lab)
        per_channel = jax.vmap(lambda ch: apply_affine(affine, ch, lab)[0], in_axes=-1, out_axes=-1)
        return per_channel(img), apply_affine(affine, img[..., 0], lab)[1]

    return jax.vmap(one)(jax.random.split(key, images.shape[0]), images, labels)
