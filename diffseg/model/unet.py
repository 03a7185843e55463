"""2D/3D U-Net for (diffusion) segmentation, after ImgX-DiffSeg (Fu et al., 2023).

Per level one residual block (conv 3^d – GroupNorm – SiLU, twice, plus a residual), 2× average
pooling between levels, a symmetric decoder (nearest 2× upsampling, skip concatenation,
residual block) and a final 1^d convolution to the classes. When ``conditional`` the image
and the noisy mask are concatenated on channels and a sinusoidal embedding of the diffusion
step is injected as scale/shift after the first normalisation of every residual block.

The 2D network takes slices ``(B, X, Y, C)`` or volumes ``(B, X, Y, Z, C)``; volumes are run
slice by slice (depth folded into the batch, ``diffseg.model.slices``) and folded back.

Between its convolutions the network keeps the layout ``diffseg.model.conv.network_layout``
chooses for the backend; the parameters and the input/output layout ``(B, X, Y, Z, C)`` do not
depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffseg.model.conv import Conv, from_layout, network_layout, resolve_impl, to_layout
from diffseg.model.slices import fold_depth, repeat_per_slice, unfold_depth


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal position embedding of the diffusion step. t ``(B,)`` → ``(B, dim)`` float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def num_groups(channels: int, max_groups: int = 8) -> int:
    """Largest group count ≤ ``max_groups`` dividing ``channels`` (8 for the paper's widths)."""
    return max(g for g in range(1, max_groups + 1) if channels % g == 0)


def downsample(x: jax.Array) -> jax.Array:
    """2× average pooling on every spatial axis. ``(B, *S, C)`` → ``(B, *S/2, C)``.

    A reshape + mean: layout-agnostic and cheap on every backend (no strided convolution).
    """
    b, *s, c = x.shape
    shape = [b]
    for n in s:
        shape += [n // 2, 2]
    y = x.reshape(*shape, c)
    return y.mean(axis=tuple(range(2, 2 * len(s) + 1, 2)))


def upsample(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2× upsampling on every spatial axis. ``(B, *S, C)`` → ``(B, *2S, C)``."""
    b, *s, c = x.shape
    # Broadcast a size-2 axis after each spatial axis and merge: one fused copy.
    y = x.reshape(b, *[v for n in s for v in (n, 1)], c)
    y = jnp.broadcast_to(y, (b, *[v for n in s for v in (n, 2)], c))
    return y.reshape(b, *[2 * n for n in s], c)


class ResBlock(nn.Module):
    """conv–GN–(time scale/shift)–SiLU–conv–GN–SiLU + (1^d-projected) input.

    x ``(B, *S, Cin)``, temb ``(B, E)`` or None → ``(B, *S, features)`` in ``dtype``.
    """

    features: int
    spatial_dims: int
    impl: str
    layout: str  # diffseg.model.conv.network_layout's value
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
        conv = dict(spatial_dims=self.spatial_dims, impl=self.impl, layout=self.layout, dtype=self.dtype)
        gn = dict(num_groups=num_groups(self.features), dtype=self.dtype)
        h = Conv(self.features, 3, **conv, name="conv1")(x)
        h = nn.GroupNorm(**gn, name="norm1")(h)
        if temb is not None:
            ss = nn.Dense(2 * self.features, dtype=self.dtype, name="time")(nn.silu(temb))
            scale, shift = jnp.split(ss, 2, axis=-1)
            bshape = (h.shape[0],) + (1,) * self.spatial_dims + (self.features,)
            h = h * (1 + scale.reshape(bshape)) + shift.reshape(bshape)
        h = nn.silu(h)
        h = Conv(self.features, 3, **conv, name="conv2")(h)
        h = nn.silu(nn.GroupNorm(**gn, name="norm2")(h))
        if x.shape[-1] != self.features:
            x = Conv(self.features, 1, **conv, name="skip")(x)
        return h + x.astype(self.dtype)


class UNet(nn.Module):
    """U-Net returning per-voxel class logits.

    Attributes:
      num_classes: C, including background.
      channels: widths per level; ``len(channels) - 1`` downsamplings.
      spatial_dims: 2 (slices ``(B, X, Y, ·)`` or volumes ``(B, X, Y, Z, ·)``, run slice by slice)
        or 3 (``(B, X, Y, Z, ·)``).
      conditional: diffusion model (image ⊕ noisy mask, time embedding) or plain segmenter.
      time_embed_dim: width of the sinusoidal time embedding.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
      conv_impl: "auto" | "xla" | "fold" | "tiled" | "onednn" (see ``diffseg.model.conv.resolve_impl``).
    """

    num_classes: int
    channels: Sequence[int] = (32, 64, 128, 256)
    spatial_dims: int = 3
    conditional: bool = True
    time_embed_dim: int = 128
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(
        self,
        image: jax.Array,
        mask: jax.Array | None = None,
        t: jax.Array | None = None,
    ) -> jax.Array:
        """image ``(B, *S, 1)``, mask ``(B, *S, C)`` float, t ``(B,)`` int → logits ``(B, *S, C)`` f32.

        ``S`` is ``(X, Y, Z)`` in 3D and ``(X, Y)`` or ``(X, Y, Z)`` (a volume, run per slice) in 2D.
        """
        d = self.spatial_dims
        if d not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {d}")
        if image.ndim != d + 2 and not (d == 2 and image.ndim == 5):
            raise ValueError(f"image must be (B, *{d} spatial dims, 1), got shape {image.shape}")
        factor = 2 ** (len(self.channels) - 1)
        spatial = image.shape[1 : 1 + d]  # a 2D volume's depth is not downsampled
        if any(s % factor for s in spatial):
            raise ValueError(
                f"spatial shape {tuple(spatial)} must be divisible by {factor} "
                f"(2^(levels-1) for channels={tuple(self.channels)})"
            )
        x = image
        temb = None
        if self.conditional:
            if mask is None or t is None:
                raise ValueError("conditional UNet needs mask (B, *S, C) and t (B,)")
            if mask.shape[:-1] != image.shape[:-1]:
                raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape}")
            x = jnp.concatenate([image, mask.astype(image.dtype)], axis=-1)
        depth = x.shape[3] if d == 2 and x.ndim == 5 else None
        if depth is not None:
            x = fold_depth(x)
        if self.conditional:
            t = t if depth is None else repeat_per_slice(t, depth)
            temb = sinusoidal_embedding(t, self.time_embed_dim)
            temb = nn.Dense(4 * self.time_embed_dim, dtype=self.dtype, name="time_mlp1")(temb)
            temb = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="time_mlp2")(nn.silu(temb))

        impl = resolve_impl(self.conv_impl, d, self.dtype)
        # Between convolutions the arrays are in the backend's layout (diffseg.model.conv's choice).
        layout = network_layout(impl, d)
        x = to_layout(x, layout)
        x = x.astype(self.dtype)
        kw = dict(spatial_dims=d, impl=impl, layout=layout, dtype=self.dtype)

        h = Conv(self.channels[0], 3, **kw, name="stem")(x)
        skips = []
        for i, ch in enumerate(self.channels):
            if i > 0:
                h = downsample(h)
            h = ResBlock(ch, **kw, name=f"down{i}")(h, temb)
            skips.append(h)
        for i in range(len(self.channels) - 2, -1, -1):
            h = upsample(h)
            h = jnp.concatenate([h, skips[i]], axis=-1)
            h = ResBlock(self.channels[i], **kw, name=f"up{i}")(h, temb)
        out = Conv(self.num_classes, 1, **kw, name="head")(h).astype(jnp.float32)
        out = from_layout(out, layout)
        return unfold_depth(out, depth) if depth is not None else out
