"""GPU jobs without a GPU: own cards per job (fake GPUs), the budget rule, the backend report and refusal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from diffseg.accelerators import memory
from diffseg.accelerators.backend import bf16_warning, check_platform, describe_devices
from diffseg.accelerators.slots import claim_gpus, gpu_pool, release_gpus
from diffseg.config import load_yaml, resolve_run_config
from diffseg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# A job as the workflow starts one: claims its GPU(s), reports them, holds them until told to stop.
HOLDER = r"""
import os, sys, time
from pathlib import Path
from diffseg.accelerators.slots import claim_gpus
ids = claim_gpus(int(sys.argv[1]), poll_seconds=0.05)
print(os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
stop = Path(sys.argv[2])
while not stop.exists():
    time.sleep(0.05)
"""


def _env(tmp_path: Path, pool: str) -> dict[str, str]:
    drop = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", memory.MEM_FRACTION_VAR)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "DIFFSEG_GPUS": pool, "DIFFSEG_GPU_LOCKS": str(tmp_path / "locks")}


def _start(tmp_path: Path, env: dict[str, str], count: int = 1) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(count), str(tmp_path / "stop")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_concurrent_jobs_never_share_a_gpu_and_a_killed_job_frees_its_card(tmp_path):
    env = _env(tmp_path, "0,1,2")
    jobs = [_start(tmp_path, env) for _ in range(3)]
    got = [job.stdout.readline().strip() for job in jobs]
    assert sorted(got) == ["0", "1", "2"], got  # three jobs, three different cards
    waiting = _start(tmp_path, env)  # a fourth finds every card claimed: it waits, saying so
    time.sleep(1.0)
    assert waiting.poll() is None
    os.kill(jobs[1].pid, signal.SIGKILL)  # kill -9: the kernel drops its lock
    jobs[1].wait()
    assert waiting.stdout.readline().strip() == got[1]
    (tmp_path / "stop").write_text("")
    for job in (*jobs, waiting):
        job.wait(timeout=30)
    assert "waiting for 1 free GPU(s)" in waiting.stderr.read()


def test_a_job_of_two_gpus_gets_two_distinct_cards(tmp_path):
    env = _env(tmp_path, "0,1,2,3")
    jobs = [_start(tmp_path, env, count=2) for _ in range(2)]
    got = [set(job.stdout.readline().strip().split(",")) for job in jobs]
    (tmp_path / "stop").write_text("")
    for job in jobs:
        job.wait(timeout=30)
    assert all(len(ids) == 2 for ids in got) and not got[0] & got[1]


def test_claims_in_process(tmp_path):
    env = _env(tmp_path, "0,1")
    try:
        assert claim_gpus(1, env=env) == ["0"]
        assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert env[memory.MEM_FRACTION_VAR] == str(memory.DEFAULT_MEM_FRACTION)
        other = _env(tmp_path, "0,1")
        assert claim_gpus(1, env=other) == ["1"]
        with pytest.raises(TimeoutError, match="no 1 free GPU"):
            claim_gpus(1, env=_env(tmp_path, "0,1"), timeout=0.2, poll_seconds=0.05, say=lambda _: None)
    finally:
        release_gpus()
    assert claim_gpus(2, env=_env(tmp_path, "0,1")) == ["0", "1"]  # released: both free again
    release_gpus()


def test_no_gpu_slurm_and_zero(tmp_path):
    env = {"DIFFSEG_GPU_LOCKS": str(tmp_path / "locks")}
    assert claim_gpus(1, env=dict(env), detect=lambda: []) is None  # no GPU here: JAX's choice
    slurm = {**env, "SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "0"}
    assert claim_gpus(1, env=slurm, detect=lambda: ["0", "1"]) is None
    assert slurm["CUDA_VISIBLE_DEVICES"] == "0"  # SLURM's choice stands
    none = {**env}
    assert claim_gpus(0, env=none, detect=lambda: ["0"]) == [] and none["CUDA_VISIBLE_DEVICES"] == ""
    with pytest.raises(ConfigError, match="--gpus 3: this machine has 2 GPU"):
        claim_gpus(3, env={**env, "DIFFSEG_GPUS": "0,1"})


def test_the_pool_follows_the_users_choice():
    assert gpu_pool({"DIFFSEG_GPUS": "2, 3"}, detect=lambda: ["0"]) == ["2", "3"]
    assert gpu_pool({"CUDA_VISIBLE_DEVICES": "1,3"}, detect=lambda: ["0"]) == ["1", "3"]
    assert gpu_pool({}, detect=lambda: ["0", "1"]) == ["0", "1"]
    with pytest.raises(ConfigError, match="DIFFSEG_GPUS='a,b'"):
        gpu_pool({"DIFFSEG_GPUS": "a,b"})


def test_one_budget_rule():
    assert memory.memory_fraction({}) == memory.DEFAULT_MEM_FRACTION
    assert memory.memory_fraction({memory.MEM_FRACTION_VAR: ".5"}) == 0.5
    with pytest.raises(ValueError, match="XLA_PYTHON_CLIENT_MEM_FRACTION"):
        memory.memory_fraction({memory.MEM_FRACTION_VAR: "2"})
    card = 80 * 10**9
    assert memory.usable_bytes(card, "gpu", {}) == int(card * 0.9)
    assert memory.step_budget(memory.usable_bytes(card, "gpu", {})) == int(int(card * 0.9) * 0.9)
    assert memory.budget_for(card, "gpu", {}).bytes == int(int(card * 0.9) * 0.9)
    # a TPU is not preallocated: its budget is the HBM less the TPU's own headroom
    assert memory.usable_bytes(card, "tpu", {memory.MEM_FRACTION_VAR: ".5"}) == card
    assert memory.budget_for(card, "tpu").bytes == int(card * 0.95)
    assert "JAX does not preallocate a TPU" in memory.budget_for(16 * 2**30, "tpu").explain()
    assert "× 0.90 (JAX's allocator" in memory.budget_for(card, "gpu", {}).explain()


class FakeGpu:
    platform, device_kind = "gpu", "Tesla V100-SXM2-16GB"

    def __init__(self, cc: str):
        self.compute_capability = cc

    def memory_stats(self):
        return {"bytes_limit": 14 * 2**30}


def test_backend_report_and_bf16_on_old_cards():
    text = describe_devices([FakeGpu("7.0")], "gpu")
    assert "backend gpu: 1 device(s), Tesla V100-SXM2-16GB (compute capability 7.0)" in text
    assert "allocator 14.0 GiB per device" in text
    assert "no bfloat16 tensor cores" in bf16_warning([FakeGpu("7.0")], True)
    assert bf16_warning([FakeGpu("8.0")], True) is None and bf16_warning([FakeGpu("7.5")], False) is None


def test_a_run_that_asks_for_an_accelerator_refuses_the_cpu_and_takes_a_gpu_or_a_tpu():
    cfg = resolve_run_config(load_yaml(ROOT / "config/paper.yaml"), "prostate_mr", "3d-diff")
    assert cfg["train"]["platform"] == "accelerator"
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[cuda12\]".*pip install -e "\.\[tpu\]"'):
        check_platform(cfg, "cpu", env={})
    check_platform(cfg, "cpu", env={"DIFFSEG_ALLOW_CPU": "1"})
    check_platform(cfg, "gpu", env={})
    check_platform(cfg, "tpu", env={})
    check_platform({**cfg, "train": {**cfg["train"], "platform": "any"}}, "cpu", env={})
    tpu_only = {**cfg, "train": {**cfg["train"], "platform": "tpu"}}
    with pytest.raises(ConfigError, match=r"asks for a TPU, but JAX found only the GPU.*\[tpu\]"):
        check_platform(tpu_only, "gpu", env={})


class FakeTpu:
    platform, device_kind, num_cores = "tpu", "TPU v3", 1

    def __init__(self, i: int):
        self.id, self.coords = i, [i // 2 % 2, i // 4, 0]  # 2 cores per chip

    def memory_stats(self):
        return {"bytes_limit": int(15.48 * 2**30)}


def test_backend_report_names_the_tpu_chips_cores_and_hbm():
    text = describe_devices([FakeTpu(i) for i in range(8)], "tpu", env={"TPU_VISIBLE_CHIPS": "0,1,2,3"})
    assert text.startswith("backend tpu: 8 device(s), TPU v3 (4 chip(s), 1 TensorCore(s) per device)")
    assert "HBM per device 15.5 GiB" in text and "(TPU_VISIBLE_CHIPS=0,1,2,3)" in text


def test_a_tpu_held_by_another_process_is_one_line(monkeypatch):
    import jax

    from diffseg.accelerators import backend

    def busy():
        raise RuntimeError(
            "Unable to initialize backend 'tpu': ABORTED: The TPU is already in use by process with pid 4242."
            " Not attempting to load libtpu.so in this process."
        )

    monkeypatch.setattr(jax, "default_backend", busy)
    with pytest.raises(ConfigError, match=r"the TPU is held by another process.*compute\.\{stage\}\.tpu"):
        backend.start_backend()
    assert backend.tpu_busy(RuntimeError("Unable to initialize backend 'cuda'")) is None


def test_diffseg_train_with_the_paper_config_stops_at_once_on_a_cpu(tmp_path):
    """The paper's run config on this CPU-only machine: exit 2 before reading data, with the hint."""
    cfg = resolve_run_config(load_yaml(ROOT / "config/paper.yaml"), "prostate_mr", "3d-diff")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "DIFFSEG_ALLOW_CPU"}
    cmd = [sys.executable, "-m", "diffseg.cli", "train", "--run-config", str(tmp_path / "config.yaml"),
           "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run")]  # fmt: skip
    start = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "backend cpu: 1 device(s)" in res.stderr
    assert "asks for a GPU or a TPU, but JAX found only the CPU" in res.stderr
    assert '".[cuda12]"' in res.stderr and '".[tpu]"' in res.stderr  # both install lines
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()
    assert time.monotonic() - start < 60
