"""The train step: micro-batches give the batch's update, per-sample randomness, skipped updates,
and the host-side feeder (volumes from (seed, step), prefetched, resume-safe)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy.testing import assert_allclose

from diffseg.config import resolve_run_config
from diffseg.errors import ConfigError
from diffseg.parallel import batch_sharding, data_mesh
from diffseg.runconfig import RunConfig
from diffseg.runs import build_model
from diffseg.train.feed import BatchFeeder, batch_indices
from diffseg.train.step import build_optimizer, check_micro_batch, init_state, make_train_step

SHAPE = (16, 16, 8)
TINY = {
    "datasets": {"toy": {"source": "phantom"}},
    "training": {
        "model": {"channels": [4, 8]},
        "train": {
            "steps": 3,
            "batch_size": 8,
            "augment": {"enabled": True, "max_rotation": 0.1, "max_translation": 2, "max_scaling": 0.1},
        },
        "optim": {"warmup_steps": 1, "learning_rate": 3e-3, "init_learning_rate": 1e-3},
    },
}


def _volumes(n: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (n, *SHAPE)).astype(np.uint8)
    labels[:, :4] = 0
    images = (rng.normal(0, 0.3, labels.shape) + labels).astype(np.float32)
    return images, labels


def _train(run: str, micro_batch, steps: int = 3, poison: int | None = None, sgd: bool = False):
    cfg = resolve_run_config(TINY, "toy", run)
    model = build_model(cfg, 3)
    # AdamW divides each gradient by its own size: parameters whose gradient is zero but for
    # rounding (biases before an InstanceNorm, the reference's cancelled time conditioning) move
    # by rounding noise. Plain SGD compares the accumulated gradients themselves.
    tx = optax.sgd(0.5) if sgd else build_optimizer(cfg)[0]
    mesh = data_mesh()
    state = init_state(model, tx, SHAPE, jax.random.key(0))
    step = make_train_step(model, tx, cfg, 3, mesh, micro_batch)
    images, labels = _volumes()
    losses, history = [], []
    for s in range(steps):
        idx = batch_indices(7, s, 8, len(images))
        batch = images[idx]
        if s == poison:
            batch = batch.copy()
            batch[3, 0, 0, 0] = np.nan
        state, loss = step(state, jnp.asarray(batch), jnp.asarray(labels[idx]), jax.random.key(1))
        losses.append(float(loss))
        history.append(jax.tree.map(np.asarray, state["params"]))
    _train.history = history  # parameters after each step (the state itself is donated)
    return state, np.array(losses)


@pytest.mark.parametrize("run", ["3d-diff"])
def test_micro_batches_give_the_same_parameters(run):
    """1 pass of 8, 2 of 4 and 8 of 1 volumes: the same update (float32, recycling, augmentation)."""
    whole, loss_whole = _train(run, None, sgd=True)
    for m in (4, 1):
        state, losses = _train(run, m, sgd=True)
        assert_allclose(losses, loss_whole, rtol=1e-5)
        jax.tree.map(
            lambda a, b: assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5),
            state["params"],
            whole["params"],
        )
        assert int(state["step"]) == 3 and int(state["skipped"]) == 0


def test_a_non_finite_update_is_skipped_and_counted():
    state, losses = _train("3d-seg", 4, steps=3, poison=2)
    after_two = _train.history[1]
    assert not np.isfinite(losses[2]) and np.isfinite(losses[:2]).all()
    assert int(state["step"]) == 3 and int(state["skipped"]) == 1
    # the poisoned step changed nothing: the parameters are those after the 2 clean steps
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state["params"], after_two)


def test_micro_batch_must_divide_the_per_device_batch():
    cfg = resolve_run_config(TINY, "toy", "3d-diff")
    assert check_micro_batch(cfg, 1) == 8 and check_micro_batch(cfg, 2, 2) == 2
    for bad in (3, 0, "two", True):
        with pytest.raises(ConfigError, match="train.micro_batch"):
            check_micro_batch(cfg, 1, bad)
    with pytest.raises(ConfigError, match="auto"):
        check_micro_batch(RunConfig.from_dict(cfg).replace("train.micro_batch", "auto"), 1)


def test_feeder_draws_from_seed_and_step_and_resumes():
    images, labels = _volumes(6)
    assert_allclose(batch_indices(3, 5, 8, 6), batch_indices(3, 5, 8, 6))
    assert not np.array_equal(batch_indices(3, 5, 8, 6), batch_indices(3, 6, 8, 6))
    sharding = batch_sharding(data_mesh())
    with BatchFeeder(images, labels, 4, 3, sharding, 0, 5) as feeder:
        full = [(np.asarray(a), np.asarray(b)) for a, b in feeder]
    assert len(full) == 5
    resumed = BatchFeeder(images, labels, 4, 3, sharding, 2, 5)
    first_image, first_label = next(iter(resumed))
    assert first_image.sharding == sharding and first_label.dtype == np.uint8
    idx = batch_indices(3, 2, 4, 6)
    np.testing.assert_array_equal(np.asarray(first_image), images[idx])
    np.testing.assert_array_equal(np.asarray(first_image), full[2][0])
    resumed.close()


def test_epoch_sampling_takes_each_volume_once_per_epoch():
    """The default ("epoch", as the reference's repeat/shuffle/batch): 10 steps of 3 over 6
    volumes are 5 epochs, each a permutation of the 6, in a different order per epoch; steps
    straddle epoch boundaries. "uniform" draws with replacement."""
    drawn = np.concatenate([batch_indices(2, s, 3, 6) for s in range(10)])
    epochs = drawn.reshape(5, 6)
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(6))
    assert len({tuple(e) for e in epochs}) > 1
    # batches of 4 over 6 volumes: step 1 takes the last 2 of epoch 0 and the first 2 of epoch 1
    fours = np.concatenate([batch_indices(2, s, 4, 6) for s in range(3)])
    for e in fours.reshape(2, 6):
        np.testing.assert_array_equal(np.sort(e), np.arange(6))
    uniform = np.concatenate([batch_indices(2, s, 3, 6, "uniform") for s in range(10)])
    assert any(len(set(u)) < 6 for u in uniform.reshape(5, 6))  # repeats within 6 draws
    with pytest.raises(ValueError, match="train.sampling"):
        batch_indices(2, 0, 3, 6, "shuffle")


def test_feeder_raises_the_threads_error_in_the_caller():
    class Broken(np.ndarray):
        def __getitem__(self, item):
            raise OSError("disk gone")

    images, labels = _volumes(2)
    feeder = BatchFeeder(images.view(Broken), labels, 2, 0, None, 0, 3)
    with pytest.raises(OSError, match="disk gone"):
        next(iter(feeder))


def test_two_devices_with_micro_batches_give_the_one_device_update():
    """2 devices × 2 volumes in one pass, 2 devices × 2 passes of 1, 1 device × 4: one update."""
    script = textwrap.dedent(
        """
        import jax, numpy as np, optax
        from jax.sharding import Mesh
        from tests.test_train_step import SHAPE, TINY, _volumes
        from diffseg.config import resolve_run_config
        from diffseg.parallel import batch_sharding
        from diffseg.runs import build_model
        from diffseg.train.feed import batch_indices
        from diffseg.train.step import init_state, make_train_step
        assert len(jax.devices()) == 2
        cfg = resolve_run_config(TINY, "toy", "3d-seg", {"train.batch_size": 4})
        model, tx = build_model(cfg, 3), optax.sgd(0.5)
        images, labels = _volumes()
        out = []
        for devices, m in [(jax.devices()[:1], None), (jax.devices(), 1), (jax.devices(), None)]:
            mesh = Mesh(np.array(devices), ("data",))
            state = init_state(model, tx, SHAPE, jax.random.key(0))
            step = make_train_step(model, tx, cfg, 3, mesh, m)
            for s in range(2):
                idx = batch_indices(7, s, 4, len(images))
                batch = [jax.device_put(a[idx], batch_sharding(mesh)) for a in (images, labels)]
                state, _ = step(state, *batch, jax.random.key(1))
            out.append(state["params"])
        for other in out[1:]:
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), other, out[0])
        print("ok")
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout


def test_the_loop_logs_skipped_updates(tmp_path):
    """A training volume with a NaN: the steps that draw it are skipped, counted and logged."""
    import json

    import pandas as pd

    from diffseg.io import write_nifti
    from diffseg.train import train_run

    images, labels = _volumes(5)
    images[0, 0, 0, 0] = np.nan
    rows = []
    for i in range(5):
        write_nifti(tmp_path / "data" / "images" / f"c{i}.nii.gz", images[i], (1.0, 1.0, 2.0))
        write_nifti(tmp_path / "data" / "labels" / f"c{i}.nii.gz", labels[i], (1.0, 1.0, 2.0))
        rows.append((f"c{i}", "train" if i < 4 else "valid"))
    pd.DataFrame(rows, columns=["uid", "split"]).to_csv(tmp_path / "data" / "split.csv", index=False)
    info = {"name": "toy", "classes": ["background", "a", "b"], "num_classes": 3, "spacing": [1.0, 1.0, 2.0],
            "shape": list(SHAPE), "splits": {"train": 4, "valid": 1}}  # fmt: skip
    (tmp_path / "data" / "dataset.json").write_text(json.dumps(info))
    over = {"train.steps": 4, "train.batch_size": 2, "train.checkpoint_every": 4, "train.log_every": 1}
    train_run(resolve_run_config(TINY, "toy", "3d-seg", over), tmp_path / "data", tmp_path / "run")
    log = pd.read_csv(tmp_path / "run" / "train_log.csv")
    # which steps draw volume 0 is fixed by (seed, step): the feeder's own indices
    drew = [0 in batch_indices(0, s, 2, 4) for s in range(4)]
    assert list(log["skipped"]) == list(np.cumsum(drew)) and any(drew)
    assert np.isfinite(log["loss"][~np.array(drew)]).all()


def test_bf16_runs_build_image_mask_and_noise_in_bf16_as_the_reference(monkeypatch):
    """``train.bf16_inputs: reference``: the image is bf16 from before augmentation on, and the mask
    and noise the network sees are built in bf16; ``float32`` keeps all three float32."""
    import diffseg.train.step as step_module
    from diffseg.train.step import training_input_dtype

    seen = {}
    real = step_module.noisy_input

    def spy(apply_fn, params, diffusion, image, x0, *rest):
        x_t, noise = real(apply_fn, params, diffusion, image, x0, *rest)
        seen.update(image=image.dtype, x0=x0.dtype, noise=noise.dtype)
        return x_t, noise

    monkeypatch.setattr(step_module, "noisy_input", spy)
    images, labels = _volumes()
    for mode, dtype in (("reference", jnp.bfloat16), ("float32", jnp.float32)):
        over = {"train.bf16": True, "train.bf16_inputs": mode, "train.batch_size": 2}
        cfg = resolve_run_config(TINY, "toy", "3d-diff-norecycle", over)
        assert training_input_dtype(cfg) == dtype
        model = build_model(cfg, 3)
        tx = build_optimizer(cfg)[0]
        step = make_train_step(model, tx, cfg, 3, data_mesh())
        state, loss = step(init_state(model, tx, SHAPE, jax.random.key(0)), images[:2], labels[:2],
                           jax.random.key(1))  # fmt: skip
        assert np.isfinite(float(loss))
        assert seen == {"image": dtype, "x0": dtype, "noise": dtype}, (mode, seen)
    cfg = resolve_run_config(TINY, "toy", "3d-diff", {"train.bf16_inputs": "reference"})
    assert training_input_dtype(cfg) == jnp.float32  # a float32 run is untouched
