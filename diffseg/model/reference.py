"""The network of the paper's reference implementation (ImgX-DiffSeg v0.1.0), in Flax.

Re-implemented from ``imgx/model/unet_3d{,_time,_slice,_slice_time}.py`` of that release (haiku):

- stem: conv 3^d (no bias) – InstanceNorm – GELU at ``channels[0]``, then a residual block;
- encoder, for each ``ch`` in ``channels``: a kernel-2 stride-2 convolution (no bias) –
  InstanceNorm, then a residual block at ``ch``: ``len(channels) + 1`` resolutions in all;
- residual block: conv 3^d – IN – GELU – conv 3^d – IN – GELU(· + input), convolutions without
  bias; in the diffusion network ``Linear(GELU(temb))`` is added per channel after the second
  convolution, i.e. just *before* the second InstanceNorm (see ``time_conditioning``);
- decoder, at widths ``(channels[0], *channels[:-1])`` from the bottom up: a kernel-2 stride-2
  transposed convolution (with bias), cropped to the skip's shape, plus the skip, then a
  residual block; a final 1^d convolution with bias to the classes;
- time: the sinusoidal embedding of t (cos half first) of width ``4·channels[0]``, no MLP; every
  residual block has its own Linear;
- the diffusion network's input is the image concatenated with the noisy mask (1 + C channels);
- the 2D network takes volumes ``(B, X, Y, Z, C)``, runs on all B·Z slices and folds them back;
- initialisers as haiku's defaults (``haiku_init``), InstanceNorm with scale and offset, eps 1e-5,
  GELU ``jax.nn.gelu`` (tanh approximation, haiku's and JAX's default).

**A bug of the reference, kept by default** (``time_conditioning="reference"``): the time term
is a constant per (sample, channel), added right before an InstanceNorm that subtracts the
per-(sample, channel) mean, so it cancels exactly: the reference diffusion network's output does
not depend on t. ``"after_norm"`` adds the same term after that normalisation instead (same
parameters), so that t is used.

Parameter counts equal those of the haiku models exactly (``tests/test_model_reference.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from diffseg.choices import TIME_CONDITIONINGS
from diffseg.model.conv import CHANNELS_LAST, Conv, from_layout, network_layout, resolve_impl, to_layout
from diffseg.model.patch import PatchConv, PatchConvTranspose
from diffseg.model.slices import fold_depth, repeat_per_slice, unfold_depth
from diffseg.model.unet import sinusoidal_embedding


def haiku_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """haiku's default weight initialiser of Conv, ConvTranspose and Linear.

    A normal truncated to ±2σ with σ = 1/sqrt(fan_in), *not* rescaled for the truncation (so the
    actual standard deviation is ≈ 0.88/sqrt(fan_in)); fan_in = ``prod(shape[:-1])``, which for
    our ``(*K, Cin, Cout)`` kernels is haiku's ``prod(K)·Cin`` for both conv and transposed conv.
    """
    fan_in = math.prod(shape[:-1])
    return jax.random.truncated_normal(key, -2.0, 2.0, tuple(shape), dtype) / math.sqrt(fan_in)


class InstanceNorm(nn.Module):
    """Per-sample, per-channel normalisation over all spatial axes, with scale and offset (``(C,)``).

    x ``(B, *S, C)`` → ``(B, *S, C)`` in ``dtype``; statistics in float32 (float64 for float64 input),
    also when ``dtype`` is bfloat16.
    """

    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        offset = self.param("offset", nn.initializers.zeros, (c,), jnp.float32)
        xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        axes = tuple(range(1, x.ndim - 1))
        mean = jnp.mean(xs, axes, keepdims=True)
        # Two-pass variance (haiku's default): no cancellation when |mean| ≫ std.
        var = jnp.mean(jnp.square(xs - mean), axes, keepdims=True)
        inv = scale * lax.rsqrt(var + self.epsilon)
        return ((xs - mean) * inv + offset).astype(self.dtype)


class ConvNormAct(nn.Module):
    """conv 3^d (no bias) – InstanceNorm – GELU. x ``(B, *S, Cin)`` → ``(B, *S, features)``."""

    features: int
    spatial_dims: int
    impl: str = "xla"
    layout: str = CHANNELS_LAST  # diffseg.model.conv.network_layout's value
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = Conv(
            self.features, 3, spatial_dims=self.spatial_dims, use_bias=False, impl=self.impl,
            layout=self.layout, dtype=self.dtype, kernel_init=haiku_init, name="conv",
        )  # fmt: skip
        return nn.gelu(InstanceNorm(dtype=self.dtype, name="norm")(conv(x)))


class ResBlock(nn.Module):
    """The reference residual block (see the module doc), input and output at ``features`` channels.

    x ``(B, *S, features)``, temb ``(B, E)`` (already through GELU) or None → ``(B, *S, features)``.
    """

    features: int
    spatial_dims: int
    time_conditioning: str = "reference"
    impl: str = "xla"
    layout: str = CHANNELS_LAST  # diffseg.model.conv.network_layout's value
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
        conv = dict(
            spatial_dims=self.spatial_dims, use_bias=False, impl=self.impl, layout=self.layout,
            dtype=self.dtype, kernel_init=haiku_init,
        )  # fmt: skip
        h = Conv(self.features, 3, **conv, name="conv1")(x)
        h = nn.gelu(InstanceNorm(dtype=self.dtype, name="norm1")(h))
        h = Conv(self.features, 3, **conv, name="conv2")(h)
        tb = None
        if temb is not None:
            tb = nn.Dense(self.features, dtype=self.dtype, kernel_init=haiku_init, name="time")(temb)
            tb = tb.reshape(tb.shape[0], *(1,) * self.spatial_dims, self.features)
            if self.time_conditioning == "reference":
                h = h + tb  # cancelled by norm2's mean subtraction: the reference's bug
        h = InstanceNorm(dtype=self.dtype, name="norm2")(h)
        if tb is not None and self.time_conditioning == "after_norm":
            h = h + tb
        return nn.gelu(h + x.astype(self.dtype))


class Down(nn.Module):
    """Kernel-2 stride-2 conv (no bias) – InstanceNorm. ``(B, *S, Cin)`` → ``(B, *S/2, features)``."""

    features: int
    spatial_dims: int
    layout: str = CHANNELS_LAST  # diffseg.model.conv.network_layout's value
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = PatchConv(
            self.features, self.spatial_dims, use_bias=False, layout=self.layout, dtype=self.dtype,
            kernel_init=haiku_init, name="conv",
        )(x)  # fmt: skip
        return InstanceNorm(dtype=self.dtype, name="norm")(h)


class ReferenceUNet(nn.Module):
    """The reference network (ImgX-DiffSeg v0.1.0), 2D or 3D, segmentation or diffusion.

    Attributes:
      num_classes: C, including background.
      channels: encoder widths after the stem; ``len(channels)`` downsamplings, so spatial
        sizes (X, Y and, in 3D, Z) must be divisible by ``2**len(channels)``.
      spatial_dims: 3 (3D convolutions) or 2 (2D network run on every axial slice).
      conditional: the diffusion network (image ⊕ noisy mask, time) or the plain segmenter.
      time_conditioning: "reference" (the reference's placement, which cancels: output
        independent of t) or "after_norm" (the same term after the InstanceNorm).
      remat: recompute every block in the backward pass (``nn.remat``; as the reference's
        configs): less memory, same numbers.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters and normalisation statistics
        stay float32, the logits are float32.
      conv_impl: for the 3^d convolutions, "auto" | "xla" | "fold" | "tiled" | "onednn" (see
        ``diffseg.model.conv.resolve_impl``); the stride-2 ones are always reshapes + matmul.
    """

    num_classes: int
    channels: Sequence[int] = (32, 64, 128, 256)
    spatial_dims: int = 3
    conditional: bool = True
    time_conditioning: str = "reference"
    remat: bool = False
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    def _check(self, image: jax.Array, mask: jax.Array | None, t: jax.Array | None) -> None:
        d = self.spatial_dims
        if d not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {d}")
        if self.time_conditioning not in TIME_CONDITIONINGS:
            raise ValueError(
                f"time_conditioning must be one of {TIME_CONDITIONINGS}, got {self.time_conditioning!r}"
            )
        if len(self.channels) < 1:
            raise ValueError("channels must name at least one level")
        ndims = (4, 5) if d == 2 else (5,)
        if image.ndim not in ndims:
            want = "(B, X, Y, Z, Cin) or slices (B, X, Y, Cin)" if d == 2 else "(B, X, Y, Z, Cin)"
            raise ValueError(f"image must be {want} for spatial_dims={d}, got shape {image.shape}")
        factor = 2 ** len(self.channels)
        # The 2D network downsamples X and Y only; depth is folded into the batch.
        spatial = image.shape[1 : 1 + d]
        if any(s % factor for s in spatial):
            names = "(X, Y, Z)" if d == 3 else "(X, Y)"
            raise ValueError(
                f"spatial shape {names} = {tuple(spatial)} must be divisible by {factor} "
                f"(2^len(channels) for channels={tuple(self.channels)})"
            )
        if not self.conditional:
            return
        if mask is None or t is None:
            raise ValueError("conditional ReferenceUNet needs mask (B, X, Y, Z, C) and t (B,)")
        if mask.shape != (*image.shape[:-1], self.num_classes):
            raise ValueError(
                f"mask shape {mask.shape} must be image's {image.shape[:-1]} plus {self.num_classes} classes"
            )
        if t.shape != image.shape[:1]:
            raise ValueError(f"t must have shape (B,) = {image.shape[:1]}, got {t.shape}")

    @nn.compact
    def __call__(
        self, image: jax.Array, mask: jax.Array | None = None, t: jax.Array | None = None
    ) -> jax.Array:
        """image ``(B, X, Y, Z, Cin)`` (2D also ``(B, X, Y, Cin)`` slices), mask ``(B, X, Y, Z, C)``
        float (the noisy mask x_t), t ``(B,)`` int → logits ``(B, X, Y, Z, C)`` float32."""
        self._check(image, mask, t)
        d = self.spatial_dims
        x = image
        if self.conditional:
            x = jnp.concatenate([image, mask.astype(image.dtype)], axis=-1)
        depth = x.shape[3] if d == 2 and x.ndim == 5 else None
        if depth is not None:
            x = fold_depth(x)
            t = repeat_per_slice(t, depth) if self.conditional else None
        temb = None
        if self.conditional:
            # GELU once here, as every reference block applies it to the same embedding.
            temb = nn.gelu(sinusoidal_embedding(t, 4 * self.channels[0]))

        impl = resolve_impl(self.conv_impl, d, self.dtype)
        # Between convolutions the arrays are in the backend's layout (diffseg.model.conv's choice).
        layout = network_layout(impl, d)
        x = to_layout(x, layout)
        x = x.astype(self.dtype)

        def wrap(cls: Any) -> Any:
            return nn.remat(cls) if self.remat else cls

        kw = dict(spatial_dims=d, layout=layout, dtype=self.dtype)
        res = dict(kw, impl=impl, time_conditioning=self.time_conditioning)
        c0 = self.channels[0]
        h = wrap(ConvNormAct)(c0, **kw, impl=impl, name="stem")(x)
        h = wrap(ResBlock)(c0, **res, name="enc0")(h, temb)
        skips = [h]
        for level, ch in enumerate(self.channels, start=1):
            h = wrap(Down)(ch, **kw, name=f"down{level}")(h)
            h = wrap(ResBlock)(ch, **res, name=f"enc{level}")(h, temb)
            skips.append(h)
        widths = (c0, *self.channels[:-1])  # decoder width at each level: (32, 32, 64, 128)
        for level in range(len(self.channels) - 1, -1, -1):
            skip = skips[level]
            h = wrap(PatchConvTranspose)(widths[level], **kw, kernel_init=haiku_init, name=f"up{level}")(h)
            # A no-op with divisible sizes; the reference crops as its downsampling may pad.
            h = h[(slice(None), *(slice(0, n) for n in skip.shape[1:-1]))] + skip
            h = wrap(ResBlock)(widths[level], **res, name=f"dec{level}")(h, temb)
        out = wrap(Conv)(self.num_classes, 1, **kw, impl=impl, kernel_init=haiku_init, name="head")(h)
        out = out.astype(jnp.float32)
        out = from_layout(out, layout)
        return unfold_depth(out, depth) if depth is not None else out
