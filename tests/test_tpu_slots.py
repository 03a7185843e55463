"""TPU jobs without a TPU: own chips per job (fake chips), the whole host one job at a time, and the
workflow's ``--tpus`` from ``compute.{stage}.tpu`` (issue 28, item 2).

``DIFFSEG_TPUS`` fakes a TPU VM's chips and ``DIFFSEG_TPU_LOCKS`` puts the locks in a temporary
folder, as ``DIFFSEG_GPUS`` / ``DIFFSEG_GPU_LOCKS`` do for GPUs (tests/test_accelerators.py).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from diffseg.accelerators.slots import (
    LIBTPU_DEFAULT_PORT,
    TPU,
    check_tpu_request,
    claim_tpus,
    release,
    tpu_count,
    tpu_environment,
    tpu_pool,
)
from diffseg.cli import build_parser, main
from diffseg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LIBTPU_VARS = (
    "TPU_CHIPS_PER_PROCESS_BOUNDS", "TPU_PROCESS_BOUNDS", "TPU_VISIBLE_CHIPS", "TPU_VISIBLE_DEVICES",
    "TPU_PROCESS_PORT", "TPU_PROCESS_ADDRESSES", "TPU_MESH_CONTROLLER_PORT", "TPU_MESH_CONTROLLER_ADDRESS",
)  # fmt: skip

# A job as the workflow starts one: claims its chips, reports its libtpu environment as one JSON
# line (what JAX would start with), holds the chips until its own stop file appears.
HOLDER = r"""
import json, os, sys, time
from pathlib import Path
from diffseg.accelerators.slots import claim_tpus, tpu_count
ids = claim_tpus(tpu_count(sys.argv[1]), detect=lambda: [], poll_seconds=0.05)  # the fake chips are the host
names = [k for k in os.environ if k.startswith("TPU_") or k == "JAX_PLATFORMS"]
print(json.dumps({"ids": ids, "env": {k: os.environ[k] for k in names}}), flush=True)
stop = Path(sys.argv[2])
while not stop.exists():
    time.sleep(0.05)
"""


def _env(tmp_path: Path, pool: str) -> dict[str, str]:
    """This process's environment with a fake TPU VM of chips ``pool``, locks in ``tmp_path``."""
    drop = ("SLURM_JOB_ID", "JAX_PLATFORMS", *LIBTPU_VARS)
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TPU_")}
    return {**env, "DIFFSEG_TPUS": pool, "DIFFSEG_TPU_LOCKS": str(tmp_path / "locks")}


def _start(tmp_path: Path, env: dict[str, str], count: str, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, count, str(tmp_path / f"stop-{name}")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _report(job: subprocess.Popen) -> dict:
    line = job.stdout.readline()
    assert line, job.stderr.read()[-2000:]
    return json.loads(line)


def _stop(tmp_path: Path, name: str, job: subprocess.Popen) -> None:
    (tmp_path / f"stop-{name}").write_text("")
    job.wait(timeout=30)


def _assert_complete(env: dict[str, str], chips: list[str]) -> None:
    """libtpu's per-process settings for a process alone on ``chips``: every one, consistent."""
    assert set(LIBTPU_VARS) <= set(env), sorted(set(LIBTPU_VARS) - set(env))
    assert env["TPU_VISIBLE_CHIPS"] == env["TPU_VISIBLE_DEVICES"] == ",".join(chips)
    assert env["TPU_CHIPS_PER_PROCESS_BOUNDS"] == {1: "1,1,1", 2: "1,2,1", 4: "2,2,1"}[len(chips)]
    assert env["TPU_PROCESS_BOUNDS"] == "1,1,1"
    port = env["TPU_PROCESS_PORT"]
    assert env["TPU_MESH_CONTROLLER_PORT"] == port and int(port) != LIBTPU_DEFAULT_PORT
    assert env["TPU_PROCESS_ADDRESSES"] == env["TPU_MESH_CONTROLLER_ADDRESS"] == f"localhost:{port}"


def test_concurrent_jobs_never_share_a_chip_and_a_killed_job_frees_its_chip(tmp_path):
    env = _env(tmp_path, "0,1,2,3")
    jobs = [_start(tmp_path, env, "1", str(i)) for i in range(4)]
    got = [_report(job) for job in jobs]
    assert sorted(r["ids"][0] for r in got) == ["0", "1", "2", "3"], got  # four jobs, four chips
    for r in got:
        _assert_complete(r["env"], r["ids"])
    assert len({r["env"]["TPU_PROCESS_PORT"] for r in got}) == 4  # ports of their own
    waiting = _start(tmp_path, env, "1", "w")  # a fifth finds every chip claimed: it waits, saying so
    time.sleep(1.0)
    assert waiting.poll() is None
    os.kill(jobs[1].pid, signal.SIGKILL)  # kill -9: the kernel drops its locks
    jobs[1].wait()
    late = _report(waiting)
    assert late["ids"] == got[1]["ids"] and late["env"] == got[1]["env"]
    for i, job in enumerate(jobs):
        _stop(tmp_path, str(i), job)
    _stop(tmp_path, "w", waiting)
    assert "waiting for 1 free TPU chip(s)" in waiting.stderr.read()


@pytest.mark.parametrize(
    ("pool", "count", "boxes"),
    [
        ("0,1,2,3", "2", [["0", "1"], ["2", "3"]]),  # a 2x2 host (v2-v4): two jobs of 2 chips
        ("0,1,2,3,4,5,6,7", "4", [["0", "1", "2", "3"], ["4", "5", "6", "7"]]),  # 2x4 (v5e/v6e)
    ],
)
def test_jobs_of_several_chips_get_disjoint_boxes_and_complete_distinct_environments(
    tmp_path, pool, count, boxes
):
    env = _env(tmp_path, pool)
    jobs = [_start(tmp_path, env, count, str(i)) for i in range(2)]
    got = [_report(job) for job in jobs]
    for i, job in enumerate(jobs):
        _stop(tmp_path, str(i), job)
    assert sorted(r["ids"] for r in got) == boxes
    for r in got:
        _assert_complete(r["env"], r["ids"])
    assert got[0]["env"]["TPU_PROCESS_PORT"] != got[1]["env"]["TPU_PROCESS_PORT"]
    assert got[0]["env"] != got[1]["env"]


def test_a_whole_host_claim_waits_while_any_chip_is_held_and_sets_nothing(tmp_path):
    env = _env(tmp_path, "0,1,2,3")
    one = _start(tmp_path, env, "1", "one")
    assert _report(one)["ids"] == ["0"]
    whole = _start(tmp_path, env, "all", "whole")
    time.sleep(1.0)
    assert whole.poll() is None  # three chips are free, but it needs all four
    _stop(tmp_path, "one", one)
    report = _report(whole)
    assert report["ids"] == ["0", "1", "2", "3"]
    assert report["env"] == {}  # one process on the whole VM: libtpu's defaults (port 8476)
    another = _start(tmp_path, env, "1", "another")  # and while it runs, no chip is anyone else's
    time.sleep(1.0)
    assert another.poll() is None
    _stop(tmp_path, "whole", whole)
    assert len(_report(another)["ids"]) == 1  # whichever chip the whole-host job's exit freed first
    _stop(tmp_path, "another", another)
    assert "waiting for 4 free TPU chips (the whole host)" in whole.stderr.read()


@pytest.mark.parametrize("host", [1, 4, 8])
def test_two_claims_held_at_once_never_share_a_port(host):
    """Every box any claim may take on a host of 1, 4 or 8 chips, against every other box it could be
    held beside (no chip in common): never the same port, never libtpu's default one."""
    pool = [str(i) for i in range(host)]
    boxes = [
        box
        for n in (1, 2, 4, 8)
        if n < host and host % n == 0
        for box in TPU.layout(pool, n, lambda: []).groups
    ]
    ports = {box: int(tpu_environment(box)["TPU_PROCESS_PORT"]) for box in boxes}
    assert LIBTPU_DEFAULT_PORT not in ports.values()
    for a, b in itertools.combinations(boxes, 2):
        if not set(a) & set(b):  # both can be held at once
            assert ports[a] != ports[b], (a, b)


def test_claims_in_process_slurm_zero_and_no_tpu(tmp_path):
    env = _env(tmp_path, "0,1,2,3")
    try:
        assert claim_tpus(2, env=env, detect=lambda: []) == ["0", "1"]
        _assert_complete(env, ["0", "1"])
        with pytest.raises(TimeoutError, match="no 4 free TPU chips"):
            claim_tpus(
                "all", env=_env(tmp_path, "0,1,2,3"), detect=lambda: [],
                timeout=0.2, poll_seconds=0.05, say=lambda _: None,
            )  # fmt: skip
    finally:
        release()
    assert claim_tpus("all", env=_env(tmp_path, "0,1,2,3"), detect=lambda: []) == ["0", "1", "2", "3"]
    release()
    # The device files of a real VM are the host; DIFFSEG_TPUS narrows the chips jobs share.
    narrowed = _env(tmp_path, "2,3")
    assert claim_tpus("all", env=narrowed, detect=lambda: ["0", "1", "2", "3"]) == ["2", "3"]
    assert narrowed["TPU_VISIBLE_CHIPS"] == "2,3" and narrowed["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,2,1"
    release()
    # SLURM: the node is the job's; nothing is claimed or set.
    slurm = {**_env(tmp_path, "0,1,2,3"), "SLURM_JOB_ID": "7"}
    assert claim_tpus("all", env=slurm, detect=lambda: []) is None
    assert claim_tpus(1, env=slurm, detect=lambda: []) is None
    assert not set(LIBTPU_VARS) & set(slurm)
    # No TPU here (a GPU box): nothing claimed, nothing set, --tpus 0 included (the GPU stays usable).
    bare = {"DIFFSEG_TPU_LOCKS": str(tmp_path / "locks")}
    for count in (0, 1, "all"):
        env = dict(bare)
        assert claim_tpus(count, env=env, detect=lambda: []) in (None, [])
        assert env == bare
    # --tpus 0 on a TPU VM: JAX never loads libtpu, so the job cannot take the TPU from others.
    zero = _env(tmp_path, "0,1,2,3")
    assert claim_tpus(0, env=zero, detect=lambda: []) == [] and zero["JAX_PLATFORMS"] == "cpu"


def test_counts_that_make_no_box_are_refused_naming_the_config_key(tmp_path):
    four = _env(tmp_path, "0,1,2,3")
    with pytest.raises(ConfigError, match=r"--tpus 3 \(compute.train.tpu / compute.test.tpu.*make no box"):
        claim_tpus(3, env=four, detect=lambda: [])
    with pytest.raises(ConfigError, match="--tpus 8 .*this machine has 4 TPU chip"):
        claim_tpus(8, env=four, detect=lambda: [])
    with pytest.raises(ConfigError, match="no box of 2 chips side by side among chips 1, 2"):
        claim_tpus(2, env=_env(tmp_path, "1,2"), detect=lambda: ["0", "1", "2", "3"])
    with pytest.raises(ConfigError, match="DIFFSEG_TPUS='a'"):
        tpu_pool({"DIFFSEG_TPUS": "a"})
    # What the workflow checks while it is parsed, with the stage's own key.
    with pytest.raises(ConfigError, match="compute.test.tpu: 3 TPU chips make no box"):
        check_tpu_request(3, 0, "compute.test.tpu")
    with pytest.raises(
        ConfigError, match="compute.train.tpu: 8 TPU chips: this host has 4, in boxes of 1, 2, 4"
    ):
        check_tpu_request(8, 4, "compute.train.tpu")
    assert check_tpu_request("all", 8, "x") == 8 and check_tpu_request(2, 8, "x") == 2
    assert check_tpu_request("all", 0, "x") == 0 and check_tpu_request(2, 0, "x") == 0  # no TPU here


def test_every_job_command_takes_tpus_and_a_bad_count_stops_before_jax(tmp_path, monkeypatch, capsys):
    parser = build_parser()
    for argv in (
        ["train", "--run-config", "c", "--data", "d", "--out", "o"],
        ["test", "--run-dir", "r", "--data", "d"],
        ["sampling-steps", "--run-dir", "r", "--data", "d", "--steps", "1"],
        ["uncertainty", "--run-dir", "r", "--data", "d", "--samples", "2"],
        ["predict", "x.nii.gz", "--run", "r", "-o", "y.nii.gz"],
    ):
        assert parser.parse_args([*argv, "--tpus", "all"]).tpus == "all"
        assert parser.parse_args([*argv, "--tpus", "2", "--gpus", "0"]).tpus == 2
        assert parser.parse_args(argv).tpus is None  # by hand: JAX's own default, nothing claimed
    assert tpu_count("ALL") == "all"
    with pytest.raises(SystemExit):
        parser.parse_args(["test", "--run-dir", "r", "--data", "d", "--tpus", "some"])
    for key, value in _env(tmp_path, "0,1,2,3").items():
        monkeypatch.setenv(key, value)
    code = main(["train", "--run-config", "c", "--data", "d", "--out", str(tmp_path / "o"), "--tpus", "3"])
    assert code == 2 and "compute.train.tpu" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -- The workflow ---------------------------------------------------------------------------------


def test_every_rule_that_claims_gpus_claims_tpus_from_the_same_stage():
    """Structural: each rule that passes --gpus passes --tpus too, from compute.{stage}.tpu, and asks
    Snakemake for the chips it holds (resource tpu, what --resources tpu=N counts)."""
    smk = "\n".join(p.read_text() for p in sorted((ROOT / "workflow" / "rules").glob("*.smk")))
    claiming = [block for block in smk.split("\nrule ")[1:] if "--gpus {resources.gpu}" in block]
    assert {b.split(":")[0] for b in claiming} == {"train", "test", "sampling_steps", "uncertainty"}
    for block in claiming:
        stage = "train" if block.startswith("train:") else "test"
        assert "--gpus {resources.gpu} --tpus {resources.tpus}" in block, block
        assert f'tpus=compute("{stage}", "tpu")' in block and f'tpu=tpu_chips("{stage}")' in block, block


def _dry_run(tmp_path: Path, compute: dict, pool: str | None, *args: str) -> subprocess.CompletedProcess:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_workflow import TINY

    cfg = {**TINY, "compute": compute}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFSEG_TPUS", "SLURM_JOB_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    if pool:
        env["DIFFSEG_TPUS"] = pool  # the workflow is parsed on a (fake) TPU VM of these chips
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory",
           str(tmp_path), "--configfile", str(tmp_path / "c.yaml"), "-n", "-p", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)


def test_the_workflow_passes_tpus_from_compute_and_counts_the_chips(tmp_path):
    compute = {"train": {"threads": 1, "gpu": 1, "tpu": 2}, "test": {"threads": 1, "gpu": 1, "tpu": "all"}}
    res = _dry_run(tmp_path, compute, "0,1,2,3")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    shells = [line for line in out.splitlines() if line.startswith("Shell command: diffseg ")]
    trains = [line for line in shells if line.startswith("Shell command: diffseg train")]
    tests = [line for line in shells if " --run-dir " in line]
    assert trains and all(" --gpus 1 --tpus 2 2> " in line for line in trains), trains
    assert tests and all(" --gpus 1 --tpus all 2> " in line for line in tests), tests
    train = out.split("\nrule train:")[1].split("\n\n")[0]
    test = out.split("\nrule test:")[1].split("\n\n")[0]
    assert "tpu=2" in train and "tpu=4" in test  # `all` holds the 4 chips of this host

    # A count that makes no box of this host stops the workflow before any job, naming the key.
    res = _dry_run(tmp_path, {**compute, "train": {"tpu": 3}}, "0,1,2,3")
    assert res.returncode != 0 and "compute.train.tpu: 3 TPU chips make no box" in res.stdout + res.stderr


def test_the_paper_config_asks_for_the_whole_slice_and_a_gpu():
    """config/paper.yaml runs unchanged on a GPU box (gpu: 1, tpu does nothing) or a TPU VM (the
    whole slice for one job at a time, the paper's layout; gpu does nothing)."""
    compute = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())["compute"]
    for stage in ("train", "test"):
        assert compute[stage]["gpu"] == 1 and compute[stage]["tpu"] == "all"


def test_the_tpu_profile_and_the_slurm_setting_for_tpu_vms(tmp_path):
    """profiles/tpu is found by name; profiles/slurm's commented-out setting for a partition of TPU
    VMs, uncommented, gives each job no GPU (no --gpus), the whole node and the partition, and the
    job still gets --tpus all (under SLURM it claims nothing: the node is the job's)."""
    text = (ROOT / "profiles" / "slurm" / "config.yaml").read_text()
    block = text[text.index("# set-resources:") :].splitlines()
    lines = [block[0]] + [line for line in block[1:] if line.startswith("#   ")]
    setting = yaml.safe_load("\n".join(line.removeprefix("# ") for line in lines))
    assert set(setting["set-resources"]) == {"train", "test", "sampling_steps", "uncertainty"}
    profile = tmp_path / "slurm-tpu"
    profile.mkdir()
    (profile / "config.yaml").write_text(yaml.safe_dump(setting))
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())["compute"]
    compute = {stage: {**paper[stage], "threads": 1} for stage in ("train", "test")}
    res = _dry_run(tmp_path, compute, None, "--workflow-profile", "tpu", "--profile", str(profile))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "profiles/tpu" in out, out[:1500]
    for rule in ("train", "test", "sampling_steps", "uncertainty"):
        block = out.split(f"\nrule {rule}:")[1].split("\n\n")[0]
        for res_ in ("gpu=0,", "slurm_extra=--exclusive,", "slurm_partition=tpu", "tpus=all"):
            assert res_ in block, (rule, res_, block)
        assert " --gpus 0 --tpus all 2> " in block, block
