"""Tables, statistics and figures on synthetic metrics.csv files with hand-checked numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from diffseg import matrix
from diffseg.cli import main
from diffseg.errors import ConfigError, DataError
from diffseg.report import stats, tables

CFG = {
    "tables": {
        "table1": {"datasets": ["ds"], "dims": ["3d"], "cells": {"N": "seg", "Y": "diff"}},
        "table2": {"dataset": "ds", "dims": ["3d"], "ablations": {"dice": {"N": "diff-nodice", "Y": "diff"}}},
    },
    "stats": {"alpha": 0.01},
}


def write(runs, run, rows):
    """rows: (uid, class, dice, nsd, hd95, cd, missed, volume_share)."""
    df = pd.DataFrame(rows, columns=["uid", "class", "dice", "nsd", "hd95", "cd", "missed", "volume_share"])
    df["class_name"] = df["class"].map(lambda c: f"c{c}")
    path = runs / "ds" / run / "test" / "metrics.csv"
    path.parent.mkdir(parents=True)
    df.to_csv(path, index=False)


@pytest.fixture
def runs(tmp_path):
    r = tmp_path / "runs"
    # seg: case a classes (1.0, 0.5) -> 0.75; case b (0.0 missed, 0.8) -> 0.4; case c (0.6, 0.6)
    write(
        r,
        "3d-seg",
        [
            ("a", 1, 1.0, 0.9, 2.0, 1.0, False, 0.10),
            ("a", 2, 0.5, 0.3, 4.0, 3.0, False, 0.01),
            ("b", 1, 0.0, 0.0, np.nan, np.nan, True, 0.12),
            ("b", 2, 0.8, 0.7, 6.0, 2.0, False, 0.02),
            ("c", 1, 0.6, 0.5, 3.0, 1.0, False, 0.08),
            ("c", 2, 0.6, 0.5, 5.0, 1.0, False, 0.03),
        ],
    )
    write(
        r,
        "3d-diff",
        [
            ("a", 1, 0.9, 0.9, 2.0, 1.0, False, 0.10),
            ("a", 2, 0.7, 0.3, 4.0, 3.0, False, 0.01),
            ("b", 1, 0.5, 0.4, 3.0, 2.0, False, 0.12),
            ("b", 2, 0.7, 0.7, 6.0, 2.0, False, 0.02),
            ("c", 1, 0.7, 0.5, 3.0, 1.0, False, 0.08),
            ("c", 2, 0.6, 0.5, 5.0, 1.0, False, 0.03),
        ],
    )
    write(
        r,
        "3d-diff-nodice",
        [
            ("a", 1, 0.2, 0.1, 9.0, 5.0, False, 0.10),
            ("a", 2, 0.1, 0.1, 9.0, 5.0, False, 0.01),
            ("b", 1, 0.3, 0.2, 9.0, 5.0, False, 0.12),
            ("b", 2, 0.2, 0.1, 9.0, 5.0, False, 0.02),
            ("c", 1, 0.4, 0.1, 9.0, 5.0, False, 0.08),
            ("c", 2, 0.1, 0.1, 9.0, 5.0, False, 0.03),
        ],
    )
    return r


def test_table1_hand_values(runs):
    t = tables.build_table(CFG, "table1", runs)
    n = t[t["diffusion"] == "N"].iloc[0]
    seg = [0.75, 0.4, 0.6]
    assert n["DS"] == pytest.approx(np.mean(seg))
    assert n["DS_std"] == pytest.approx(np.std(seg, ddof=1))
    # HD: case b has one non-missing class (6.0); misses left out of HD, counted separately.
    assert n["HD"] == pytest.approx(np.mean([3.0, 6.0, 4.0]))
    assert n["NSD"] == pytest.approx(np.mean([0.6, 0.35, 0.5]))
    assert (n["misses"], n["n"]) == (1, 3)
    diff = [0.8, 0.6, 0.65]
    assert n["p_value"] == pytest.approx(sps.ttest_rel(seg, diff).pvalue)
    assert np.isnan(t[t["diffusion"] == "Y"].iloc[0]["p_value"])


def test_table2_and_markdown(runs):
    t = tables.build_table(CFG, "table2", runs)
    assert list(t["setting"]) == ["N", "Y"]
    assert t.iloc[0]["DS"] == pytest.approx(np.mean([0.15, 0.25, 0.25]))
    assert t.iloc[0]["p_value"] == pytest.approx(sps.ttest_rel([0.15, 0.25, 0.25], [0.8, 0.6, 0.65]).pvalue)
    md = tables.to_markdown(t)
    assert "| 3d | dice | N | 3d-diff-nodice | 0.217 (0.058)" in md


def test_table5_is_an_ablation_table_with_its_own_tests(runs):
    """A further ablation table (table5: what the reference code changed) is built, tested and
    needed like table2, from config alone."""
    cfg = {
        **CFG,
        "tables": {
            **CFG["tables"],
            "table5": {
                "dataset": "ds",
                "dims": ["3d"],
                "ablations": {"time": {"reference": "diff", "after_norm": "seg"}},
            },
        },
    }
    t = tables.build_table(cfg, "table5", runs)
    assert list(t["setting"]) == ["reference", "after_norm"] and list(t["run"]) == ["3d-diff", "3d-seg"]
    assert np.isnan(t.iloc[0]["p_value"])
    assert t.iloc[1]["p_value"] == pytest.approx(sps.ttest_rel([0.75, 0.4, 0.6], [0.8, 0.6, 0.65]).pvalue)
    tt = stats.paired_tests(cfg, runs)
    assert ("table5", "time", "3d-seg", "3d-diff") in set(
        zip(tt["table"], tt["comparison"], tt["run_a"], tt["run_b"], strict=True)
    )
    assert matrix.table_names(cfg) == ["table1", "table2", "table5"]
    with pytest.raises(ConfigError, match="unknown table 'table9'"):
        matrix.cells(cfg, "table9")


def test_runs_needed_and_experiments():
    exp = {"datasets": ["ds"], "dims": ["2d"], "variants": ["diff"], "seeds": [1, 2]}
    cfg = {**CFG, "experiments": [exp]}
    assert matrix.runs_needed(cfg) == [
        ("ds", "2d-diff-seed1"),
        ("ds", "2d-diff-seed2"),
        ("ds", "3d-diff"),
        ("ds", "3d-diff-nodice"),
        ("ds", "3d-seg"),
    ]
    with pytest.raises(ConfigError, match="experiments\\[0\\]"):
        matrix.runs_needed({"experiments": [{"datasets": ["ds"]}]})
    with pytest.raises(ConfigError, match="tables.table2.ablations.x"):
        bad = {"dataset": "d", "dims": ["2d"], "ablations": {"x": {"a": "b"}}}
        matrix.table2_cells({"tables": {"table2": bad}})


def test_stats(runs):
    tt = stats.paired_tests(CFG, runs)
    assert list(tt["run_a"]) == ["3d-seg", "3d-diff-nodice"]
    assert (tt["run_b"] == "3d-diff").all()
    assert tt.iloc[0]["p_value"] == pytest.approx(sps.ttest_rel([0.75, 0.4, 0.6], [0.8, 0.6, 0.65]).pvalue)
    assert tt.iloc[0]["mean_diff"] == pytest.approx(np.mean([0.75, 0.4, 0.6]) - np.mean([0.8, 0.6, 0.65]))
    cs = stats.class_summary(tables.read_metrics(runs / "ds" / "3d-seg" / "test" / "metrics.csv"))
    assert cs["dice"].tolist() == pytest.approx([np.mean([1.0, 0.0, 0.6]), np.mean([0.5, 0.8, 0.6])])
    assert cs["volume_share"].tolist() == pytest.approx([0.1, 0.02])
    sp = stats.spearman(runs, [("ds", "3d-seg")])
    assert np.isnan(sp.iloc[0]["r"])  # two classes: no correlation reported


def test_spearman_against_scipy(tmp_path):
    share = [0.3, 0.1, 0.01, 0.05, 0.2]
    dice = [0.9, 0.7, 0.2, 0.6, 0.5]
    rows = [("u", i + 1, d, d, 1.0, 1.0, False, s) for i, (d, s) in enumerate(zip(dice, share, strict=True))]
    write(tmp_path, "2d-diff", rows)
    sp = stats.spearman(tmp_path, [("ds", "2d-diff")]).iloc[0]
    ref = sps.spearmanr(share, dice)
    assert (sp["r"], sp["p_value"]) == pytest.approx((ref.statistic, ref.pvalue))
    assert sp["classes"] == 5


def test_bad_metrics(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("uid,class,dice\na,1,0.5\n")
    with pytest.raises(DataError, match="missing columns"):
        tables.read_metrics(p)
    with pytest.raises(DataError, match="not found"):
        tables.read_metrics(tmp_path / "none.csv")


def test_cli_and_figure3(runs, tmp_path):
    import yaml

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    out = tmp_path / "table1.csv"
    assert (
        main(
            [
                "table",
                "--which",
                "table1",
                "--config",
                str(cfg),
                "--runs",
                str(runs),
                "--out",
                str(out),
                "--markdown",
                str(tmp_path / "t1.md"),
            ]
        )
        == 0
    )
    assert len(pd.read_csv(out)) == 2 and (tmp_path / "t1.md").read_text().startswith("| dataset")
    assert (
        main(
            [
                "stats",
                "--config",
                str(cfg),
                "--runs",
                str(runs),
                "--ttests",
                str(tmp_path / "t.csv"),
                "--spearman",
                str(tmp_path / "s.csv"),
            ]
        )
        == 0
    )
    assert len(pd.read_csv(tmp_path / "s.csv")) == 2
    png = tmp_path / "f3.png"
    assert (
        main(
            [
                "figure",
                "--which",
                "figure3",
                "--config",
                str(cfg),
                "--results",
                str(runs.parent),
                "--out",
                str(png),
                str(tmp_path / "f3.pdf"),
            ]
        )
        == 0
    )
    assert png.stat().st_size > 1000 and (tmp_path / "f3.pdf").exists()
    assert (
        main(
            [
                "table",
                "--which",
                "table1",
                "--config",
                str(cfg),
                "--runs",
                str(tmp_path / "no"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
