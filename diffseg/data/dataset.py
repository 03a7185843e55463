"""Loading a prepared dataset (``results/data/{name}``) and on-device augmentation in pure JAX."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffseg.data.preprocess import read_nifti
from diffseg.data.splits import SPLITS, read_split_csv
from diffseg.errors import DataError


class Dataset:
    """A prepared dataset folder: ``dataset.json``, ``split.csv``, ``images/`` and ``labels/``.

    Attributes:
        info: the ``dataset.json`` dict (name, source, modality, classes, num_classes, spacing,
            shape, num_cases, splits).
    """

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        meta = self.dir / "dataset.json"
        if not meta.is_file():
            raise DataError(f"{meta}: not found (run `diffseg data` to prepare {self.dir})")
        try:
            self.info: dict[str, Any] = json.loads(meta.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{meta}: invalid JSON ({err})") from None
        missing = {"classes", "num_classes", "spacing", "shape"} - set(self.info)
        if missing:
            raise DataError(f"{meta}: missing keys {sorted(missing)}")
        self._split = read_split_csv(self.dir / "split.csv")
        self._cache: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm, ``(sx, sy, sz)``."""
        return tuple(float(s) for s in self.info["spacing"])  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape ``(X, Y, Z)``."""
        return tuple(int(s) for s in self.info["shape"])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        """Number of classes, counting background."""
        return int(self.info["num_classes"])

    @property
    def class_names(self) -> list[str]:
        """Class names by label value (``class_names[0]`` is background)."""
        return list(self.info["classes"])

    def uids(self, name: str) -> list[str]:
        """Sorted case ids of split ``name`` (train | valid | test)."""
        if name not in SPLITS:
            raise DataError(
                f"{self.dir / 'split.csv'}: unknown split {name!r} (expected one of {list(SPLITS)})"
            )
        return sorted(u for u, s in self._split.items() if s == name)

    def split(self, name: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Load split ``name``: ``(uids, images (N, X, Y, Z) float32, labels (N, X, Y, Z) uint8)``; cached."""
        if name in self._cache:
            return self._cache[name]
        uids = self.uids(name)
        if not uids:
            raise DataError(f"{self.dir / 'split.csv'}: split {name!r} is empty")
        images = np.empty((len(uids), *self.shape), np.float32)
        labels = np.empty((len(uids), *self.shape), np.uint8)
        for i, uid in enumerate(uids):
            for arr, sub in ((images, "images"), (labels, "labels")):
                path = self.dir / sub / f"{uid}.nii.gz"
                data, _ = read_nifti(path)
                if data.shape != self.shape:
                    raise DataError(f"{path}: shape {data.shape}, expected {self.shape} from dataset.json")
                arr[i] = data
        self._cache[name] = (uids, images, labels)
        return self._cache[name]


def load_dataset(data_dir: str | Path) -> Dataset:
    """Open a prepared dataset folder (``results/data/{name}``)."""
    return Dataset(data_dir)


def _sample_coords(key: jax.Array, spatial: tuple[int, ...], cfg: Mapping[str, Any]) -> list[jax.Array]:
    """Input-space coordinates, one array of shape ``spatial`` per axis, for one random transform."""
    k_rot, k_shift, k_scale = jax.random.split(key, 3)
    max_rot = float(np.deg2rad(cfg.get("rotation_deg", 0.0)))
    tv = float(cfg.get("translation_vox", 0.0))
    lo, hi = (float(s) for s in cfg.get("scale", (1.0, 1.0)))
    theta = jax.random.uniform(k_rot, (), minval=-max_rot, maxval=max_rot)
    limits = jnp.array([tv, tv, tv / 2][: len(spatial)])
    shift = jax.random.uniform(k_shift, (len(spatial),), minval=-1.0, maxval=1.0) * limits
    scale = jax.random.uniform(k_scale, (), minval=lo, maxval=hi)
    grids = jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in spatial], indexing="ij")
    centre = [(n - 1) / 2.0 for n in spatial]
    # Output voxel p maps to input c + R(-theta) (p - c - t) / s: the inverse of scale-rotate-shift.
    u = grids[0] - centre[0] - shift[0]
    v = grids[1] - centre[1] - shift[1]
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    coords = [centre[0] + (cos * u + sin * v) / scale, centre[1] + (-sin * u + cos * v) / scale]
    if len(spatial) == 3:
        coords.append(grids[2] - shift[2])
    return coords


def augment_batch(
    key: jax.Array, images: jax.Array, labels: jax.Array, cfg: Mapping[str, Any]
) -> tuple[jax.Array, jax.Array]:
    """Random in-plane rotation, translation and scaling per sample; jit-able.

    Args:
        key: a PRNG key.
        images: ``(B, X, Y, Z)`` (or ``(B, X, Y)``) float.
        labels: same shape, integer.
        cfg: ``enabled``, ``rotation_deg`` (± degrees about Z), ``translation_vox`` (± voxels in X, Y;
            half of it in Z), ``scale`` ([lo, hi], isotropic in-plane). Python values (static).

    Returns:
        ``(images, labels)`` with the input shapes and dtypes; images interpolated linearly and
        padded with each sample's minimum, labels by nearest neighbour and padded with 0.
    """
    if not cfg.get("enabled", True):
        return images, labels
    spatial = tuple(images.shape[1:])
    keys = jax.random.split(key, images.shape[0])

    def one(k: jax.Array, img: jax.Array, lab: jax.Array) -> tuple[jax.Array, jax.Array]:
        coords = _sample_coords(k, spatial, cfg)
        # map_coordinates' cval must be static: shift so the image minimum is the 0 padding.
        lo = img.min()
        out = jax.scipy.ndimage.map_coordinates(img - lo, coords, order=1, mode="constant", cval=0.0) + lo
        lab_f = jax.scipy.ndimage.map_coordinates(
            lab.astype(jnp.float32), coords, order=0, mode="constant", cval=0.0
        )
        return out.astype(img.dtype), jnp.round(lab_f).astype(lab.dtype)

    return jax.vmap(one)(keys, images, labels)
