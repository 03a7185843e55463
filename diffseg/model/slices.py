"""Running a 2D network on volumes: depth folded into the batch and back (one place for both U-Nets).

Slice ``z`` of volume ``b`` becomes batch element ``b·Z + z`` (as the reference's
``unet_3d_slice*.py``: transpose to ``(B, Z, X, Y, C)``, then merge B and Z).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fold_depth(x: jax.Array) -> jax.Array:
    """``(B, X, Y, Z, C)`` → ``(B·Z, X, Y, C)``."""
    if x.ndim != 5:
        raise ValueError(f"fold_depth expects a volume batch (B, X, Y, Z, C), got shape {x.shape}")
    b, sx, sy, z, c = x.shape
    return jnp.moveaxis(x, 3, 1).reshape(b * z, sx, sy, c)


def unfold_depth(y: jax.Array, depth: int) -> jax.Array:
    """Inverse of ``fold_depth``: ``(B·Z, X, Y, C)`` → ``(B, X, Y, Z, C)`` with ``Z = depth``."""
    bz, sx, sy, c = y.shape
    if bz % depth:
        raise ValueError(f"batch {bz} of slices is not a multiple of the depth {depth}")
    return jnp.moveaxis(y.reshape(bz // depth, depth, sx, sy, c), 1, 3)


def repeat_per_slice(t: jax.Array, depth: int) -> jax.Array:
    """Per-volume values ``(B, …)`` → per-slice ``(B·Z, …)``, in ``fold_depth``'s order."""
    return jnp.repeat(t, depth, axis=0)
