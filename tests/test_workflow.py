"""The Snakemake workflow: lint, the run matrix from config, schema errors, and a tiny end-to-end run.

The end-to-end test needs the data/train/test stages (``diffseg data``, ``diffseg train``,
``diffseg test``); it is skipped, saying so, until those sub-commands exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from diffseg.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"

TINY = {
    "resources": "resources",
    "results": "results",
    "datasets": {
        "tiny": {
            "source": "phantom",
            "anatomy": "pelvis",
            "num_cases": 6,
            "seed": 0,
            "spacing": [0.75, 0.75, 2.5],
            "shape": [32, 32, 8],
            "split": {"train": 3, "valid": 1, "test": 2},
        }
    },
    "training": {
        "model": {"channels": [4, 8], "time_embed_dim": 8},
        "train": {
            "steps": 4,
            "batch_size": 2,
            "checkpoint_every": 2,
            "log_every": 1,
            "augment": {"enabled": False},
        },
        "optim": {"warmup_steps": 1},
    },
    "variants": {"diff-k3": {"diffusion": {"train_steps": 3, "sample_steps": 3}}},
    "tables": {
        "table1": {"datasets": ["tiny"], "dims": ["2d", "3d"], "cells": {"N": "seg", "Y": "diff"}},
        "table2": {"dataset": "tiny", "dims": ["3d"], "ablations": {"steps": {"3": "diff-k3", "5": "diff"}}},
    },
    # The studies beyond the paper, small: two sampling-step counts, two samples per case.
    "sampling_steps": {"dataset": "tiny", "dims": ["3d"], "variants": ["diff"], "steps": [1, 5]},
    "uncertainty": {"dataset": "tiny", "dims": ["3d"], "variants": ["diff"], "samples": 2},
    "stats": {"alpha": 0.01},
    "figures": {"figure2": {"dim": "3d", "cases": 1}},
    "compute": {"train": {"threads": 1}, "test": {"threads": 1}},
}


def snakemake(tmp_path: Path, cfg: dict, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run snakemake on the repo's Snakefile in ``tmp_path`` with ``cfg`` as the only config."""
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(tmp_path),
        "--configfile",
        str(cfg_path),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def test_lint():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert res.returncode == 0, res.stderr + res.stdout
    assert "Congratulations" in res.stdout + res.stderr


def test_run_matrix_from_tables(tmp_path):
    """The jobs are exactly the table cells; a new ablation is a config entry, no new rule."""
    res = snakemake(tmp_path, TINY, "-n", "--cores", "2")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    trains = sorted(
        {
            line.split("/")[3]
            for line in out.splitlines()
            if line.strip().startswith("output: results/runs/") and "best.json" in line
        }
    )
    assert trains == ["2d-diff", "2d-seg", "3d-diff", "3d-diff-k3", "3d-seg"]
    # --configfile replaces the demo config: no phantom of config/config.yaml leaks in.
    assert "phantom_abdomen" not in out
    assert "results/benchmarks/train/tiny/3d-diff-k3.tsv" in out
    assert "results/figures/phantom_tiny.png" in out


def test_experiments_and_results_prefix(tmp_path):
    cfg = {
        **TINY,
        "results": "out",
        "experiments": [{"datasets": ["tiny"], "dims": ["2d"], "variants": ["diff"], "seeds": [1]}],
    }
    res = snakemake(tmp_path, cfg, "-n", "--cores", "1")
    assert res.returncode == 0, res.stderr
    assert "out/runs/tiny/2d-diff-seed1/test/metrics.csv" in res.stdout
    assert "out/table2.csv" in res.stdout


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"tabels": {}}, "tabels"),
        ({"stats": {"alpha": 2}}, "alpha"),
        ({"datasets": {"tiny": {"source": "nifti"}}}, "nifti"),
        (
            {
                "tables": {
                    "table2": {
                        "dataset": "tiny",
                        "dims": ["3d"],
                        "ablations": {"x": {"a": "diff-bogus", "b": "diff"}},
                    }
                }
            },
            "diff-bogus",
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path, patch, needle):
    res = snakemake(tmp_path, {**TINY, **patch}, "-n")
    assert res.returncode != 0
    assert needle in res.stderr + res.stdout


# Stand-in for the data/train/test stages: writes their output contract (ARCHITECTURE.md) with
# synthetic content, and hands every other sub-command to the real CLI. It checks the
# workflow's wiring (paths, arguments, job order, report) independently of those stages.
STAND_IN = r"""#!{python}
import json, sys
from pathlib import Path
import numpy as np, nibabel as nib, pandas as pd
a = sys.argv[1:]
opt = lambda k: a[a.index(k) + 1]
cmd = a[0]
if cmd == "data":
    assert int(opt("--threads")) >= 1  # the rule passes its threads
    cfg = __import__("yaml").safe_load(open(opt("--config")))
    out = Path(cfg["results"]) / "data" / opt("--dataset")
    lab = np.zeros((8, 8, 4), np.uint8); lab[2:6, 2:6, 1:3] = 1; lab[6:8, 6:8, 2] = 2
    for u in ("u0", "u1"):
        for sub, arr in (("images", lab.astype(np.float32)), ("labels", lab)):
            (out / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr, np.eye(4)), str(out / sub / f"{{u}}.nii.gz"))
    (out / "dataset.json").write_text(json.dumps({{"classes": ["bg", "a", "b"]}}))
    (out / "split.csv").write_text("uid,split\nu0,test\nu1,test\n")
elif cmd == "data-figure":
    Path(opt("--out")).write_bytes(b"PNG")
elif cmd == "train":
    out = Path(opt("--out"))
    assert (out / "config.yaml").exists() and Path(opt("--run-config")) == out / "config.yaml"
    (out / "best.json").write_text('{{"step": 2, "mean_dice": 0.5}}')
    (out / "train_log.csv").write_text("step,loss\n1,1.0\n")
    (out / "valid.csv").write_text("step,mean_dice\n2,0.5\n")
elif cmd == "test":
    run, data = Path(opt("--run-dir")), Path(opt("--data"))
    rng = np.random.default_rng(abs(hash(run.name)) % 1000)
    rows = []
    for u in ("u0", "u1"):
        lab = np.asarray(nib.load(str(data / "labels" / f"{{u}}.nii.gz")).dataobj)
        (run / "test/predictions").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(run / "test/predictions" / f"{{u}}.nii.gz"))
        for c, share in ((1, 0.1), (2, 0.02), (3, 0.01)):
            d = float(rng.uniform(0.2, 0.9))
            rows.append((u, c, f"c{{c}}", d, d, 1.0, 1.0, False, share, 2))
    cols = ["uid", "class", "class_name", "dice", "nsd", "hd95", "cd", "missed", "volume_share",
            "checkpoint_step"]
    pd.DataFrame(rows, columns=cols).to_csv(run / "test/metrics.csv", index=False)
elif cmd == "sampling-steps":
    run, rest = Path(opt("--run-dir")), a[a.index("--steps") + 1:]
    steps = [int(k) for k in rest[: next((i for i, x in enumerate(rest) if x.startswith("--")), len(rest))]]
    rows = [(k, u, c, 0.5 + 0.01 * k + 0.1 * c, 0.5, 1.0, 1.0, False, 0.01 * k, 5)
            for k in steps for u in ("u0", "u1", "u2") for c in (1, 2)]
    cols = ["steps", "uid", "class", "dice", "nsd", "hd95", "cd", "missed", "seconds", "sample_steps"]
    (run / "sampling_steps").mkdir(exist_ok=True)
    pd.DataFrame(rows, columns=cols).to_csv(run / "sampling_steps/metrics.csv", index=False)
elif cmd == "uncertainty":
    run, n = Path(opt("--run-dir")), int(opt("--samples"))
    (run / "uncertainty").mkdir(exist_ok=True)
    pd.DataFrame({{"uid": ["u0", "u1", "u2"], "samples": n, "dice_one": [0.5, 0.6, 0.7],
                  "dice_vote": [0.55, 0.6, 0.75], "mean_entropy": [0.3, 0.2, 0.1],
                  "max_entropy": np.log(n)}}).to_csv(run / "uncertainty/cases.csv", index=False)
    pd.DataFrame({{"entropy": [0.0, np.log(n)], "voxels": [90, 10], "wrong": [5, 6]}}).to_csv(
        run / "uncertainty/histogram.csv", index=False)
else:
    from diffseg.cli import main
    sys.exit(main(a))
"""


@pytest.mark.slow
def test_workflow_wiring_and_report(tmp_path):
    """The whole graph runs to tables, stats, figures and the HTML report (stand-in stages)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "diffseg"
    exe.write_text(STAND_IN.format(python=sys.executable))
    exe.chmod(0o755)
    env_path = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    work = tmp_path / "w"
    work.mkdir()
    cfg_path = work / "tiny.yaml"
    # Table 2 over two seeds: 3d-diff (seed 0, its own) and 3d-diff-seed1, each cell.
    cfg = {**TINY, "tables": {**TINY["tables"], "table2": {**TINY["tables"]["table2"], "seeds": [0, 1]}}}
    cfg_path.write_text(yaml.safe_dump(cfg))
    base = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(work),
        "--configfile",
        str(cfg_path),
    ]
    env = {**os.environ, "PATH": env_path}
    res = subprocess.run([*base, "--cores", "2"], capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    results = work / "results"
    t1 = pd.read_csv(results / "table1.csv")
    assert len(t1) == 4 and (t1["n"] == 2).all() and (t1["misses"] == 0).all()
    t2 = pd.read_csv(results / "table2.csv")
    assert list(t2["run"]) == ["3d-diff-k3", "3d-diff"] and (t2["seeds"] == 2).all()
    assert {"DS_seed_std", "same_sign", "p_seed0", "p_seed1"} <= set(t2.columns)
    assert (results / "runs/tiny/3d-diff-k3-seed1/test/metrics.csv").exists()
    assert len(pd.read_csv(results / "figures" / "seeds.csv")) == 4  # 2 cells x 2 seeds
    steps = pd.read_csv(results / "sampling_steps.csv")
    assert list(steps["steps"]) == [1, 5] and steps["p_value"].isna().tolist() == [False, True]
    unc = pd.read_csv(results / "uncertainty.csv")
    # 5 wrong voxels tie with 85 right ones at entropy 0, 6 rank above them and tie with 4: ties count 1/2
    assert unc.iloc[0]["auroc"] == pytest.approx((5 * 85 / 2 + 6 * (85 + 4 / 2)) / (11 * 89))
    for name in ("sampling_steps", "uncertainty", "seeds"):
        assert (results / "figures" / f"{name}.png").stat().st_size > 1000
    assert (results / "table1.md").read_text().startswith("| dataset")
    assert len(pd.read_csv(results / "stats" / "ttests.csv")) == 3
    assert len(pd.read_csv(results / "stats" / "spearman.csv")) == 4
    assert (results / "figures" / "figure2.pdf").stat().st_size > 1000
    assert (results / "benchmarks" / "uncertainty" / "tiny" / "3d-diff.tsv").exists()
    assert (results / "benchmarks" / "test" / "tiny" / "2d-seg.tsv").exists()
    resolved = yaml.safe_load((results / "runs/tiny/3d-diff-k3/config.yaml").read_text())
    assert resolved["diffusion"]["train_steps"] == 3 and resolved["model"]["channels"] == [4, 8]
    # Nothing left to do: the graph is stable after a full run.
    res = subprocess.run([*base, "-n", "--cores", "1"], capture_output=True, text=True, timeout=120, env=env)
    assert "Nothing to be done" in res.stdout + res.stderr, res.stdout[-3000:]
    res = subprocess.run(
        [*base, "--report", str(work / "report.html")], capture_output=True, text=True, timeout=240, env=env
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert (work / "report.html").stat().st_size > 10_000
    # A new ablation after a full run: the same invocation plans its runs, and only those.
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["variants"]["diff-k4"] = {"diffusion": {"train_steps": 4, "sample_steps": 4}}
    cfg["tables"]["table2"]["ablations"]["steps"]["4"] = "diff-k4"
    cfg_path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([*base, "-n", "--cores", "1"], capture_output=True, text=True, timeout=120, env=env)
    planned = res.stdout + res.stderr
    assert "runs/tiny/3d-diff-k4/best.json" in planned, planned[-3000:]
    assert "runs/tiny/3d-diff/best.json" not in planned, planned[-3000:]


def _stages_available() -> bool:
    commands = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    return {"data", "train", "test"} <= set(commands)


@pytest.mark.slow
@pytest.mark.skipif(not _stages_available(), reason="needs the data/train/test CLIs (other stages)")
def test_end_to_end(tmp_path):
    res = snakemake(tmp_path, TINY, "--cores", "2", timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    results = tmp_path / "results"
    t1 = pd.read_csv(results / "table1.csv")
    assert len(t1) == 4 and set(t1["diffusion"]) == {"N", "Y"}
    assert (t1["n"] == 2).all() and t1["DS"].between(0, 1).all()
    t2 = pd.read_csv(results / "table2.csv")
    assert list(t2["setting"].astype(str)) == ["3", "5"]
    assert len(pd.read_csv(results / "stats" / "ttests.csv")) == 3
    assert len(pd.read_csv(results / "stats" / "spearman.csv")) == 4
    for name in ("figure2", "figure3"):
        for ext in ("png", "pdf"):
            assert (results / "figures" / f"{name}.{ext}").stat().st_size > 0
    assert (results / "benchmarks" / "train" / "tiny" / "3d-diff.tsv").exists()
    # The studies: K = 5 (the run's own) reproduces the test job; one sample is the test job's.
    steps = pd.read_csv(results / "sampling_steps.csv")
    assert list(steps["steps"]) == [1, 5]
    t1_diff = t1[(t1["dim"] == "3d") & (t1["diffusion"] == "Y")].iloc[0]
    assert steps.iloc[1]["DS"] == pytest.approx(t1_diff["DS"])
    unc = pd.read_csv(results / "uncertainty.csv").iloc[0]
    assert unc["dice_one"] == pytest.approx(t1_diff["DS"]) and 0 <= unc["auroc"] <= 1
    res = snakemake(tmp_path, TINY, "--report", "report.html", timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "report.html").stat().st_size > 10_000
