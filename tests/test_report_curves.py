"""The training-curves figure from runs' train_log.csv and valid.csv."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from diffseg.cli import main
from diffseg.errors import DataError
from diffseg.report import curves


def _run(runs, dataset, run, steps=20):
    d = runs / dataset / run
    d.mkdir(parents=True)
    s = np.arange(1, steps + 1)
    pd.DataFrame({"step": s, "loss": 1.0 / s, "lr": 1e-3}).to_csv(d / "train_log.csv", index=False)
    pd.DataFrame({"step": s[4::5], "mean_dice": np.linspace(0.1, 0.6, len(s[4::5]))}).to_csv(
        d / "valid.csv", index=False
    )


def test_read_and_draw(tmp_path):
    runs = tmp_path / "runs"
    for ds, run in (("a", "2d-seg"), ("a", "3d-diff"), ("b", "3d-diff")):
        _run(runs, ds, run)
    train, valid = curves.read_curves(runs, [("a", "2d-seg"), ("a", "3d-diff"), ("b", "3d-diff")])
    assert len(train) == 60 and len(valid) == 12
    assert list(train.columns) == ["dataset", "run", "step", "loss"]
    assert main(["curves", "--runs", str(runs), "--models", "a/2d-seg", "a/3d-diff", "b/3d-diff",
                 "--out", str(tmp_path / "c.png"), str(tmp_path / "c.pdf")]) == 0  # fmt: skip
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "c.pdf").read_bytes()[:4] == b"%PDF"


def test_smooth_and_errors(tmp_path):
    assert curves.smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert curves.smooth(np.array([2.0]), 5).tolist() == [2.0]
    with pytest.raises(DataError, match="train_log.csv"):
        curves.read_curves(tmp_path, [("a", "2d-seg")])
    with pytest.raises(DataError, match="dataset/run"):
        curves.parse_models(["nope"])
    d = tmp_path / "a" / "2d-seg"
    d.mkdir(parents=True)
    (d / "train_log.csv").write_text("step,lr\n1,0.1\n")
    with pytest.raises(DataError, match="columns"):
        curves.read_curves(tmp_path, [("a", "2d-seg")])


def test_eighteen_runs_are_told_apart(tmp_path):
    """The demo's pelvis panel: 9 variants in 2D and 3D, each (colour, line style) its own; the
    colour follows the variant and the style the dimension; one legend outside the panels."""
    variants = ["seg", "diff", "diff-noise", "diff-nodice", "diff-norecycle", "diff-t1000", "diff-time",
                "diff-betatilde", "diff-k3"]  # fmt: skip
    runs = [f"{d}-{v}" for v in variants for d in ("2d", "3d")]
    styles = curves.run_styles(runs)
    assert len({(tuple(s["color"]), s["ls"]) for s in styles.values()}) == 18
    assert styles["2d-diff"]["color"] == styles["3d-diff"]["color"] and styles["2d-diff"]["ls"] == "--"
    assert len({tuple(styles[f"3d-{v}"]["color"]) for v in variants}) == 9
    root = tmp_path / "runs"
    for run in runs:
        _run(root, "pelvis", run)
    import matplotlib.pyplot as plt

    seen = {}
    real = plt.Figure.legend

    def spy(self, *args, **kwargs):
        seen["labels"] = list(args[1]) if len(args) > 1 else None
        seen["anchor"] = kwargs.get("bbox_to_anchor")
        return real(self, *args, **kwargs)

    import unittest.mock

    with unittest.mock.patch.object(plt.Figure, "legend", spy):
        curves.curves(root, [("pelvis", r) for r in runs], [tmp_path / "c.png"])
    assert sorted(seen["labels"]) == sorted(runs) and seen["anchor"] == (1.0, 0.5)
