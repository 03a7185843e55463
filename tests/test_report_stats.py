"""Benjamini–Hochberg beside the raw p-values of the t-tests and Spearman correlations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from diffseg.report import stats


def test_bh_by_hand():
    # Sorted p: 0.01, 0.02, 0.03, 0.5 (m = 4): p*m/rank = 0.04, 0.04, 0.04, 0.5, then the
    # running minimum from the top; NaN stays NaN and is not counted in m.
    adj = stats.bh_adjust([0.03, np.nan, 0.5, 0.01, 0.02], alpha=0.05)
    assert adj["p_bh"].tolist()[:1] + adj["p_bh"].tolist()[2:] == pytest.approx([0.04, 0.5, 0.04, 0.04])
    assert np.isnan(adj["p_bh"][1])
    assert adj["significant_bh"].tolist() == [True, False, False, True, True]
    # A raw p under alpha that does not survive the correction.
    adj = stats.bh_adjust([0.009, 0.2, 0.3, 0.4], alpha=0.01)
    assert adj["p_bh"][0] == pytest.approx(0.036) and not adj["significant_bh"].any()
    ref = sps.false_discovery_control([0.009, 0.2, 0.3, 0.4], method="bh")
    assert adj["p_bh"].tolist() == pytest.approx(list(ref))
    assert stats.bh_adjust([], 0.01).empty
    assert stats.bh_adjust([np.nan], 0.01)["significant_bh"].tolist() == [False]


def _metrics(path, dice_by_case):
    rows = [(u, c, d, 0.1 * c) for u, ds in dice_by_case.items() for c, d in enumerate(ds, start=1)]
    df = pd.DataFrame(rows, columns=["uid", "class", "dice", "volume_share"])
    for col, val in (("nsd", 0.5), ("hd95", 1.0), ("cd", 1.0), ("missed", False)):
        df[col] = val
    path.parent.mkdir(parents=True)
    df.to_csv(path, index=False)


def test_paired_tests_and_spearman_carry_bh(tmp_path):
    runs = tmp_path / "runs"
    rng = np.random.default_rng(0)
    for run, shift in (("3d-seg", 0.0), ("3d-diff", 0.05), ("3d-diff-k3", 0.2)):
        cases = {f"u{i}": list(np.clip(rng.uniform(0.3, 0.7, 4) + shift, 0, 1)) for i in range(5)}
        _metrics(runs / "ds" / run / "test" / "metrics.csv", cases)
    cfg = {
        "tables": {
            "table1": {"datasets": ["ds"], "dims": ["3d"], "cells": {"N": "seg", "Y": "diff"}},
            "table2": {"dataset": "ds", "dims": ["3d"], "ablations": {"k": {"3": "diff-k3", "5": "diff"}}},
        },
        "stats": {"alpha": 0.05},
    }
    tt = stats.paired_tests(cfg, runs)
    cols = list(tt.columns)
    assert cols.index("p_bh") == cols.index("p_value") + 1 and cols[-1] == "significant_bh"
    assert tt["p_bh"].tolist() == pytest.approx(list(sps.false_discovery_control(tt["p_value"])))
    assert (tt["p_bh"] >= tt["p_value"]).all()
    assert tt["significant_bh"].tolist() == (tt["p_bh"] < 0.05).tolist()
    sp = stats.spearman(runs, [("ds", "3d-seg"), ("ds", "3d-diff")], alpha=0.05)
    assert {"p_bh", "significant_bh"} <= set(sp.columns) and len(sp) == 2
    assert sp["p_bh"].tolist() == pytest.approx(list(sps.false_discovery_control(sp["p_value"])))
    empty = stats.paired_tests({"tables": {}, "stats": {}}, runs)
    assert empty.empty and {"p_bh", "significant_bh"} <= set(empty.columns)
