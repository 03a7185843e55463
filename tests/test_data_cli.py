"""``diffseg data`` and ``diffseg data-figure`` on a small phantom config; CLI errors."""

from __future__ import annotations

import json

import pytest
import yaml

from diffseg.cli import main


def test_cli_data_and_figure(tmp_path, capsys):
    cfg = {
        "resources": str(tmp_path / "resources"),
        "results": str(tmp_path / "results"),
        "datasets": {
            "ph": {
                "source": "phantom",
                "anatomy": "abdomen",
                "num_cases": 4,
                "seed": 1,
                "spacing": [3.0, 3.0, 5.0],
                "shape": [32, 24, 16],
                "clip": [-991, 362],
                "split": {"train": 2, "valid": 1, "test": 1},
            }
        },
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["data", "--config", str(tmp_path / "cfg.yaml"), "--dataset", "ph"]) == 0
    data = tmp_path / "results" / "data" / "ph"
    info = json.loads((data / "dataset.json").read_text())
    assert (
        info["num_classes"] == 16 and info["modality"] == "CT" and len(list((data / "images").iterdir())) == 4
    )
    out = tmp_path / "fig" / "ph.png"
    assert main(["data-figure", "--data", str(data), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in out.parent.iterdir()] == ["ph.png"]
    # A bad dataset name is a one-line error with exit code 2.
    assert main(["data", "--config", str(tmp_path / "cfg.yaml"), "--dataset", "nope"]) == 2
    assert "datasets.nope not found" in capsys.readouterr().err


def test_ct_display_window_follows_the_normalisation():
    import numpy as np

    from diffseg.data.cli import _display_window

    image = np.zeros((2, 2, 2), np.float32)
    info = {"modality": "CT", "clip": [-991, 362]}
    lo, hi = _display_window(info, image)  # legacy: [-991, 362] -> [-1, 1]
    assert lo == pytest.approx(2 * 831 / 1353 - 1) and hi == pytest.approx(2 * 1231 / 1353 - 1)
    lo, hi = _display_window({**info, "normalize": "reference"}, image)  # reference: -> [0, 1]
    assert lo == pytest.approx(831 / 1353) and hi == pytest.approx(1231 / 1353)
