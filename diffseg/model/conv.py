"""Convolutions whose implementation is chosen per backend.

XLA's native 3D convolution (``lax.conv_general_dilated`` with three spatial dims) is slow on
CPU, especially its backward pass. On CPU we therefore compute a ``k×k×k`` convolution as
*one* 2D convolution over (X, Y) with depth folded into the batch: the ``k`` depth-shifted
copies of the input are concatenated on channels, so the kernel ``(k, k, k, Cin, Cout)`` is
just reshaped to ``(k, k, k·Cin, Cout)``. On GPU/TPU the plain XLA convolution is used.

Every implementation reads the same parameters (``kernel`` ``(*[k]*d, Cin, Cout)`` and
``bias`` ``(Cout,)``, exactly as ``flax.linen.Conv``), so checkpoints are portable.

Layouts: ``"xyz"`` is the library's channels-last ``(B, X, Y, Z, C)``; ``"zxy"`` is
``(B, Z, X, Y, C)``, used inside the U-Net on CPU so that folding depth into the batch is a
free reshape instead of a transpose per convolution. The kernel is always stored in
(X, Y, Z) order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla", "fold", "im2col")


def resolve_impl(impl: str, spatial_dims: int) -> str:
    """Map ``impl`` ("auto" | "xla" | "fold" | "im2col") to a concrete implementation.

    "auto" picks "fold" for 3D on the CPU backend and "xla" otherwise (2D convolutions and
    accelerators are already fast in XLA).
    """
    if impl not in IMPLS:
        raise ValueError(f"conv_impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "fold" if spatial_dims == 3 and jax.default_backend() == "cpu" else "xla"
    return impl


def _xla_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int]) -> jax.Array:
    """Plain XLA convolution, channels-last, SAME padding. x (B, *S, Cin) → (B, *S', Cout)."""
    d = x.ndim - 2
    spatial = "XYZ"[:d]
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    return lax.conv_general_dilated(x, kernel, tuple(strides), "SAME", dimension_numbers=dn)


def _same_pads(k: int) -> tuple[int, int]:
    # SAME padding for stride 1 (and for stride 2 with even input sizes, as XLA does).
    return ((k - 1) // 2, k // 2)


def conv3d_fold(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3D SAME stride-1 convolution as one 2D convolution over depth-folded batches.

    Args:
      x: ``(B, Z, X, Y, Cin)`` (depth-first layout).
      kernel: ``(kx, ky, kz, Cin, Cout)``.
    Returns:
      ``(B, Z, X, Y, Cout)``.
    """
    b, z, sx, sy, cin = x.shape
    kx, ky, kz, _, cout = kernel.shape
    lo, hi = _same_pads(kz)
    xp = jnp.pad(x, ((0, 0), (lo, hi), (0, 0), (0, 0), (0, 0)))
    # Channel block j holds the input at depth z + j − lo, matching kernel[:, :, j].
    stacked = jnp.concatenate([xp[:, j : j + z] for j in range(kz)], axis=-1)
    stacked = stacked.reshape(b * z, sx, sy, kz * cin)
    k2 = kernel.reshape(kx, ky, kz * cin, cout)
    out = _xla_conv(stacked, k2, (1, 1))
    return out.reshape(b, z, sx, sy, cout)


def conv3d_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3D SAME stride-1 convolution as im2col + one matmul (GEMM) in either layout.

    Args:
      x: ``(B, Z, X, Y, Cin)`` (depth-first layout).
      kernel: ``(kx, ky, kz, Cin, Cout)``.
    Returns:
      ``(B, Z, X, Y, Cout)``.
    """
    b, z, sx, sy, cin = x.shape
    kx, ky, kz, _, cout = kernel.shape
    pads = ((0, 0), _same_pads(kz), _same_pads(kx), _same_pads(ky), (0, 0))
    xp = jnp.pad(x, pads)
    # Patch order (i, j, l) = (kx, ky, kz), matching kernel.reshape(kx*ky*kz*Cin, Cout).
    cols = [
        xp[:, l : l + z, i : i + sx, j : j + sy]
        for i in range(kx)
        for j in range(ky)
        for l in range(kz)  # noqa: E741
    ]
    patches = jnp.concatenate(cols, axis=-1)
    return jnp.dot(patches, kernel.reshape(kx * ky * kz * cin, cout))


def conv_nd(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: int = 1,
    impl: str = "auto",
    layout: str = "xyz",
) -> jax.Array:
    """Channels-last SAME convolution, dispatching on ``impl``.

    Args:
      x: ``(B, *S, Cin)`` in ``layout`` ("xyz": ``(B, X, Y[, Z], C)``; "zxy": ``(B, Z, X, Y, C)``,
        3D only).
      kernel: ``(*K, Cin, Cout)`` in (X, Y[, Z]) order, as ``flax.linen.Conv`` stores it.
      strides: the same stride on every spatial axis.
      impl: "auto" | "xla" | "fold" | "im2col" (see ``resolve_impl``).
    Returns:
      ``(B, *S', Cout)`` in the same layout, ``S' = ceil(S / strides)``.
    """
    d = x.ndim - 2
    impl = resolve_impl(impl, d)
    if layout not in ("xyz", "zxy"):
        raise ValueError(f"layout must be 'xyz' or 'zxy', got {layout!r}")
    if layout == "zxy" and d != 3:
        raise ValueError("layout 'zxy' is for 3D inputs only")
    ksize = kernel.shape[:d]
    if d == 3 and impl != "xla" and strides == 1 and all(k % 2 == 1 for k in ksize):
        xz = x if layout == "zxy" else jnp.moveaxis(x, 3, 1)
        if ksize == (1, 1, 1):
            out = jnp.dot(xz, kernel.reshape(kernel.shape[-2:]))
        elif impl == "fold":
            out = conv3d_fold(xz, kernel)
        else:
            out = conv3d_im2col(xz, kernel)
        return out if layout == "zxy" else jnp.moveaxis(out, 1, 3)
    if layout == "zxy":
        # Kernel (X, Y, Z, I, O) → (Z, X, Y, I, O) so it matches the data's axis order.
        kernel = jnp.transpose(kernel, (2, 0, 1, 3, 4))
    return _xla_conv(x, kernel, (strides,) * d)


class Conv(nn.Module):
    """Drop-in for ``nn.Conv(features, (k,)*d, padding="SAME")`` with a per-backend impl.

    Parameters: ``kernel`` ``(*[k]*d, Cin, Cout)`` (float32, lecun-normal) and ``bias``
    ``(Cout,)`` — the same names, shapes and initialisers as ``flax.linen.Conv``.
    Input ``(B, *S, Cin)`` in ``layout``; output ``(B, *S', Cout)`` in ``self.dtype``.
    """

    features: int
    kernel_size: int = 3
    spatial_dims: int = 3
    strides: int = 1
    use_bias: bool = True
    impl: str = "auto"
    layout: str = "xyz"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        kshape = (self.kernel_size,) * self.spatial_dims + (cin, self.features)
        kernel = self.param("kernel", self.kernel_init, kshape, self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = conv_nd(x, kernel, strides=self.strides, impl=self.impl, layout=self.layout)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y
