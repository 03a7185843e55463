"""Beyond the paper: seeds in tables, Dice against sampling steps, uncertainty (hand-made files)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose
from scipy import stats as sps
from test_evaluate import trained_run  # noqa: F401 (a fixture: a tiny trained 3D diffusion run)
from test_train import toy_data  # noqa: F401 (a fixture)

from diffseg import matrix
from diffseg.errors import ConfigError, DataError
from diffseg.evaluate import uncertainty as unc
from diffseg.report import stats, studies, tables

DATASET = {
    "source": "phantom",
    "anatomy": "pelvis",
    "num_cases": 6,
    "seed": 0,
    "spacing": [1.0, 1.0, 1.0],
    "shape": [32, 32, 16],
    "split": {"train": 3, "valid": 1, "test": 2},
}
TABLE2 = {"dataset": "ds", "dims": ["3d"], "ablations": {"dice": {"N": "diff-nodice", "Y": "diff"}}}


def config(**extra):
    return {"datasets": {"ds": DATASET}, "tables": {"table2": {**TABLE2, **extra}}, "stats": {"alpha": 0.01}}


def write(runs, run, dice_by_case, missed=()):
    """One metrics.csv: two classes per case, both with the case's Dice (so the case mean is it)."""
    rows = [(u, c, d, d, 1.0, 1.0, (u, c) in missed, 0.1) for u, d in dice_by_case.items() for c in (1, 2)]
    df = pd.DataFrame(rows, columns=["uid", "class", "dice", "nsd", "hd95", "cd", "missed", "volume_share"])
    path = runs / "ds" / run / "test" / "metrics.csv"
    path.parent.mkdir(parents=True)
    df.to_csv(path, index=False)


# Per seed, per case Dice of the reference (diff) and the ablation (diff-nodice).
DIFF = {0: [0.80, 0.70, 0.60], 1: [0.75, 0.72, 0.66], 2: [0.82, 0.60, 0.64]}
NODICE = {0: [0.60, 0.65, 0.50], 1: [0.70, 0.74, 0.55], 2: [0.79, 0.61, 0.70]}


@pytest.fixture
def seed_runs(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1, 2):
        suffix = "" if seed == 0 else f"-seed{seed}"
        write(runs, f"3d-diff{suffix}", dict(zip("abc", DIFF[seed], strict=True)))
        write(
            runs,
            f"3d-diff-nodice{suffix}",
            dict(zip("abc", NODICE[seed], strict=True)),
            missed={("a", 1)} if seed == 2 else (),
        )
    return runs


def test_seed_runs_keep_the_plain_name_for_the_runs_own_seed():
    cfg = config(seeds=[0, 1, 2])
    assert matrix.seed_runs(cfg, "ds", "3d-diff", [0, 1, 2]) == ["3d-diff", "3d-diff-seed1", "3d-diff-seed2"]
    # A run that trains with seed 1 already: seed 1 is its plain name, seed 0 the new one.
    own1 = {**cfg, "training": {"train": {"seed": 1}}}
    assert matrix.seed_runs(own1, "ds", "3d-diff", [0, 1]) == ["3d-diff-seed0", "3d-diff"]
    assert matrix.runs_needed(cfg) == sorted(
        ("ds", f"3d-{v}{s}") for v in ("diff", "diff-nodice") for s in ("", "-seed1", "-seed2")
    )
    assert (
        matrix.has_seeds(cfg) and not matrix.has_seeds(config(seeds=[0])) and not matrix.has_seeds(config())
    )
    # The config's top-level seeds apply to every table without its own.
    assert matrix.table_seeds({**config(), "seeds": [3, 4]}, "table2") == [3, 4]
    with pytest.raises(ConfigError, match="distinct"):
        matrix.table_seeds(config(seeds=[1, 1]), "table2")


def test_one_seed_changes_nothing(seed_runs):
    plain = tables.build_table(config(), "table2", seed_runs)
    one = tables.build_table(config(seeds=[0]), "table2", seed_runs)
    pd.testing.assert_frame_equal(plain, one)
    assert "seeds" not in plain.columns
    assert tables.to_markdown(plain) == tables.to_markdown(one)
    pd.testing.assert_frame_equal(
        stats.paired_tests(config(), seed_runs), stats.paired_tests(config(seeds=[0]), seed_runs)
    )


def test_seed_table_by_hand(seed_runs):
    t = tables.build_table(config(seeds=[0, 1, 2]), "table2", seed_runs).set_index("setting")
    nodice = np.array([NODICE[s] for s in (0, 1, 2)])  # (seeds, cases)
    diff = np.array([DIFF[s] for s in (0, 1, 2)])
    row = t.loc["N"]
    assert row["DS"] == pytest.approx(nodice.mean())
    assert row["DS_std"] == pytest.approx(np.std(nodice.mean(axis=0), ddof=1))  # between cases
    assert row["DS_seed_std"] == pytest.approx(np.std(nodice.mean(axis=1), ddof=1))  # between seeds
    assert row["misses"] == pytest.approx(1 / 3) and row["seeds"] == 3 and row["n"] == 3
    assert row["p_value"] == pytest.approx(sps.ttest_rel(nodice.mean(axis=0), diff.mean(axis=0)).pvalue)
    for s in (0, 1, 2):
        assert row[f"p_seed{s}"] == pytest.approx(sps.ttest_rel(NODICE[s], DIFF[s]).pvalue)
        assert row[f"diff_seed{s}"] == pytest.approx(np.mean(NODICE[s]) - np.mean(DIFF[s]))
    # Seeds 0 and 1: nodice below diff; seed 2: above. The sign is not consistent.
    assert not row["same_sign"]
    assert np.isnan(t.loc["Y"]["p_value"]) and pd.isna(t.loc["Y"]["same_sign"])
    md = tables.to_markdown(t.reset_index())
    assert "| DS seed std | same sign | p per seed |" in md and "| no |" in md
    tt = stats.paired_tests(config(seeds=[0, 1, 2]), seed_runs).iloc[0]
    assert tt["seeds"] == 3 and not tt["same_sign"] and tt["p_value"] == pytest.approx(row["p_value"])
    assert tt["mean_diff"] == pytest.approx(nodice.mean() - diff.mean())


def test_same_sign_when_every_seed_agrees(seed_runs):
    t = tables.build_table(config(seeds=[0, 1]), "table2", seed_runs).set_index("setting")
    assert bool(t.loc["N"]["same_sign"])  # both seeds: nodice below diff
    values = studies.seed_values(config(seeds=[0, 1]), seed_runs)
    assert len(values) == 4 and set(values["seed_run"]) == {
        "3d-diff",
        "3d-diff-seed1",
        "3d-diff-nodice",
        "3d-diff-nodice-seed1",
    }
    got = values.set_index(["cell", "seed"])["DS"]
    assert got[("dice: N", 1)] == pytest.approx(np.mean(NODICE[1]))


def test_seeds_tested_on_different_cases_is_an_error(seed_runs):
    (seed_runs / "ds" / "3d-diff-seed1" / "test" / "metrics.csv").unlink()
    df = pd.read_csv(seed_runs / "ds" / "3d-diff" / "test" / "metrics.csv")
    df.assign(uid=df["uid"].replace("c", "z")).to_csv(
        seed_runs / "ds" / "3d-diff-seed1" / "test" / "metrics.csv", index=False
    )
    with pytest.raises(DataError, match="different cases"):
        tables.build_table(config(seeds=[0, 1]), "table2", seed_runs)


# -- uncertainty -----------------------------------------------------------------------------------


def test_auroc_of_a_perfect_a_useless_and_an_inverted_uncertainty():
    rng = np.random.default_rng(0)
    wrong = rng.random((16, 16, 8)) < 0.2
    assert unc.auroc(wrong.astype(float), wrong) == 1.0  # entropy exactly where the errors are
    assert unc.auroc(np.full(wrong.shape, 0.3), wrong) == 0.5  # one value everywhere: all ties
    assert unc.auroc(1.0 - wrong, wrong) == 0.0
    assert np.isnan(unc.auroc(np.ones(4), np.zeros(4, bool)))  # no error: undefined


def test_auroc_against_mann_whitney_with_ties():
    rng = np.random.default_rng(1)
    scores = np.round(rng.random(5000), 1)  # 11 distinct values: many ties
    wrong = rng.random(5000) < 0.1 + 0.5 * scores  # errors more likely at high scores
    u = sps.mannwhitneyu(scores[wrong], scores[~wrong]).statistic
    assert unc.auroc(scores, wrong) == pytest.approx(u / (wrong.sum() * (~wrong).sum()), rel=1e-12)


def test_histograms_pool_and_bin():
    e1, w1 = np.array([0.0, 0.0, 0.5, 0.7]), np.array([False, True, True, False])
    e2, w2 = np.array([0.5, 0.0]), np.array([True, False])
    pooled = unc.merge_histograms([unc.entropy_histogram(e1, w1), unc.entropy_histogram(e2, w2)])
    assert pooled.to_dict(orient="list") == {
        "entropy": [0.0, 0.5, 0.7],
        "voxels": [3, 2, 1],
        "wrong": [1, 2, 0],
    }
    both = unc.entropy_histogram(np.concatenate([e1, e2]), np.concatenate([w1, w2]))
    assert unc.auroc_from_histogram(pooled) == unc.auroc_from_histogram(both)
    bins = unc.error_rate_bins(pooled, 2, 1.0)
    assert bins["voxels"].tolist() == [3, 3] and bins["wrong"].tolist() == [1, 2]
    assert bins["error_rate"].tolist() == pytest.approx([1 / 3, 2 / 3])
    with pytest.raises(ValueError, match="shape"):
        unc.entropy_histogram(e1, w2)


def test_uncertainty_table_by_hand(tmp_path):
    base = tmp_path / "runs" / "ds" / "3d-diff" / "uncertainty"
    base.mkdir(parents=True)
    cases = pd.DataFrame(
        {
            "uid": list("abcd"),
            "samples": 4,
            "dice_one": [0.5, 0.6, 0.7, 0.8],
            "dice_vote": [0.55, 0.62, 0.69, 0.85],
            "mean_entropy": [0.4, 0.3, 0.35, 0.1],
            "max_entropy": np.log(4),
        }
    )
    cases.to_csv(base / "cases.csv", index=False)
    pd.DataFrame({"entropy": [0.0, 0.5], "voxels": [100, 20], "wrong": [0, 20]}).to_csv(
        base / "histogram.csv", index=False
    )
    cfg = {
        "datasets": {"ds": DATASET},
        "uncertainty": {"dataset": "ds", "dims": ["3d"], "variants": ["diff"]},
    }
    row = studies.uncertainty_table(cfg, tmp_path / "runs").iloc[0]
    assert row["auroc"] == 1.0 and row["error_rate"] == pytest.approx(20 / 120)
    assert row["dice_vote"] == pytest.approx(0.6775) and row["vote_gain"] == pytest.approx(0.0275)
    assert row["p_vote"] == pytest.approx(sps.ttest_rel(cases["dice_vote"], cases["dice_one"]).pvalue)
    ref = sps.spearmanr(cases["mean_entropy"], 1 - cases["dice_vote"])
    assert (row["spearman_r"], row["spearman_p"]) == pytest.approx((ref.statistic, ref.pvalue))
    assert "| ds | `3d-diff` | 4 | 4 |" in studies.uncertainty_markdown(
        studies.uncertainty_table(cfg, tmp_path / "runs")
    )


# -- sampling steps --------------------------------------------------------------------------------


def test_sampling_steps_table_by_hand(tmp_path):
    dice = {1: [0.4, 0.5, 0.45], 5: [0.6, 0.7, 0.62], 25: [0.61, 0.69, 0.64]}
    rows = [
        (k, u, c, d, d, 2.0, 1.0, False, 0.1 * k + i, 5)
        for k, ds in dice.items()
        for i, (u, d) in enumerate(zip("abc", ds, strict=True))
        for c in (1, 2)
    ]
    cols = ["steps", "uid", "class", "dice", "nsd", "hd95", "cd", "missed", "seconds", "sample_steps"]
    path = tmp_path / "runs" / "ds" / "2d-diff" / "sampling_steps" / "metrics.csv"
    path.parent.mkdir(parents=True)
    pd.DataFrame(rows, columns=cols).to_csv(path, index=False)
    cfg = {
        "datasets": {"ds": DATASET},
        "sampling_steps": {"dataset": "ds", "dims": ["2d"], "variants": ["diff"], "steps": [1, 5, 25]},
    }
    t = studies.sampling_steps_table(cfg, tmp_path / "runs").set_index("steps")
    assert t.loc[1, "DS"] == pytest.approx(np.mean(dice[1])) and t.loc[1, "DS_std"] == pytest.approx(
        np.std(dice[1], ddof=1)
    )
    assert t.loc[1, "p_value"] == pytest.approx(sps.ttest_rel(dice[1], dice[5]).pvalue)
    assert np.isnan(t.loc[5, "p_value"])
    assert t.loc[25, "seconds"] == pytest.approx(2.5 + 1.0)  # mean of 2.5, 3.5, 4.5
    md = studies.sampling_steps_markdown(t.reset_index())
    assert "| 5 (configured) |" in md


def test_study_config_errors():
    cfg = {"datasets": {"ds": DATASET}, "tables": {"table2": TABLE2}}
    with pytest.raises(ConfigError, match="not a diffusion run"):
        matrix.study_runs(
            {**cfg, "uncertainty": {"dataset": "ds", "dims": ["3d"], "variants": ["seg"]}}, "uncertainty"
        )
    with pytest.raises(ConfigError, match="exceed"):
        matrix.study_runs(
            {
                **cfg,
                "sampling_steps": {"dataset": "ds", "dims": ["3d"], "variants": ["diff"], "steps": [5, 2000]},
            },
            "sampling_steps",
        )
    got = matrix.study_runs(
        {**cfg, "sampling_steps": {"dataset": "ds", "dims": ["2d", "3d"], "variants": ["diff", "diff-time"]}},
        "sampling_steps",
    )
    assert got == [("ds", "2d-diff"), ("ds", "2d-diff-time"), ("ds", "3d-diff"), ("ds", "3d-diff-time")]


# -- the studies on a trained run -------------------------------------------------------------------


def test_studies_on_a_trained_run_reproduce_the_test_job_and_resume(trained_run, toy_data):  # noqa: F811
    from diffseg.cli import main
    from diffseg.evaluate.studies import sampling_steps_run, uncertainty_run

    assert main(["test", "--run-dir", str(trained_run), "--data", str(toy_data)]) == 0
    test = pd.read_csv(trained_run / "test" / "metrics.csv")
    steps = sampling_steps_run(trained_run, toy_data, [1, 5])
    assert sorted(set(steps["steps"])) == [1, 5] and (steps["seconds"] > 0).all()
    assert (steps["sample_steps"] == 5).all() and (
        steps["checkpoint_step"] == test["checkpoint_step"][0]
    ).all()
    assert_allclose(steps[steps["steps"] == 5]["dice"], test["dice"])  # the run's own K is the test job
    # A second call resumes from the finished K's (their part files), computing nothing again.
    parts = {p: p.stat().st_mtime_ns for p in (trained_run / "sampling_steps").glob("part-K*.csv")}
    again = sampling_steps_run(trained_run, toy_data, [1, 5])
    assert {p: p.stat().st_mtime_ns for p in parts} == parts
    pd.testing.assert_frame_equal(again, steps)

    cases, histogram = uncertainty_run(trained_run, toy_data, 3)
    row = cases.iloc[0]
    assert row["samples"] == 3 and row["dice_one"] == pytest.approx(
        test["dice"].mean()
    )  # sample 0: the test's
    assert histogram["voxels"].sum() == row["voxels"] and histogram["wrong"].sum() == row["wrong_voxels"]
    assert 0 <= row["mean_entropy"] <= np.log(3) and row["max_entropy"] == pytest.approx(np.log(3))
    assert (trained_run / "uncertainty" / "cases.csv").is_file()
    with pytest.raises(DataError, match="at least 2"):
        uncertainty_run(trained_run, toy_data, 1)


def test_the_seed_config_is_the_demo_table2_with_three_seeds():
    """config/seeds.yaml repeats the demo's dataset, training and Table 2 (a --configfile replaces
    the demo config): it must not drift from config/config.yaml."""
    from pathlib import Path

    from diffseg.config import load_yaml, validate_config

    root = Path(__file__).resolve().parents[1]
    demo, seeds = load_yaml(root / "config" / "config.yaml"), load_yaml(root / "config" / "seeds.yaml")
    validate_config(seeds)
    assert seeds["datasets"] == {"phantom_pelvis": demo["datasets"]["phantom_pelvis"]}
    assert seeds["training"] == demo["training"]
    table2 = dict(seeds["tables"]["table2"])
    assert table2.pop("seeds") == [0, 1, 2] and table2 == demo["tables"]["table2"]
    assert seeds["results"] != demo["results"]  # its own tables beside the demo's
    runs = matrix.runs_needed(seeds)
    assert (
        len(runs) == 30
        and ("phantom_pelvis", "3d-diff") in runs
        and ("phantom_pelvis", "2d-diff-seed2") in runs
    )


def test_a_seed_study_without_table1_has_no_spearman_models(seed_runs):
    """config/seeds.yaml has Table 2 only: the statistics job writes its t-tests and an empty
    Spearman table (with its columns) rather than failing on the missing Table 1."""
    cfg = config(seeds=[0, 1])
    assert matrix.figure3_models(cfg) == []
    empty = stats.spearman(seed_runs, matrix.figure3_models(cfg))
    assert empty.empty and {"run", "r", "p_value", "p_bh"} <= set(empty.columns)
    assert len(stats.paired_tests(cfg, seed_runs)) == 1
