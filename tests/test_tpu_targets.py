"""TPU slices (``diffseg plan --target tpu-*``): the known slices, the TPU budget rule, and the TPU
compiler in libtpu planning a step for a slice this machine does not have.

The compiler tests need the ``tpu`` extra (libtpu as a wheel); they skip without it, except in
CI's TPU venv (``DIFFSEG_TPU_PLAN_REQUIRED=1``), where a skip would hide a broken path."""

from __future__ import annotations

import importlib
import json
import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from diffseg.accelerators import tpu
from diffseg.accelerators.memory import budget_for
from diffseg.accelerators.targets import KNOWN_TARGETS, KNOWN_TPUS, get_target, target_mesh
from diffseg.errors import ConfigError
from diffseg.train.plan import _compile, out_of_memory, plan

GiB = 2**30
TINY = {
    "datasets": {"toy": {"source": "phantom", "anatomy": "pelvis", "shape": [16, 16, 8],
                         "split": {"train": 3, "valid": 1, "test": 1}}},
    "training": {"model": {"channels": [4, 8]}, "train": {"steps": 3}},
}  # fmt: skip
NEEDS_LIBTPU = "libtpu: install the tpu extra (pip install -e '.[tpu]')"


def _libtpu():
    if os.environ.get("DIFFSEG_TPU_PLAN_REQUIRED") == "1":  # CI's TPU venv: a skip would hide it
        return importlib.import_module("libtpu")
    return pytest.importorskip("libtpu", reason=NEEDS_LIBTPU)


@pytest.mark.parametrize(
    "name, devices, hbm_gib, megacore",
    [("tpu-v3-8", 8, 16, False), ("tpu-v4-8", 4, 32, True), ("tpu-v5p-8", 4, 95, True),
     ("tpu-v5e-8", 8, 16, False), ("tpu-v6e-8", 8, 32, False), ("tpu-v3-32", 32, 16, False)],
)  # fmt: skip
def test_the_known_slices_say_their_devices_and_hbm_per_device(name, devices, hbm_gib, megacore):
    target = get_target(name)
    assert target is KNOWN_TARGETS[name] is KNOWN_TPUS[name] and target.platform == "tpu"
    assert target.devices == devices and target.memory_bytes == hbm_gib * GiB
    assert (target.chip_config == "megacore") == megacore and target.accelerator_type == name[4:]
    assert target.facts()["devices"] == devices and f"{devices} " in target.summary()


def test_the_paper_slice_is_8_cores_of_16_gib_and_its_budget_is_the_hbm_less_5_percent():
    v3 = get_target("tpu-v3-8")  # the paper: "TPU v3-8, which has 16×8 GB device memory"
    assert (v3.devices, v3.memory_bytes, v3.chips) == (8, 16 * GiB, 4)
    assert budget_for(v3.memory_bytes, "tpu").bytes == int(16 * GiB * 0.95)
    with pytest.raises(ConfigError, match="tpu-v3-8, tpu-v4-8"):
        get_target("tpu-v9-8")


def test_the_compilers_out_of_memory_is_read_as_the_bytes_needed():
    new = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO"
                       " temporaries (18.00G) exceeds available HBM (15.48G).")  # fmt: skip
    assert out_of_memory(new) == 18 * GiB
    assert out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Used 20.5G of 15.48G hbm")) == int(20.5 * GiB)
    assert out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: something else")) == 0
    assert out_of_memory(RuntimeError("INVALID_ARGUMENT: a bug")) is None


def test_without_libtpu_a_tpu_target_says_which_extra(monkeypatch):
    monkeypatch.setattr(tpu.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r'tpu-v3-8 needs the tpu extra: pip install -e "\.\[tpu\]"'):
        target_mesh(get_target("tpu-v3-8"))


def test_libtpu_says_the_hbm_a_program_may_use_on_each_slice():
    """A real chip reports it as bytes_limit; libtpu's compiler says it for a slice not here."""
    _libtpu()
    from diffseg.accelerators.tpu import usable_hbm

    for name in ("tpu-v3-8", "tpu-v5e-8"):
        target = get_target(name)
        usable = usable_hbm(target, target_mesh(target))
        assert 0.9 * target.memory_bytes < usable < target.memory_bytes, name


def test_a_program_larger_than_a_cores_hbm_is_a_plan_that_does_not_fit():
    """The TPU compiler refuses it at compile time; the planner records the bytes it needed."""
    _libtpu()
    mesh = target_mesh(get_target("tpu-v3-8"))
    x = jax.ShapeDtypeStruct((8, 3 * 2**29), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("data")))
    big = jax.jit(lambda a: jnp.concatenate([jnp.sin(a), jnp.cos(a), a * 2, a + 1, jnp.exp(a)], 0).sum(0))
    compiled, needed = _compile(big.lower(x), None)
    assert compiled is None and needed > 16 * GiB


def _tiny(batch: int) -> dict:
    return {**TINY, "training": {**TINY["training"], "train": {"batch_size": batch, "steps": 3}}}


def test_plan_for_a_v3_8_splits_the_batch_over_its_8_cores():
    """The paper's layout: batch 8 on a v3-8 is one volume per TensorCore, both remat settings
    planned per core by the TPU compiler, with its FLOPs and its own step-time estimate."""
    _libtpu()
    facts, text = plan(_tiny(8), "toy", "3d-diff", target=get_target("tpu-v3-8"))
    xla = facts["xla"]
    assert (
        xla["backend"] == "tpu" and xla["devices"] == 8 and facts["micro_batch"] == 1 and xla["passes"] == 1
    )
    assert sorted((t["micro_batch"], t["remat"]) for t in facts["tried"]) == [(1, False), (1, True)]
    assert all(t["compiled"] and 0 < t["total_bytes"] < facts["budget_bytes"] for t in facts["tried"])
    # the budget: the HBM libtpu lets a program use on a v3 core (15.48 GiB of 16), less 5 %
    assert 15 * GiB < facts["usable_bytes"] < 16 * GiB and facts["card_bytes"] == 16 * GiB
    assert facts["budget_bytes"] == int(facts["usable_bytes"] * 0.95) and facts["fits"]
    assert "(libtpu's usable HBM of 16 GiB) (JAX does not preallocate a TPU) × 0.95 (headroom)" in text
    assert xla["flops_per_step"] == pytest.approx(8 * xla["flops"]) and xla["flops"] > 0
    assert facts["versions"]["tpu_compiler"] and facts["target"]["topology"] == "v3:2x2"
    assert "compiled for tpu-v3-8 (Cloud TPU v3-8: 4 chips, 8 TensorCores, 16.00 GiB HBM each)" in text
    assert "by the TPU compiler (libtpu) on this machine, 8 device(s)" in text
    assert "per device × 8 devices" in text and "state + its 1 of the step's 8 volumes" in text
    if xla["estimate_s"] is not None:  # the compiler's estimate, where it gives a positive one
        assert xla["estimate_s"] > 0 and "the compiler's estimate (not a measurement)" in text


def test_plan_for_a_v3_32_pod_slice_splits_the_batch_over_its_4_hosts_32_cores():
    """A pod slice: libtpu's compile-only topology spans 4 hosts (processes); the plan is per core."""
    _libtpu()
    target = get_target("tpu-v3-32")
    mesh = target_mesh(target)
    assert mesh.size == 32 and {d.process_index for d in mesh.devices.flat} == {0, 1, 2, 3}
    facts, text = plan(_tiny(32), "toy", "3d-diff", target=target, every=False)
    assert facts["xla"]["devices"] == 32 and facts["micro_batch"] == 1 and facts["xla"]["passes"] == 1
    assert facts["target"]["topology"] == "v3:4x4" and facts["fits"]
    assert "compiled for tpu-v3-32 (Cloud TPU v3-32, 4 hosts: 16 chips, 32 TensorCores" in text
    assert "state + its 1 of the step's 32 volumes" in text


def test_plan_for_a_v4_8_plans_4_megacore_devices():
    _libtpu()
    facts, text = plan(_tiny(4), "toy", "3d-seg", target=get_target("tpu-v4-8"))
    assert (
        facts["xla"]["devices"] == 4
        and facts["micro_batch"] == 1
        and facts["target"]["chip_config"] == "megacore"
    )
    assert "4 chips, 4 megacore devices, 32.00 GiB HBM each" in text


def test_two_plans_load_libtpu_at_once(tmp_path):
    """libtpu's machine-wide chip lock would fail the second process; a plan opens no chip and
    skips it, so plans run side by side (and beside a training job on a TPU VM)."""
    import subprocess
    import sys

    _libtpu()
    holder = (
        "import sys; from diffseg.accelerators.targets import get_target, target_mesh;"
        " target_mesh(get_target('tpu-v3-8')); print('loaded', flush=True); sys.stdin.read()"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    first = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=env)  # fmt: skip
    try:
        assert first.stdout.readline().strip() == "loaded"  # libtpu is loaded there, and stays
        assert target_mesh(get_target("tpu-v5e-8")).size == 8
    finally:
        first.communicate("", timeout=60)
    assert first.returncode == 0


def test_device_check_dry_run_for_a_tpu(tmp_path):
    """benchmarks/gpu_check.sh --dry-run --tpu: every stage at tiny sizes on this CPU, the plan for
    a v3-8 by libtpu, and the workflow through the TPU profile (each job asks for the whole slice)."""
    import subprocess
    import sys
    from pathlib import Path

    _libtpu()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHON": sys.executable}  # fmt: skip
    cmd = ["bash", str(root / "benchmarks/gpu_check.sh"), "--dry-run", "--tpu", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env, cwd=root)
    summary = (tmp_path / "summary.txt").read_text()
    assert res.returncode == 0, summary + res.stderr[-3000:]
    for stage in ("devices", "plan_3d-diff", "plan_3d-diff_target", "step_3d-diff", "workflow"):
        assert f"   {stage}: exit 0" in summary, summary
    assert "pytorch: skipped on a TPU" in summary
    plan = json.loads((tmp_path / "plan_3d-diff_tpu-v3-8.json").read_text())
    assert plan["xla"]["devices"] == 8 and plan["target"]["name"] == "tpu-v3-8"
    log = (tmp_path / "workflow/results/logs/train/phantom_pelvis/3d-diff.log").read_text()
    assert "backend cpu" in log  # no TPU here: --tpus all finds no chips and claims nothing
