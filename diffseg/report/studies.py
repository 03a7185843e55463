"""Reports of the questions beyond the paper: sampling steps, uncertainty, seeds.

* :func:`sampling_steps_table` / :func:`sampling_steps_figure`: per run of the
  ``sampling_steps`` study and per K, test-split Dice (and NSD, HD95, CD) with its between-case
  std, the seconds per case, and the paired t-test of per-case Dice against the run's own K
  (the configured ``sample_steps``). The figure: Dice and seconds per case against K.
* :func:`uncertainty_table` / :func:`uncertainty_figure`: per run of the ``uncertainty`` study,
  the Dice of one sample and of the majority vote of N (and their paired t-test), Spearman's
  correlation over cases of mean entropy with 1 − Dice (of the vote), the voxel AUROC of entropy
  for "the vote is wrong here" over every voxel of the test split, and the error rate overall.
  The figure: the error rate per entropy bin (calibration-style) and the per-case scatter.
* :func:`seeds_figure`: each seed's mean Dice per cell of every table over several seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from diffseg.config import parse_run_name  # noqa: E402
from diffseg.errors import DataError  # noqa: E402
from diffseg.evaluate.uncertainty import auroc_from_histogram, error_rate_bins  # noqa: E402
from diffseg.matrix import cells, study_runs, table_names  # noqa: E402
from diffseg.report.figures import save  # noqa: E402
from diffseg.report.tables import COLUMNS, METRICS, MetricsCache, mean_std, per_case, ttest_cases  # noqa: E402


def _read(path: Path, required: Sequence[str]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={"uid": str})
    except FileNotFoundError:
        raise DataError(f"{path}: not found (has the study's job run?)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{path}: not a readable CSV: {err}") from None
    missing = [c for c in required if c not in df.columns]
    if missing or df.empty:
        raise DataError(f"{path}: " + (f"missing columns {missing}" if missing else "no rows"))
    return df


def _identity(dataset: str, run: str) -> dict[str, str]:
    dim, variant, _ = parse_run_name(run)
    return {"dataset": dataset, "dim": dim, "variant": variant, "run": run}


# -- sampling steps ------------------------------------------------------------------------------


def sampling_steps_table(config: Mapping[str, Any], runs_dir: str | Path) -> pd.DataFrame:
    """One row per run × K: ``dataset, dim, variant, run, steps, sample_steps, DS, DS_std, NSD, ...,
    seconds, n, p_value`` (``p_value``: paired t-test of per-case Dice at K against the
    configured K, NaN on that row and when the study has no such K; ``seconds``: mean seconds per case)."""
    rows = []
    for dataset, run in study_runs(config, "sampling_steps"):
        path = Path(runs_dir) / dataset / run / "sampling_steps" / "metrics.csv"
        metrics = _read(path, ("steps", "uid", *METRICS, "seconds", "sample_steps"))
        configured = int(metrics["sample_steps"].iloc[0])
        by_k = {int(k): m for k, m in metrics.groupby("steps", sort=True)}
        # The tests' reference: the run's own K (p is blank when the study leaves that K out).
        reference = per_case(by_k[configured])["dice"] if configured in by_k else None
        for k, m in by_k.items():
            cases = per_case(m)
            row: dict[str, Any] = {**_identity(dataset, run), "steps": k, "sample_steps": configured}
            for metric, col in COLUMNS.items():
                row[col] = float(cases[metric].mean())
                row[f"{col}_std"] = float(cases[metric].std(ddof=1))
            row["seconds"] = float(m.groupby("uid")["seconds"].first().mean())
            row["n"] = int(len(cases))
            compared = reference is not None and k != configured
            row["p_value"] = ttest_cases(cases["dice"], reference)[1] if compared else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


def sampling_steps_markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """Markdown: one row per run × K, Dice and NSD as ``mean (std)``, seconds per case, p."""
    header = ["dataset", "run", "K", "DS", "NSD", "HD", "s/case", "n", "p (vs trained K)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        own = " (configured)" if r["steps"] == r["sample_steps"] else ""
        p = "" if pd.isna(r["p_value"]) else f"{r['p_value']:.3g}"
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["dataset"]),
                    f"`{r['run']}`",
                    f"{int(r['steps'])}{own}",
                    mean_std(r["DS"], r["DS_std"], digits),
                    mean_std(r["NSD"], r["NSD_std"], digits),
                    mean_std(r["HD"], r["HD_std"], 2),
                    f"{r['seconds']:.3g}",
                    str(int(r["n"])),
                    p,
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def sampling_steps_figure(table: pd.DataFrame, outputs: Sequence[str | Path]) -> None:
    """Mean Dice (± between-case std) and seconds per case against K (log scale), a line per run."""
    fig, (ax_dice, ax_time) = plt.subplots(1, 2, figsize=(10, 3.6))
    for (dataset, run), d in table.groupby(["dataset", "run"], sort=False):
        label = f"{run} ({dataset})" if table["dataset"].nunique() > 1 else run
        line = ax_dice.errorbar(d["steps"], d["DS"], yerr=d["DS_std"], marker="o", capsize=3, label=label)
        ax_time.plot(d["steps"], d["seconds"], marker="o", color=line[0].get_color(), label=label)
        own = d[d["steps"] == d["sample_steps"]]
        ax_dice.plot(own["steps"], own["DS"], marker="*", markersize=14, color=line[0].get_color())
    for ax in (ax_dice, ax_time):
        ax.set_xscale("log")
        steps = sorted(table["steps"].unique())
        ax.set_xticks(steps, [str(k) for k in steps])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps K at inference")
        ax.grid(alpha=0.3)
    ax_dice.set_ylabel("test mean foreground Dice")
    ax_dice.set_title("Dice against K (★ the trained K)")
    ax_time.set_ylabel("seconds per case")
    ax_time.set_title("cost against K")
    ax_time.legend(fontsize=8)
    fig.tight_layout()
    save(fig, outputs)


# -- uncertainty ---------------------------------------------------------------------------------


def read_uncertainty(runs_dir: str | Path, dataset: str, run: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A run's ``uncertainty/cases.csv`` and ``histogram.csv``."""
    base = Path(runs_dir) / dataset / run / "uncertainty"
    cases = _read(
        base / "cases.csv", ("uid", "samples", "dice_one", "dice_vote", "mean_entropy", "max_entropy")
    )
    return cases, _read(base / "histogram.csv", ("entropy", "voxels", "wrong"))


def uncertainty_table(config: Mapping[str, Any], runs_dir: str | Path) -> pd.DataFrame:
    """One row per run of the ``uncertainty`` study.

    Columns: ``dataset, dim, variant, run, samples, n, dice_one, dice_vote, vote_gain`` (vote −
    one, mean over cases), ``p_vote`` (paired t-test, vote against one sample), ``spearman_r,
    spearman_p`` (over cases: mean entropy against 1 − Dice of the vote; NaN below 3 cases),
    ``auroc`` (voxel AUROC of entropy for a wrong vote, every voxel of the split), ``error_rate``
    (wrong voxels / voxels) and ``voxels``.
    """
    rows = []
    for dataset, run in study_runs(config, "uncertainty"):
        cases, histogram = read_uncertainty(runs_dir, dataset, run)
        one, vote = cases.set_index("uid")["dice_one"], cases.set_index("uid")["dice_vote"]
        if len(cases) >= 3 and cases["mean_entropy"].nunique() > 1:
            res = stats.spearmanr(cases["mean_entropy"], 1.0 - cases["dice_vote"])
            r, p = float(res.statistic), float(res.pvalue)
        else:
            r = p = float("nan")
        voxels, wrong = int(histogram["voxels"].sum()), int(histogram["wrong"].sum())
        rows.append(
            {
                **_identity(dataset, run),
                "samples": int(cases["samples"].iloc[0]),
                "n": int(len(cases)),
                "dice_one": float(one.mean()),
                "dice_vote": float(vote.mean()),
                "vote_gain": float((vote - one).mean()),
                "p_vote": ttest_cases(vote, one)[1],
                "spearman_r": r,
                "spearman_p": p,
                "auroc": auroc_from_histogram(histogram),
                "error_rate": wrong / voxels if voxels else float("nan"),
                "voxels": voxels,
            }
        )
    return pd.DataFrame(rows)


def uncertainty_markdown(table: pd.DataFrame) -> str:
    """Markdown of :func:`uncertainty_table`."""
    header = [
        "dataset",
        "run",
        "N",
        "n",
        "DS one sample",
        "DS vote",
        "p (vote vs one)",
        "Spearman r (entropy, 1 − DS)",
        "p",
        "voxel AUROC",
        "error rate",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    g = lambda v, fmt: "n/a" if pd.isna(v) else format(v, fmt)  # noqa: E731
    for _, r in table.iterrows():
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["dataset"]),
                    f"`{r['run']}`",
                    str(int(r["samples"])),
                    str(int(r["n"])),
                    g(r["dice_one"], ".3f"),
                    g(r["dice_vote"], ".3f"),
                    g(r["p_vote"], ".3g"),
                    g(r["spearman_r"], ".2f"),
                    g(r["spearman_p"], ".3g"),
                    g(r["auroc"], ".3f"),
                    g(r["error_rate"], ".4f"),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def uncertainty_figure(
    config: Mapping[str, Any], runs_dir: str | Path, outputs: Sequence[str | Path], bins: int = 10
) -> pd.DataFrame:
    """Left: the share of wrong voxels per entropy bin (``bins`` over ``[0, log(min(N, C))]``), a
    line per run, with the voxel counts' share as bars behind; right: per case, mean entropy
    against 1 − Dice of the vote. Returns the binned numbers (``dataset, run, low, high, voxels,
    wrong, error_rate``)."""
    fig, (ax_cal, ax_case) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_share = ax_cal.twinx()
    binned = []
    models = study_runs(config, "uncertainty")
    width = 1.0 / (len(models) + 1)
    for j, (dataset, run) in enumerate(models):
        cases, histogram = read_uncertainty(runs_dir, dataset, run)
        b = error_rate_bins(histogram, bins, float(cases["max_entropy"].iloc[0]))
        label = f"{run} ({dataset})" if len({d for d, _ in models}) > 1 else run
        centres = (b["low"] + b["high"]) / 2
        line = ax_cal.plot(centres, b["error_rate"], marker="o", label=label, zorder=3)[0]
        step = float(b["high"].iloc[0] - b["low"].iloc[0])
        ax_share.bar(
            b["low"] + step * width * (j + 0.5),
            b["voxels"] / b["voxels"].sum(),
            width=step * width,
            color=line.get_color(),
            alpha=0.25,
            align="edge",
        )
        ax_case.scatter(cases["mean_entropy"], 1.0 - cases["dice_vote"], color=line.get_color(), label=label)
        binned.append(b.assign(dataset=dataset, run=run))
    ax_cal.set_xlabel("voxel entropy of the samples (nats)")
    ax_cal.set_ylabel("error rate of the majority vote")
    ax_cal.set_ylim(0, 1)
    ax_cal.set_zorder(ax_share.get_zorder() + 1)
    ax_cal.patch.set_visible(False)
    ax_share.set_yscale("log")
    ax_share.set_ylabel("share of voxels (bars)")
    ax_cal.set_title("error rate per entropy bin")
    ax_cal.legend(fontsize=8)
    ax_case.set_xlabel("case mean entropy over predicted foreground (nats)")
    ax_case.set_ylabel("1 − Dice of the vote")
    ax_case.set_title("per test case")
    ax_case.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))  # close entropies: few labels
    for ax in (ax_cal, ax_case):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, outputs)
    out = pd.concat(binned, ignore_index=True) if binned else pd.DataFrame()
    return out[["dataset", "run", "low", "high", "voxels", "wrong", "error_rate"]] if binned else out


# -- seeds ---------------------------------------------------------------------------------------


def seed_values(config: Mapping[str, Any], runs_dir: str | Path) -> pd.DataFrame:
    """Each seed's mean foreground Dice per cell of every table over several seeds.

    Columns: ``table, dataset, dim, cell`` (the row's setting, or N/Y for Table 1), ``run``
    (the seed-0-named cell run), ``seed``, ``seed_run``, ``DS``. Empty when no table has 2+ seeds.
    """
    load = MetricsCache(runs_dir)
    rows = []
    for which in table_names(config):
        for cell in cells(config, which):
            if len(cell["seeds"]) < 2:
                continue
            label = cell.get("setting", cell.get("diffusion"))
            if "ablation" in cell:
                label = f"{cell['ablation']}: {label}"
            for seed, run in zip(cell["seeds"], cell["runs"], strict=True):
                dice = per_case(load(cell["dataset"], run))["dice"].mean()
                rows.append(
                    {
                        "table": which,
                        "dataset": cell["dataset"],
                        "dim": cell["dim"],
                        "cell": label,
                        "run": cell["run"],
                        "seed": seed,
                        "seed_run": run,
                        "DS": float(dice),
                    }
                )
    return pd.DataFrame(rows, columns=["table", "dataset", "dim", "cell", "run", "seed", "seed_run", "DS"])


def seeds_figure(values: pd.DataFrame, outputs: Sequence[str | Path]) -> None:
    """One panel per table × dataset × dim: each seed's Dice per run (a marker per seed) and
    their mean (a bar). A run that is several cells (an ablation table's reference) is drawn
    once, named by its variant."""
    if values.empty:
        raise DataError("seeds figure: no table has two or more seeds (tables.<name>.seeds)")
    values = values.copy()
    shared = values.groupby(["table", "run"])["cell"].transform("nunique") > 1
    values.loc[shared, "cell"] = values.loc[shared, "run"].str.split("-", n=1).str[1] + " (reference)"
    values = values.drop_duplicates(["table", "run", "seed"])
    panels = list(values.groupby(["table", "dataset", "dim"], sort=False))
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(max(4.0, 0.9 * values["cell"].nunique()) * len(panels) / 1.5, 3.8),
        squeeze=False,
    )
    markers = "osD^v<>px*"
    seeds = sorted(values["seed"].unique())
    for ax, ((table, dataset, dim), d) in zip(axes[0], panels, strict=True):
        order = list(dict.fromkeys(d["cell"]))
        x = {c: i for i, c in enumerate(order)}
        means = d.groupby("cell", sort=False)["DS"].mean()
        ax.bar([x[c] for c in means.index], means.to_numpy(), color="0.85", label="mean over seeds")
        for k, seed in enumerate(seeds):
            s = d[d["seed"] == seed]
            ax.scatter(
                [x[c] + (k - (len(seeds) - 1) / 2) * 0.12 for c in s["cell"]],
                s["DS"],
                marker=markers[k % len(markers)],
                zorder=3,
                label=f"seed {seed}",
            )
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("test mean foreground Dice")
        ax.set_title(f"{table}, {dataset}, {dim}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    save(fig, outputs)
