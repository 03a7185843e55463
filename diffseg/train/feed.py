"""The host-side batch feeder: each step's volumes, chosen from (seed, step), sent to the devices.

The training split stays in host memory (numpy arrays, memory-mapped when the data stage wrote
its uncompressed cache, ``diffseg.data.dataset``). For step ``s`` (0-based, ``state["step"]``
before the update) the feeder draws ``batch_size`` volume indices uniformly with replacement
from ``numpy.random.Generator(PCG64([seed, s]))``: a pure function of (seed, step), so a resumed
run feeds the same volumes as an uninterrupted one, whatever the micro-batch or device count.
It gathers them (``images[idx]``: only those volumes are read from a memory map) and
``device_put``\\ s them with the batch sharding, one step ahead in a background thread, so the
host's reading and the transfer overlap the device's previous step.

In a run of several processes (``diffseg.distributed``) every process draws the same global
indices and gathers only the volumes of its own devices' shards (:func:`process_batch`).

Shapes: ``images (N, X, Y, Z)`` float32, ``labels (N, X, Y, Z)`` uint8 on the host; each batch is
``(B, X, Y, Z)`` of the same dtypes on the devices, split along B.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

SAMPLING = ("epoch", "uniform")


def batch_indices(
    seed: int, step: int, batch_size: int, num_volumes: int, sampling: str = "epoch"
) -> np.ndarray:
    """Volume indices ``(batch_size,)`` int64 of 0-based step ``step``, from ``(seed, step)`` alone.

    ``"epoch"``: sample ``j = step·B + i`` of the run is ``perm_e[j mod N]``, ``perm_e`` a fresh
    permutation of the N volumes per epoch ``e = j // N`` (seeded by ``(seed, e)``): each volume
    once per epoch, as the reference's ``repeat → shuffle → batch`` pipeline (``train.sampling``).
    ``"uniform"``: B volumes uniform with replacement per step (seeded by ``(seed, step)``).
    Both are resume-safe: no state but the step.
    """
    if sampling == "uniform":
        rng = np.random.Generator(np.random.PCG64([int(seed), int(step)]))
        return rng.integers(0, num_volumes, batch_size)
    if sampling != "epoch":
        raise ValueError(f"train.sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
    j = int(step) * int(batch_size) + np.arange(int(batch_size), dtype=np.int64)
    epochs, pos = np.divmod(j, int(num_volumes))
    out = np.empty(int(batch_size), np.int64)
    for e in np.unique(epochs):  # at most 1 + B // N epochs touch one step
        # A third seed word keeps these streams apart from "uniform"'s (seed, step) ones.
        perm = np.random.Generator(np.random.PCG64([int(seed), int(e), 1])).permutation(int(num_volumes))
        out[epochs == e] = perm[pos[epochs == e]]
    return out


def gather(images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``images[index]``, ``labels[index]`` as contiguous in-memory arrays (reads a memmap's volumes)."""
    return np.ascontiguousarray(images[index]), np.ascontiguousarray(labels[index])


def process_batch(
    images: np.ndarray, labels: np.ndarray, index: np.ndarray, sharding: Sharding
) -> tuple[Any, Any]:
    """The global batch ``images[index]``, ``labels[index]`` ``(B, ...)`` with ``sharding``, of which
    this process reads and sends only the rows of its own devices' shards."""
    arrays: tuple[list[Any], list[Any]] = ([], [])
    for device, where in sharding.addressable_devices_indices_map((len(index), *images.shape[1:])).items():
        for out, part in zip(arrays, gather(images, labels, index[where[0]]), strict=True):
            out.append(jax.device_put(part, device))
    return tuple(
        jax.make_array_from_single_device_arrays((len(index), *source.shape[1:]), sharding, parts)
        for source, parts in zip((images, labels), arrays, strict=True)
    )


class BatchFeeder:
    """Iterate ``(images, labels)`` device arrays ``(B, X, Y, Z)`` for steps ``first..last-1`` (0-based).

    A background thread prepares step ``s + 1`` (gather + ``device_put``) while the caller runs
    step ``s``: at most ``prefetch`` batches wait on the devices. Errors in the thread are raised in
    the caller at the step they belong to. ``close()`` (or leaving a ``with`` block) stops it.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        seed: int,
        sharding: Sharding | None,
        first: int,
        last: int,
        prefetch: int = 1,
        sampling: str = "epoch",
    ):
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"BatchFeeder: {len(images)} images and {len(labels)} labels")
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.sharding = int(batch_size), int(seed), sharding
        self.first, self.last = int(first), int(last)
        self.sampling = sampling
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(prefetch)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="diffseg-feeder", daemon=True)
        self._thread.start()

    def batch(self, step: int) -> tuple[Any, Any]:
        """Step ``step``'s batch on the devices (synchronously; the thread uses this too)."""
        index = batch_indices(self.seed, step, self.batch_size, len(self.images), self.sampling)
        if self.sharding is not None and not self.sharding.is_fully_addressable:  # one of several processes
            return process_batch(self.images, self.labels, index, self.sharding)
        image, label = gather(self.images, self.labels, index)
        if self.sharding is None:
            return jax.device_put(image), jax.device_put(label)
        return jax.device_put(image, self.sharding), jax.device_put(label, self.sharding)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        for step in range(self.first, self.last):
            try:
                item: Any = (step, self.batch(step), None)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                item = (step, None, err)
            if not self._put(item) or item[2] is not None:
                return

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        try:
            for expected in range(self.first, self.last):
                step, batch, err = self._queue.get()
                if err is not None:
                    raise err
                assert step == expected, (step, expected)
                yield batch
        finally:  # also when the caller stops early (an exception, a dropped iterator)
            self.close()

    def close(self) -> None:
        """Stop the thread (it finishes the batch in hand) and drop what is queued."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)

    def __enter__(self) -> BatchFeeder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
