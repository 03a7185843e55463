"""Loading a prepared dataset (``results/data/{name}``); ``augment_batch`` lives in ``augment.py``.

Besides the NIfTI files, the data stage writes an uncompressed cache of every split (``write_cache``):
``cache/{split}_images.npy`` (float32 ``(N, X, Y, Z)``), ``cache/{split}_labels.npy`` (uint8) and
``cache/{split}.json`` (the uids in order, the shape, and the size and mtime of each NIfTI file it
was made from; written last). ``Dataset.split`` memory-maps it (``np.load(mmap_mode="r")``) when it
is present and up to date, so a split larger than RAM is read volume by volume as training asks
for it; otherwise it reads the NIfTI files into memory, as before.
"""

from __future__ import annotations

import functools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from diffseg.data.augment import augment_batch
from diffseg.data.splits import SPLITS, read_split_csv
from diffseg.errors import DataError, fmt_shape
from diffseg.io import atomic_path, atomic_write_json, read_nifti

__all__ = ["Dataset", "augment_batch", "load_dataset", "write_cache"]

CACHE = "cache"


def _sources(data_dir: Path, uids: list[str]) -> list[list[int]]:
    """Size and mtime (ns) of each uid's image and label NIfTI: what the cache was made from."""
    out = []
    for uid in uids:
        row = []
        for sub in ("images", "labels"):
            st = os.stat(data_dir / sub / f"{uid}.nii.gz")
            row += [st.st_size, st.st_mtime_ns]
        out.append(row)
    return out


def _write_slot(fd: int, offset: int, i: int, path: Path, dtype: type, want: tuple[int, ...]) -> None:
    """Read one NIfTI volume and write it as slot ``i`` of an ``.npy`` file's data (``os.pwrite``).

    ``offset`` is where the data start (after the header); a volume whose shape is not ``want`` is
    a ``DataError`` naming its file.
    """
    data, _ = read_nifti(path)
    if data.shape != want:
        raise DataError(f"{path}: shape {fmt_shape(data.shape)}, expected {fmt_shape(want)}")
    volume = np.ascontiguousarray(data, dtype=dtype)
    view, at = memoryview(volume).cast("B"), offset + i * volume.nbytes
    while view:  # pwrite may write less than asked; it releases the GIL and needs no shared seek
        written = os.pwrite(fd, view, at)
        view, at = view[written:], at + written


def write_cache(
    data_dir: str | Path, shape: tuple[int, ...] | list[int], channels: int = 1, threads: int = 1
) -> None:
    """Write the uncompressed, memory-mappable cache of every split of ``data_dir`` (see the module).

    Reads ``split.csv`` and the NIfTI files volume by volume and writes each into its slot of the
    ``.npy`` file (the header from ``open_memmap``, the data with positional writes, not through a
    memory map: a map's dirty pages would count in the process's memory, growing with the split,
    and a full disk would kill it with SIGBUS instead of an error). Never the whole split in
    memory: ``threads`` volumes at most, read (decompressed) at once, so the files are the same for
    any number. Each file is written atomically and the manifest ``{split}.json`` last, so an
    interrupted write leaves no cache that counts. With several image ``channels`` the images are
    ``(N, X, Y, Z, C)``.
    """
    data_dir = Path(data_dir)
    shape = tuple(int(s) for s in shape)
    split = read_split_csv(data_dir / "split.csv")
    (data_dir / CACHE).mkdir(exist_ok=True)
    for name in SPLITS:
        uids = sorted(u for u, s in split.items() if s == name)
        if not uids:
            continue
        for sub, dtype in (("images", np.float32), ("labels", np.uint8)):
            want = (*shape, channels) if sub == "images" and channels > 1 else shape
            with atomic_path(data_dir / CACHE / f"{name}_{sub}.npy") as tmp:
                header = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(uids), *want))
                offset = header.offset  # numpy's header, the data's size set; no page touched
                del header
                paths = [data_dir / sub / f"{uid}.nii.gz" for uid in uids]
                fd = os.open(tmp, os.O_WRONLY)
                try:
                    write = functools.partial(_write_slot, fd, offset, dtype=dtype, want=want)
                    if threads > 1 and len(uids) > 1:
                        # gzip decoding releases the GIL; a task holds one volume while it runs.
                        pool = ThreadPoolExecutor(min(threads, len(uids)), thread_name_prefix="cache")
                        try:
                            for _ in pool.map(write, range(len(uids)), paths):
                                pass
                        finally:  # after an error, read no more files
                            pool.shutdown(wait=True, cancel_futures=True)
                    else:
                        for i, path in enumerate(paths):
                            write(i, path)
                finally:
                    os.close(fd)
        manifest = {"uids": uids, "shape": list(shape), "sources": _sources(data_dir, uids)}
        atomic_write_json(data_dir / CACHE / f"{name}.json", manifest)


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
    def channels(self) -> int:
        """Image channels (``dataset.json`` ``channels``, absent = 1)."""
        return int(self.info.get("channels", 1))

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One image's shape: ``(X, Y, Z)``, or ``(X, Y, Z, C)`` with several channels."""
        return self.shape if self.channels == 1 else (*self.shape, self.channels)

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

    def cached(self, name: str) -> tuple[np.memmap, np.memmap] | None:
        """Split ``name``'s uncompressed cache, memory-mapped read-only, if present and up to date
        (same uids and shape, NIfTI files unchanged since it was written); else ``None``."""
        folder = self.dir / CACHE
        try:
            manifest = json.loads((folder / f"{name}.json").read_text())
            uids = self.uids(name)
            if manifest["uids"] != uids or tuple(manifest["shape"]) != self.shape:
                return None
            if manifest["sources"] != _sources(self.dir, uids):
                return None
            images = np.load(folder / f"{name}_images.npy", mmap_mode="r")
            labels = np.load(folder / f"{name}_labels.npy", mmap_mode="r")
        except (OSError, ValueError, KeyError, TypeError):
            return None
        want = (len(uids), *self.shape)
        if (
            images.shape != (len(uids), *self.image_shape)
            or labels.shape != want
            or images.dtype != np.float32
            or labels.dtype != np.uint8
        ):
            return None
        return images, labels

    def split(self, name: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Load split ``name``: ``(uids, images (N, X, Y, Z) float32, labels (N, X, Y, Z) uint8)``; cached.

        Memory-mapped (read-only ``np.memmap``) from the data stage's cache when it is up to date,
        else read from the NIfTI files into memory.

        With several channels the images are ``(N, X, Y, Z, C)``, channels last.
        """
        if name in self._cache:
            return self._cache[name]
        uids = self.uids(name)
        if not uids:
            raise DataError(f"{self.dir / 'split.csv'}: split {name!r} is empty")
        mapped = self.cached(name)
        if mapped is not None:
            self._cache[name] = (uids, *mapped)
            return self._cache[name]
        images = np.empty((len(uids), *self.image_shape), np.float32)
        labels = np.empty((len(uids), *self.shape), np.uint8)
        for i, uid in enumerate(uids):
            for arr, sub in ((images, "images"), (labels, "labels")):
                path = self.dir / sub / f"{uid}.nii.gz"
                data, _ = read_nifti(path)
                want = self.image_shape if sub == "images" else self.shape
                if data.shape != want:
                    got, want_text = fmt_shape(data.shape), fmt_shape(want)
                    raise DataError(f"{path}: shape {got}, expected {want_text} from dataset.json")
                arr[i] = data
        self._cache[name] = (uids, images, labels)
        return self._cache[name]


def load_dataset(data_dir: str | Path) -> Dataset:
    """Open a prepared dataset folder (``results/data/{name}``)."""
    return Dataset(data_dir)
