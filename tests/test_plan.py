"""``diffseg plan``: the resolved run, the parameter count, one step's consumption and XLA's plan."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import diffseg.model.slices as slices
from diffseg.cli import main
from diffseg.config import load_yaml, resolve_run_config
from diffseg.errors import ConfigError
from diffseg.parallel import data_mesh
from diffseg.runs import build_model, count_parameters, init_params
from diffseg.train.plan import parse_bytes, plan, xla_plan
from diffseg.train.step import build_optimizer, init_state, make_train_step

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "datasets": {"toy": {"source": "phantom", "anatomy": "pelvis", "shape": [16, 16, 8],
                         "split": {"train": 3, "valid": 1, "test": 1}}},
    "training": {"model": {"channels": [4, 8]}, "train": {"batch_size": 2, "steps": 3}},
}  # fmt: skip


def test_plan_counts_parameters_and_compiles_the_step_without_running_it():
    facts, text = plan(TINY, "toy", "3d-diff", device_memory=parse_bytes("1GB"))
    cfg = resolve_run_config(TINY, "toy", "3d-diff")
    model = build_model(cfg, 9)
    expected = count_parameters(init_params(model, (16, 16, 8), jax.random.key(0)))
    assert f"parameters: {expected}\n" in text and facts["parameters"] == expected
    assert "consumes: 2 volumes of 16×16×8" in text
    assert "t = [1, 251, 501, 751, 1001]" in text and "2 forward passes" in text
    xla = facts["xla"]
    assert xla["flops"] > 0 and xla["temp_bytes"] > 0
    # the step's 2 volumes (float32 images, uint8 labels) are arguments; the 3 training ones stay home
    assert xla["argument_bytes"] >= 2 * 16 * 16 * 8 * 5 and facts["host_data_bytes"] == 3 * 16 * 16 * 8 * 5
    assert facts["micro_batch"] == 2 and xla["passes"] == 1
    assert "chosen: micro-batch 2 volume(s) per device per pass, 1 pass(es) per step" in text
    # one budget rule: the card x JAX's allocator fraction x (1 - headroom), as training's auto uses
    assert facts["budget_bytes"] == int(10**9 * 0.9 * 0.9)
    assert "budget per device: 0.75 GiB = 0.93 GiB" in text
    assert facts["fits"] is True and text.endswith("fits 0.75 GiB: yes\n")
    assert "time conditioning: reference (the reference's placement" in text


def test_plan_2d_says_how_many_slices_one_step_feeds():
    facts, text = plan(TINY, "toy", "2d-seg", compile_step=False)
    assert facts["slices_per_step"] == 16 and "= 16 slices of 16×16" in text
    assert "xla" not in facts


def test_the_2d_step_runs_every_slice_of_each_volume(monkeypatch):
    """A 2D step on 2 volumes of depth 8 sends 16 slices through the network, in each pass."""
    seen = []
    real = slices.fold_depth

    def spy(x):
        seen.append(x.shape)
        return real(x)

    for module in ("diffseg.model.reference", "diffseg.model.unet"):
        monkeypatch.setattr(f"{module}.fold_depth", spy, raising=False)
    cfg = resolve_run_config(TINY, "toy", "2d-diff")
    model = build_model(cfg, 3)
    tx, _ = build_optimizer(cfg)
    state = init_state(model, tx, (16, 16, 8), jax.random.key(0))
    seen.clear()
    step = make_train_step(model, tx, cfg, 3, data_mesh())
    images = jnp.zeros((3, 16, 16, 8))
    labels = jnp.zeros((3, 16, 16, 8), jnp.uint8)
    step(state, images[:2], labels[:2], jax.random.key(1))
    assert seen, "the 2D network did not fold depth into its batch"
    # recycling: a forward pass without gradient, then the trained pass: 2 volumes -> 16 slices each
    assert {s[0] for s in seen} == {2} and all(s[1:4] == (16, 16, 8) for s in seen) and len(seen) >= 2


@pytest.mark.parametrize(
    ("dataset", "run", "count"),
    [  # the reference's counts (docs/FIDELITY.md, measured with dm-haiku on ImgX-DiffSeg v0.1.0)
        ("prostate_mr", "3d-diff", 6788841),
        ("prostate_mr", "2d-diff", 2449513),
        ("prostate_mr", "3d-seg", 6681993),
        ("prostate_mr", "2d-seg", 2347849),
        ("abdominal_ct", "3d-diff", 6795120),
        ("abdominal_ct", "2d-diff", 2451760),
        ("abdominal_ct", "3d-seg", 6682224),
        ("abdominal_ct", "2d-seg", 2348080),
    ],
)
def test_paper_config_plans_the_reference_parameter_counts(dataset, run, count, capsys):
    assert main(["plan", "--configfile", str(ROOT / "config/paper.yaml"), "--dataset", dataset,
                 "--run", run, "--no-compile"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"\nparameters: {count}\n" in out
    assert "arch: reference" in out and "bf16: true" in out


def test_plan_cli_writes_json_and_rejects_bad_sizes(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "plan.json"
    assert main(["plan", "--configfile", str(cfg), "--dataset", "toy", "--run", "3d-seg",
                 "--no-compile", "--json", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["volumes_per_step"] == 2
    assert load_yaml(cfg)["datasets"]["toy"]["shape"] == [16, 16, 8]
    assert main(["plan", "--configfile", str(cfg), "--dataset", "toy", "--run", "3d-seg",
                 "--device-memory", "lots"]) == 2  # fmt: skip
    assert "--device-memory 'lots'" in capsys.readouterr().err
    assert parse_bytes("16GiB") == 16 * 2**30 and parse_bytes("80 GB") == 80 * 10**9
    with pytest.raises(ConfigError, match="datasets.toy.shape"):
        plan({**TINY, "datasets": {"toy": {"source": "phantom"}}}, "toy", "3d-seg", compile_step=False)


def test_plan_auto_picks_the_largest_micro_batch_that_fits():
    cfg = {
        **TINY,
        "training": {**TINY["training"], "train": {"batch_size": 4, "steps": 3, "micro_batch": "auto"}},
    }
    roomy, text = plan(cfg, "toy", "3d-seg", device_memory=parse_bytes("1GB"))
    assert roomy["micro_batch"] == 4 and roomy["fits"] and "train.micro_batch: auto" in text
    one = next(t for t in roomy["tried"] if t["micro_batch"] == 1 and not t["remat"])
    assert one["total_bytes"] < roomy["xla"]["total_bytes"]
    # room for 1 volume per pass, not 2: auto runs the step as 4 passes of 1
    tight, text = plan(cfg, "toy", "3d-seg", device_memory=int(one["total_bytes"] / 0.81 + 16))
    assert tight["micro_batch"] == 1 and tight["xla"]["passes"] == 4 and tight["fits"], text
    assert "4 pass(es) per step" in text
    # training's log line for the same choice (diffseg.train.loop prints it)
    choice, _ = xla_plan(resolve_run_config(cfg, "toy", "3d-seg"), 9, (16, 16, 8), parse_bytes("1GB"))
    assert choice.describe().startswith("micro-batch: 4 volume(s) per device per pass, remat off (auto: ")
