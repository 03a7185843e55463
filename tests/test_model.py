"""Tests of diffseg.model: U-Net shapes/dtypes and the CPU-fast convolution's exactness."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffseg.model import Conv, UNet, conv_nd
from diffseg.model.conv import resolve_impl
from diffseg.model.unet import downsample, upsample

CH = (4, 8)


def _inputs(spatial: tuple[int, ...], c: int = 3, b: int = 2, seed: int = 0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    image = jax.random.normal(k1, (b, *spatial, 1))
    mask = jax.random.uniform(k2, (b, *spatial, c), minval=-1, maxval=1)
    t = jnp.array([1, 1000][:b], dtype=jnp.int32)
    return image, mask, t


@pytest.mark.parametrize("dims,spatial", [(2, (8, 12)), (3, (8, 4, 6))])
@pytest.mark.parametrize("conditional", [True, False])
def test_unet_shapes(dims, spatial, conditional):
    image, mask, t = _inputs(spatial)
    model = UNet(num_classes=3, channels=CH, spatial_dims=dims, conditional=conditional, time_embed_dim=8)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), image, mask, t)
    out = jax.jit(model.apply)(params, image, mask, t)
    assert out.shape == (2, *spatial, 3)
    assert out.dtype == jnp.float32
    names = set(params["params"])
    assert ("time_mlp1" in names) == conditional
    if not conditional:
        # The segmenter ignores mask and t entirely.
        np.testing.assert_array_equal(out, jax.jit(model.apply)(params, image))


def test_unet_bf16_compute_float32_params_and_output():
    image, mask, t = _inputs((8, 4, 4))
    model = UNet(num_classes=3, channels=CH, time_embed_dim=8, dtype=jnp.bfloat16)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), image, mask, t)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out = jax.jit(model.apply)(params, image, mask, t)
    assert out.dtype == jnp.float32 and out.shape == (2, 8, 4, 4, 3)
    ref = jax.jit(UNet(num_classes=3, channels=CH, time_embed_dim=8).apply)(params, image, mask, t)
    np.testing.assert_allclose(out, ref, atol=0.2, rtol=0.1)


def test_unet_jit_and_finite_gradient():
    image, mask, t = _inputs((8, 8, 4))
    model = UNet(num_classes=3, channels=CH, time_embed_dim=8)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), image, mask, t)

    @jax.jit
    def loss(p):
        return jnp.mean(model.apply(p, image, mask, t, train=True) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_unet_rejects_indivisible_shape():
    image, mask, t = _inputs((8, 8, 6))
    model = UNet(num_classes=3, channels=(4, 8, 8), time_embed_dim=8)
    with pytest.raises(ValueError, match=r"\(8, 8, 6\)"):
        jax.jit(model.init)(jax.random.PRNGKey(1), image, mask, t)


def test_unet_conditional_needs_mask_and_t():
    image, _, _ = _inputs((8, 8, 4))
    with pytest.raises(ValueError, match="mask"):
        UNet(num_classes=3, channels=CH).init(jax.random.PRNGKey(1), image)


@pytest.mark.parametrize("impl", ["fold", "im2col"])
def test_unet_impls_agree_with_xla(impl):
    image, mask, t = _inputs((8, 8, 4))
    ref_model = UNet(num_classes=3, channels=CH, time_embed_dim=8, conv_impl="xla")
    params = jax.jit(ref_model.init)(jax.random.PRNGKey(1), image, mask, t)
    fast = UNet(num_classes=3, channels=CH, time_embed_dim=8, conv_impl=impl)
    # Same parameter tree: checkpoints are portable between implementations.
    fast_params = jax.jit(fast.init)(jax.random.PRNGKey(1), image, mask, t)
    assert jax.tree.structure(fast_params) == jax.tree.structure(params)
    assert [p.shape for p in jax.tree.leaves(fast_params)] == [p.shape for p in jax.tree.leaves(params)]
    np.testing.assert_allclose(
        jax.jit(fast.apply)(params, image, mask, t),
        jax.jit(ref_model.apply)(params, image, mask, t),
        rtol=1e-4,
        atol=1e-4,
    )


def _ref_conv(x, k):
    dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NXYZC", "XYZIO", "NXYZC"))
    return lax.conv_general_dilated(x, k, (1, 1, 1), "SAME", dimension_numbers=dn)


@pytest.mark.parametrize("impl", ["fold", "im2col"])
@pytest.mark.parametrize("spatial,ksize", [((5, 7, 3), 3), ((6, 4, 8), 3), ((5, 6, 7), 1)])
def test_fast_conv_matches_xla_forward_and_gradients(impl, spatial, ksize):
    kx, kk, kc = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (2, *spatial, 3))
    k = jax.random.normal(kk, (ksize,) * 3 + (3, 5))
    cot = jax.random.normal(kc, (2, *spatial, 5))

    def loss(fn):
        return lambda x, k: jnp.sum(fn(x, k) * cot)

    fast = jax.jit(lambda x, k: conv_nd(x, k, impl=impl, layout="xyz"))
    np.testing.assert_allclose(fast(x, k), _ref_conv(x, k), rtol=1e-4, atol=1e-4)
    g_fast = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(x, k)
    g_ref = jax.jit(jax.grad(loss(_ref_conv), argnums=(0, 1)))(x, k)
    for a, b in zip(g_fast, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)

    # The depth-first layout used inside the U-Net gives the same numbers.
    zxy = conv_nd(jnp.moveaxis(x, 3, 1), k, impl=impl, layout="zxy")
    np.testing.assert_allclose(jnp.moveaxis(zxy, 1, 3), _ref_conv(x, k), rtol=1e-4, atol=1e-4)


def test_conv_module_params_match_flax_conv():
    import flax.linen as nn

    x = jnp.ones((1, 4, 4, 4, 3))
    ours = Conv(6, 3, spatial_dims=3, impl="fold").init(jax.random.PRNGKey(0), x)
    ref = nn.Conv(6, (3, 3, 3), padding="SAME").init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, ref)
    np.testing.assert_allclose(
        Conv(6, 3, spatial_dims=3, impl="fold").apply(ref, x), nn.Conv(6, (3, 3, 3)).apply(ref, x), rtol=1e-5
    )


def test_resolve_impl():
    expected = "fold" if jax.default_backend() == "cpu" else "xla"
    assert resolve_impl("auto", 3) == expected
    assert resolve_impl("auto", 2) == "xla"
    with pytest.raises(ValueError, match="conv_impl"):
        resolve_impl("cudnn", 3)


def test_down_and_upsample_shapes():
    x = jnp.arange(2 * 4 * 6 * 2 * 3, dtype=jnp.float32).reshape(2, 4, 6, 2, 3)
    assert downsample(x).shape == (2, 2, 3, 1, 3)
    up = upsample(x)
    assert up.shape == (2, 8, 12, 4, 3)
    np.testing.assert_array_equal(downsample(up), x)
