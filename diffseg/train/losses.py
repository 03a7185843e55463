"""Segmentation losses on logits: cross-entropy and foreground Dice (paper section 4.2).

Shapes: ``logits`` and ``onehot`` are ``(batch, *spatial, classes)``; class 0 is background.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from diffseg.runconfig import LossConfig, as_section


def cross_entropy(logits: jax.Array, onehot: jax.Array) -> jax.Array:
    """Mean voxel-wise cross-entropy, a scalar."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.sum(onehot * log_probs, axis=-1))


def dice_loss(logits: jax.Array, onehot: jax.Array, eps: float = 1e-6, mean: str = "per_sample") -> jax.Array:
    """``1 - soft Dice`` averaged over the foreground classes present in each sample's label.

    ``mean``: ``per_sample`` (the default) averages each sample's present classes, then the
    samples: what the reference computed with one sample per accelerator core (its nanmean over
    one sample's classes, then the cores' gradients averaged). ``pooled`` is the reference's
    nanmean over all (sample, class) pairs of a batch, which differs when a core holds several
    samples with different numbers of classes present.

    Soft Dice per sample and class is ``2 sum(p g) / (sum(p) + sum(g))`` with ``p`` the softmax.
    Classes absent from a sample's label are left out of its mean (their false positives are
    the cross-entropy's business): counting them would reward predicting nothing on slices
    where a class is absent and make the loss depend on the crop. A sample with no
    foreground at all contributes 0.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1:]
    target = onehot[..., 1:].astype(jnp.float32)
    axes = tuple(range(1, logits.ndim - 1))  # spatial axes
    intersection = jnp.sum(probs * target, axis=axes)  # (batch, classes-1)
    denominator = jnp.sum(probs, axis=axes) + jnp.sum(target, axis=axes)
    dice = 2.0 * intersection / (denominator + eps)
    present = (jnp.sum(target, axis=axes) > 0).astype(jnp.float32)
    if mean == "pooled":
        return jnp.sum((1.0 - dice) * present) / jnp.maximum(jnp.sum(present), 1.0)
    if mean != "per_sample":
        raise ValueError(f"dice mean must be per_sample or pooled, got {mean!r}")
    per_sample = jnp.sum((1.0 - dice) * present, axis=-1) / jnp.maximum(jnp.sum(present, axis=-1), 1.0)
    return jnp.mean(per_sample)


def segmentation_loss(
    logits: jax.Array, onehot: jax.Array, loss_cfg: LossConfig | Mapping[str, Any]
) -> jax.Array:
    """Cross-entropy and/or foreground Dice as switched on in the run config's ``loss`` section
    (a mapping: its keys over ``LossConfig``'s defaults)."""
    loss_cfg = as_section(LossConfig, loss_cfg)
    loss = jnp.zeros((), jnp.float32)
    if loss_cfg.cross_entropy:
        loss = loss + cross_entropy(logits, onehot)
    if loss_cfg.dice:
        loss = loss + dice_loss(logits, onehot, mean=loss_cfg.dice_mean)
    return loss
