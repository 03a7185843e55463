"""The train-step benchmark times the same loss in both frameworks (needs the benchmark extra)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_step  # noqa: E402


def test_torch_loss_equals_training_loss():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 6, 5, 4, 4)).astype(np.float32)  # (B, *S, C)
    labels = rng.integers(0, 3, size=(2, 6, 5, 4))  # class 3 absent: left out of the Dice mean
    labels[1] = 0  # a sample with no foreground at all
    onehot = np.eye(4, dtype=np.float32)[labels]
    ours = float(train_step.jax_loss(jnp.asarray(logits), jnp.asarray(onehot)))
    perm = (0, 4, 1, 2, 3)
    theirs = float(
        train_step.torch_loss(
            torch.from_numpy(logits.transpose(perm).copy()), torch.from_numpy(onehot.transpose(perm).copy())
        )
    )
    np.testing.assert_allclose(theirs, ours, rtol=1e-5)
