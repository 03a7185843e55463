"""The paper's Tables 1 and 2 (with the standard deviations of Tables 3 and 4), and more tables
of the same ablation form as Table 2 (``table5``: what the reference code changed).

Aggregation (paper 4.2 and the captions of Tables 3-4: "averaged over foreground classes,
reported together with standard deviations"), from one run's ``test/metrics.csv`` (one row
per test case × foreground class):

1. Per case, the mean over its foreground classes: Dice and NSD over every class row whose
   value is not NaN (a missed class has Dice 0 / NSD 0, so it counts as 0; NaN only when the
   class is absent from both label and prediction); HD95 and CD over the non-missing
   (non-NaN) values only.
2. Per cell, the mean and the sample standard deviation (ddof = 1) over cases of these
   per-case means (NaN values, e.g. a case whose every class was missed, are skipped for
   HD/CD).
3. ``misses`` = the number of (case, class) rows with ``missed`` true; ``n`` = the number of
   test cases.
4. ``p_value``: paired Student's t-test (``scipy.stats.ttest_rel``) on the per-case mean
   foreground Dice of the row's run against its pair (Table 1: N against Y of the same
   dataset and dim; Table 2 and every other ablation table: each setting against the ``diff``
   run of the same dim), cases
   matched by ``uid``. Blank for the reference row itself.
5. Seeds (a table's ``seeds: [0, 1, 2]``, ``diffseg.matrix``): each cell is one run per seed.
   Step 1 is done per seed and the per-case values averaged over seeds; steps 2 and 4 use these
   averages. ``{col}_seed_std`` is the standard deviation over seeds of each seed's mean over
   cases; each pair is also tested per seed (``p_seed{s}``) and ``same_sign`` says whether
   the difference of mean Dice has the same sign in every seed. One seed: steps 1-4 as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from diffseg.errors import DataError
from diffseg.matrix import cells

METRICS = ("dice", "nsd", "hd95", "cd")
COLUMNS = {"dice": "DS", "nsd": "NSD", "hd95": "HD", "cd": "CD"}
REQUIRED = ("uid", "class", "dice", "nsd", "hd95", "cd", "missed")


def read_metrics(path: str | Path) -> pd.DataFrame:
    """Read a ``test/metrics.csv``; rows = case × foreground class, columns at least ``REQUIRED``."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"uid": str})
    except FileNotFoundError:
        raise DataError(f"{path}: metrics file not found (has the test job run?)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{path}: not a readable CSV: {err}") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}")
    if df.empty:
        raise DataError(f"{path}: no rows")
    df["missed"] = df["missed"].astype(str).str.lower().isin(("true", "1", "1.0"))
    return df


def per_case(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per-case means over foreground classes: index ``uid``, columns ``dice, nsd, hd95, cd``.

    NaNs are skipped (pandas' default), so missed classes count as 0 in Dice/NSD and are
    left out of HD/CD, as the module docstring states.
    """
    return metrics.groupby("uid", sort=True)[list(METRICS)].mean()


def summarise(metrics: pd.DataFrame) -> dict[str, Any]:
    """One table row: ``DS, DS_std, NSD, NSD_std, HD, HD_std, CD, CD_std, misses, n``."""
    cases = per_case(metrics)
    row: dict[str, Any] = {}
    for metric, col in COLUMNS.items():
        row[col] = float(cases[metric].mean())
        row[f"{col}_std"] = float(cases[metric].std(ddof=1))
    row["misses"] = int(metrics["missed"].sum())
    row["n"] = int(len(cases))
    return row


def ttest_cases(da: pd.Series, db: pd.Series) -> tuple[float, float, int]:
    """Paired t-test of two per-case series (index ``uid``), cases matched by uid.

    Returns ``(t statistic, p value, number of paired cases)``; NaN when fewer than 2 pairs.
    """
    joined = pd.concat({"a": da, "b": db}, axis=1, join="inner").dropna()
    if len(joined) < 2:
        return float("nan"), float("nan"), int(len(joined))
    from scipy import stats  # imported when a test runs: `diffseg status` reads this module

    res = stats.ttest_rel(joined["a"], joined["b"])
    return float(res.statistic), float(res.pvalue), int(len(joined))


def paired_ttest(a: pd.DataFrame, b: pd.DataFrame) -> tuple[float, float, int]:
    """Paired t-test of per-case mean foreground Dice of two runs' metrics, cases matched by uid.

    Returns ``(t statistic, p value, number of paired cases)``; NaN when fewer than 2 pairs.
    """
    return ttest_cases(per_case(a)["dice"], per_case(b)["dice"])


def seed_cases(frames: list[pd.DataFrame], where: str = "") -> pd.DataFrame:
    """Per-case means over foreground classes, averaged over seeds: index ``uid``, columns ``METRICS``.

    Args:
        frames: one ``metrics.csv`` per seed of a cell (one frame: :func:`per_case` of it).
        where: the cell, for the error message.

    Raises:
        DataError: the seeds' runs were tested on different cases.
    """
    cases = [per_case(m) for m in frames]
    if len(cases) == 1:
        return cases[0]
    for other in cases[1:]:
        if set(other.index) != set(cases[0].index):
            raise DataError(f"{where}: the seeds' runs were tested on different cases")
    return pd.concat(cases).groupby(level=0, sort=True).mean()


def summarise_seeds(frames: list[pd.DataFrame], where: str = "") -> dict[str, Any]:
    """One table row from one ``metrics.csv`` per seed (one frame: :func:`summarise`).

    Several seeds: each metric is the mean over cases of the per-case value averaged over seeds,
    ``{col}_std`` the between-case standard deviation of those averages and ``{col}_seed_std``
    the between-seed one (of each seed's mean over cases; ddof = 1); ``misses`` is the mean number
    of missed structures per seed; ``seeds`` the number of seeds.
    """
    if len(frames) == 1:
        return summarise(frames[0])
    cases = seed_cases(frames, where)
    per_seed = [per_case(m) for m in frames]
    row: dict[str, Any] = {}
    for metric, col in COLUMNS.items():
        row[col] = float(cases[metric].mean())
        row[f"{col}_std"] = float(cases[metric].std(ddof=1))
        row[f"{col}_seed_std"] = float(pd.Series([c[metric].mean() for c in per_seed]).std(ddof=1))
    row["misses"] = float(sum(int(m["missed"].sum()) for m in frames) / len(frames))
    row["n"] = int(len(cases))
    row["seeds"] = len(frames)
    return row


def compare_seeds(
    a: list[pd.DataFrame], b: list[pd.DataFrame], seeds: list[int], where: str = ""
) -> dict[str, Any]:
    """Paired comparison of two cells, each one ``metrics.csv`` per seed (same seeds, same order).

    Returns ``t, p_value, n``: the paired t-test on per-case mean foreground Dice averaged over
    seeds. With several seeds also, per seed ``s``, ``diff_seed{s}`` (the difference of mean Dice,
    a - b) and ``p_seed{s}`` (that seed's paired test), and ``same_sign``: whether every seed's
    difference has the same sign (and none is 0).
    """
    t, p, n = ttest_cases(seed_cases(a, where)["dice"], seed_cases(b, where)["dice"])
    out: dict[str, Any] = {"t": t, "p_value": p, "n": n}
    if len(a) > 1:
        diffs = []
        for seed, ma, mb in zip(seeds, a, b, strict=True):
            diffs.append(float(per_case(ma)["dice"].mean() - per_case(mb)["dice"].mean()))
            out[f"diff_seed{seed}"] = diffs[-1]
            out[f"p_seed{seed}"] = paired_ttest(ma, mb)[1]
        out["same_sign"] = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    return out


def metrics_path(runs_dir: str | Path, dataset: str, run: str) -> Path:
    """``{runs_dir}/{dataset}/{run}/test/metrics.csv``."""
    return Path(runs_dir) / dataset / run / "test" / "metrics.csv"


class MetricsCache:
    """Reads each run's ``test/metrics.csv`` under ``runs_dir`` once."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(runs_dir)
        self._frames: dict[tuple[str, str], pd.DataFrame] = {}

    def __call__(self, dataset: str, run: str) -> pd.DataFrame:
        if (dataset, run) not in self._frames:
            self._frames[dataset, run] = read_metrics(metrics_path(self.runs_dir, dataset, run))
        return self._frames[dataset, run]

    def seeds(self, dataset: str, runs: list[str]) -> list[pd.DataFrame]:
        """The metrics of one cell's runs, one per seed."""
        return [self(dataset, run) for run in runs]


CELL_ONLY = ("pair_run", "runs", "pair_runs", "seeds")  # cell keys that are not table columns


def build_table(config: Mapping[str, Any], which: str, runs_dir: str | Path) -> pd.DataFrame:
    """Build Table 1 or an ablation table from the runs' ``test/metrics.csv`` under ``runs_dir``.

    Returns one row per cell: the cell's keys, then ``DS, DS_std, NSD, NSD_std, HD, HD_std,
    CD, CD_std, misses, n, p_value`` (``p_value`` NaN on the reference row of a pair). A table
    with several seeds adds ``{col}_seed_std`` and ``seeds`` (:func:`summarise_seeds`) and, for
    each compared row, ``same_sign``, ``diff_seed{s}`` and ``p_seed{s}`` (:func:`compare_seeds`).
    """
    load = MetricsCache(runs_dir)
    rows = []
    for cell in cells(config, which):
        where = f"{which} {cell['dataset']} {cell['run']}"
        frames = load.seeds(cell["dataset"], cell["runs"])
        row = {k: v for k, v in cell.items() if k not in CELL_ONLY}
        row.update(summarise_seeds(frames, where))
        if cell["run"] == cell["pair_run"]:
            row["p_value"] = float("nan")
        else:
            pair = load.seeds(cell["dataset"], cell["pair_runs"])
            comparison = compare_seeds(frames, pair, cell["seeds"], where)
            row["p_value"] = comparison.pop("p_value")
            row.update({k: v for k, v in comparison.items() if k not in ("t", "n")})
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """Render a table as GitHub markdown with ``mean (std)`` cells, as the paper's Tables 3-4.

    A table over several seeds adds ``DS seed std`` (between seeds), ``same sign`` (of the
    difference in every seed) and ``p per seed`` columns.
    """
    keys = [c for c in table.columns if c in ("dataset", "dim", "diffusion", "ablation", "setting", "run")]
    seeded = "seeds" in table.columns
    p_seeds = [c for c in table.columns if c.startswith("p_seed")]
    header = keys + list(COLUMNS.values()) + ["misses", "n", "p"]
    if seeded:
        header += ["DS seed std", "same sign", "p per seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        vals = [str(r[k]) for k in keys]
        vals += [mean_std(r[c], r[f"{c}_std"], digits) for c in COLUMNS.values()]
        p = r["p_value"]
        misses = f"{r['misses']:.1f}" if seeded else str(int(r["misses"]))
        vals += [misses, str(int(r["n"])), "" if pd.isna(p) else f"{p:.3g}"]
        if seeded:
            same = r.get("same_sign")
            vals += [
                mean_std(r["DS_seed_std"], float("nan"), digits),
                "" if pd.isna(same) else ("yes" if same else "no"),
                ", ".join("" if pd.isna(r[c]) else f"{r[c]:.3g}" for c in p_seeds) if pd.notna(p) else "",
            ]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def mean_std(mean: float, std: float, digits: int) -> str:
    """A markdown cell ``mean (std)``; ``n/a`` for a missing mean, no brackets for a missing std."""
    if pd.isna(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + ("" if pd.isna(std) else f" ({std:.{digits}f})")
