"""Loading a prepared dataset (``results/data/{name}``); ``augment_batch`` lives in ``augment.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from diffseg.data.augment import augment_batch
from diffseg.data.preprocess import read_nifti
from diffseg.data.splits import SPLITS, read_split_csv
from diffseg.errors import DataError, fmt_shape

__all__ = ["Dataset", "augment_batch", "load_dataset"]


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
                    got, want = fmt_shape(data.shape), fmt_shape(self.shape)
                    raise DataError(f"{path}: shape {got}, expected {want} from dataset.json")
                arr[i] = data
        self._cache[name] = (uids, images, labels)
        return self._cache[name]


def load_dataset(data_dir: str | Path) -> Dataset:
    """Open a prepared dataset folder (``results/data/{name}``)."""
    return Dataset(data_dir)
