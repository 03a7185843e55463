"""Inference: one forward pass for ``seg`` runs, K-step DDPM sampling for diffusion runs.

Volumes go in as ``(N, X, Y, Z)``, to the 2D network as to the 3D one (it folds the axial slices
into its batch itself). Batches are jit-compiled once per shape and split over every local
device (data parallel).

Sliding windows: given the run's training shape (``window``), a volume of any size is cut into
windows of that shape, overlapping by ``evaluate.window_overlap``, that go through the network
``evaluate.batch_size`` at a time; their class probabilities are blended with a Gaussian
weight (sigma = 1/8 of the window per axis, as nnU-Net), accumulated on the host in float32.
A diffusion run samples each window with its own K steps and its own key; its probabilities are
the softmax of :meth:`GaussianDiffusion.mask_logits` (for a noise prediction, ``(x0_hat + 1) / 2``
of the last unclipped ``x0_hat`` normalised over the classes), whose argmax is the last
``x0_hat``'s. A volume smaller than a window is padded to it and cropped back; a volume of
exactly one window is one call, the same as without windows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffseg.diffusion import GaussianDiffusion, Prediction
from diffseg.parallel import batch_sharding, data_mesh, replicated
from diffseg.runconfig import RunConfig, RunConfigLike


def make_logits_fn(model: Any, run_cfg: RunConfigLike) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """``logits(params, image (B, *S, 1), key) -> (B, *S, C)`` float32 for the run's model."""
    run_cfg = RunConfig.of(run_cfg)
    diff_cfg = run_cfg.diffusion
    if not diff_cfg.enabled:
        return lambda params, image, key: model.apply(params, image).astype(jnp.float32)
    diffusion = GaussianDiffusion.from_config(diff_cfg, num_steps=diff_cfg.sample_steps)

    def logits(params, image, key):
        shape = (*image.shape[:-1], model.num_classes)
        denoise = lambda x_t, t: model.apply(params, image, x_t, t)
        return diffusion.sample(denoise, shape, key, diff_cfg.prediction)

    return logits


def make_window_logits_fn(
    model: Any, run_cfg: RunConfigLike
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """``logits(params, image (B, *S, 1), keys (B,)) -> (B, *S, C)``: one key per batch element.

    The K-step sampling of :meth:`GaussianDiffusion.sample`, ending in the same mask logits
    (:meth:`GaussianDiffusion.mask_logits` of the last step), with each element's noise drawn
    from its own key, so that a window's result does not depend on the other windows of its
    batch. With JAX's partitionable threefry (the default), element 0 with key ``k`` draws the
    same noise as ``sample`` with ``k`` over the whole batch.
    """
    run_cfg = RunConfig.of(run_cfg)
    diff_cfg = run_cfg.diffusion
    if not diff_cfg.enabled:
        return lambda params, image, keys: model.apply(params, image).astype(jnp.float32)
    diffusion = GaussianDiffusion.from_config(diff_cfg, num_steps=diff_cfg.sample_steps)
    prediction = Prediction(diff_cfg.prediction)
    split = jax.vmap(jax.random.split)

    def logits(params, image, keys):
        shape = (*image.shape[:-1], model.num_classes)
        normal = jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))
        pair = split(keys)
        keys, x_t = pair[:, 0], normal(pair[:, 1])

        def body(i, carry):
            x_t, _, keys = carry
            k = jnp.full((shape[0],), diffusion.num_steps - 1 - i, dtype=jnp.int32)
            output = model.apply(params, image, x_t, diffusion.t(k)).astype(jnp.float32)
            x0_hat = diffusion.predict_x0(output, x_t, k, prediction)
            pair = split(keys)
            x_prev = diffusion.p_sample_step(x0_hat, x_t, k, normal(pair[:, 1]))
            out = diffusion.mask_logits(output, x0_hat, prediction)
            return x_prev, out, pair[:, 0]

        init = (x_t, jnp.zeros(shape, jnp.float32), keys)
        return jax.lax.fori_loop(0, diffusion.num_steps, body, init)[1]

    return logits


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start positions of windows of ``window`` voxels covering ``size`` voxels (``size >= window``).

    Evenly spaced from 0 to ``size - window``, with at most ``window * (1 - overlap)`` voxels
    between neighbours (nnU-Net's rule).
    """
    if size <= window:
        return [0]
    stride = max(1.0, window * (1.0 - overlap))
    n = math.ceil((size - window) / stride) + 1
    return [round(i * (size - window) / (n - 1)) for i in range(n)]


def gaussian_weight(window: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Blending weight ``window`` float32: a Gaussian, sigma = ``sigma_scale`` * window per axis, max 1."""
    weight = np.ones((), np.float64)
    for n in window:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        weight = np.multiply.outer(weight, np.exp(-0.5 * (x / (sigma_scale * n)) ** 2))
    weight /= weight.max()
    return np.maximum(weight, np.finfo(np.float32).tiny).astype(np.float32)


class Segmenter:
    """Segments volumes with a trained model; compiled once per window (or volume) shape.

    Args:
        model: the run's network (``diffseg.runs.build_model``); params: its parameters;
            run_cfg: the resolved run config.
        batch_size: volumes (windows) per device call (default ``evaluate.batch_size``);
            rounded up to the devices.
        window: the windows' spatial shape ``(X, Y, Z)``: the run's training shape (its
            ``dataset.json`` ``shape``). ``None``: each volume in one pass, whole (it must then
            suit the network).
        overlap: the share of a window that neighbouring windows overlap, in [0, 1) (default
            ``evaluate.window_overlap``).
    """

    def __init__(
        self,
        model: Any,
        params: Any,
        run_cfg: RunConfigLike,
        batch_size: int | None = None,
        window: Sequence[int] | None = None,
        overlap: float | None = None,
    ):
        run_cfg = RunConfig.of(run_cfg)
        self.model, self.run_cfg = model, run_cfg
        self.mesh = data_mesh()
        self.params = params
        eval_cfg = run_cfg.evaluate
        wanted = batch_size or eval_cfg.batch_size
        self.batch_size = -(-wanted // self.mesh.size) * self.mesh.size
        self.window = None if window is None else tuple(int(n) for n in window)
        self.overlap = float(eval_cfg.window_overlap if overlap is None else overlap)
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"window overlap must be in [0, 1), got {self.overlap}")
        self._logits = jax.jit(make_window_logits_fn(model, run_cfg))
        self._batch_sharding = batch_sharding(self.mesh)
        self._weights: dict[tuple[int, ...], np.ndarray] = {}

    @property
    def params(self) -> Any:
        """The model parameters, replicated over the devices; assign new ones to re-use the compilation."""
        return self._params

    @params.setter
    def params(self, params: Any) -> None:
        self._params = jax.device_put(params, replicated(self.mesh))

    def _probabilities(self, windows: list[np.ndarray], keys: list[jax.Array]) -> np.ndarray:
        """Class probabilities ``(n, *S, C)`` float32 of up to ``batch_size`` windows ``(*S,)``: the
        softmax of the run's logits (diffusion: of its mask logits, see :meth:`probabilities`)."""
        shape = windows[0].shape if windows[0].ndim == 4 else (*windows[0].shape, 1)  # (*S, channels)
        batch = np.zeros((self.batch_size, *shape), np.float32)
        for i, window in enumerate(windows):
            batch[i] = window.reshape(shape)  # fixed batch shape: one compilation per window shape
        keys = keys + keys[:1] * (self.batch_size - len(keys))  # unused slots: results dropped
        logits = self._logits(self.params, jax.device_put(batch, self._batch_sharding), jnp.stack(keys))
        return np.asarray(jax.nn.softmax(logits[: len(windows)], axis=-1))

    def probabilities(self, volume: np.ndarray, key: jax.Array) -> np.ndarray:
        """Class probabilities ``(X, Y, Z, classes)`` float32 of one normalised volume ``(X, Y, Z)``
        or, with several image channels, ``(X, Y, Z, C)`` (the windows cut the first three axes).

        Each window's are the softmax of its logits: a ``seg`` run's, an x0 run's last logits
        (``(x0_hat + 1) / 2``), or for a noise prediction the softmax of
        :meth:`GaussianDiffusion.mask_logits`, ``(x0_hat + 1) / 2`` of the last unclipped
        ``x0_hat`` normalised over the classes (a class below ``x0_hat = -1 + 2e-5`` weighs less
        than 1e-5 before the normalisation). Softmax keeps the order of the logits, so the argmax
        of one window is that of the last ``x0_hat``; overlapping windows are blended with
        Gaussian weights.
        """
        spatial = volume.shape[:3]
        window = spatial if self.window is None else self.window
        if len(window) != len(spatial):
            raise ValueError(f"window {window} and volume {volume.shape} differ in dimensions")
        size = tuple(max(n, w) for n, w in zip(spatial, window, strict=True))
        crop = tuple(slice(0, n) for n in spatial)
        if size != spatial:  # smaller than a window along some axis: pad, crop back at the end
            pads = [(0, s - n) for s, n in zip(size, spatial, strict=True)] + [(0, 0)] * (volume.ndim - 3)
            volume = np.pad(volume, pads, constant_values=float(volume.min()))
        starts = list(
            itertools.product(*(window_starts(s, w, self.overlap) for s, w in zip(size, window, strict=True)))
        )
        boxes = [tuple(slice(a, a + w) for a, w in zip(start, window, strict=True)) for start in starts]
        if len(boxes) == 1:  # one window: one call, no blending
            return self._probabilities([volume[boxes[0]]], [key])[0][crop]
        if window not in self._weights:
            self._weights[window] = gaussian_weight(window)
        weight = self._weights[window]
        total = np.zeros((*size, int(self.model.num_classes)), np.float32)
        norm = np.zeros(size, np.float32)
        for b in range(0, len(boxes), self.batch_size):
            chunk = boxes[b : b + self.batch_size]
            keys = [jax.random.fold_in(key, b + i) for i in range(len(chunk))]  # one per window
            probs = self._probabilities([volume[box] for box in chunk], keys)
            for box, p in zip(chunk, probs, strict=True):
                total[box] += p * weight[..., None]
                norm[box] += weight
        total /= norm[..., None]
        return total[crop]

    def segment(self, volume: np.ndarray, key: jax.Array) -> np.ndarray:
        """Label map ``(X, Y, Z)`` uint8 of one normalised volume ``(X, Y, Z)`` or ``(X, Y, Z, C)``."""
        return np.argmax(self.probabilities(volume, key), axis=-1).astype(np.uint8)


def segment(
    model: Any, params: Any, images: np.ndarray, run_cfg: RunConfigLike, key: jax.Array
) -> np.ndarray:
    """Label maps ``(N, X, Y, Z)`` uint8 of normalised volumes ``(N, X, Y, Z)`` or ``(N, X, Y, Z, C)``."""
    segmenter = Segmenter(model, params, run_cfg)
    keys = jax.random.split(key, len(images))
    return np.stack([segmenter.segment(volume, k) for volume, k in zip(images, keys, strict=True)])


def vote_and_entropy(samples: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Majority vote and voxel-wise entropy (nats) across segmentation samples.

    Args:
        samples: ``(S, X, Y, Z)`` integer label maps from S independent samples.

    Returns:
        vote ``(X, Y, Z)`` uint8 (ties go to the lower class) and entropy ``(X, Y, Z)`` float32
        of the empirical class distribution, 0 where all samples agree, at most ``log(min(S, C))``.
    """
    counts = np.stack([(samples == c).sum(axis=0) for c in range(num_classes)], axis=-1)
    freq = counts / samples.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.sum(np.where(freq > 0, freq * np.log(freq), 0.0), axis=-1)
    return np.argmax(counts, axis=-1).astype(np.uint8), entropy.astype(np.float32)
