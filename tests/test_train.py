"""Training: losses by hand, recycling's stop-gradient, learning, sharding, checkpoints and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose

from diffseg.config import resolve_run_config
from diffseg.diffusion import GaussianDiffusion, mask_to_x0
from diffseg.io import write_nifti
from diffseg.parallel import data_mesh
from diffseg.runs import build_model
from diffseg.train.feed import batch_indices
from diffseg.train.losses import cross_entropy, dice_loss, segmentation_loss
from diffseg.train.step import (
    build_optimizer,
    init_state,
    make_train_step,
    noisy_input,
)

TINY = {
    "datasets": {"toy": {"source": "phantom"}},
    "training": {
        "model": {"channels": [4, 8], "time_embed_dim": 16},
        "train": {
            "steps": 6,
            "batch_size": 2,
            "checkpoint_every": 3,
            "log_every": 1,
            "augment": {"enabled": False},
        },
        "optim": {
            "warmup_steps": 2,
            "learning_rate": 3e-3,
            "init_learning_rate": 1e-3,
            "end_learning_rate": 1e-3,
        },
    },
}


def toy_volumes(n: int = 4, shape=(16, 16, 8), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright box (class 1) and dark ball (class 2) at random places, plus noise: ``(n, *shape)``."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 0.3, (n, *shape)).astype(np.float32)
    labels = np.zeros((n, *shape), np.uint8)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    for i in range(n):
        x, y = rng.integers(2, 7, 2)
        labels[i, x : x + 6, y : y + 6, 2:6] = 1
        centre = np.array([rng.integers(10, 13), rng.integers(10, 13), 4])
        labels[i][np.linalg.norm(grid - centre, axis=-1) < 3] = 2
        images[i] += np.choose(labels[i], [0.0, 1.5, -1.5]).astype(np.float32)
    return images, labels


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    """A preprocessed dataset folder per the data stage's output contract (6 cases)."""
    return write_toy_data(tmp_path_factory.mktemp("toy"))


def write_toy_data(root: Path) -> Path:
    """Write 6 toy cases (4 train, 1 valid, 1 test) into ``root`` as the data stage would; returns it."""
    images, labels = toy_volumes(6)
    rows = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        uid = f"case{i}"
        write_nifti(root / "images" / f"{uid}.nii.gz", image, (1.0, 1.0, 2.0))
        write_nifti(root / "labels" / f"{uid}.nii.gz", label, (1.0, 1.0, 2.0))
        rows.append((uid, "train" if i < 4 else "valid" if i == 4 else "test"))
    pd.DataFrame(rows, columns=["uid", "split"]).to_csv(root / "split.csv", index=False)
    info = {
        "name": "toy",
        "source": "phantom",
        "modality": "MR",
        "classes": ["background", "box", "ball"],
        "num_classes": 3,
        "spacing": [1.0, 1.0, 2.0],
        "shape": [16, 16, 8],
        "num_cases": 6,
        "splits": {"train": 4, "valid": 1, "test": 1},
    }
    (root / "dataset.json").write_text(json.dumps(info))
    return root


# -- losses ---------------------------------------------------------------------------------


def test_dice_loss_hand_computed():
    # 4 voxels, 3 classes; softmax of these logits is exactly the one-hot-ish probabilities below.
    probs = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    logits = jnp.log(jnp.asarray(probs) + 1e-30)[None]  # (1, 4, 3)
    onehot = jnp.asarray([[0, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], jnp.float32)[None]
    # class 1: 2*(0.5+1) / (1.5 + 2) = 6/7; class 2: 2*1 / (1 + 1) = 1
    expected = 1.0 - (6 / 7 + 1.0) / 2
    assert_allclose(float(dice_loss(logits, onehot)), expected, rtol=1e-5)


def test_dice_loss_ignores_classes_absent_from_the_label():
    logits = jnp.asarray([[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]])  # predicts class 1 on voxel 2
    onehot = jnp.asarray([[[1.0, 0, 0], [0, 1.0, 0]]])  # class 2 absent: not in the mean
    p = jax.nn.softmax(logits, -1)[0, :, 1]
    expected = 1.0 - 2 * p[1] / (p.sum() + 1.0)
    assert_allclose(float(dice_loss(logits, onehot)), float(expected), atol=1e-6)


def test_dice_loss_per_sample_or_pooled_over_the_batch():
    """Two samples: one with classes 1 and 2 present (losses a, b), one with class 1 only (c).
    per_sample = ((a + b) / 2 + c) / 2 (the reference, one sample per core); pooled = (a + b + c) / 3."""
    probs = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    first = jnp.log(jnp.asarray(probs) + 1e-30)
    onehot1 = jnp.asarray([[0, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], jnp.float32)
    onehot2 = jnp.asarray([[0, 1, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]], jnp.float32)
    logits, onehot = jnp.stack([first, first]), jnp.stack([onehot1, onehot2])
    a, b = 1.0 - 6 / 7, 0.0
    c = 1.0 - 2 * 0.5 / (1.5 + 1)  # sample 2, class 1: p = (0.5, 1, 0, 0), g = (1, 0, 0, 0)
    assert_allclose(float(dice_loss(logits, onehot)), ((a + b) / 2 + c) / 2, rtol=1e-5)
    assert_allclose(float(dice_loss(logits, onehot, mean="pooled")), (a + b + c) / 3, rtol=1e-5)
    cfg = {"cross_entropy": False, "dice": True, "dice_mean": "pooled"}
    assert_allclose(float(segmentation_loss(logits, onehot, cfg)), (a + b + c) / 3, rtol=1e-5)


def test_cross_entropy_and_combination():
    logits = jnp.asarray([[[2.0, 0.0], [0.0, 1.0]]])
    onehot = jnp.asarray([[[1.0, 0.0], [1.0, 0.0]]])
    ce = -(np.log(np.exp(2) / (np.exp(2) + 1)) + np.log(1 / (1 + np.e))) / 2
    assert_allclose(float(cross_entropy(logits, onehot)), ce, rtol=1e-6)
    both = segmentation_loss(logits, onehot, {"cross_entropy": True, "dice": True})
    assert_allclose(float(both), ce + float(dice_loss(logits, onehot)), rtol=1e-6)


# -- recycling ------------------------------------------------------------------------------


def test_recycling_passes_no_gradient_through_the_first_pass():
    diffusion = GaussianDiffusion.linear(1000, 5)
    image = jnp.ones((2, 4, 4, 1))
    x0 = mask_to_x0(jnp.zeros((2, 4, 4), jnp.int32), 3)
    k = jnp.array([0, 2])

    def apply_fn(params, image, x_t, t):  # a "network" whose output depends on its params
        return params["w"] * x_t + params["b"]

    params = {"w": jnp.array(0.7), "b": jnp.array(0.1)}
    key = jax.random.key(0)
    grads = jax.grad(
        lambda p: jnp.sum(noisy_input(apply_fn, p, diffusion, image, x0, k, key, "x0", True)[0])
    )(params)
    assert float(grads["w"]) == 0.0 and float(grads["b"]) == 0.0
    # and the first pass does change the input (recycling is not a no-op)
    plain, _ = noisy_input(apply_fn, params, diffusion, image, x0, k, key, "x0", False)
    recycled, _ = noisy_input(apply_fn, params, diffusion, image, x0, k, key, "x0", True)
    assert not np.allclose(plain, recycled)


# -- training -------------------------------------------------------------------------------


def _losses(run: str, steps: int, mesh=None, **train) -> np.ndarray:
    images, labels = toy_volumes(4)
    cfg = resolve_run_config(
        TINY, "toy", run, {"train.steps": steps, **{f"train.{k}": v for k, v in train.items()}}
    )
    model = build_model(cfg, 3)
    tx, _ = build_optimizer(cfg)
    mesh = mesh or data_mesh()
    state = init_state(model, tx, images.shape[1:], jax.random.key(0))
    step = make_train_step(model, tx, cfg, 3, mesh)
    out = []
    for s in range(steps):
        index = batch_indices(0, s, int(cfg["train"]["batch_size"]), len(images))  # as the loop's feeder
        state, loss = step(state, jnp.asarray(images[index]), jnp.asarray(labels[index]), jax.random.key(1))
        out.append(float(loss))
    return np.array(out)


@pytest.mark.parametrize("run", ["3d-diff", "2d-diff-noise"])
def test_short_training_lowers_the_loss(run):
    losses = _losses(run, 40, batch_size=4)
    assert losses[-8:].mean() < 0.8 * losses[:8].mean(), losses


def test_two_devices_give_the_same_loss_as_one():
    script = textwrap.dedent(
        """
        import jax, numpy as np
        from jax.sharding import Mesh
        from tests.test_train import _losses
        assert len(jax.devices()) == 2
        one = _losses("3d-diff", 3, Mesh(np.array(jax.devices()[:1]), ("data",)))
        two = _losses("3d-diff", 3, Mesh(np.array(jax.devices()), ("data",)))
        np.testing.assert_allclose(one, two, rtol=2e-4)
        print("ok", one, two)
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout


# -- the loop: logs, checkpoints, resume ----------------------------------------------------


def _run_cfg(run: str = "3d-diff") -> dict:
    return resolve_run_config(TINY, "toy", run)


def test_train_run_writes_the_output_contract(toy_data, tmp_path):
    from diffseg.runs import load_trained
    from diffseg.train import train_run

    best = train_run(_run_cfg(), toy_data, tmp_path)
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert list(log["step"]) == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "seconds", "steps_per_s", "session"} <= set(log.columns)
    valid = pd.read_csv(tmp_path / "valid.csv")
    assert list(valid["step"]) == [3, 6] and valid["mean_dice"].between(0, 1).all()
    assert json.loads((tmp_path / "best.json").read_text()) == best
    assert {"step", "mean_dice", "config_hash", "data_fingerprint", "run_id"} <= set(best)
    assert best["mean_dice"] == valid["mean_dice"].max()
    model, params, cfg, info = load_trained(tmp_path)
    assert info["num_classes"] == 3 and cfg.run == "3d-diff"
    assert jax.tree.leaves(params)


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(toy_data, tmp_path, monkeypatch):
    import diffseg.train.loop as loop
    from diffseg.runs import RunCheckpoints

    def latest_params(run_dir):
        ckpt = RunCheckpoints(run_dir)
        model = build_model(_run_cfg(), 3)
        tx, _ = build_optimizer(_run_cfg())
        like = init_state(model, tx, (16, 16, 8), jax.random.key(0))
        state, logs = ckpt.restore(jax.tree.map(np.asarray, like))
        ckpt.close()
        return state["params"], logs

    loop.train_run(_run_cfg(), toy_data, tmp_path / "whole")

    real = loop.make_train_step

    def killed_at_step_5(*args, **kwargs):
        step_fn, calls = real(*args, **kwargs), {"n": 0}

        def wrapped(state, *rest):
            if int(state["step"]) == 4:  # after the checkpoint at step 3, before the one at 6
                raise KeyboardInterrupt("killed")
            calls["n"] += 1
            return step_fn(state, *rest)

        return wrapped

    monkeypatch.setattr(loop, "make_train_step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        loop.train_run(_run_cfg(), toy_data, tmp_path / "killed")
    calls_made = {"n": 0}

    def counted(*args, **kwargs):
        step_fn = real(*args, **kwargs)

        def wrapped(*rest):
            calls_made["n"] += 1
            return step_fn(*rest)

        return wrapped

    monkeypatch.setattr(loop, "make_train_step", counted)
    loop.train_run(_run_cfg(), toy_data, tmp_path / "killed")

    whole, whole_logs = latest_params(tmp_path / "whole")
    resumed, resumed_logs = latest_params(tmp_path / "killed")
    jax.tree.map(
        lambda a, b: assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7), whole, resumed
    )
    assert [row[0] for row in resumed_logs["train"]] == [1, 2, 3, 4, 5, 6]
    # The second process ran steps 4-6 only (a silent restart from 0 would give the same parameters).
    assert [row[5] for row in resumed_logs["train"]] == [0, 0, 0, 1, 1, 1]
    assert calls_made["n"] == 3
    assert_allclose([r[1] for r in resumed_logs["train"]], [r[1] for r in whole_logs["train"]], rtol=1e-6)


def test_learning_rate_decays_to_decay_steps_then_holds():
    """The reference's schedule: warm-up 100, cosine to 1e-6 at step 10 000, held to 12 500."""
    cfg = resolve_run_config({"datasets": {"toy": {"source": "phantom"}}}, "toy", "3d-diff")
    _, schedule = build_optimizer(cfg)
    assert_allclose(float(schedule(0)), 1e-5, rtol=1e-6)
    assert_allclose(float(schedule(100)), 1e-4, rtol=1e-6)
    mid = 100 + (10000 - 100) / 2  # half-way through the cosine: the mean of peak and end
    assert_allclose(float(schedule(mid)), (1e-4 + 1e-6) / 2, rtol=1e-4)
    for step in (10000, 11000, 12499):
        assert_allclose(float(schedule(step)), 1e-6, rtol=1e-6)
    whole = resolve_run_config(
        {"datasets": {"toy": {"source": "phantom"}}}, "toy", "3d-diff", {"optim.decay_steps": None}
    )
    _, schedule = build_optimizer(whole)
    assert float(schedule(11000)) > 1e-6  # decay over all 12 500 steps: not yet at the end
