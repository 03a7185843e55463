"""Significance tests and correlations behind the paper's claims.

* ``paired_tests``: paired Student's t-test (``scipy.stats.ttest_rel``) on per-case mean
  foreground Dice between the paired cells of every configured table (see ``tables`` for the pairs),
  with ``significant = p < alpha`` (``stats.alpha``, default 0.01), and beside the raw p-value
  the Benjamini–Hochberg adjusted one over all the tests of the file (``p_bh``,
  ``scipy.stats.false_discovery_control``) with ``significant_bh = p_bh < alpha``: about ten
  comparisons are tested at once, so the raw ``significant`` over-states discoveries.
* ``spearman``: per model, Spearman's rank correlation across foreground classes between the
  class's mean volume share (``volume_share`` column of metrics.csv, the class's share of the
  label volume, averaged over test cases) and its mean Dice over test cases (Figure 3); the
  same ``p_bh`` / ``significant_bh`` over the models.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats

from diffseg.errors import DataError
from diffseg.matrix import cells, table_names
from diffseg.report.tables import MetricsCache, compare_seeds, metrics_path, read_metrics, seed_cases


def alpha_of(config: Mapping[str, Any]) -> float:
    """The significance level ``stats.alpha`` (default 0.01)."""
    return float((config.get("stats") or {}).get("alpha", 0.01))


def bh_adjust(p_values: pd.Series | list[float], alpha: float) -> pd.DataFrame:
    """Benjamini–Hochberg adjusted p-values and decisions for one family of tests.

    Args:
        p_values: raw p-values; NaN (a test that could not be computed) stays NaN and is not
            counted in the family.
        alpha: the false discovery rate to control.

    Returns:
        Columns ``p_bh`` (``scipy.stats.false_discovery_control(method="bh")``) and
        ``significant_bh`` (``p_bh < alpha``; False where NaN), in the input's order.
    """
    p = pd.Series(p_values, dtype=float).reset_index(drop=True)
    adjusted = pd.Series(float("nan"), index=p.index)
    ok = p.notna()
    if ok.any():
        adjusted[ok] = stats.false_discovery_control(p[ok].to_numpy(), method="bh")
    return pd.DataFrame({"p_bh": adjusted, "significant_bh": (adjusted < alpha).fillna(False).astype(bool)})


def _with_bh(df: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """``df`` with ``p_bh`` and ``significant_bh`` after ``p_value`` (a family: the whole table)."""
    if df.empty:
        return df.assign(p_bh=pd.Series(dtype=float), significant_bh=pd.Series(dtype=bool))
    adj = bh_adjust(df["p_value"], alpha)
    out = df.reset_index(drop=True)
    at = list(out.columns).index("p_value") + 1
    out.insert(at, "p_bh", adj["p_bh"])
    out["significant_bh"] = adj["significant_bh"]
    return out


def paired_tests(config: Mapping[str, Any], runs_dir: str | Path) -> pd.DataFrame:
    """One row per distinct pair of each configured table.

    Columns: ``table, dataset, dim, comparison, run_a, run_b, n, mean_a, mean_b, mean_diff,
    t, p_value, p_bh, alpha, significant, significant_bh`` (``mean_diff = mean_a - mean_b``
    of per-case mean Dice; ``run_b`` is the reference: Table 1's Y cell, Table 2's ``diff``
    run; ``p_bh``: Benjamini–Hochberg over every row, see ``bh_adjust``). A table over several
    seeds tests per-case Dice averaged over seeds and adds ``seeds``, ``same_sign``,
    ``diff_seed{s}`` and ``p_seed{s}`` (``diffseg.report.tables.compare_seeds``).
    """
    alpha = alpha_of(config)
    load = MetricsCache(runs_dir)
    rows, seen = [], set()
    for which in table_names(config):
        for cell in cells(config, which):
            a, b = cell["run"], cell["pair_run"]
            key = (which, cell["dataset"], a, b)
            if a == b or key in seen:
                continue
            seen.add(key)
            where = f"{which} {cell['dataset']} {a}"
            ma, mb = load.seeds(cell["dataset"], cell["runs"]), load.seeds(cell["dataset"], cell["pair_runs"])
            comparison = compare_seeds(ma, mb, cell["seeds"], where)
            da, db = seed_cases(ma, where)["dice"].mean(), seed_cases(mb, where)["dice"].mean()
            p = comparison.pop("p_value")
            row = {
                "table": which,
                "dataset": cell["dataset"],
                "dim": cell["dim"],
                "comparison": cell.get("ablation", "diffusion"),
                "run_a": a,
                "run_b": b,
                "n": comparison.pop("n"),
                "mean_a": da,
                "mean_b": db,
                "mean_diff": da - db,
                "t": comparison.pop("t"),
                "p_value": p,
                "alpha": alpha,
                "significant": bool(p < alpha) if pd.notna(p) else False,
            }
            if comparison:  # several seeds
                row["seeds"] = len(cell["seeds"])
                row.update(comparison)
            rows.append(row)
    return _with_bh(pd.DataFrame(rows), alpha)


def class_summary(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per foreground class: ``class, class_name, dice, volume_share, n`` (means over cases).

    Dice counts a miss as 0; NaN Dice (class absent from label and prediction) is skipped.
    """
    if "volume_share" not in metrics.columns:
        raise DataError("metrics.csv: no volume_share column, needed for the Spearman correlation")
    m = metrics.copy()
    if "class_name" not in m.columns:
        m["class_name"] = m["class"].astype(str)
    out = m.groupby(["class", "class_name"], sort=True).agg(
        dice=("dice", "mean"), volume_share=("volume_share", "mean"), n=("uid", "nunique")
    )
    return out.reset_index()


def class_spearman(summary: pd.DataFrame) -> tuple[float, float, int]:
    """Spearman (r, p, classes) of volume share vs Dice over a ``class_summary``'s classes.

    Classes with NaN Dice or share are left out; fewer than 3 classes give NaN (a correlation
    over so few means nothing).
    """
    cs = summary.dropna(subset=["dice", "volume_share"])
    if len(cs) < 3:
        return float("nan"), float("nan"), len(cs)
    res = stats.spearmanr(cs["volume_share"], cs["dice"])
    return float(res.statistic), float(res.pvalue), len(cs)


def spearman(runs_dir: str | Path, models: list[tuple[str, str]], alpha: float = 0.01) -> pd.DataFrame:
    """Spearman r between class mean volume share and class mean Dice, one row per model.

    Args:
        runs_dir: ``{results}/runs``.
        models: ``(dataset, run)`` pairs.
        alpha: significance level.

    Returns:
        Columns ``dataset, run, classes, r, p_value, p_bh, alpha, significant,
        significant_bh`` (``p_bh``: Benjamini–Hochberg over the models).
    """
    rows = []
    for dataset, run in models:
        r, p, n = class_spearman(class_summary(read_metrics(metrics_path(runs_dir, dataset, run))))
        rows.append(
            {
                "dataset": dataset,
                "run": run,
                "classes": n,
                "r": r,
                "p_value": p,
                "alpha": alpha,
                "significant": bool(p < alpha) if pd.notna(p) else False,
            }
        )
    columns = ["dataset", "run", "classes", "r", "p_value", "alpha", "significant"]  # also when empty
    return _with_bh(pd.DataFrame(rows, columns=columns), alpha)
