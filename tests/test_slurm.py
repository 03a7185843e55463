"""The tiny workflow on a real one-node SLURM cluster, through ``--profile workflow/profiles/slurm``.

The cluster (``tests/slurm/cluster.py``: munge, MariaDB, slurmdbd, slurmctld, slurmd, a fake GPU)
is started by this module and stopped after it. The run goes to both tables; then ``sacct``
must show that the compute jobs (data, train, test) went through SLURM with the CPUs and
memory their rules ask for, that the local rules (run configs, tables, statistics, figures)
did not, and that the GPU requests became the plugin's ``--gpus`` option (``ReqTRES`` and
``scontrol show job``); the jobs themselves run on the CPU.

Skipped, saying why, where SLURM is not installed (``.ci/slurm`` installs it) or cannot be
started here; with ``DIFFSEG_SLURM_REQUIRED=1`` (``.ci/slurm`` sets it) that is a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm.cluster import Cluster, ClusterError, missing_binaries  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("DIFFSEG_SLURM_REQUIRED") == "1"

# The end-to-end test's tiny config (tests/test_workflow.py), cut to 3 runs (3d seg, diff and
# diff-k3) that still fill both tables; compute: asks each stage for distinct resources.
TINY = {
    "resources": "resources",
    "results": "results",
    "datasets": {
        "tiny": {
            "source": "phantom", "anatomy": "pelvis", "num_cases": 6, "seed": 0,
            "spacing": [0.75, 0.75, 2.5], "shape": [32, 32, 8],
            "split": {"train": 3, "valid": 1, "test": 2},
        }
    },
    "training": {
        "model": {"channels": [4, 8], "time_embed_dim": 8},
        "train": {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1,
                  "augment": {"enabled": False}},
        "optim": {"warmup_steps": 1},
    },
    "variants": {"diff-k3": {"diffusion": {"train_steps": 3, "sample_steps": 3}}},
    "tables": {
        "table1": {"datasets": ["tiny"], "dims": ["3d"], "cells": {"N": "seg", "Y": "diff"}},
        "table2": {"dataset": "tiny", "dims": ["3d"],
                   "ablations": {"steps": {"3": "diff-k3", "5": "diff"}}},
    },
    "stats": {"alpha": 0.01},
    "figures": {"figure2": {"dim": "3d", "cases": 1}},
    "compute": {
        "data": {"threads": 1, "mem_mb": 700, "runtime": 10},
        "train": {"threads": 2, "mem_mb": 1500, "runtime": 15, "gpu": 1},
        "test": {"threads": 1, "mem_mb": 1200, "runtime": 10, "gpu": 1, "gpu_model": "fake"},
    },
}  # fmt: skip
# rule -> (AllocCPUS, ReqMem, the GPU in ReqTRES or None)
EXPECTED = {
    "data": (1, "700M", None),
    "train": (2, "1500M", "gres/gpu=1"),
    "test": (1, "1200M", "gres/gpu:fake=1"),
}
LOCAL = ("download", "run_config", "table", "stats", "figure2", "figure3", "curves", "data_figure")


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


@pytest.mark.slow
def test_tiny_workflow_on_slurm(cluster, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    cfg = work / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    env = {
        **os.environ, **cluster.env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }  # fmt: skip
    since = datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    time.sleep(1)
    cmd = [
        sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
        "--profile", str(ROOT / "workflow/profiles/slurm"), "--directory", str(work),
        "--configfile", str(cfg), "--latency-wait", "10",
        "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2",
    ]  # fmt: skip
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
    assert sorted(jobs["rule"]) == ["data"] + ["test"] * 3 + ["train"] * 3
    assert not set(jobs["rule"]) & set(LOCAL)
    for _, job in jobs.iterrows():
        cpus, mem, gpu = EXPECTED[job["rule"]]
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
