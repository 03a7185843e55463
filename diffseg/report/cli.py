"""Report sub-commands: ``diffseg table``, ``stats``, ``figure``, ``curves``, ``cost``, ``study``,
``readme-table`` and ``status``.

Each reads the workflow config (the merged Snakemake config, dumped by the workflow to
``{results}/workflow_config.yaml``, or any config YAML) and the runs' ``test/metrics.csv``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffseg.config import load_yaml
from diffseg.errors import ConfigError
from diffseg.io import atomic_path, atomic_write_text


def _write_csv(df, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _table(args: argparse.Namespace) -> int:
    from diffseg.report.tables import build_table, to_markdown

    table = build_table(load_yaml(args.config), args.which, args.runs)
    _write_csv(table, args.out)
    if args.markdown:
        atomic_write_text(args.markdown, to_markdown(table))
    return 0


def _stats(args: argparse.Namespace) -> int:
    from diffseg.matrix import figure3_models
    from diffseg.report.stats import alpha_of, paired_tests, spearman

    config = load_yaml(args.config)
    _write_csv(paired_tests(config, args.runs), args.ttests)
    _write_csv(spearman(args.runs, figure3_models(config), alpha_of(config)), args.spearman)
    return 0


def _figure(args: argparse.Namespace) -> int:
    from diffseg.matrix import figure3_models, table1_cells
    from diffseg.report.figures import figure2, figure3

    config = load_yaml(args.config)
    results = Path(args.results)
    if args.which != "figure3" and any(Path(o).suffix.lower() == ".csv" for o in args.out):
        raise ConfigError(f"--out: a .csv output is Figure 3's data; {args.which} draws images only")
    if args.which == "figure3":
        figure3(results / "runs", figure3_models(config), args.out)
        return 0
    fig2 = (config.get("figures") or {}).get("figure2") or {}
    t1 = table1_cells(config)
    dim = str(fig2.get("dim", t1[-1]["dim"] if t1 else "3d"))
    panels = [
        {"dataset": c["dataset"], "seg_run": c["run"], "diff_run": c["pair_run"]}
        for c in t1
        if c["dim"] == dim and c["diffusion"] == t1[0]["diffusion"]
    ]
    if not panels:
        raise ConfigError(f"figures.figure2.dim: {dim!r} is not among tables.table1.dims")
    figure2(results, panels, args.out, cases=int(fig2.get("cases", 2)))
    return 0


def _curves(args: argparse.Namespace) -> int:
    from diffseg.report.curves import curves, parse_models

    curves(args.runs, parse_models(args.models), args.out)
    return 0


def _cost(args: argparse.Namespace) -> int:
    from diffseg.report.cost import cost_table, to_markdown

    runs = [tuple(m.split("/", 1)) for m in args.models]
    if any(len(r) != 2 for r in runs):
        raise ConfigError(f"--models: each run as dataset/run, got {args.models}")
    table = cost_table(args.results, runs)
    _write_csv(table, args.out)
    if args.markdown:
        atomic_write_text(args.markdown, to_markdown(table))
    return 0


def _readme_table(args: argparse.Namespace) -> int:
    from diffseg.report.readme import readme_table

    text = readme_table(args.table, args.readme)
    print(f"wrote the table into {args.readme}" if args.readme else text, end="" if not args.readme else "\n")
    return 0


def _study(args: argparse.Namespace) -> int:
    from diffseg.report import studies

    config = load_yaml(args.config)
    images = [o for o in args.out if Path(o).suffix.lower() in (".png", ".pdf", ".svg")]
    if args.which == "seeds":
        values = studies.seed_values(config, args.runs)
        table, markdown = values, None
        studies.seeds_figure(values, images)
    elif args.which == "sampling_steps":
        table = studies.sampling_steps_table(config, args.runs)
        markdown = studies.sampling_steps_markdown(table)
        studies.sampling_steps_figure(table, images)
    else:
        table = studies.uncertainty_table(config, args.runs)
        markdown = studies.uncertainty_markdown(table)
        bins = int((config.get("uncertainty") or {}).get("bins", 10))
        binned = studies.uncertainty_figure(config, args.runs, images, bins)
        if args.bins:
            _write_csv(binned, args.bins)
    _write_csv(table, args.csv)
    if args.markdown and markdown is not None:
        atomic_write_text(args.markdown, markdown)
    return 0


def _status(args: argparse.Namespace) -> int:
    import sys
    import time

    from diffseg.config import validate_config
    from diffseg.report.status import campaign_status, to_markdown, to_text

    config = load_yaml(args.configfile)
    validate_config(config, args.configfile)

    def show() -> None:
        started = time.perf_counter()
        table = campaign_status(config, args.results)
        text = to_text(table)
        if args.watch is not None and sys.stdout.isatty():
            text = "\x1b[2J\x1b[H" + text  # a fresh screen each refresh
        took = time.perf_counter() - started
        print(text + f"read in {took:.2f} s at {time.strftime('%H:%M:%S')}", flush=True)
        if args.csv:
            _write_csv(table, args.csv)
        if args.markdown:
            atomic_write_text(args.markdown, to_markdown(table))

    show()
    try:
        while args.watch is not None:  # until Ctrl-C, which ends it as asked, not as an error
            time.sleep(args.watch)
            show()
    except KeyboardInterrupt:
        pass
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the report's sub-commands (table, stats, figure, curves, cost, study, readme-table, status)."""
    p = sub.add_parser("table", help="build a table (table1, table2, table5, ...) from test metrics")
    p.add_argument("--which", required=True, help="a key of tables: in the config, e.g. table2")
    p.add_argument("--config", required=True, help="workflow config YAML (the tables: section)")
    p.add_argument("--runs", required=True, help="the runs folder, {results}/runs")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--markdown", help="markdown rendering to write beside it")
    p.set_defaults(func=_table)

    p = sub.add_parser("stats", help="paired t-tests and Spearman correlations")
    p.add_argument("--config", required=True)
    p.add_argument("--runs", required=True)
    p.add_argument("--ttests", required=True, help="CSV of paired t-tests")
    p.add_argument("--spearman", required=True, help="CSV of Spearman correlations")
    p.set_defaults(func=_stats)

    p = sub.add_parser("figure", help="draw Figure 2 (examples) or Figure 3 (Dice per class)")
    p.add_argument("--which", choices=("figure2", "figure3"), required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--results", required=True, help="the results folder")
    p.add_argument(
        "--out", nargs="+", required=True, help="image files (.png, .pdf); Figure 3 also .csv (its data)"
    )
    p.set_defaults(func=_figure)

    p = sub.add_parser("curves", help="draw the training curves (loss, validation Dice) of runs")
    p.add_argument("--runs", required=True, help="the runs folder, {results}/runs")
    p.add_argument("--models", nargs="+", required=True, help="runs as dataset/run")
    p.add_argument("--out", nargs="+", required=True, help="image files (.png, .pdf)")
    p.set_defaults(func=_curves)

    p = sub.add_parser("cost", help="wall, CPU and GPU/TPU time, peak memory and device of each run's jobs")
    p.add_argument("--results", required=True, help="the results folder (benchmarks/ and logs/ in it)")
    p.add_argument("--models", nargs="+", required=True, help="runs as dataset/run")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--markdown", help="markdown rendering to write beside it")
    p.set_defaults(func=_cost)

    p = sub.add_parser("study", help="a study beyond the paper: sampling steps, uncertainty, seeds")
    p.add_argument("--which", choices=("sampling_steps", "uncertainty", "seeds"), required=True)
    p.add_argument("--config", required=True, help="workflow config YAML")
    p.add_argument("--runs", required=True, help="the runs folder, {results}/runs")
    p.add_argument("--csv", required=True, help="the table (seeds: each seed's Dice per cell) as CSV")
    p.add_argument("--markdown", help="its markdown (sampling_steps, uncertainty)")
    p.add_argument("--bins", help="uncertainty: the error rate per entropy bin (the figure's data) as CSV")
    p.add_argument("--out", nargs="+", required=True, help="figure files (.png, .pdf)")
    p.set_defaults(func=_study)

    p = sub.add_parser(
        "status", help="every run of a campaign: state, step, best validation Dice, speed, ETA, time, test"
    )
    p.add_argument("--configfile", default="config/config.yaml", help="workflow config YAML")
    p.add_argument("--results", help="the results folder (default: the config's results:)")
    p.add_argument(
        "--watch", type=float, nargs="?", const=10.0, metavar="SECONDS", help="refresh every SECONDS (10)"
    )
    p.add_argument("--csv", help="also write the table as CSV")
    p.add_argument("--markdown", help="also write the table as Markdown")
    p.set_defaults(func=_status)

    p = sub.add_parser("readme-table", help="the README's demo table from a table CSV (results/table2.csv)")
    p.add_argument("--table", default="results/table2.csv", help="a table CSV written by diffseg table")
    p.add_argument("--readme", help="write it between this file's demo-table markers instead of printing it")
    p.set_defaults(func=_readme_table)
