"""Convolutions whose implementation is chosen per backend.

XLA's native 3D convolution (``lax.conv_general_dilated`` with three spatial dims) is slow on
CPU, especially its backward pass. On CPU, a 3D convolution therefore goes elsewhere:

- ``"onednn"``: oneDNN's forward, backward-data and backward-weights primitives, called through
  XLA's FFI (``diffseg.model.onednn``, compiled on first use). The fastest, 2D (as 3D over one
  slice) and 3D; computes in float32 (bfloat16/float16 inputs are upcast, exactly).
- ``"tiled"``: pure XLA. Depth is folded into channels (the ``k`` depth-shifted copies of the
  input concatenated on channels, so the kernel ``(k, k, k, Cin, Cout)`` is just reshaped to
  ``(k, k, k·Cin, Cout)``), then cache-sized GEMMs run over chunks of zero-padded (X, Y) planes,
  with a written-out gradient (``conv3d_tiled``). On small planes (below ``TILED_MIN_PLANE``
  voxels) it uses ``"fold"``.
- ``"fold"``: the same depth folding, then one 2D XLA convolution with depth folded into batch.

"auto" is ``"onednn"`` on the CPU backend (2D and 3D, float32 and bfloat16), ``"tiled"`` (3D) or
``"xla"`` (2D) where oneDNN cannot be loaded or for float64; on GPU/TPU the plain XLA convolution
is used.

Every implementation reads the same parameters (``kernel`` ``(*[k]*d, Cin, Cout)`` and
``bias`` ``(Cout,)``, exactly as ``flax.linen.Conv``), so checkpoints are portable.

Layouts, this module's business alone: ``"xyz"`` (``CHANNELS_LAST``) is the library's
channels-last ``(B, X, Y, Z, C)``; ``"zxy"`` is ``(B, Z, X, Y, C)``, used between the convolutions of
a network with "fold"/"tiled" so that folding depth is a free reshape instead of a transpose per
convolution. "onednn" takes either; networks give it "xyz", where oneDNN picks its fast kernels
(with depth first and only 2 slices deep, it fell back to a slower GEMM-based weight gradient).
The kernel is always stored in (X, Y, Z) order. A network reads none of this: it asks
``network_layout(impl, spatial_dims)`` for an opaque value, brings its channels-last input into it
with ``to_layout`` and its output back with ``from_layout``, and hands the value unread to
``Conv`` and ``PatchConv``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from diffseg.model import onednn

IMPLS = ("auto", "xla", "fold", "tiled", "onednn")
# Compute dtypes oneDNN serves: float32, and the 16-bit ones through float32 (exact upcast).
ONEDNN_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve_impl(impl: str, spatial_dims: int, dtype: Any = jnp.float32) -> str:
    """Map ``impl`` ("auto" | "xla" | "fold" | "tiled" | "onednn") to a concrete implementation.

    "auto" picks "onednn" on the CPU backend, 2D and 3D, for float32 and the 16-bit compute
    dtypes (computed in float32, see ``conv_nd``; float32 2D planes under
    ``ONEDNN_2D_MIN_PLANE`` pixels still go to XLA there, which is faster on them); elsewhere
    (float64, oneDNN not loadable) it picks "tiled" in 3D and "xla" in 2D, and on accelerators
    always "xla" (cuDNN is fast). An explicit "onednn" becomes "tiled"/"xla" for float64 only,
    which float32 cannot hold.
    """
    if impl not in IMPLS:
        raise ValueError(f"conv_impl must be one of {IMPLS}, got {impl!r}")
    fallback = "tiled" if spatial_dims == 3 else "xla"
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "xla"
        impl = "onednn" if onednn.available() else fallback
    if impl == "onednn":
        if jnp.dtype(dtype) not in ONEDNN_DTYPES:
            return fallback
        if not onednn.available():
            raise onednn.OneDNNUnavailable("conv_impl='onednn', but oneDNN cannot load (see the warning)")
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


# Rows of one chunk's GEMM in ``conv3d_tiled``: small enough that the chunk's operands and its
# (rows, kx·ky·Cout) product stay in the L2/L3 cache (2-core EPYC, benchmark U-Net step:
# 2048 and 4096 alike, 8192 slower).
TILE_ROWS = 4096
# Below this many voxels per (X, Y) plane, "tiled" uses "fold": the per-chunk loop then costs
# more than XLA's convolution (``benchmarks/conv_layers.py``: fold is faster on 16×16 planes and
# smaller, tiled on 32×32 and larger).
TILED_MIN_PLANE = 1024


class _Rows(NamedTuple):
    """A 3D input as one sequence of GEMM rows per batch element (see ``_as_rows``)."""

    xp: jax.Array  # (B, rows, C): zero-padded planes, flattened, plus a zero tail
    plane: int  # PX·PY rows per padded (X, Y) plane
    chunk: int  # R: output rows per chunk
    per_batch: int  # chunks per batch element
    halo: int  # extra input rows a chunk reads past its R: (kx − 1)·PY + ky − 1


def _as_rows(x: jax.Array, kx: int, ky: int, kz: int) -> _Rows:
    """Zero-pad x for SAME and flatten it to rows; choose the chunking.

    x ``(B, Z, X, Y, C)``. Row ``z·PX·PY + u·PY + v`` of batch element b holds the padded input
    at (z, u, v), ``PX = X + kx − 1``, ``PY = Y + ky − 1``. Output row p (same numbering,
    only u < X, v < Y kept) needs input rows ``p + dz·PX·PY + i·PY + j`` for the taps
    (i, j, dz): contiguous shifts, so a chunk of R output rows reads R + halo rows per depth tap.
    """
    b, z, sx, sy, c = x.shape
    py = sy + ky - 1
    plane = (sx + kx - 1) * py
    per_batch = -(-z * plane // TILE_ROWS)
    chunk = -(-z * plane // per_batch)  # equal chunks of at most TILE_ROWS rows: little padding
    halo = (kx - 1) * py + ky - 1
    pads = ((0, 0), _same_pads(kz), _same_pads(kx), _same_pads(ky), (0, 0))
    xp = jnp.pad(x, pads).reshape(b, (z + kz - 1) * plane, c)
    tail = per_batch * chunk + (kz - 1) * plane + halo - xp.shape[1]
    return _Rows(jnp.pad(xp, ((0, 0), (0, tail), (0, 0))), plane, chunk, per_batch, halo)


def _chunk_rows(r: _Rows, k: jax.Array, kz: int) -> jax.Array:
    """Input rows of chunk k, depth taps on channels: ``(R + halo, kz·C)``.

    Channel block j holds depth z + j − lo, as in ``conv3d_fold``; stacked here, inside the
    loop, so the kz-times larger copy stays in cache.
    """
    c = r.xp.shape[-1]
    start = (k % r.per_batch) * r.chunk
    return jnp.concatenate(
        [
            lax.dynamic_slice(r.xp, (k // r.per_batch, start + j * r.plane, 0), (1, r.chunk + r.halo, c))[0]
            for j in range(kz)
        ],
        axis=-1,
    )


def _tiled_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``conv3d_tiled`` without its custom gradient. x ``(B, Z, X, Y, Cin)`` → ``(B, Z, X, Y, Cout)``."""
    b, z, sx, sy, _ = x.shape
    kx, ky, kz, cin, cout = kernel.shape
    px, py = sx + kx - 1, sy + ky - 1
    r = _as_rows(x, kx, ky, kz)
    # Columns (i, j, o): the product for in-plane tap (i, j) of every output channel.
    wk = jnp.transpose(kernel, (2, 3, 0, 1, 4)).reshape(kz * cin, kx * ky * cout)

    def chunk(k: jax.Array) -> jax.Array:  # → (R, Cout)
        prod = jnp.dot(_chunk_rows(r, k, kz), wk, preferred_element_type=jnp.float32)
        # Output row p sums tap (i, j) of input row p + i·PY + j: contiguous row-shifted slices.
        out = sum(
            prod[i * py + j : i * py + j + r.chunk, (i * ky + j) * cout : (i * ky + j + 1) * cout]
            for i in range(kx)
            for j in range(ky)
        )
        return out.astype(x.dtype)

    out = lax.map(chunk, jnp.arange(b * r.per_batch)).reshape(b, -1, cout)[:, : z * r.plane]
    return out.reshape(b, z, px, py, cout)[:, :, :sx, :sy]


def _tiled_kernel_grad(x: jax.Array, dy: jax.Array, kshape: tuple[int, ...]) -> jax.Array:
    """dL/dkernel of ``conv3d_tiled``. x ``(B, Z, X, Y, Cin)``, dy ``(B, Z, X, Y, Cout)`` → kshape."""
    b, z = x.shape[:2]
    kx, ky, kz, cin, cout = kshape
    py = x.shape[3] + ky - 1
    r = _as_rows(x, kx, ky, kz)
    # dy on the output rows, zero where the forward's output was cropped away.
    dyp = jnp.pad(dy, ((0, 0), (0, 0), (0, kx - 1), (0, ky - 1), (0, 0))).reshape(b, z * r.plane, cout)
    dyp = jnp.pad(dyp, ((0, 0), (0, r.per_batch * r.chunk - z * r.plane), (0, 0)))
    dyp = dyp.reshape(b * r.per_batch, r.chunk, cout)

    def chunk(k: jax.Array) -> jax.Array:  # → (kz·Cin, kx·ky·Cout)
        d = dyp[k]
        # Column block (i, j) holds dy shifted down by i·PY + j rows: dW_ij = Σ_q t[q]ᵀ dy[q − off].
        shifted = jnp.concatenate(
            [jnp.pad(d, ((i * py + j, r.halo - i * py - j), (0, 0))) for i in range(kx) for j in range(ky)],
            axis=-1,
        )
        t = _chunk_rows(r, k, kz)
        return lax.dot_general(t, shifted, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    dwk = lax.map(chunk, jnp.arange(b * r.per_batch)).sum(axis=0)
    return dwk.reshape(kz, cin, kx, ky, cout).transpose(2, 3, 0, 1, 4).astype(x.dtype)


@jax.custom_vjp
def conv3d_tiled(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3D SAME stride-1 convolution as cache-sized GEMMs over chunks of padded planes.

    The zero-padded input is flattened to rows (one per voxel of the padded grid) and cut into
    chunks of ``TILE_ROWS`` output rows. Per chunk, depth is folded into channels as in
    ``conv3d_fold``, the rows are multiplied once by the kernel laid out as
    ``(kz·Cin, kx·ky·Cout)``, and the output sums the kx·ky column blocks at row offsets
    ``i·PY + j``. Working chunk by chunk (``lax.map``) keeps every operand in cache, so the
    GEMMs run near this CPU's peak where XLA's own CPU convolution does not. The gradient is
    written out: dx is the same convolution of dy with the flipped, transposed kernel, and
    dkernel is one GEMM per chunk against row-shifted copies of dy.

    Args:
      x: ``(B, Z, X, Y, Cin)`` (depth-first layout).
      kernel: ``(kx, ky, kz, Cin, Cout)``, every size odd.
    Returns:
      ``(B, Z, X, Y, Cout)``.
    """
    return _tiled_forward(x, kernel)


def _tiled_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _tiled_forward(x, kernel), (x, kernel)


def _tiled_bwd(res: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = res
    # SAME padding with odd sizes is symmetric, so the transposed convolution is a SAME one.
    flipped = jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4)
    return _tiled_forward(dy, flipped), _tiled_kernel_grad(x, dy, kernel.shape)


conv3d_tiled.defvjp(_tiled_fwd, _tiled_bwd)


@jax.custom_vjp
def conv3d_onednn(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """3D SAME stride-1 float32 convolution plus bias by oneDNN (``diffseg.model.onednn``), CPU only.

    With the batch sharded over several CPU devices XLA cannot partition the FFI call, so it
    gathers the operands: the same numbers (tested), without data parallelism on CPU.

    Args:
      x: ``(B, D, H, W, Cin)``, any order of the three spatial axes.
      kernel: ``(kd, kh, kw, Cin, Cout)`` in the same spatial order as ``x``, every size odd.
      bias: ``(Cout,)``.
    Returns:
      ``(B, D, H, W, Cout)``.
    """
    return onednn.conv3d_forward(x, kernel, bias)


def _onednn_fwd(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> tuple[jax.Array, tuple]:
    return onednn.conv3d_forward(x, kernel, bias), (x, kernel)


def _onednn_bwd(res: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, kernel = res
    return onednn.conv3d_input_grad(dy, kernel), *onednn.conv3d_params_grad(x, dy, kernel.shape[:3])


conv3d_onednn.defvjp(_onednn_fwd, _onednn_bwd)


CHANNELS_LAST = "xyz"  # (B, X, Y[, Z], C): what networks take and return
_DEPTH_FIRST = "zxy"  # (B, Z, X, Y, C): 3D only, for the depth-folding convolutions
LAYOUTS = (CHANNELS_LAST, _DEPTH_FIRST)


def network_layout(impl: str, spatial_dims: int) -> str:
    """The layout a network keeps between its convolutions for a resolved ``impl`` (opaque to it).

    Depth first for the pure-XLA 3D convolutions ("fold", "tiled"), which fold depth with a free
    reshape there; channels-last otherwise.
    """
    return _DEPTH_FIRST if spatial_dims == 3 and impl in ("fold", "tiled") else CHANNELS_LAST


def to_layout(x: jax.Array, layout: str) -> jax.Array:
    """Channels-last ``(B, X, Y[, Z], C)`` -> ``layout`` (``network_layout``'s value)."""
    return jnp.moveaxis(x, 3, 1) if layout == _DEPTH_FIRST else x


def from_layout(x: jax.Array, layout: str) -> jax.Array:
    """``layout`` (``network_layout``'s value) -> channels-last ``(B, X, Y[, Z], C)``."""
    return jnp.moveaxis(x, 1, 3) if layout == _DEPTH_FIRST else x


def _kernel_in_data_order(kernel: jax.Array, layout: str) -> jax.Array:
    """The kernel in the data's axis order, as oneDNN and XLA take it ((Z, X, Y, I, O) in "zxy")."""
    return kernel if layout == CHANNELS_LAST else jnp.transpose(kernel, (2, 0, 1, 3, 4))


# Below this many pixels per plane, XLA's own float32 2D convolution beats oneDNN's (its
# one-slice 3D primitive): the demo's 2D U-Net step (channels 8-64, 32 slices) took 0.145 s with
# XLA and 0.192 s with oneDNN at 48×48, 0.82 and 0.56 s at 96×96, 0.97 and 0.85 s at 128×128; the
# rehearsal's (channels 4-8, 384 slices of 256×256, bf16) 323 s with XLA and 39 s with oneDNN (2-core
# AVX-512 VM, 2026-12-02). Deeper levels of a U-Net, with smaller planes, go to XLA by this rule.
ONEDNN_2D_MIN_PLANE = 4096


def _xla_faster_2d(x: jax.Array, d: int) -> bool:
    return d == 2 and x.dtype == jnp.float32 and x.shape[1] * x.shape[2] < ONEDNN_2D_MIN_PLANE


def conv_nd(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    strides: int = 1,
    impl: str = "auto",
    layout: str = CHANNELS_LAST,
) -> jax.Array:
    """Channels-last SAME convolution plus optional bias, dispatching on ``impl``.

    Args:
      x: ``(B, *S, Cin)`` in ``layout`` ("xyz": ``(B, X, Y[, Z], C)``; "zxy": ``(B, Z, X, Y, C)``,
        3D only).
      kernel: ``(*K, Cin, Cout)`` in (X, Y[, Z]) order, as ``flax.linen.Conv`` stores it.
      bias: ``(Cout,)`` or None.
      strides: the same stride on every spatial axis.
      impl: "auto" | "xla" | "fold" | "tiled" | "onednn" (see ``resolve_impl``); "onednn" computes
        in float32 and returns ``x.dtype``.
    Returns:
      ``(B, *S', Cout)`` in the same layout, ``S' = ceil(S / strides)``.
    """
    d = x.ndim - 2
    impl = resolve_impl(impl, d, x.dtype)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == _DEPTH_FIRST and d != 3:
        raise ValueError("layout 'zxy' is for 3D inputs only")
    ksize = kernel.shape[:d]
    odd_stride1 = strides == 1 and all(k % 2 == 1 for k in ksize)
    # A 1×1×1 convolution is a matmul; "onednn" keeps it, so the bias rides along and XLA does
    # not duplicate the fused concatenate that feeds both a decoder block's conv and its skip.
    if d == 3 and odd_stride1 and ksize == (1, 1, 1) and impl in ("fold", "tiled"):
        out = jnp.dot(x, kernel.reshape(kernel.shape[-2:]))
    elif impl == "onednn" and odd_stride1 and not _xla_faster_2d(x, d):
        # oneDNN adds the bias inside its kernel (and returns its gradient with the kernel's).
        b = jnp.zeros(kernel.shape[-1], jnp.float32) if bias is None else bias
        k = _kernel_in_data_order(kernel, layout)
        if d == 2:  # a 2D convolution is a 3D one over a single slice with a 1-deep kernel;
            x, k = x[:, None], k[None]  # the slice axis first: oneDNN blocks its kernels along Y
        # bf16/f16 are exact in float32: this is their convolution with float32 accumulation
        # (as cuDNN's), rounded back; XLA's CPU bf16 convolutions are several times slower.
        f32 = jnp.float32
        out = conv3d_onednn(x.astype(f32), k.astype(f32), b.astype(f32))
        return (out[:, 0] if d == 2 else out).astype(x.dtype)
    elif d == 3 and impl in ("fold", "tiled") and odd_stride1:
        xz = x if layout == _DEPTH_FIRST else jnp.moveaxis(x, 3, 1)
        if impl == "fold" or xz.shape[2] * xz.shape[3] < TILED_MIN_PLANE:
            out = conv3d_fold(xz, kernel)
        else:
            out = conv3d_tiled(xz, kernel)
        out = out if layout == _DEPTH_FIRST else jnp.moveaxis(out, 1, 3)
    else:
        out = _xla_conv(x, _kernel_in_data_order(kernel, layout), (strides,) * d)
    return out if bias is None else out + bias


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
    layout: str = CHANNELS_LAST  # network_layout's value
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        kshape = (self.kernel_size,) * self.spatial_dims + (cin, self.features)
        kernel = self.param("kernel", self.kernel_init, kshape, self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            bias = bias.astype(self.dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return conv_nd(x, kernel, bias, strides=self.strides, impl=self.impl, layout=self.layout)
