"""Sliding-window inference: windows, Gaussian blending, one window as before, batch-independence."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from diffseg.config import resolve_run_config
from diffseg.diffusion import GaussianDiffusion
from diffseg.evaluate import inference
from diffseg.evaluate.inference import (
    Segmenter,
    gaussian_weight,
    make_logits_fn,
    vote_and_entropy,
    window_starts,
)
from diffseg.runs import build_model, init_params

CONFIG = {
    "datasets": {"toy": {"source": "phantom"}},
    "training": {"model": {"channels": [4, 8]}, "train": {"augment": {"enabled": False}}},
}


def run_config(run: str, **evaluate) -> dict:
    cfg = resolve_run_config(CONFIG, "toy", run)
    cfg["evaluate"].update(evaluate)
    return cfg


class PerVoxel:
    """A translation-equivariant stand-in for a network: logits are a function of each voxel alone."""

    num_classes = 3

    def apply(self, params, image, x_t=None, t=None):
        w = jnp.asarray([-2.0, 0.5, 3.0])
        logits = jnp.sin(image * w + params["b"]) * 2.0 + image**2 * w
        if x_t is not None:  # diffusion: depends on the noisy mask too (still per voxel)
            logits = logits + 0.3 * x_t
        return logits.astype(jnp.float32)


PARAMS = {"b": jnp.asarray([0.1, -0.4, 0.2])}


def test_window_starts():
    assert window_starts(16, 16, 0.5) == [0]
    assert window_starts(10, 16, 0.5) == [0]
    assert window_starts(32, 16, 0.5) == [0, 8, 16]
    assert window_starts(32, 16, 0.0) == [0, 16]
    for size, window, overlap in [(50, 16, 0.5), (17, 16, 0.5), (100, 48, 0.25), (129, 64, 0.5)]:
        starts = window_starts(size, window, overlap)
        assert starts[0] == 0 and starts[-1] == size - window  # covered to both ends
        assert max(np.diff(starts)) <= window * (1 - overlap)  # at least the overlap asked for
        assert starts == sorted(set(starts))


def test_gaussian_weight():
    w = gaussian_weight((16, 12, 8))
    assert w.shape == (16, 12, 8) and w.dtype == np.float32 and (w > 0).all()
    assert_allclose(w.max(), 1.0)
    assert_allclose(w, w[::-1, ::-1, ::-1], rtol=1e-6)  # symmetric about the centre
    # sigma = 1/8 of the window: one sigma (2 voxels) from the centre along X, exp(-1/2)
    line = gaussian_weight((16,))
    x = np.arange(16) - 7.5
    assert_allclose(line, np.exp(-0.5 * (x / 2.0) ** 2) / np.exp(-0.5 * (0.5 / 2.0) ** 2), rtol=1e-6)


@pytest.mark.parametrize("shape", [(40, 29, 19), (12, 30, 8), (5, 7, 3)])
def test_blended_windows_reproduce_the_whole_volume(shape):
    """A per-voxel model: every window sees the same values as the whole volume does, so the
    Gaussian-weighted blend of windows must give the whole-volume probabilities back."""
    cfg = run_config("3d-seg", batch_size=3)
    volume = np.random.default_rng(0).normal(0, 1, shape).astype(np.float32)
    whole = Segmenter(PerVoxel(), PARAMS, cfg).probabilities(volume, jax.random.key(0))
    windowed = Segmenter(PerVoxel(), PARAMS, cfg, window=(12, 10, 8), overlap=0.5)
    probs = windowed.probabilities(volume, jax.random.key(0))
    assert probs.shape == (*shape, 3) and probs.dtype == np.float32
    assert_allclose(probs, whole, atol=1e-5)
    assert_array_equal(windowed.segment(volume, jax.random.key(0)), np.argmax(whole, axis=-1))


def test_windows_are_batched_and_counted(monkeypatch):
    """A scan several windows large: ceil(windows / batch) calls; a training-shape volume: one."""
    cfg = run_config("3d-seg", batch_size=4)
    seg = Segmenter(PerVoxel(), PARAMS, cfg, window=(12, 10, 8), overlap=0.5)
    calls = []
    real = seg._logits
    seg._logits = lambda params, batch, keys: calls.append(batch.shape) or real(params, batch, keys)
    volume = np.zeros((40, 29, 19), np.float32)
    seg.probabilities(volume, jax.random.key(0))
    windows = np.prod([len(window_starts(n, w, 0.5)) for n, w in zip((40, 29, 19), (12, 10, 8), strict=True)])
    assert windows == 6 * 5 * 4
    assert calls == [(4, 12, 10, 8, 1)] * -(-windows // 4)
    calls.clear()
    seg.probabilities(np.zeros((12, 10, 8), np.float32), jax.random.key(0))  # validation's case
    assert calls == [(4, 12, 10, 8, 1)]


def test_diffusion_windows_have_their_own_keys():
    """Each window is sampled with its own key: the result does not depend on the batch size,
    is deterministic, and windows do not share their noise."""
    cfg = run_config("3d-diff")
    volume = np.random.default_rng(1).normal(0, 1, (20, 15, 10)).astype(np.float32)
    key = jax.random.key(3)
    one = Segmenter(PerVoxel(), PARAMS, cfg, batch_size=1, window=(12, 10, 8))
    five = Segmenter(PerVoxel(), PARAMS, cfg, batch_size=5, window=(12, 10, 8))
    probs = five.probabilities(volume, key)
    assert_allclose(one.probabilities(volume, key), probs, atol=1e-6)
    assert_array_equal(five.probabilities(volume, key), probs)
    assert np.abs(five.probabilities(volume, jax.random.key(4)) - probs).max() > 1e-3
    # Two windows of the same content get different noise: a volume made of two equal halves
    # along X, each one window, does not give two equal halves.
    half = volume[:12, :10, :8]
    one.overlap = 0.0
    twice = one.probabilities(np.concatenate([half, half], axis=0), key)
    assert np.abs(twice[:12] - twice[12:]).max() > 1e-3


@pytest.mark.parametrize("run", ["3d-diff", "3d-diff-noise"])
def test_one_window_is_exactly_the_whole_volume_pass(run):
    """A volume of exactly the window's shape: the same bits as the whole-volume pass (one call of
    the run's sampler, ``GaussianDiffusion.sample``, on a padded batch, noise from the case's
    key), for a real tiny U-Net predicting x0 or the noise: the windows' own sampling loop ends
    in the same mask logits as ``sample``."""
    cfg = run_config(run, batch_size=2)
    cfg["model"]["channels"] = [4]  # a one-level reference U-Net: quick to compile
    model = build_model(cfg, 3)
    shape = (8, 8, 4)
    params = init_params(model, shape, jax.random.key(0))
    volume = np.random.default_rng(2).normal(0, 1, shape).astype(np.float32)
    key = jax.random.key(7)
    batch = np.zeros((2, *shape, 1), np.float32)
    batch[0, ..., 0] = volume
    before = np.asarray(jax.nn.softmax(jax.jit(make_logits_fn(model, cfg))(params, batch, key)[0], axis=-1))
    segmenter = Segmenter(model, params, cfg, window=shape)
    assert_array_equal(segmenter.probabilities(volume, key), before)
    segmenter.window = None  # the whole volume, as before windows (the same compiled program)
    assert_array_equal(segmenter.probabilities(volume, key), before)


class FixedX0:
    """A per-voxel stand-in for a noise-predicting network whose x0_hat is fixed: the image holds a
    code per voxel, and the predicted noise is ``eps_from_x0(x_t, k, X[code])`` at every step."""

    num_classes = 3
    # x0_hat above 1 in two classes (0 and 1; 1 and 2) and one inside [-1, 1]: argmax 0, 1, 2, 1
    X = np.array([[1.6, 1.3, -1.0], [1.2, 1.9, -1.0], [-1.0, 1.1, 1.4], [0.2, 0.5, -0.3]], np.float32)

    def __init__(self, cfg: dict):
        d = cfg["diffusion"]
        self.diffusion = GaussianDiffusion.from_config(d, num_steps=d["sample_steps"])

    def apply(self, params, image, x_t, t):
        k = jnp.searchsorted(jnp.asarray(self.diffusion.timesteps), t)  # t_k back to the position k
        x0 = jnp.asarray(self.X)[jnp.round(image[..., 0]).astype(jnp.int32)]
        return self.diffusion.eps_from_x0(x_t, k, x0)


def test_epsilon_windows_and_votes_segment_as_the_argmax_of_x0():
    """An epsilon run's mask is the argmax of the unclipped x0_hat, through one window, blended
    windows and the vote of several samples (validation, test, predict and the studies all
    segment so): classes above 1 are not tied."""
    cfg = run_config("3d-diff-noise", batch_size=2)
    model = FixedX0(cfg)
    codes = np.random.default_rng(3).integers(0, 4, (20, 15, 10))
    expected = np.argmax(FixedX0.X, -1)[codes]
    assert set(np.unique(expected)) == {0, 1, 2}
    volume = codes.astype(np.float32)
    one = Segmenter(model, {}, cfg, window=(20, 15, 10))
    windowed = Segmenter(model, {}, cfg, window=(12, 10, 8), overlap=0.5)
    for segmenter in (one, windowed):
        maps = np.stack([segmenter.segment(volume, jax.random.key(s)) for s in range(3)])
        for labels in maps:
            assert_array_equal(labels, expected)
        vote, entropy = vote_and_entropy(maps, 3)
        assert_array_equal(vote, expected)
        assert_array_equal(entropy, 0.0)
    # the blended probabilities: (x0_hat + 1) / 2 normalised, the class at -1 next to nothing
    p = np.clip((FixedX0.X + 1) / 2, 0, None)
    p /= p.sum(-1, keepdims=True)
    assert_allclose(windowed.probabilities(volume, jax.random.key(0)), p[codes], atol=1e-5)


def test_overlap_out_of_range():
    with pytest.raises(ValueError, match="overlap"):
        Segmenter(PerVoxel(), PARAMS, run_config("3d-seg"), window=(8, 8, 8), overlap=1.0)


def test_evaluate_window_overlap_is_the_default():
    cfg = run_config("3d-seg")
    assert inference.Segmenter(PerVoxel(), PARAMS, cfg).overlap == cfg["evaluate"]["window_overlap"] == 0.5


def test_windows_sharded_over_two_devices(tmp_path):
    """Windows batched over two devices: the same blend as on one device, windows keyed the same."""
    volume = np.random.default_rng(0).normal(0, 1, (20, 15, 10)).astype(np.float32)
    np.save(tmp_path / "volume.npy", volume)
    script = textwrap.dedent(
        f"""
        import jax, numpy as np
        from tests.test_sliding_window import PARAMS, PerVoxel, run_config
        from diffseg.evaluate.inference import Segmenter
        assert len(jax.devices()) == 2
        volume = np.load("{tmp_path}/volume.npy")
        out = {{}}
        for run in ("3d-seg", "3d-diff"):
            two = Segmenter(PerVoxel(), PARAMS, run_config(run), batch_size=3, window=(12, 10, 8))
            assert two.batch_size == 4  # rounded up to the devices
            out[run] = two.probabilities(volume, jax.random.key(5))
        np.savez("{tmp_path}/two.npz", **out)
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    two = np.load(tmp_path / "two.npz")
    assert len(jax.devices()) == 1
    for run in ("3d-seg", "3d-diff"):
        one = Segmenter(PerVoxel(), PARAMS, run_config(run), batch_size=1, window=(12, 10, 8))
        assert_allclose(two[run], one.probabilities(volume, jax.random.key(5)), atol=1e-6)
