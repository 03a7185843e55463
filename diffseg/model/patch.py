"""Kernel-2 stride-2 convolutions (patch merging / patch expansion) as reshapes plus one matmul.

A convolution whose kernel equals its stride, on sizes divisible by it, sees every input voxel
exactly once: it is a space-to-depth reshape (each ``f^d`` patch becomes one row of
``f^d·Cin`` values) followed by one ``(f^d·Cin, Cout)`` matmul. Its transpose is the matmul
followed by the depth-to-space reshape. That avoids XLA's (slow on CPU) strided and
transposed convolutions, in 2D and 3D, and the backward pass is a matmul again.

The numbers are those of ``lax.conv_general_dilated(x, k, (f,)*d, "SAME")`` and
``lax.conv_transpose(x, k, (f,)*d, "SAME")`` (as ``flax.linen.Conv``/``ConvTranspose`` call
them), with the same kernels ``(*[f]*d, Cin, Cout)``; note that ``lax.conv_transpose`` without
``transpose_kernel`` applies the spatially flipped kernel to each patch.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffseg.model.conv import CHANNELS_LAST, _kernel_in_data_order


def _check(x: jax.Array, kernel: jax.Array, what: str) -> tuple[int, int]:
    """(d, f) for x ``(B, *S, Cin)`` and a kernel ``(*[f]*d, Cin, Cout)``; ValueError otherwise."""
    d = x.ndim - 2
    ks = kernel.shape[:-2]
    if kernel.ndim != d + 2 or len(set(ks)) != 1:
        raise ValueError(f"{what}: kernel {kernel.shape} must be (*[f]*{d}, Cin, Cout) for input {x.shape}")
    if kernel.shape[-2] != x.shape[-1]:
        raise ValueError(
            f"{what}: kernel {kernel.shape} expects {kernel.shape[-2]} channels, input {x.shape}"
        )
    return d, ks[0]


def space_to_depth(x: jax.Array, factor: int = 2) -> jax.Array:
    """``(B, *S, C)`` → ``(B, *S/f, f^d·C)``; channel ``(a_1, …, a_d, c)`` (row-major) holds voxel
    ``f·i + a`` of the patch at ``i``."""
    b, *s, c = x.shape
    if any(n % factor for n in s):
        raise ValueError(f"spatial shape {tuple(s)} must be divisible by {factor}")
    d = len(s)
    y = x.reshape(b, *[v for n in s for v in (n // factor, factor)], c)
    # (B, S1/f, f, S2/f, f, …, C) → (B, S1/f, S2/f, …, f, f, …, C)
    perm = (0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2), 2 * d + 1)
    return y.transpose(perm).reshape(b, *[n // factor for n in s], factor**d * c)


def depth_to_space(y: jax.Array, factor: int = 2) -> jax.Array:
    """Inverse of ``space_to_depth``: ``(B, *S, f^d·C)`` → ``(B, *f·S, C)``."""
    b, *s, fc = y.shape
    d = len(s)
    c = fc // factor**d
    y = y.reshape(b, *s, *[factor] * d, c)
    # (B, S1, S2, …, f, f, …, C) → (B, S1, f, S2, f, …, C)
    perm = (0, *[v for i in range(d) for v in (1 + i, 1 + d + i)], 1 + 2 * d)
    return y.transpose(perm).reshape(b, *[n * factor for n in s], c)


def patch_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Convolution with kernel size = stride = f (no padding: S divisible by f).

    Args:
      x: ``(B, *S, Cin)``, spatial axes in the kernel's order.
      kernel: ``(*[f]*d, Cin, Cout)``.
    Returns:
      ``(B, *S/f, Cout)``, equal to ``lax.conv_general_dilated(x, kernel, (f,)*d, "SAME")``.
    """
    _, f = _check(x, kernel, "patch_conv")
    return jnp.dot(space_to_depth(x, f), kernel.reshape(-1, kernel.shape[-1]))


def patch_conv_transpose(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Transposed convolution with kernel size = stride = f.

    Args:
      x: ``(B, *S, Cin)``, spatial axes in the kernel's order.
      kernel: ``(*[f]*d, Cin, Cout)`` (``flax.linen.ConvTranspose``'s layout).
    Returns:
      ``(B, *f·S, Cout)``, equal to ``lax.conv_transpose(x, kernel, (f,)*d, "SAME")``: output
      voxel ``f·i + a`` is ``x[i] @ kernel[f-1-a]`` (lax applies the flipped kernel).
    """
    d, f = _check(x, kernel, "patch_conv_transpose")
    cin, cout = kernel.shape[-2:]
    flipped = jnp.flip(kernel, tuple(range(d)))
    # (f, …, f, Cin, Cout) → (Cin, f, …, f, Cout) → (Cin, f^d·Cout): columns in depth_to_space's order.
    w = jnp.moveaxis(flipped, d, 0).reshape(cin, f**d * cout)
    return depth_to_space(jnp.dot(x, w), f)


class PatchConv(nn.Module):
    """``nn.Conv(features, (f,)*d, strides=f)`` on sizes divisible by f, as ``patch_conv``.

    Parameters ``kernel`` ``(*[f]*d, Cin, Cout)`` (kept in (X, Y[, Z]) order whatever the
    ``layout``) and, with ``use_bias``, ``bias`` ``(Cout,)``: flax.linen.Conv's names and shapes.
    x ``(B, *S, Cin)`` in ``layout`` (``diffseg.model.conv``'s; channels-last by default) →
    ``(B, *S/f, Cout)`` in ``dtype``.
    """

    features: int
    spatial_dims: int = 3
    factor: int = 2
    use_bias: bool = True
    transpose: bool = False  # True: the transposed convolution (see PatchConvTranspose)
    layout: str = CHANNELS_LAST  # diffseg.model.conv.network_layout's value
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kshape = (self.factor,) * self.spatial_dims + (x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kshape, self.param_dtype)
        kernel = _kernel_in_data_order(kernel, self.layout) if self.spatial_dims == 3 else kernel
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = patch_conv_transpose(x, kernel) if self.transpose else patch_conv(x, kernel)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class PatchConvTranspose(PatchConv):
    """``nn.ConvTranspose(features, (f,)*d, strides=f, padding="SAME")`` as ``patch_conv_transpose``.

    Same parameters as ``PatchConv``; x ``(B, *S, Cin)`` → ``(B, *f·S, Cout)``.
    """

    transpose: bool = True
