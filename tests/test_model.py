"""Tests of diffseg.model: U-Net shapes/dtypes and the CPU-fast convolution's exactness."""

from __future__ import annotations

import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffseg.model import Conv, UNet, conv_nd, onednn
from diffseg.model import conv as conv_module
from diffseg.model.conv import resolve_impl
from diffseg.model.unet import downsample, upsample

CH = (4, 8)

# oneDNN is a dependency on Linux x86-64 (pyproject.toml), so there it must load: not skipped.
needs_onednn = pytest.mark.skipif(
    not (platform.system() == "Linux" and platform.machine() == "x86_64") or jax.default_backend() != "cpu",
    reason="the oneDNN convolution is installed on Linux x86-64 CPU only",
)


def _inputs(spatial: tuple[int, ...], c: int = 3, b: int = 2, seed: int = 0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    image = jax.random.normal(k1, (b, *spatial, 1))
    mask = jax.random.uniform(k2, (b, *spatial, c), minval=-1, maxval=1)
    t = jnp.array([1, 1000][:b], dtype=jnp.int32)
    return image, mask, t


@pytest.fixture(scope="module")
def cond3d():
    """One initialised 3D conditional model (default conv_impl) shared by several tests.

    Compilation dominates these tests on a 2-core CPU, so each program is compiled once.
    """
    image, mask, t = _inputs((8, 4, 4))
    model = UNet(num_classes=3, channels=CH, time_embed_dim=8)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), image, mask, t)
    out = jax.jit(model.apply)(params, image, mask, t)
    return model, params, (image, mask, t), out


def test_unet_3d_conditional_shapes(cond3d):
    _, params, _, out = cond3d
    assert out.shape == (2, 8, 4, 4, 3) and out.dtype == jnp.float32
    assert "time_mlp1" in params["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


@pytest.mark.parametrize("dims,spatial,conditional", [(2, (8, 12), True), (3, (4, 4, 2), False)])
def test_unet_shapes(dims, spatial, conditional):
    image, mask, t = _inputs(spatial)
    model = UNet(num_classes=3, channels=CH, spatial_dims=dims, conditional=conditional, time_embed_dim=8)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), image, mask, t)
    apply = jax.jit(model.apply)
    out = apply(params, image, mask, t)
    assert out.shape == (2, *spatial, 3)
    assert out.dtype == jnp.float32
    assert ("time_mlp1" in params["params"]) == conditional
    if not conditional:
        # The segmenter ignores mask and t entirely.
        np.testing.assert_array_equal(out, apply(params, image, jnp.zeros_like(mask), t[::-1]))


def test_unet_2d_on_volumes_equals_slice_by_slice():
    """The 2D network also takes volumes (B, X, Y, Z, ·): depth folded into the batch and back."""
    image, mask, t = _inputs((8, 12, 3))  # Z = 3: depth is not downsampled, any size
    model = UNet(num_classes=3, channels=CH, spatial_dims=2, time_embed_dim=8)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), image[:, :, :, 0], mask[:, :, :, 0], t)
    volume_params = jax.eval_shape(model.init, jax.random.PRNGKey(1), image, mask, t)
    assert jax.tree.map(lambda p: p.shape, volume_params) == jax.tree.map(jnp.shape, params)
    apply = jax.jit(model.apply)
    out = apply(params, image, mask, t)
    assert out.shape == (2, 8, 12, 3, 3) and out.dtype == jnp.float32
    for z in range(3):
        ref = apply(params, image[:, :, :, z], mask[:, :, :, z], t)
        np.testing.assert_allclose(out[:, :, :, z], ref, rtol=1e-5, atol=1e-5)


def test_unet_bf16_compute_float32_output(cond3d):
    _, params, (image, mask, t), ref = cond3d
    model = UNet(num_classes=3, channels=CH, time_embed_dim=8, dtype=jnp.bfloat16)
    out = jax.jit(model.apply)(params, image, mask, t)
    assert out.dtype == jnp.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=0.2, rtol=0.1)


def test_unet_jit_and_finite_gradient(cond3d):
    model, params, (image, mask, t), _ = cond3d

    def loss(p):
        return jnp.mean(model.apply(p, image, mask, t) ** 2)

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


def test_unet_xla_impl_agrees_with_default(cond3d):
    """Same params through conv_impl="xla" and the default (fold on CPU) give the same logits."""
    _, params, (image, mask, t), out = cond3d
    xla_model = UNet(num_classes=3, channels=CH, time_embed_dim=8, conv_impl="xla")
    # Same parameter tree: checkpoints are portable between implementations.
    xla_params = jax.eval_shape(xla_model.init, jax.random.PRNGKey(1), image, mask, t)
    assert jax.tree.map(lambda p: p.shape, xla_params) == jax.tree.map(jnp.shape, params)
    ref = jax.jit(xla_model.apply)(params, image, mask, t)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def _ref_conv(x, k):
    dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NXYZC", "XYZIO", "NXYZC"))
    return lax.conv_general_dilated(x, k, (1, 1, 1), "SAME", dimension_numbers=dn)


@pytest.mark.parametrize(
    "impl,spatial,ksize,tile_rows",
    [
        ("fold", (5, 7, 3), 3, None),
        ("fold", (6, 4, 8), 3, None),
        ("fold", (5, 6, 7), 1, None),
        ("tiled", (5, 7, 3), 3, 4096),  # one chunk per batch element
        ("tiled", (6, 4, 8), 3, 70),  # 64-row chunks end mid-plane (a padded plane is 8·6 = 48 rows)
        ("tiled", (5, 6, 4), 3, 7),  # several chunks per plane
        pytest.param("onednn", (5, 7, 3), 3, None, marks=needs_onednn),
        pytest.param("onednn", (2, 6, 8), 3, None, marks=needs_onednn),  # a depth of 2
        pytest.param("onednn", (5, 6, 7), 1, None, marks=needs_onednn),
    ],
)
def test_fast_conv_matches_xla_forward_and_gradients(impl, spatial, ksize, tile_rows, monkeypatch):
    if tile_rows is not None:  # exercise the tiled path on planes this small
        monkeypatch.setattr(conv_module, "TILED_MIN_PLANE", 0)
        monkeypatch.setattr(conv_module, "TILE_ROWS", tile_rows)
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


@needs_onednn
@pytest.mark.parametrize("kshape", [(3, 5, 1), (1, 3, 5)])
@pytest.mark.parametrize("layout", ["xyz", "zxy"])
def test_onednn_conv_with_bias_and_unequal_odd_kernel_sizes(kshape, layout):
    kx, kk, kc = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(kx, (2, 6, 5, 4, 3))  # (B, X, Y, Z, C)
    k = jax.random.normal(kk, (*kshape, 3, 2))
    cot = jax.random.normal(kc, (2, 6, 5, 4, 2))

    bias = jax.random.normal(kc, (2,))

    def ours(x, k, b):  # the bias goes into oneDNN's kernel, its gradient comes back with dk
        if layout == "xyz":
            return conv_nd(x, k, b, impl="onednn", layout="xyz")
        return jnp.moveaxis(conv_nd(jnp.moveaxis(x, 3, 1), k, b, impl="onednn", layout="zxy"), 1, 3)

    def ref(x, k, b):
        return _ref_conv(x, k) + b

    np.testing.assert_allclose(jax.jit(ours)(x, k, bias), ref(x, k, bias), rtol=1e-4, atol=1e-4)
    g = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums=(0, 1, 2)))(x, k, bias)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * cot), argnums=(0, 1, 2))(x, k, bias)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


@needs_onednn
def test_onednn_takes_16_bit_compute_and_leaves_float64_to_xla():
    assert resolve_impl("onednn", 3, jnp.bfloat16) == "onednn"
    assert resolve_impl("onednn", 2, jnp.bfloat16) == "onednn"
    assert resolve_impl("onednn", 3, jnp.float64) == "tiled"
    assert resolve_impl("onednn", 2, jnp.float64) == "xla"


def _f32_ref_conv(x, k, b):
    """XLA's convolution in float32 plus bias, rounded to x's dtype (for bf16: what cuDNN computes)."""
    d = x.ndim - 2
    spec = ("N" + "XYZ"[:d] + "C", "XYZ"[:d] + "IO", "N" + "XYZ"[:d] + "C")
    x32, k32, b32 = (a.astype(jnp.float32) for a in (x, k, b))
    dn = lax.conv_dimension_numbers(x.shape, k.shape, spec)
    y = lax.conv_general_dilated(x32, k32, (1,) * d, "SAME", dimension_numbers=dn) + b32
    return y.astype(x.dtype)


@needs_onednn
@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((2, 64, 64, 3), jnp.float32),  # 2D at the smallest plane oneDNN takes in float32
        ((2, 6, 5, 3), jnp.bfloat16),  # 2D bf16: oneDNN at any plane
        ((2, 6, 5, 4, 3), jnp.bfloat16),  # 3D bf16
    ],
)
def test_onednn_2d_and_bfloat16_match_xla_with_gradients(shape, dtype):
    """2D goes through oneDNN as a one-slice 3D convolution; bf16 is computed in float32 and
    rounded back, equal to XLA's float32-accumulated bf16 convolution up to summation order."""
    d = len(shape) - 2
    kx, kk, kc, kb = jax.random.split(jax.random.PRNGKey(4), 4)
    x = jax.random.normal(kx, shape).astype(dtype)
    k = jax.random.normal(kk, (3,) * d + (3, 2)).astype(dtype)
    b = jax.random.normal(kb, (2,)).astype(dtype)
    cot = jax.random.normal(kc, (*shape[:-1], 2)).astype(dtype)
    ours = lambda x, k, b: conv_nd(x, k, b, impl="onednn")  # noqa: E731
    ref = _f32_ref_conv
    out = jax.jit(ours)(x, k, b)
    assert out.dtype == dtype
    # One bf16 rounding step (2^-8 relative) of the outputs, at most, between the two orders.
    tol = dict(rtol=1e-2, atol=5e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref(x, k, b), np.float32), **tol)
    # the XLA or tiled fallbacks would give the same numbers: prove oneDNN ran
    assert "custom_call" in jax.jit(ours).lower(x, k, b).as_text()
    g = jax.jit(jax.grad(lambda *a: jnp.sum((ours(*a) * cot).astype(jnp.float32)), argnums=(0, 1, 2)))(
        x, k, b
    )
    g_ref = jax.grad(lambda *a: jnp.sum((ref(*a) * cot).astype(jnp.float32)), argnums=(0, 1, 2))(x, k, b)
    for a, r in zip(g, g_ref, strict=True):
        assert a.dtype == dtype
        scale = float(jnp.abs(r.astype(jnp.float32)).max())
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(r, np.float32), rtol=2e-2, atol=2e-2 * scale
        )


def test_small_float32_2d_planes_stay_with_xla():
    """Under ONEDNN_2D_MIN_PLANE pixels XLA's float32 2D convolution is faster: no custom call."""
    x, k = jnp.ones((1, 16, 16, 2)), jnp.ones((3, 3, 2, 2))
    hlo = jax.jit(lambda x, k: conv_nd(x, k, impl="auto")).lower(x, k).as_text()
    assert "custom_call" not in hlo
    assert conv_module.ONEDNN_2D_MIN_PLANE > 16 * 16


def test_onednn_build_failure_names_the_problem_and_falls_back(monkeypatch, tmp_path):
    """No compiler: a warning that says so, ``available()`` False, and "auto" stays usable."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path / "cache"))
    try:
        root = onednn._onednn_root()
    except onednn.OneDNNUnavailable as err:
        assert "DIFFSEG_ONEDNN_ROOT" in str(err)
    else:
        with pytest.raises(onednn.OneDNNUnavailable, match="compiler .*no-such-c.*not found"):
            onednn._compile(root)
    with pytest.warns(UserWarning, match="oneDNN 3D convolution unavailable"):
        assert onednn.available.__wrapped__() is False
    monkeypatch.setenv("DIFFSEG_ONEDNN", "0")
    assert onednn.available.__wrapped__() is False


@pytest.mark.parametrize("kshape", [(3, 5, 1), (1, 3, 5)])
def test_tiled_conv_with_unequal_odd_kernel_sizes(kshape):
    kx, kk, kc = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(kx, (2, 6, 5, 4, 3))  # (B, X, Y, Z, C)
    k = jax.random.normal(kk, (*kshape, 3, 2))
    cot = jax.random.normal(kc, (2, 6, 5, 4, 2))

    def tiled(x, k):  # conv3d_tiled works in the depth-first layout
        return jnp.moveaxis(conv_module.conv3d_tiled(jnp.moveaxis(x, 3, 1), k), 1, 3)

    np.testing.assert_allclose(tiled(x, k), _ref_conv(x, k), rtol=1e-4, atol=1e-4)
    g = jax.grad(lambda x, k: jnp.sum(tiled(x, k) * cot), argnums=(0, 1))(x, k)
    g_ref = jax.grad(lambda x, k: jnp.sum(_ref_conv(x, k) * cot), argnums=(0, 1))(x, k)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_tiled_conv_in_bfloat16_keeps_dtypes_and_values():
    kx, kk, kc = jax.random.split(jax.random.PRNGKey(2), 3)
    x = jax.random.normal(kx, (2, 4, 6, 5, 3))  # (B, Z, X, Y, C)
    k = jax.random.normal(kk, (3, 3, 3, 3, 4))
    cot = jax.random.normal(kc, (2, 4, 6, 5, 4))

    def loss(x, k):
        return jnp.sum(conv_module.conv3d_tiled(x, k).astype(jnp.float32) * cot)

    bf = [a.astype(jnp.bfloat16) for a in (x, k)]
    assert conv_module.conv3d_tiled(*bf).dtype == jnp.bfloat16
    g16 = jax.grad(loss, argnums=(0, 1))(*bf)
    g32 = jax.grad(loss, argnums=(0, 1))(x, k)
    for a, b in zip(g16, g32, strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(a.astype(jnp.float32), b, rtol=0.05, atol=0.05 * float(jnp.abs(b).max()))


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
    cpu = jax.default_backend() == "cpu"
    expected = ("onednn" if onednn.available() else "tiled") if cpu else "xla"
    assert resolve_impl("auto", 3) == expected
    expected_2d = ("onednn" if onednn.available() else "xla") if cpu else "xla"
    assert resolve_impl("auto", 2) == expected_2d
    assert resolve_impl("auto", 2, jnp.float64) == "xla"
    with pytest.raises(ValueError, match="conv_impl"):
        resolve_impl("cudnn", 3)


def test_down_and_upsample_shapes():
    x = jnp.arange(2 * 4 * 6 * 2 * 3, dtype=jnp.float32).reshape(2, 4, 6, 2, 3)
    assert downsample(x).shape == (2, 2, 3, 1, 3)
    up = upsample(x)
    assert up.shape == (2, 8, 12, 4, 3)
    np.testing.assert_array_equal(downsample(up), x)
