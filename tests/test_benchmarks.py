"""The train-step benchmark: the same network and loss in both frameworks, its timing loop, whole tiny runs.

The PyTorch tests need the ``benchmark`` extra and are skipped without it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_step  # noqa: E402

TINY = "--shape 8 8 4 --batch 2 --channels 4 8 --classes 3 --recycle".split()


@pytest.mark.parametrize("arch", train_step.ARCHS)
@pytest.mark.parametrize("dims,shape", [(3, (8, 8, 4)), (2, (8, 8))])
def test_torch_twin_has_the_parameter_count_of_the_jax_network(arch, dims, shape):
    pytest.importorskip("torch")
    count = train_step.check_parameter_counts(arch, 3, [4, 8], dims, shape)
    assert count > 0


def test_torch_twin_of_the_default_network_has_its_parameter_count():
    """The benchmark's default: ReferenceUNet, 3D, channels 32–256, 9 classes (shapes only in JAX)."""
    pytest.importorskip("torch")
    assert train_step.check_parameter_counts("reference", 9, [32, 64, 128, 256], 3, (64, 64, 16)) == 6788841


def test_a_twin_with_other_parameters_is_refused(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(train_step, "build_torch", lambda *a: torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="parameters"):
        train_step.check_parameter_counts("reference", 3, [4, 8], 3, (8, 8, 4))


@pytest.mark.parametrize("dims,shape", [(3, (8, 8, 4)), (2, (8, 8))])
def test_reference_twin_computes_what_the_jax_network_computes(dims, shape):
    """Same layers, not just as many parameters: with the Flax parameters copied in, same logits."""
    torch = pytest.importorskip("torch")
    model = train_step.jax_network("reference", 3, [4, 8], dims, False, "auto")
    params = train_step.init_params(model, shape, jax.random.PRNGKey(0))
    net = train_step.build_torch("reference", 3, [4, 8], dims, 1 + 3)
    train_step.load_jax_params(net, params)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, *shape, 1)).astype(np.float32)
    mask = rng.standard_normal((2, *shape, 3)).astype(np.float32)
    t = np.array([3, 700], np.int32)
    ours = np.asarray(model.apply(params, jnp.asarray(image), jnp.asarray(mask), jnp.asarray(t)))
    perm = (0, dims + 1, *range(1, dims + 1))
    x = torch.from_numpy(np.concatenate([image, mask], -1).transpose(perm).copy())
    with torch.no_grad():
        theirs = net(x, torch.from_numpy(t)).numpy()
    theirs = theirs.transpose(0, *range(2, dims + 2), 1)
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * float(np.abs(ours).max()))


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
    """The default (reference) network, every model: both PyTorch layouts, JAX fast and plain XLA."""
    pytest.importorskip("torch")
    out = tmp_path / "step.json"
    argv = [*TINY, "--repeats", "1", "--warmup", "0", "--torch-channels-last"]
    assert train_step.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["recycle"] is True and result["config"]["arch"] == "reference"
    assert set(result["seconds_per_step"]) == {"torch", "torch_cl", "jax_fast", "jax_xla"}
    assert len(result["parameters"]) == 4 and len(set(result["parameters"].values())) == 1
    assert result["flops_per_step"] > 0
    assert set(result["isa"]) >= {"ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "torch_cpu_capability"}


def test_tiny_run_of_the_legacy_network(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "legacy.json"
    argv = [*TINY, "--arch", "legacy", "--repeats", "1", "--warmup", "0", "--skip-xla"]
    assert train_step.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["arch"] == "legacy"
    assert set(result["seconds_per_step"]) == {"torch", "jax_fast"}
    assert len(set(result["parameters"].values())) == 1


def test_compile_only_writes_the_plan_without_running(tmp_path):
    out = tmp_path / "plan.json"
    assert train_step.main([*TINY, "--compile-only", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["recycle"] is True and "seconds_per_step" not in result
    assert result["config"]["arch"] == "reference"
    assert result["plan"]["flops"] > 0 and result["plan"]["temp_bytes"] > 0


def test_without_pytorch_the_error_says_what_to_do(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(SystemExit) as stop:
        train_step.main([*TINY, "--repeats", "1", "--warmup", "0"])
    assert stop.value.code == 2
    assert "--skip-torch" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: every stage at tiny sizes on this CPU, unattended, exit 0."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHON": sys.executable}  # fmt: skip
    res = subprocess.run(["bash", str(root / "benchmarks/gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=1500, env=env, cwd=root)  # fmt: skip
    summary = (tmp_path / "summary.txt").read_text()
    assert res.returncode == 0, summary + res.stderr[-3000:]
    assert "0 stage(s) failed" in summary
    for stage in ("devices", "plan_3d-diff", "step_3d-diff", "plan_2d-diff", "step_2d-diff",
                  "pytorch_3d", "pytorch_2d", "workflow"):  # fmt: skip
        assert f"   {stage}: exit 0" in summary, summary
    step = json.loads((tmp_path / "step_3d-diff.json").read_text())
    assert step["seconds_per_step"] > 0 and step["plan_total_bytes"] > 0
    metrics = tmp_path / "workflow/results/runs/phantom_pelvis/3d-diff/test/metrics.csv"
    assert metrics.is_file() and (tmp_path / "workflow_train_log.csv").is_file()
    log = (tmp_path / "workflow/results/logs/train/phantom_pelvis/3d-diff.log").read_text()
    assert "backend cpu" in log  # each job says which backend and devices it got


def test_feed_rate_tiny_writes_a_positive_finite_rate(tmp_path):
    """benchmarks/feed_rate.py --tiny: phantoms prepared by `diffseg data`, training's feeder timed."""
    import math

    import feed_rate

    out = tmp_path / "feed.json"
    argv = ["--tiny", "--steps", "3", "--warmup", "1", "--repeats", "2", "--cases", "4",
            "--datasets", "phantom_pelvis", "--step-seconds", "0.01", "--stall-steps", "2",
            "--devices", "1",  # 8 would set XLA_FLAGS for the rest of this test process
            "--work", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    assert feed_rate.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "feed_rate" and result["paper_step_s"] == 3.168
    assert len(result["load_average_start"]) == 3 and result["devices"]
    pelvis = result["datasets"]["phantom_pelvis"]
    assert pelvis["shape"] == feed_rate.TINY_SHAPES["phantom_pelvis"] and pelvis["train_volumes"] == 4
    assert pelvis["batch_bytes"] == 8 * 32 * 32 * 16 * (4 + 1)
    assert set(pelvis["stages"]) == set(pelvis["cold"]) == {"sample", "read", "transfer", "total"}
    for part in (*pelvis["stages"].values(), pelvis["feed"]["seconds_per_batch"]):
        assert 0 <= part["min_s"] <= part["median_s"] <= part["max_s"] and math.isfinite(part["max_s"])
    rate = pelvis["feed"]["batches_per_s"]
    assert len(pelvis["feed"]["rounds"]) == 2 and all(math.isfinite(v) and v > 0 for v in rate.values())
    assert pelvis["stall"]["wait"]["n"] == 2
    # A second run reuses the prepared data.
    assert feed_rate.main(argv) == 0
