"""The train-step benchmark: the same loss in both frameworks, its timing loop, a whole tiny run.

The PyTorch tests need the ``benchmark`` extra and are skipped without it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_step  # noqa: E402

TINY = "--shape 8 8 4 --batch 2 --channels 4 8 --classes 3 --recycle".split()


def test_torch_loss_equals_training_loss():
    torch = pytest.importorskip("torch")
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


def _fake_factories(events: list[str]):
    def factory(name: str):
        def build() -> train_step.Runner:
            events.append(f"build {name}")
            return train_step.Runner(
                run=lambda: events.append(f"run {name}"),
                parameters=len(name),
                peak_bytes=lambda: 7,
                close=lambda: events.append(f"close {name}"),
            )

        return build

    return {"a": factory("a"), "bb": factory("bb")}


def test_time_runners_interleaves_rounds():
    events: list[str] = []
    factories = _fake_factories(events)
    times, counts, peaks = train_step.time_runners(factories, warmup=1, repeats=2, interleave=True)
    assert events == [
        "build a", "build bb",
        "run a", "run bb",  # warm-up
        "run a", "run bb", "run a", "run bb",  # two interleaved rounds
        "close a", "close bb",
    ]  # fmt: skip
    assert [len(v) for v in times.values()] == [2, 2]
    assert counts == {"a": 1, "bb": 2} and peaks == {"a": 7, "bb": 7}


def test_time_runners_one_after_the_other_closes_before_the_next_is_built():
    """On a GPU each model must have the memory to itself: close (free) before building the next."""
    events: list[str] = []
    times, _, _ = train_step.time_runners(_fake_factories(events), warmup=0, repeats=2, interleave=False)
    assert events == ["build a", "run a", "run a", "close a", "build bb", "run bb", "run bb", "close bb"]
    assert [len(v) for v in times.values()] == [2, 2]


def test_peak_tflops():
    assert train_step.peak_tflops("NVIDIA H100 80GB HBM3", True, None) == 989.4
    assert train_step.peak_tflops("NVIDIA H100 PCIe", True, None) == 756.0
    assert train_step.peak_tflops("NVIDIA H100 80GB HBM3", False, None) is None  # float32: not tabled
    assert train_step.peak_tflops("cpu", True, 2.5) == 2.5


def test_tiny_run_with_recycling_writes_its_json(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "step.json"
    argv = [*TINY, "--repeats", "1", "--warmup", "0", "--skip-xla", "--torch-channels-last"]
    assert train_step.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["recycle"] is True
    assert set(result["seconds_per_step"]) == {"torch", "torch_cl", "jax_fast"}
    assert len(set(result["parameters"].values())) == 1  # the twin has the same parameters
    assert result["flops_per_step"] > 0


def test_compile_only_writes_the_plan_without_running(tmp_path):
    out = tmp_path / "plan.json"
    assert train_step.main([*TINY, "--compile-only", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["recycle"] is True and "seconds_per_step" not in result
    assert result["plan"]["flops"] > 0 and result["plan"]["temp_bytes"] > 0


def test_without_pytorch_the_error_says_what_to_do(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(SystemExit) as stop:
        train_step.main([*TINY, "--repeats", "1", "--warmup", "0"])
    assert stop.value.code == 2
    assert "--skip-torch" in capsys.readouterr().err
