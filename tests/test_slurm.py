"""The tiny workflow on a real one-node SLURM cluster, through ``--profile profiles/slurm``.

The cluster (``tests/slurm/cluster.py``: munge, MariaDB, slurmdbd, slurmctld, slurmd, a fake GPU)
is started by this module and stopped after it. The run goes to both tables; then ``sacct``
must show that the compute jobs (data, train, test, and the sampling-steps and uncertainty
studies, which ask for the test stage's resources) went through SLURM with the CPUs and
memory their rules ask for, that the local rules (run configs, tables, statistics, figures, cost,
the studies' reports) did not, and that the GPU requests became the plugin's ``--gpus`` option
(``ReqTRES`` and ``scontrol show job``); the jobs themselves run on the CPU.

A second run is preempted: its train job gets SIGTERM through ``scancel``, checkpoints, fails,
and Snakemake's retry resumes it to the parameters of an uninterrupted run (issue 15 item 2).

Skipped, saying why, where SLURM is not installed (``.ci/slurm`` installs it) or cannot be
started here; with ``DIFFSEG_SLURM_REQUIRED=1`` (``.ci/slurm`` sets it) that is a failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm.cluster import Cluster, ClusterError, missing_binaries  # noqa: E402
from test_workflow import TINY as WORKFLOW_TINY  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("DIFFSEG_SLURM_REQUIRED") == "1"

# The end-to-end test's tiny config (tests/test_workflow.py), cut to 3 runs (3d seg, diff and
# diff-k3) that still fill both tables; compute: asks each stage for distinct resources.
TINY = {
    **WORKFLOW_TINY,
    "tables": {
        "table1": {"datasets": ["tiny"], "dims": ["3d"], "cells": {"N": "seg", "Y": "diff"}},
        "table2": WORKFLOW_TINY["tables"]["table2"],
    },
    "compute": {
        "data": {"threads": 1, "mem_mb": 700, "runtime": 10},
        "train": {"threads": 2, "mem_mb": 1500, "runtime": 15, "gpu": 1},
        "test": {"threads": 1, "mem_mb": 1200, "runtime": 10, "gpu": 1, "gpu_model": "fake"},
    },
}  # fmt: skip
# compute: stage -> (AllocCPUS, ReqMem, the GPU in ReqTRES or None)
EXPECTED = {
    "data": (1, "700M", None),
    "train": (2, "1500M", "gres/gpu=1"),
    "test": (1, "1200M", "gres/gpu:fake=1"),
}
# compute rule -> the compute: stage whose resources it asks for (the studies evaluate like test)
STAGE_OF = {"data": "data", "train": "train", "test": "test", "sampling_steps": "test", "uncertainty": "test"}
LOCAL = (
    "download", "run_config", "table", "stats", "figure2", "figure3", "curves", "data_figure", "cost",
    "sampling_steps_report", "uncertainty_report", "seeds_figure",
)  # fmt: skip


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"SLURM required (DIFFSEG_SLURM_REQUIRED=1) but {reason}")
    pytest.skip(f"no SLURM cluster here: {reason} (.ci/slurm installs and runs it)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        _unavailable(f"not installed: {', '.join(missing)}")
    if os.geteuid() != 0:
        _unavailable("the test cluster's daemons run as root, and this is not root")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        _unavailable('snakemake-executor-plugin-slurm is not installed (pip install -e ".[slurm]")')
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except (ClusterError, OSError, subprocess.TimeoutExpired) as e:
        c.stop()
        _unavailable(f"the cluster did not start: {e}")
    yield c
    c.stop()


def sacct(cluster: Cluster, since: str, fields: str) -> pd.DataFrame:
    res = subprocess.run(
        ["sacct", "-X", "-P", "-a", "-S", since, "-o", fields],
        capture_output=True, text=True, timeout=60, env={**os.environ, **cluster.env}, check=True,
    )  # fmt: skip
    rows = [line.split("|") for line in res.stdout.strip().splitlines()]
    return pd.DataFrame(rows[1:], columns=rows[0])


def rule_of(comment: str) -> str:
    """The rule of a job from the plugin's ``--comment rule_{name}_wildcards_{...}``."""
    return comment.removeprefix("rule_").split("_wildcards_")[0]


def _slurm_workflow(cluster, tmp_path: Path, cfg: dict) -> tuple[Path, dict, str, list[str]]:
    """``(work folder, env, sacct's --starttime, snakemake's command without targets)`` for running
    the workflow with ``cfg`` through the SLURM profile on ``cluster``."""
    work = tmp_path / "w"
    work.mkdir()
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    env = {
        **os.environ, **cluster.env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }  # fmt: skip
    since = datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    time.sleep(1)  # sacct's start time has a resolution of a second
    cmd = [
        sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
        "--profile", str(ROOT / "profiles/slurm"), "--directory", str(work),
        "--configfile", str(work / "tiny.yaml"), "--latency-wait", "10",
        "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2",
    ]  # fmt: skip
    return work, env, since, cmd


@pytest.mark.slow
def test_tiny_workflow_on_slurm(cluster, tmp_path):
    work, env, since, cmd = _slurm_workflow(cluster, tmp_path, TINY)
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=work)
    elapsed = time.monotonic() - t0
    out = res.stdout + res.stderr
    logs = "\n".join(p.read_text()[-1500:] for p in (work / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert res.returncode == 0, f"{out[-5000:]}\n--- job logs ---\n{logs[-5000:]}"
    print(f"snakemake through SLURM took {elapsed:.0f} s")
    # The profiles: the slurm one given, profiles/default found beside the Snakefile on its own.
    assert "Using profile" in out and "workflow specific profile" in out, out[:2000]

    results = work / "results"
    assert len(pd.read_csv(results / "table1.csv")) == 2
    assert list(pd.read_csv(results / "table2.csv")["setting"].astype(str)) == ["3", "5"]
    tt = pd.read_csv(results / "stats" / "ttests.csv")
    assert len(tt) == 2 and {"p_value", "p_bh", "significant_bh"} <= set(tt.columns)
    assert (results / "figures" / "curves.png").stat().st_size > 1000
    for rule in ("data/tiny", "train/tiny/3d-diff", "test/tiny/3d-seg", "report/table1", "report/curves"):
        assert (results / "benchmarks" / f"{rule}.tsv").is_file(), rule

    jobs = sacct(cluster, since, "JobID,JobName,Comment,State,AllocCPUS,ReqMem,ReqTRES")
    print(jobs.to_string())
    assert len(jobs) > 0, "sacct shows no job: nothing went through SLURM"
    jobs["rule"] = jobs["Comment"].map(rule_of)
    assert jobs["JobName"].nunique() == 1  # the plugin names every job of a run by its run id
    assert (jobs["State"] == "COMPLETED").all(), jobs[["rule", "State"]]
    assert sorted(jobs["rule"]) == sorted(["data", "sampling_steps", "uncertainty"] + ["test", "train"] * 3)
    assert not set(jobs["rule"]) & set(LOCAL)
    for _, job in jobs.iterrows():
        cpus, mem, gpu = EXPECTED[STAGE_OF[job["rule"]]]
        assert int(job["AllocCPUS"]) == cpus, job.to_dict()
        assert job["ReqMem"] == mem, job.to_dict()
        tres = job["ReqTRES"].split(",")
        if gpu is None:
            assert not any(t.startswith("gres/gpu") for t in tres), job.to_dict()
        else:
            assert gpu in tres, job.to_dict()

    # The GPU request as the controller holds it: the plugin's --gpus=fake:1 for a test job.
    test_id = jobs.loc[jobs["rule"] == "test", "JobID"].iloc[0]
    show = subprocess.run(["scontrol", "show", "job", test_id], capture_output=True, text=True,
                          timeout=30, env=env, check=True).stdout  # fmt: skip
    assert "TresPerJob=gres:gpu:fake:1" in show, show


# -- Deployment conventions, checked without a cluster ----------------------------------------


def test_conda_envs_install_this_package_from_the_source():
    """Every rule's conda: file exists, is valid, and pip-installs the package by a path that
    resolves to this repository both from the file's folder and from .snakemake/conda/, where
    Snakemake copies it before conda runs pip beside the copy."""
    rules = ROOT / "workflow" / "rules"
    used = set()
    for smk in rules.glob("*.smk"):
        text = smk.read_text()
        for block in text.split("\nrule ")[1:]:
            if "\n    shell:" in block:
                assert "\n    conda:\n" in block, f"{smk.name}: rule {block.split(':')[0]} has no conda:"
        for line in text.split("    conda:\n")[1:]:
            value = line.split("\n")[0].strip()
            if value.startswith("conda_env("):  # common.smk's choice: the CPU, CUDA or TPU environment
                envs = ("../envs/diffseg.yaml", "../envs/diffseg-cuda.yaml", "../envs/diffseg-tpu.yaml")
                used |= {(rules / f).resolve() for f in envs}
            else:
                used.add((rules / value.strip('"')).resolve())
    assert used, "no conda: directive"
    for env_file in used:
        assert env_file.is_file() and env_file.parent == ROOT / "workflow" / "envs", env_file
        env = yaml.safe_load(env_file.read_text())
        assert env["channels"] and "conda-forge" in env["channels"]
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
        assert "pip" in env["dependencies"]
        paths = [p.removeprefix("-e").strip().split("[")[0] for p in pip if p.startswith(("-e", ".", "/"))]
        assert len(paths) == 1, pip
        for base in (env_file.parent, ROOT / ".snakemake" / "conda"):
            target = (base / paths[0]).resolve()
            assert (target / "pyproject.toml").is_file(), (base, paths[0])
            assert 'name = "diffseg"' in (target / "pyproject.toml").read_text()


def test_every_computing_rule_has_a_benchmark_and_local_rules_are_local():
    smk = "\n".join(p.read_text() for p in sorted((ROOT / "workflow" / "rules").glob("*.smk")))
    local = {name.strip().rstrip(",") for block in smk.split("localrules:\n")[1:]
             for name in block.split("\n\n")[0].split("\n") if name.strip()}  # fmt: skip
    assert set(LOCAL) <= local
    computing = set()
    for block in smk.split("\nrule ")[1:]:
        name = block.split(":")[0]
        if "\n    shell:" in block:
            assert "\n    benchmark:\n" in block, f"rule {name} computes and has no benchmark:"
            if name not in local:
                computing.add(name)
        if name in STAGE_OF:
            assert name not in local
            assert f'cpus_per_task=compute("{STAGE_OF[name]}", "threads")' in block, name
    # A new cluster job must say whose compute: resources it takes (and be expected above).
    assert computing == set(STAGE_OF), computing ^ set(STAGE_OF)


def _dry_run(tmp_path: Path, cfg: dict, *args: str) -> str:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory",
           str(tmp_path), "--configfile", str(tmp_path / "c.yaml"), "-n", *args]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr


def test_profiles_are_found_and_compute_becomes_resources(tmp_path):
    """profiles/default is used on its own, profiles/gpu by name; compute: reaches the jobs as
    the resources the SLURM plugin reads (cpus_per_task, gpu, gpu_model)."""
    train = {"threads": 3, "mem_mb": 2000, "gpu": 1, "gpu_model": "a100"}
    cfg = {**TINY, "compute": {**TINY["compute"], "train": train}}
    out = _dry_run(tmp_path, cfg)
    assert f"workflow specific profile {ROOT / 'profiles' / 'default'}" in out or (
        "workflow specific profile profiles/default" in out
    ), out[:1500]
    train = out.split("\nrule train:")[1].split("\n\n")[0]
    for res in ("cpus_per_task=3", "mem_mb=2000", "gpu=1", "gpu_model=a100"):
        assert res in train, train
    # each job claims the GPUs (or TPU chips: none by default) it asked for (diffseg.accelerators.slots)
    out = _dry_run(tmp_path, cfg, "-p")
    trains = [line for line in out.splitlines() if line.startswith("Shell command: diffseg train")]
    assert trains and all(
        line.endswith(" --gpus 1 --tpus 0 2> " + line.split(" 2> ")[1]) for line in trains
    ), trains
    out = _dry_run(tmp_path, cfg, "--workflow-profile", "gpu")
    assert "profiles/gpu" in out, out[:1500]


def test_the_plugin_turns_compute_into_sbatch_options():
    """The sbatch call the installed plugin (>= 1.9) makes from a train job's resources, and its
    refusal of the schema's old example, slurm_extra: --gres=gpu:a100:1."""
    plugin = pytest.importorskip("snakemake_executor_plugin_slurm")
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra
    from snakemake_interface_common.exceptions import WorkflowError

    class Resources(dict):
        __getattr__ = dict.get

    def job(**res):
        return type("Job", (), {"resources": Resources(res), "threads": res.get("cpus_per_task", 1),
                                "name": "train", "is_group": lambda self: False})()  # fmt: skip

    params = {"run_uuid": "u", "slurm_logfile": "l", "comment_str": "rule_train", "account": "",
              "partition": "", "workdir": "."}  # fmt: skip
    j = job(cpus_per_task=8, mem_mb=64000, runtime=2880, gpu=1, gpu_model="a100", slurm_extra="")
    call = get_submit_command(j, params) + set_gres_string(j)
    for opt in ("--cpus-per-task=8", "--mem 64000", "-t 2880", "--gpus=a100:1"):
        assert opt in call, (opt, call)
    j = job(cpus_per_task=2, mem_mb=100, runtime=1, gpu=1, gpu_model="", slurm_extra="")
    assert set_gres_string(j).strip() == "--gpus=1"
    assert set_gres_string(job(cpus_per_task=1, gpu=0, gpu_model="")) == ""
    with pytest.raises(WorkflowError, match="gres|GRES"):
        validate_slurm_extra(job(slurm_extra="--gres=gpu:a100:1"))
    assert plugin  # imported for the skip


# -- Item 2 of issue 15: preemption -----------------------------------------------------------
#
# A running train job is sent `scancel --signal=TERM <job>`: SIGTERM to the processes of its
# job steps, so to `diffseg train` in the plugin's `srun` step (and to the step's Snakemake,
# which waits for its job). `diffseg train` finishes its step, checkpoints and exits 143; the
# job fails; Snakemake's retry (`retries: 1` in the profile) resubmits it and it resumes.
# Snakemake deletes the failed job's declared outputs before the retry; checkpoints are not
# declared, so they stay. Not `--full`: it signals the batch script's `srun` too, which then
# cancels its step ("srun: forcing job termination", the task SIGKILLed) before the save: the
# retry resumes from the periodic checkpoint before (as after a kill; tests/test_interrupt.py).
# `--batch` reached `diffseg train` here only through `srun` forwarding it, racing the batch
# script's `sh`, which dies of the signal and ends the job. The volume is larger than TINY's,
# so the 120 steps take long enough (about 25 s on a CPU) for the signal to land mid-run.
PREEMPT_STEPS, PREEMPT_EVERY = 120, 20
PREEMPT_SHAPE = [48, 48, 16]
SCANCEL = os.environ.get("DIFFSEG_TEST_SCANCEL", "")  # more scancel options, e.g. --full, to see that


def _latest_state(run_dir: Path) -> tuple[dict, int]:
    """The latest checkpoint's state (params, optimizer state, step) of a run folder."""
    import json

    import jax

    from diffseg.config import load_yaml
    from diffseg.runs import RunCheckpoints, build_model
    from diffseg.train.step import build_optimizer, init_state

    run_cfg = load_yaml(run_dir / "config.yaml")
    info = json.loads((run_dir / "dataset.json").read_text())
    model = build_model(run_cfg, int(info["num_classes"]))
    tx, _ = build_optimizer(run_cfg)
    like = jax.eval_shape(lambda: init_state(model, tx, tuple(info["shape"]), jax.random.key(0)))
    ckpt = RunCheckpoints(run_dir)
    state, _ = ckpt.restore(like)
    ckpt.close()
    return state, int(state["step"])


def _saved_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


@pytest.mark.slow
def test_preempted_training_resumes_to_the_same_parameters(cluster, tmp_path):
    import jax
    import numpy as np

    from diffseg.runs import load_trained

    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["datasets"]["tiny"]["shape"] = PREEMPT_SHAPE
    cfg["training"]["train"].update(
        {"steps": PREEMPT_STEPS, "checkpoint_every": PREEMPT_EVERY, "log_every": 5}
    )
    work, env, since, snakemake = _slurm_workflow(cluster, tmp_path, cfg)
    run = work / "results" / "runs" / "tiny" / "3d-diff"
    train_log = work / "results" / "logs" / "train" / "tiny" / "3d-diff.log"
    cmd = [*snakemake, str(run.relative_to(work) / "best.json")]
    t0 = time.monotonic()
    out_file = tmp_path / "snakemake.out"
    with out_file.open("w") as out_fh:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out_fh, stderr=subprocess.STDOUT, text=True)
    try:
        # 1. Wait for the train job to run past its first checkpoint, then do what a time limit does.
        job_id, deadline = None, time.monotonic() + 600
        while job_id is None and time.monotonic() < deadline and proc.poll() is None:
            q = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i %k"], capture_output=True, text=True,
                               env=env, timeout=30)  # fmt: skip
            running = [line.split()[0] for line in q.stdout.splitlines() if "rule_train" in line]
            if running and _saved_steps(run):
                job_id = running[0]
            else:
                time.sleep(0.5)
        assert job_id, (
            f"the train job was never seen running past a checkpoint\n{out_file.read_text()[-3000:]}"
        )
        signalled_after = _saved_steps(run)
        subprocess.run(
            ["scancel", "--signal=TERM", *SCANCEL.split(), job_id], check=True, env=env, timeout=30
        )
        # The first attempt's own log, read before the retry's `2> {log}` replaces it.
        first_log, deadline = "", time.monotonic() + 120
        while "checkpoint saved at step" not in first_log and time.monotonic() < deadline:
            time.sleep(0.2)
            first_log = train_log.read_text() if train_log.is_file() else ""
            if "resuming" in first_log or proc.poll() is not None:  # the retry's log, or all over
                break
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    elapsed = time.monotonic() - t0
    out = out_file.read_text()
    slurm_logs = {p.name: p.read_text() for p in (work / ".snakemake" / "slurm_logs").rglob("*.log")}
    print(f"snakemake through SLURM, preempted once, took {elapsed:.0f} s; signalled after {signalled_after}")
    print(first_log[-600:])
    # 2. The signal reached `diffseg train`, which saved and stopped; Snakemake's retry resumed it.
    assert proc.returncode == 0, f"{out[-5000:]}\n--- job logs ---\n{str(slurm_logs)[-5000:]}"
    match = re.search(r"SIGTERM received; checkpoint saved at step (\d+)", first_log)
    assert match, f"no SIGTERM checkpoint in the first attempt's log:\n{first_log[-3000:]}"
    stopped_at = int(match.group(1))
    assert signalled_after[-1] <= stopped_at < PREEMPT_STEPS, (signalled_after, stopped_at)
    resumed = train_log.read_text()
    assert (
        f"resuming {run.relative_to(work)} from step {stopped_at} of {PREEMPT_STEPS} (session 1)" in resumed
    ), resumed[-3000:]
    log = pd.read_csv(run / "train_log.csv")
    assert list(log["step"]) == list(range(5, PREEMPT_STEPS + 1, 5))  # log_every: 5
    assert set(log.loc[log["step"] <= stopped_at, "session"]) == {0}
    assert set(log.loc[log["step"] > stopped_at, "session"]) == {1}  # only the remaining steps ran again
    assert list(pd.read_csv(run / "valid.csv")["step"]) == list(
        range(PREEMPT_EVERY, PREEMPT_STEPS + 1, PREEMPT_EVERY)
    )

    # 3. sacct: the first attempt failed (its step's Snakemake exits 1 after the 143), the retry completed.
    jobs = sacct(cluster, since, "JobID,Comment,State,ExitCode")
    print(jobs.to_string())
    trains = jobs[jobs["Comment"].map(rule_of) == "train"].sort_values("JobID", key=lambda s: s.astype(int))
    assert list(trains["JobID"])[0] == job_id and len(trains) == 2, trains
    assert trains["State"].iloc[0] in ("FAILED", "CANCELLED", "CANCELLED+"), trains
    assert trains["ExitCode"].iloc[0] != "0:0" and trains["State"].iloc[1] == "COMPLETED", trains
    fields = ["-o", "JobID,State,ExitCode"]
    steps = subprocess.run(["sacct", "-P", "-n", "-j", job_id, *fields], capture_output=True, text=True,
                           env=env, timeout=60, check=True).stdout  # fmt: skip
    print(steps)
    assert f"{job_id}.0|FAILED" in steps, steps  # the srun step that ran `diffseg train`

    # 4. The same parameters as an uninterrupted run of the same config, here without SLURM.
    ref = tmp_path / "ref"
    res = subprocess.run(
        [sys.executable, "-m", "diffseg.cli", "train", "--run-config", str(run / "config.yaml"),
         "--data", str(work / "results/data/tiny"), "--out", str(ref)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    (a, a_step), (b, b_step) = _latest_state(run), _latest_state(ref)
    assert a_step == b_step == PREEMPT_STEPS
    assert _saved_steps(run)[-1] == PREEMPT_STEPS
    same = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
    assert all(jax.tree.leaves(same)), "the resumed run's final state differs from the uninterrupted run's"
    for x, y in zip(
        jax.tree.leaves(load_trained(run)[1]), jax.tree.leaves(load_trained(ref)[1]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- Issue 29: one run as two SLURM tasks ----------------------------------------------------
#
# compute.train.tasks: 2 makes the train job a job of 2 tasks (the plugin's multi-task route:
# resources tasks and mpi, so its job step runs the rule's own `srun -n 2` instead of `srun -n1`);
# both `diffseg train` processes join one run by JAX's SLURM detection and train it together.
# Then the run is tested by one process (the test job), and its parameters equal a run of the
# same config by one process with 2 host devices, here without SLURM.


@pytest.mark.slow
def test_a_two_task_train_job_is_one_run(cluster, tmp_path):
    from test_distributed import assert_same_up_to_rounding

    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["compute"]["train"] = {"threads": 1, "mem_mb": 1500, "runtime": 15, "tasks": 2}
    work, env, since, snakemake = _slurm_workflow(cluster, tmp_path, cfg)
    run = work / "results" / "runs" / "tiny" / "3d-diff"
    cmd = [*snakemake, str(run.relative_to(work) / "test" / "metrics.csv")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=work)
    logs = "\n".join(p.read_text()[-1500:] for p in (work / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert res.returncode == 0, f"{(res.stdout + res.stderr)[-5000:]}\n--- job logs ---\n{logs[-5000:]}"
    train_log = (work / "results" / "logs" / "train" / "tiny" / "3d-diff.log").read_text()
    print(train_log[:600])
    for i in range(2):  # both tasks' stderr, srun-collected into the rule's log
        line = rf"diffseg: process {i} of 2 \(SLURM job \d+, 2 tasks\)"
        assert re.search(line, train_log), train_log[-3000:]
    assert "using the 2 devices of the run's 2 processes" in train_log
    assert (run / "test" / "metrics.csv").is_file()

    jobs = sacct(cluster, since, "JobID,Comment,State,AllocCPUS,NTasks")
    print(jobs.to_string())
    train = jobs[jobs["Comment"].map(rule_of) == "train"]
    assert len(train) == 1 and train["State"].iloc[0] == "COMPLETED", jobs
    assert int(train["AllocCPUS"].iloc[0]) == 2  # 2 tasks of 1 CPU (threads: 1)
    fields = ["-o", "JobID,NTasks,State"]
    steps = subprocess.run(["sacct", "-P", "-n", "-j", train["JobID"].iloc[0], *fields], capture_output=True,
                           text=True, env=env, timeout=60, check=True).stdout  # fmt: skip
    print(steps)
    assert re.search(rf"{train['JobID'].iloc[0]}\.0\|2\|COMPLETED", steps), steps  # the srun step: 2 tasks

    # The same parameters as one process on 2 host devices, here without SLURM.
    ref = tmp_path / "ref"
    one = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "DIFFSEG_ALLOW_CPU": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "diffseg.cli", "train", "--run-config", str(run / "config.yaml"),
         "--data", str(work / "results/data/tiny"), "--out", str(ref)],
        capture_output=True, text=True, env=one, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    (a, a_step), (b, b_step) = _latest_state(run), _latest_state(ref)
    assert a_step == b_step
    lr = max(float(v) for k, v in yaml.safe_load((run / "config.yaml").read_text())["optim"].items()
             if k.endswith("learning_rate"))  # fmt: skip
    assert_same_up_to_rounding(a["params"], b["params"], a_step, lr)
    losses = [pd.read_csv(r / "train_log.csv")["loss"] for r in (run, ref)]
    np.testing.assert_allclose(*losses, rtol=1e-5)
