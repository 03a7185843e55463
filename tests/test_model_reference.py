"""Tests of diffseg.model.reference (the ImgX-DiffSeg v0.1.0 network) and its patch convolutions."""

from __future__ import annotations

import math
import platform

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffseg.model import (
    PatchConv,
    PatchConvTranspose,
    ReferenceUNet,
    fold_depth,
    patch_conv,
    patch_conv_transpose,
    unfold_depth,
)
from diffseg.model.reference import haiku_init

CH = (4, 8, 16, 32)  # 4 downsamplings: sizes divisible by 16
C = 3
SHAPE3D = (16, 16, 16)
SHAPE2D = (16, 16, 3)  # the 2D network does not downsample depth: any Z

needs_onednn = pytest.mark.skipif(
    not (platform.system() == "Linux" and platform.machine() == "x86_64") or jax.default_backend() != "cpu",
    reason="the oneDNN convolution is installed on Linux x86-64 CPU only",
)


def _key(seed: int = 1) -> jax.Array:
    # XLA compiles threefry slowly on CPU (≈ 15 s for this model's init, ≈ 2 s with "rbg"); the
    # networks' numbers do not depend on the generator.
    return jax.random.key(seed, impl="rbg")


def _normal(rng: np.random.Generator, shape) -> jax.Array:
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _inputs(spatial, b: int = 2, seed: int = 0, c: int = C):
    rng = np.random.default_rng(seed)  # numpy: no XLA compilation per random op
    image = jnp.asarray(rng.normal(size=(b, *spatial, 1)), jnp.float32)
    mask = jnp.asarray(rng.uniform(-1, 1, (b, *spatial, c)), jnp.float32)
    t = jnp.array([3, 970][:b], dtype=jnp.int32)
    return image, mask, t


def _model(dims: int = 3, **kw) -> ReferenceUNet:
    return ReferenceUNet(C, CH, spatial_dims=dims, **{"conv_impl": "xla", **kw})


@pytest.fixture(scope="module")
def cond3d():
    """A conditional 3D model's params and reference-mode output (compiling dominates: share it)."""
    image, mask, t = _inputs(SHAPE3D)
    model = _model(3)
    params = jax.jit(model.init)(_key(), image, mask, t)
    return params, (image, mask, t), jax.jit(model.apply)(params, image, mask, t)


@pytest.fixture(scope="module")
def cond2d():
    """A conditional 2D model ("after_norm", so that t matters), its params and output on volumes."""
    image, mask, t = _inputs(SHAPE2D)
    model = _model(2, time_conditioning="after_norm")
    params = jax.jit(model.init)(_key(), image, mask, t)
    return model, params, (image, mask, t), jax.jit(model.apply)(params, image, mask, t)


def _num_params(tree) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(tree))


# --- shapes, dtypes, errors -------------------------------------------------------------------


def test_conditional_shapes_3d_and_2d(cond3d, cond2d):
    params, _, out = cond3d
    assert out.shape == (2, *SHAPE3D, C) and out.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert params["params"]["enc0"]["time"]["kernel"].shape == (4 * CH[0], CH[0])
    _, params2d, _, out2d = cond2d
    assert out2d.shape == (2, *SHAPE2D, C) and out2d.dtype == jnp.float32
    assert params2d["params"]["stem"]["conv"]["kernel"].shape == (3, 3, 1 + C, CH[0])  # image ⊕ mask


@pytest.mark.parametrize("dims,spatial", [(3, SHAPE3D), (2, SHAPE2D)])
def test_segmentation_net_shapes_and_ignores_mask_and_t(dims, spatial):
    image, mask, t = _inputs(spatial)
    model = _model(dims, conditional=False)
    params = jax.jit(model.init)(_key(), image)
    out = jax.jit(model.apply)(params, image)
    assert out.shape == (2, *spatial, C) and out.dtype == jnp.float32
    assert "time" not in params["params"]["enc0"]
    assert params["params"]["stem"]["conv"]["kernel"].shape == (3,) * dims + (1, CH[0])
    np.testing.assert_array_equal(out, jax.jit(model.apply)(params, image, mask, t))


@pytest.mark.parametrize(
    "kw,shapes,match",
    [
        (dict(time_conditioning="film"), None, "reference.*after_norm"),
        ({}, ((2, 16, 16, 8, 1), (2, 16, 16, 8, C), (2,)), r"divisible by 16"),
        (dict(dims=2), ((2, 16, 12, 5, 1), (2, 16, 12, 5, C), (2,)), r"\(X, Y\) = \(16, 12\)"),
        ({}, ((2, 16, 16, 1), (2, 16, 16, C), (2,)), r"\(B, X, Y, Z, Cin\)"),
        ({}, ((2, 16, 16, 16, 1), (2, 16, 16, 16, C + 1), (2,)), "mask shape"),
        ({}, ((2, 16, 16, 16, 1), (2, 16, 16, 16, C), (3,)), r"t must have shape \(B,\)"),
        (dict(dims=1), None, "spatial_dims"),
    ],
)
def test_bad_configs_and_shapes_raise_value_errors(kw, shapes, match):
    image, mask, t = (jnp.zeros(s) for s in shapes or ((2, 16, 16, 16, 1), (2, 16, 16, 16, C), (2,)))
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(_model(**kw).init, jax.random.PRNGKey(0), image, mask, t.astype(jnp.int32))


def test_conditional_needs_mask_and_t():
    image, _, _ = _inputs(SHAPE3D)
    with pytest.raises(ValueError, match="needs mask"):
        jax.eval_shape(_model().init, jax.random.PRNGKey(0), image)


# --- the time conditioning ----------------------------------------------------------------------


def test_reference_time_conditioning_ignores_t_after_norm_uses_it(cond3d):
    """The reference adds t right before an InstanceNorm, which subtracts it again.

    float32: the outputs for different t agree only to rounding, not to 1e-6 absolute: t changes
    the values that the normalisation rounds (x + t, then its mean), and ~10 normalisations
    later the logits (|y| ≈ 7 here, where one float32 ulp is 4.8e-7) differ by a few ulps
    (measured ≈ 3e-6). So the float32 bound is relative, 1e-5·max|y|; the float64 run below
    shows that the difference is rounding only (≤ 1e-6 after the float32 cast of the logits).
    """
    params, (image, mask, t), out = cond3d
    other_t = jnp.array([999, 0], jnp.int32)
    apply = jax.jit(_model().apply)
    scale = float(jnp.abs(out).max())
    assert float(jnp.abs(apply(params, image, mask, other_t) - out).max()) <= 1e-5 * scale

    after = jax.jit(_model(time_conditioning="after_norm").apply)  # same parameters
    y1, y2 = after(params, image, mask, t), after(params, image, mask, other_t)
    assert float(jnp.abs(y1 - y2).max()) > 1e-2 * scale
    assert float(jnp.abs(y1 - out).max()) > 1e-2 * scale

    with jax.enable_x64(True):
        model64 = _model(dtype=jnp.float64)
        x64 = [a.astype(jnp.float64) for a in (image, mask)]
        apply64 = jax.jit(model64.apply)
        y64, y64_other = apply64(params, *x64, t), apply64(params, *x64, other_t)
    assert y64.dtype == jnp.float32
    np.testing.assert_allclose(y64, y64_other, rtol=0, atol=1e-6)
    np.testing.assert_allclose(y64, out, rtol=0, atol=1e-4)  # and float32 ≈ float64


def test_reference_time_parameters_get_no_gradient(cond3d):
    params, (image, mask, t), _ = cond3d
    model = _model()
    grads = jax.jit(jax.grad(lambda p: jnp.mean(model.apply(p, image, mask, t) ** 2)))(params)["params"]
    time = [g for name, blk in grads.items() if "time" in blk for g in jax.tree.leaves(blk["time"])]
    convs = [g for blk in grads.values() for name, g in blk.items() if name.startswith("conv")]
    assert len(time) == 2 * (2 * len(CH) + 1)  # kernel and bias in each of the 9 residual blocks
    largest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(convs))
    assert max(float(jnp.abs(g).max()) for g in time) <= 1e-4 * largest


# --- 2D on volumes ------------------------------------------------------------------------------


def test_2d_model_on_a_volume_equals_slice_by_slice(cond2d):
    model, params, (image, mask, t), out = cond2d
    per_slice = jax.jit(model.apply)
    for z in range(SHAPE2D[2]):
        ref = per_slice(params, image[:, :, :, z], mask[:, :, :, z], t)
        np.testing.assert_allclose(out[:, :, :, z], ref, rtol=1e-5, atol=1e-5)


def test_fold_depth_round_trip_and_order():
    x = jnp.arange(2 * 3 * 4 * 5 * 2, dtype=jnp.float32).reshape(2, 3, 4, 5, 2)
    folded = fold_depth(x)
    assert folded.shape == (10, 3, 4, 2)
    np.testing.assert_array_equal(folded[1 * 5 + 3], x[1, :, :, 3])  # slice z of volume b at b·Z + z
    np.testing.assert_array_equal(unfold_depth(folded, 5), x)


# --- patch (stride-2) convolutions --------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(4, 6), (4, 6, 8)])
def test_patch_convs_match_lax_forward_and_gradients(spatial):
    d = len(spatial)
    sp = "XYZ"[:d]
    dn = (f"N{sp}C", f"{sp}IO", f"N{sp}C")
    rng = np.random.default_rng(0)
    x, k, kt_ = (_normal(rng, s) for s in ((2, *spatial, 3), (2,) * d + (3, 5), (2,) * d + (3, 5)))

    def down_ref(x, k):
        return lax.conv_general_dilated(x, k, (2,) * d, "SAME", dimension_numbers=dn)

    def up_ref(x, k):
        return lax.conv_transpose(x, k, (2,) * d, "SAME", dimension_numbers=dn)

    cot_down = _normal(rng, (2, *[n // 2 for n in spatial], 5))
    cot_up = _normal(rng, (2, *[2 * n for n in spatial], 5))
    cases = ((patch_conv, down_ref, k, cot_down), (patch_conv_transpose, up_ref, kt_, cot_up))
    for ours, ref, kernel, cot in cases:
        np.testing.assert_allclose(ours(x, kernel), ref(x, kernel), rtol=1e-5, atol=1e-5)
        g = jax.grad(lambda x, k, f=ours, c=cot: jnp.sum(f(x, k) * c), argnums=(0, 1))(x, kernel)
        g_ref = jax.grad(lambda x, k, f=ref, c=cot: jnp.sum(f(x, k) * c), argnums=(0, 1))(x, kernel)
        for a, b in zip(g, g_ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_patch_conv_modules_read_flax_conv_parameters(dims):
    x = _normal(np.random.default_rng(0), (2, *(4, 6, 2)[:dims], 3))
    for ours, flax_cls in ((PatchConv, nn.Conv), (PatchConvTranspose, nn.ConvTranspose)):
        flax_mod = flax_cls(5, (2,) * dims, strides=(2,) * dims, padding="SAME")
        ref_params = flax_mod.init(_key(), x)
        mod = ours(5, dims)
        assert jax.tree.map(jnp.shape, mod.init(_key(), x)) == jax.tree.map(jnp.shape, ref_params)
        ref = flax_mod.apply(ref_params, x)
        np.testing.assert_allclose(mod.apply(ref_params, x), ref, rtol=1e-5, atol=1e-5)
    # Depth-first layout: same parameters (kept in (X, Y, Z) order), same numbers.
    if dims == 3:
        for cls in (PatchConv, PatchConvTranspose):
            p = cls(5, 3).init(_key(), x)
            zxy = cls(5, 3, layout="zxy").apply(p, jnp.moveaxis(x, 3, 1))
            np.testing.assert_allclose(jnp.moveaxis(zxy, 1, 3), cls(5, 3).apply(p, x), rtol=1e-5, atol=1e-5)


def test_haiku_init_is_an_unscaled_truncated_normal():
    w = haiku_init(_key(0), (3, 3, 3, 16, 32))
    fan_in = 3 * 3 * 3 * 16
    assert float(jnp.abs(w).max()) <= 2 / math.sqrt(fan_in)
    # std of N(0, 1) truncated to ±2 is 0.8796 (haiku does not rescale; VarianceScaling would).
    np.testing.assert_allclose(float(w.std()) * math.sqrt(fan_in), 0.8796, rtol=0.02)


# --- implementation choices give the same numbers -----------------------------------------------


def _value_and_grad(model: ReferenceUNet, params, image, mask, t):
    return jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply(p, image, mask, t) ** 2)))(params)


@pytest.fixture(scope="module")
def after_norm_grad(cond3d):
    """Loss and gradient of the "after_norm" network (t used) through plain XLA: the baseline."""
    params, (image, mask, t), _ = cond3d
    return _value_and_grad(_model(time_conditioning="after_norm"), params, image, mask, t)


def test_remat_gives_the_same_output_and_gradient(cond3d, after_norm_grad):
    params, (image, mask, t), _ = cond3d
    model = _model(remat=True, time_conditioning="after_norm")
    remat_params = jax.eval_shape(model.init, _key(), image, mask, t)
    assert jax.tree.map(lambda p: p.shape, remat_params) == jax.tree.map(jnp.shape, params)
    (v1, g1), (v2, g2) = after_norm_grad, _value_and_grad(model, params, image, mask, t)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", [pytest.param("onednn", marks=needs_onednn), "fold"])
def test_fast_conv_impls_match_xla(cond3d, after_norm_grad, impl):
    """oneDNN (xyz layout) and the pure-XLA fold (depth-first layout) agree with plain XLA."""
    params, (image, mask, t), out = cond3d
    ours = jax.jit(_model(conv_impl=impl).apply)(params, image, mask, t)
    np.testing.assert_allclose(ours, out, rtol=1e-4, atol=1e-4)
    v1, g1 = _value_and_grad(_model(conv_impl=impl, time_conditioning="after_norm"), params, image, mask, t)
    v2, g2 = after_norm_grad
    np.testing.assert_allclose(v1, v2, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(jnp.abs(b).max()) + 1e-6)


def test_bfloat16_compute_keeps_float32_parameters_and_logits(cond3d):
    """bfloat16 compute ("auto": the tiled/fold convolutions, depth-first, on CPU) stays close."""
    params, (image, mask, t), out = cond3d
    out16 = jax.jit(_model(dtype=jnp.bfloat16, conv_impl="auto").apply)(params, image, mask, t)
    assert out16.dtype == jnp.float32
    np.testing.assert_allclose(out16, out, atol=0.1 * float(jnp.abs(out).max()))


# --- parameter counts: exactly those of the haiku reference -------------------------------------

# Measured with the reference itself (ImgX-DiffSeg v0.1.0, dm-haiku 0.0.17, jax 0.10.2):
#   python3 -m venv /tmp/hkenv && /tmp/hkenv/bin/pip install dm-haiku jax
#   mkdir /tmp/imgx010 && git -C <ImgX-DiffSeg mirror> archive v0.1.0 imgx | tar -x -C /tmp/imgx010
#   PYTHONPATH=/tmp/imgx010 /tmp/hkenv/bin/python count_haiku.py
# where count_haiku.py builds each model as imgx/exp/model.py does (in_channels 1, or 1 + C for
# the *_time models; out_channels C; num_channels as below), and counts the leaves of
# hk.transform(f).init(key, image (1, *in_shape, in_channels), t (1,)); counts were checked
# identical at in_shape (32, 32, 16) and (16, 48, 32), with remat on and off.
HAIKU_COUNTS = {
    # (classes, in_shape, channels): {reference model: parameters}
    (9, (256, 256, 48), (32, 64, 128, 256)): {  # prostate
        "unet3d": 6681993, "unet3d_time": 6788841, "unet3d_slice": 2347849, "unet3d_slice_time": 2449513,
    },
    (16, (192, 128, 128), (32, 64, 128, 256)): {  # AMOS
        "unet3d": 6682224, "unet3d_time": 6795120, "unet3d_slice": 2348080, "unet3d_slice_time": 2451760,
    },
    (9, (32, 32, 16), (8, 16, 32, 64)): {  # demo widths
        "unet3d": 418665, "unet3d_time": 426945, "unet3d_slice": 147673, "unet3d_slice_time": 154657,
    },
    (16, (32, 32, 16), (8, 16, 32, 64)): {
        "unet3d": 418728, "unet3d_time": 428520, "unet3d_slice": 147736, "unet3d_slice_time": 155224,
    },
}  # fmt: skip


@pytest.mark.parametrize("classes,in_shape,channels", list(HAIKU_COUNTS))
def test_parameter_counts_equal_the_reference(classes, in_shape, channels):
    image = jax.ShapeDtypeStruct((1, *in_shape, 1), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, *in_shape, classes), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    for name, expected in HAIKU_COUNTS[(classes, in_shape, channels)].items():
        model = ReferenceUNet(
            classes, channels, spatial_dims=2 if "slice" in name else 3, conditional=name.endswith("_time"),
            conv_impl="xla",
        )  # fmt: skip
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), image, mask, t)
        assert _num_params(params) == expected, name
