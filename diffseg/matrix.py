"""The run matrix: which ``(dataset, run)`` every table, study and experiment of a config needs.

The workflow builds its jobs from these functions (``workflow/rules/common.smk``) and the report
reads the same cells back (``diffseg.report``), so a table, its jobs and its statistics cannot
disagree on which runs make a cell. Imports no jax: the Snakefile imports it.

* A **table cell** is one row of a table: Table 1's ``dataset × dim × diffusion (N|Y)``, an
  ablation table's ``dim × ablation × setting`` (``table2``, ``table5``, ...). Its ``pair_run`` is
  the run it is tested against (Table 1's Y cell, an ablation table's ``reference`` variant).
* **Seeds**: ``seeds: [0, 1, 2]`` under a table (or at the top level, for every table without
  its own) trains each cell once per seed. The run of seed ``s`` is ``{run}-seed{s}``, except the
  seed the run already has (``train.seed``, 0 unless configured): that run keeps its plain name,
  so one seed, or none, changes nothing, and a seed study reuses the single-seed runs.
* **Studies** (beyond the paper) evaluate trained runs again: ``sampling_steps`` (Dice against
  the number of sampling steps K) and ``uncertainty`` (N samples per case); each names a
  ``dataset``, ``dims`` and ``variants``.
* **Experiments**: runs outside the tables (``experiments: [{datasets, dims, variants, seeds}]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffseg.config import resolve_run
from diffseg.errors import ConfigError

STUDIES = ("sampling_steps", "uncertainty")


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = (config.get("tables") or {}).get(name)
    if not isinstance(section, Mapping):
        raise ConfigError(f"tables.{name}: missing from the config")
    return section


def table_names(config: Mapping[str, Any]) -> list[str]:
    """The configured tables: ``table1`` (if any) and the ablation tables, in config order."""
    return [str(name) for name in (config.get("tables") or {})]


def table_seeds(config: Mapping[str, Any], which: str) -> list[int] | None:
    """The table's ``seeds`` (else the config's top-level ``seeds``); ``None`` when neither is set."""
    seeds = _section(config, which).get("seeds", config.get("seeds"))
    if seeds is None:
        return None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"tables.{which}.seeds: expected distinct seeds, got {seeds!r}")
    return [int(s) for s in seeds]


def has_seeds(config: Mapping[str, Any]) -> bool:
    """Whether some table trains its cells over two or more seeds."""
    return any(len(table_seeds(config, t) or []) > 1 for t in table_names(config))


def seed_runs(config: Mapping[str, Any], dataset: str, run: str, seeds: list[int] | None) -> list[str]:
    """The runs of ``run`` for each seed, in the seeds' order (``[run]`` when ``seeds`` is None).

    The seed the run already trains with (its resolved ``train.seed``) keeps the plain name.
    """
    if seeds is None:
        return [run]
    own = resolve_run(config, dataset, run).train.seed
    return [run if s == own else f"{run}-seed{s}" for s in seeds]


def _with_seeds(config: Mapping[str, Any], which: str, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``seeds``, ``runs`` and ``pair_runs`` (one per seed, same order) to each cell."""
    seeds = table_seeds(config, which)
    for cell in cells:
        cell["seeds"] = seeds or []
        cell["runs"] = seed_runs(config, cell["dataset"], cell["run"], seeds)
        cell["pair_runs"] = seed_runs(config, cell["dataset"], cell["pair_run"], seeds)
    return cells


def table1_cells(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Cells of Table 1: dicts ``dataset, dim, diffusion (N|Y), run, pair_run`` (+ the seed keys of
    :func:`cells`) in table order.

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
                out.append(
                    {
                        "dataset": dataset,
                        "dim": dim,
                        "diffusion": label,
                        "run": f"{dim}-{cells[label]}",
                        "pair_run": f"{dim}-{cells[labels[-1]]}",
                    }
                )
    return _with_seeds(config, "table1", out)


def table2_cells(config: Mapping[str, Any], which: str = "table2") -> list[dict[str, Any]]:
    """Cells of Table 2 (or another ablation table): dicts ``dataset, dim, ablation, setting, run,
    pair_run`` (+ the seed keys of :func:`cells`).

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
                out.append(
                    {
                        "dataset": dataset,
                        "dim": dim,
                        "ablation": str(ablation),
                        "setting": str(setting),
                        "run": f"{dim}-{variant}",
                        "pair_run": f"{dim}-{reference}",
                    }
                )
    return _with_seeds(config, which, out)


def cells(config: Mapping[str, Any], which: str) -> list[dict[str, Any]]:
    """The cells of ``table1`` or of an ablation table (``table2``, ``table5``, ...).

    Besides the keys of :func:`table1_cells` / :func:`table2_cells` each cell has ``seeds`` (the
    table's seeds, ``[]`` when none are set), ``runs`` and ``pair_runs``: the run and its pair for
    each seed, in the seeds' order (``[run]`` and ``[pair_run]`` without seeds).
    """
    if which == "table1":
        return table1_cells(config)
    if which in (config.get("tables") or {}):
        return table2_cells(config, which)
    raise ConfigError(f"unknown table {which!r}; configured: {', '.join(table_names(config)) or 'none'}")


def table_runs(config: Mapping[str, Any], which: str) -> list[tuple[str, str]]:
    """Every ``(dataset, run)`` whose metrics table ``which`` reads (cells, pairs, seeds), sorted."""
    return sorted({(c["dataset"], r) for c in cells(config, which) for r in (*c["runs"], *c["pair_runs"])})


def figure3_models(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The models of Figures 2-3 (and the Spearman table): every Table 1 cell, in table order;
    none without a Table 1 (a seed study of Table 2 alone)."""
    if "table1" not in (config.get("tables") or {}):
        return []
    return [(c["dataset"], c["run"]) for c in cells(config, "table1")]


def study_runs(config: Mapping[str, Any], study: str) -> list[tuple[str, str]]:
    """The ``(dataset, run)`` a study (``sampling_steps``, ``uncertainty``) evaluates, in config
    order (dims, then variants); ``[]`` when the config has no such section."""
    sec = config.get(study)
    if not sec:
        return []
    try:
        runs = [(str(sec["dataset"]), f"{dim}-{var}") for dim in sec["dims"] for var in sec["variants"]]
    except (KeyError, TypeError):
        raise ConfigError(f"{study}: expected a mapping with dataset, dims and variants") from None
    for dataset, run in runs:  # a config mistake is one message at parse time, not a failed job
        diffusion = resolve_run(config, dataset, run).diffusion
        if not diffusion.enabled:
            raise ConfigError(f"{study}.variants: {run!r} is not a diffusion run (it samples nothing)")
        too_many = [k for k in sec.get("steps") or () if k > diffusion.num_timesteps]
        if too_many:
            raise ConfigError(
                f"{study}.steps: {too_many} exceed {run!r}'s diffusion.num_timesteps "
                f"({diffusion.num_timesteps})"
            )
    return runs


def runs_needed(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every ``(dataset, run)`` a table cell, a study or an experiment needs, sorted, unique.

    ``experiments`` is a list of ``{datasets: [...], dims: [...], variants: [...], seeds: [...]}``
    (``seeds`` optional: each seed adds a ``-seed{N}`` run).
    """
    need: set[tuple[str, str]] = set()
    for which in table_names(config):
        need.update(table_runs(config, which))
    for study in STUDIES:
        need.update(study_runs(config, study))
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
