"""Inference: one forward pass for ``seg`` runs, K-step DDPM sampling for diffusion runs.

Volumes go in as ``(N, X, Y, Z)``, to the 2D network as to the 3D one (it folds the axial slices
into its batch itself). Batches are jit-compiled once per shape and split over every local
device (data parallel).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffseg.diffusion import GaussianDiffusion
from diffseg.parallel import batch_sharding, data_mesh, replicated


def make_logits_fn(model: Any, run_cfg: dict[str, Any]) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """``logits(params, image (B, *S, 1), key) -> (B, *S, C)`` float32 for the run's model."""
    diff_cfg = run_cfg["diffusion"]
    if not diff_cfg["enabled"]:
        return lambda params, image, key: model.apply(params, image).astype(jnp.float32)
    diffusion = GaussianDiffusion.from_config(diff_cfg, num_steps=int(diff_cfg["sample_steps"]))

    def logits(params, image, key):
        shape = (*image.shape[:-1], model.num_classes)
        denoise = lambda x_t, t: model.apply(params, image, x_t, t)
        return diffusion.sample(denoise, shape, key, diff_cfg["prediction"])

    return logits


class Segmenter:
    """Segments volumes with a trained model; compiled once per input shape.

    Args:
        model: the run's network (``diffseg.runs.build_model``); params: its parameters;
            run_cfg: the resolved run config.
        batch_size: volumes per device call (default ``evaluate.batch_size``); rounded up to
            the devices.
    """

    def __init__(self, model: Any, params: Any, run_cfg: dict[str, Any], batch_size: int | None = None):
        self.model, self.run_cfg = model, run_cfg
        self.mesh = data_mesh()
        self.params = params
        wanted = batch_size or int(run_cfg["evaluate"]["batch_size"])
        self.batch_size = -(-wanted // self.mesh.size) * self.mesh.size
        self._logits = jax.jit(make_logits_fn(model, run_cfg))
        self._batch_sharding = batch_sharding(self.mesh)

    @property
    def params(self) -> Any:
        """The model parameters, replicated over the devices; assign new ones to re-use the compilation."""
        return self._params

    @params.setter
    def params(self, params: Any) -> None:
        self._params = jax.device_put(params, replicated(self.mesh))

    def probabilities(self, volume: np.ndarray, key: jax.Array) -> np.ndarray:
        """Class probabilities ``(X, Y, Z, C)`` float32 of one normalised volume ``(X, Y, Z)``."""
        padded = np.zeros((self.batch_size, *volume.shape, 1), np.float32)
        padded[0, ..., 0] = volume  # fixed batch shape: one compilation per volume shape
        logits = self._logits(self.params, jax.device_put(padded, self._batch_sharding), key)
        return np.asarray(jax.nn.softmax(logits[0], axis=-1))

    def segment(self, volume: np.ndarray, key: jax.Array) -> np.ndarray:
        """Label map ``(X, Y, Z)`` uint8 of one normalised volume ``(X, Y, Z)``."""
        return np.argmax(self.probabilities(volume, key), axis=-1).astype(np.uint8)


def segment(
    model: Any, params: Any, images: np.ndarray, run_cfg: dict[str, Any], key: jax.Array
) -> np.ndarray:
    """Label maps ``(N, X, Y, Z)`` uint8 of normalised volumes ``(N, X, Y, Z)``."""
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
