"""GPU targets (``diffseg plan --target``): the cards' text protos, users' spec files, and XLA's
GPU compiler planning a step for a card this machine does not have."""

from __future__ import annotations

import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffseg.accelerators.cuda import COMPILER_OPTIONS, parse_text_proto
from diffseg.accelerators.targets import KNOWN_GPUS, get_target, target_mesh
from diffseg.config import resolve_run_config
from diffseg.errors import ConfigError
from diffseg.parallel import data_mesh
from diffseg.runs import build_model, init_params
from diffseg.train.plan import card_budget, plan, step_memory
from diffseg.train.step import build_optimizer

TINY = {
    "datasets": {"toy": {"source": "phantom", "anatomy": "pelvis", "shape": [16, 16, 8],
                         "split": {"train": 3, "valid": 1, "test": 1}}},
    "training": {"model": {"channels": [4, 8]}, "train": {"batch_size": 2, "steps": 3}},
}  # fmt: skip
NEEDS_PLUGIN = "jax's CUDA plugin: install the gpu-plan extra (pip install -e '.[gpu-plan]')"
CARD_24GB = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 102400
  threads_per_core_limit: 1536
  core_count: 128
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 1008000000000
  l2_cache_size: 75497472
  clock_rate_ghz: 2.52
  device_memory_size: 25769803776  # 24 GiB
  shared_memory_per_block_optin: 101376
  cuda_compute_capability { major: 8 minor: 9 }
}
platform_name: "CUDA"
device_description_str: "a 24 GB card"
"""


def _plugin():
    if os.environ.get("DIFFSEG_GPU_PLAN_REQUIRED") == "1":  # CI's gpu-plan venv: a skip would hide it
        return importlib.import_module("jax_plugins.xla_cuda12")
    return pytest.importorskip("jax_plugins.xla_cuda12", reason=NEEDS_PLUGIN)


@pytest.mark.parametrize("name", sorted(KNOWN_GPUS))
def test_each_known_card_generates_a_text_proto_with_its_memory_and_compute_capability(name):
    target = get_target(name)
    spec = parse_text_proto(target.text_proto(), name)
    info = spec["gpu_device_info"]
    assert info["device_memory_size"] == target.memory_bytes > 10 * 2**30
    cc = info["cuda_compute_capability"]
    assert (cc["major"], cc["minor"]) == target.compute_capability
    assert spec["platform_name"] == "CUDA" and info["core_count"] == target.core_count > 0
    assert target.has_bf16 == (target.compute_capability >= (8, 0))
    assert (target.peak_bf16_tflops is not None) == target.has_bf16 and target.peak_fp16_tflops > 0
    # a field can be left out (one the installed plugin does not know)
    assert "registers_per_core_limit" not in target.text_proto(frozenset({"registers_per_core_limit"}))


def test_v100_has_no_bf16_tensor_cores_and_h100_does():
    assert not get_target("v100-16gb").has_bf16 and get_target("H100-80GB").has_bf16


def test_a_users_spec_file_is_a_target_and_a_malformed_one_names_the_file(tmp_path):
    path = tmp_path / "rtx24.txtpb"
    path.write_text(CARD_24GB)
    card = get_target(str(path))
    assert card.memory_bytes == 24 * 2**30 and card.compute_capability == (8, 9) and card.has_bf16
    assert card.name == "rtx24" and card.description == "a 24 GB card" and card.text_proto() == CARD_24GB
    bad = tmp_path / "bad.txtpb"
    bad.write_text("gpu_device_info { core_count: 12\n")
    with pytest.raises(ConfigError, match="bad.txtpb: a { is never closed"):
        get_target(str(bad))
    bad.write_text("gpu_device_info { core_count: 12 }\n")
    with pytest.raises(ConfigError, match="bad.txtpb: gpu_device_info.device_memory_size"):
        get_target(str(bad))
    bad.write_text("gpu_device_info { core_count: 12 ; }\n")
    with pytest.raises(ConfigError, match="bad.txtpb: line 1: cannot read"):
        get_target(str(bad))
    with pytest.raises(ConfigError, match="missing.txtpb: cannot read it"):
        get_target(str(tmp_path / "missing.txtpb"))
    with pytest.raises(ConfigError, match="not a known card.*h100-80gb"):
        get_target("h900")


def test_a_spec_file_the_plugin_cannot_parse_is_an_error_naming_it(tmp_path):
    _plugin()
    from diffseg.accelerators.targets import target_mesh

    path = tmp_path / "typo.txtpb"
    path.write_text(CARD_24GB.replace("core_count: 128", "core_cuont: 128"))
    with pytest.raises(ConfigError, match="typo.txtpb: jax's CUDA plugin cannot parse it"):
        target_mesh(get_target(str(path)))
    path.write_text(CARD_24GB)
    assert target_mesh(get_target(str(path))).devices.flat[0].device_kind == "a 24 GB card"


def test_the_gpu_compiler_plans_a_small_step_for_an_h100_below_the_cpu_compilers_plan():
    """The GPU plan of a step (no GPU here) is positive and smaller than the CPU compiler's."""
    _plugin()

    shape = (32, 32, 16)  # at 16×16×8 the GPU's fixed costs (workspaces) still outweigh the CPU's copies
    cfg = resolve_run_config({**TINY, "datasets": {"toy": {**TINY["datasets"]["toy"], "shape": list(shape)}}},
                             "toy", "3d-diff")  # fmt: skip
    model = build_model(cfg, 9, conv_impl="xla")
    tx, _ = build_optimizer(cfg)
    gpu = step_memory(model, tx, cfg, 9, target_mesh(get_target("h100-80gb")), shape, 2, COMPILER_OPTIONS)
    cpu = step_memory(model, tx, cfg, 9, data_mesh(), shape, 2)
    assert gpu["backend"] != "cpu" and cpu["backend"] == "cpu"
    assert gpu["argument_bytes"] > 2 * int(np.prod(shape)) * 5 and gpu["temp_bytes"] > 0
    assert 0 < gpu["total_bytes"] < cpu["total_bytes"]
    assert gpu["flops_of"] == "lowered" and gpu["flops"] > 0
    # the HLO's count and the CPU compiler's agree on the math to within fusion's rewrites
    assert gpu["flops"] == pytest.approx(cpu["flops"], rel=0.2)


def test_plan_for_a_v100_says_bf16_runs_as_float32_there():
    _plugin()
    train = {**TINY["training"]["train"], "bf16": True, "batch_size": 1}
    cfg = {**TINY, "training": {**TINY["training"], "train": train}}
    facts, text = plan(cfg, "toy", "3d-seg", target=get_target("v100-16gb"))
    assert "bf16 convolutions run as float32 on this card; set train.bf16: false" in text
    assert facts["bf16_warning"] and facts["target"]["compute_capability"] == [7, 0]
    assert facts["budget_bytes"] == card_budget(16 * 2**30) and facts["fits"]
    # every micro-batch dividing the batch (here 1), with remat off and on
    assert sorted((t["micro_batch"], t["remat"]) for t in facts["tried"]) == [(1, False), (1, True)]
    assert "v100-16gb (Tesla V100" in text and all(t["total_bytes"] > 0 for t in facts["tried"])
    facts, text = plan(cfg, "toy", "3d-seg", target=get_target("a100-40gb"), compile_step=False)
    assert "bf16 convolutions" not in text and "bf16_warning" not in facts and facts["target"]["has_bf16"]


def test_remat_gives_the_same_gradients():
    """Remat recomputes the same forward pass in the backward pass: equal gradients, up to rounding."""
    cfg = resolve_run_config(TINY, "toy", "3d-seg")
    plain = build_model(cfg, 3, conv_impl="xla")
    assert plain.remat is False
    rematted = plain.clone(remat=True)
    params = init_params(plain, (16, 16, 8), jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 8, 1))

    def loss(net):
        return lambda p: jnp.mean(jnp.tanh(net.apply(p, x)) ** 2)

    grads = jax.jit(jax.grad(loss(plain)))(params)
    again = jax.jit(jax.grad(loss(rematted)))(params)
    text = jax.jit(jax.grad(loss(rematted))).lower(params).as_text()
    assert "remat" in text or "optimization_barrier" in text  # remat really is in the program
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(again), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
