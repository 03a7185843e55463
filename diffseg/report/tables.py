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
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats

from diffseg.errors import ConfigError, DataError

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


def paired_ttest(a: pd.DataFrame, b: pd.DataFrame) -> tuple[float, float, int]:
    """Paired t-test of per-case mean foreground Dice of two runs' metrics, cases matched by uid.

    Returns ``(t statistic, p value, number of paired cases)``; NaN when fewer than 2 pairs.
    """
    da, db = per_case(a)["dice"], per_case(b)["dice"]
    joined = pd.concat({"a": da, "b": db}, axis=1, join="inner").dropna()
    if len(joined) < 2:
        return float("nan"), float("nan"), int(len(joined))
    res = stats.ttest_rel(joined["a"], joined["b"])
    return float(res.statistic), float(res.pvalue), int(len(joined))


def metrics_path(runs_dir: str | Path, dataset: str, run: str) -> Path:
    """``{runs_dir}/{dataset}/{run}/test/metrics.csv``."""
    return Path(runs_dir) / dataset / run / "test" / "metrics.csv"


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = (config.get("tables") or {}).get(name)
    if not isinstance(section, Mapping):
        raise ConfigError(f"tables.{name}: missing from the config")
    return section


def table1_cells(config: Mapping[str, Any]) -> list[dict[str, str]]:
    """Cells of Table 1: dicts ``dataset, dim, diffusion (N|Y), run, pair_run`` in table order.

    The second cell (Y, the diffusion model) is the reference: its ``pair_run`` is its own run,
    as for Table 2's reference rows, so the pair is tested once, on the N row.
    """
    sec = _section(config, "table1")
    cells = {str(k): str(v) for k, v in (sec.get("cells") or {}).items()}
    if len(cells) != 2:
        raise ConfigError(f"tables.table1.cells: expected two cells (N, Y), got {list(cells)}")
    labels = list(cells)
    out = []
    for dataset in sec.get("datasets") or []:
        for dim in sec.get("dims") or []:
            for label in labels:
                out.append({
                    "dataset": dataset, "dim": dim, "diffusion": label,
                    "run": f"{dim}-{cells[label]}", "pair_run": f"{dim}-{cells[labels[-1]]}",
                })
    return out


def table_names(config: Mapping[str, Any]) -> list[str]:
    """The configured tables: ``table1`` (if any) and the ablation tables, in config order."""
    return [str(name) for name in (config.get("tables") or {})]


def table2_cells(config: Mapping[str, Any], which: str = "table2") -> list[dict[str, str]]:
    """Cells of Table 2 (or another ablation table): dicts ``dataset, dim, ablation, setting, run, pair_run``.

    ``pair_run`` is the reference (the ``diff`` run, the table's "Y"/"Logits"/"5" rows):
    within each ablation, the setting whose variant is ``reference`` (default ``diff``).
    """
    sec = _section(config, which)
    dataset = sec.get("dataset")
    if not dataset:
        raise ConfigError(f"tables.{which}.dataset: missing")
    reference = str(sec.get("reference", "diff"))
    out = []
    for dim in sec.get("dims") or []:
        for ablation, settings in (sec.get("ablations") or {}).items():
            if not isinstance(settings, Mapping) or reference not in map(str, settings.values()):
                raise ConfigError(
                    f"tables.{which}.ablations.{ablation}: expected a mapping setting -> variant "
                    f"with one setting equal to the reference variant {reference!r}"
                )
            for setting, variant in settings.items():
                out.append({
                    "dataset": dataset, "dim": dim, "ablation": str(ablation),
                    "setting": str(setting), "run": f"{dim}-{variant}",
                    "pair_run": f"{dim}-{reference}",
                })
    return out


def cells(config: Mapping[str, Any], which: str) -> list[dict[str, str]]:
    """The cells of ``table1`` or of an ablation table (``table2``, ``table5``, ...)."""
    if which == "table1":
        return table1_cells(config)
    if which in (config.get("tables") or {}):
        return table2_cells(config, which)
    raise ConfigError(f"unknown table {which!r}; configured: {', '.join(table_names(config)) or 'none'}")


def table_runs(config: Mapping[str, Any], which: str) -> list[tuple[str, str]]:
    """Every ``(dataset, run)`` whose metrics table ``which`` reads (cells and pairs), sorted."""
    return sorted({(c["dataset"], r) for c in cells(config, which) for r in (c["run"], c["pair_run"])})


def build_table(config: Mapping[str, Any], which: str, runs_dir: str | Path) -> pd.DataFrame:
    """Build Table 1 or 2 from the runs' ``test/metrics.csv`` files under ``runs_dir``.

    Returns one row per cell: the cell's keys, then ``DS, DS_std, NSD, NSD_std, HD, HD_std,
    CD, CD_std, misses, n, p_value`` (``p_value`` NaN on the reference row of a pair).
    """
    cache: dict[tuple[str, str], pd.DataFrame] = {}

    def load(dataset: str, run: str) -> pd.DataFrame:
        if (dataset, run) not in cache:
            cache[dataset, run] = read_metrics(metrics_path(runs_dir, dataset, run))
        return cache[dataset, run]

    rows = []
    for cell in cells(config, which):
        m = load(cell["dataset"], cell["run"])
        row = {k: v for k, v in cell.items() if k != "pair_run"}
        row.update(summarise(m))
        if cell["run"] == cell["pair_run"]:
            row["p_value"] = float("nan")
        else:
            row["p_value"] = paired_ttest(m, load(cell["dataset"], cell["pair_run"]))[1]
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """Render a table as GitHub markdown with ``mean (std)`` cells, as the paper's Tables 3-4."""
    keys = [c for c in table.columns if c in ("dataset", "dim", "diffusion", "ablation", "setting", "run")]
    header = keys + list(COLUMNS.values()) + ["misses", "n", "p"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        vals = [str(r[k]) for k in keys]
        vals += [_fmt(r[c], r[f"{c}_std"], digits) for c in COLUMNS.values()]
        p = r["p_value"]
        vals += [str(int(r["misses"])), str(int(r["n"])), "" if pd.isna(p) else f"{p:.3g}"]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def _fmt(mean: float, std: float, digits: int) -> str:
    if pd.isna(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + ("" if pd.isna(std) else f" ({std:.{digits}f})")


def runs_needed(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every ``(dataset, run)`` a table cell needs, plus those of ``experiments:``, sorted, unique.

    ``experiments`` is a list of ``{datasets: [...], dims: [...], variants: [...], seeds: [...]}``
    (``seeds`` optional: each seed adds a ``-seed{N}`` run).
    """
    need: set[tuple[str, str]] = set()
    for which in table_names(config):
        need.update(table_runs(config, which))
    for i, exp in enumerate(config.get("experiments") or []):
        try:
            seeds = exp.get("seeds") or [None]
            for ds in exp["datasets"]:
                for dim in exp["dims"]:
                    for var in exp["variants"]:
                        for seed in seeds:
                            need.add((ds, f"{dim}-{var}" + ("" if seed is None else f"-seed{seed}")))
        except (KeyError, TypeError, AttributeError):
            raise ConfigError(
                f"experiments[{i}]: expected a mapping with datasets, dims, variants (and seeds)"
            ) from None
    return sorted(need)

