"""Paper splits: prostate 411/14/164 random, AMOS 200 train / 10 valid / 90 test."""

from __future__ import annotations

import pytest

from diffseg.data import Case, make_split, random_split, read_split_csv, write_split_csv
from diffseg.errors import ConfigError


def test_prostate_split_counts_and_seed(tmp_path):
    uids = [f"{i:03d}" for i in range(589)]
    cases = [Case(u) for u in uids]
    split = make_split("prostate_mr", {"source": "prostate_mr", "seed": 0}, cases)
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "valid", "test")}
    assert counts == {"train": 411, "valid": 14, "test": 164}
    assert split == make_split("prostate_mr", {"source": "prostate_mr", "seed": 0}, cases[::-1])
    assert split != make_split("prostate_mr", {"source": "prostate_mr", "seed": 1}, cases)
    write_split_csv(tmp_path / "split.csv", split)
    assert read_split_csv(tmp_path / "split.csv") == split


def test_amos_split():
    cases = [Case(f"amos_{i:04d}", group="train") for i in range(200)]
    cases += [Case(f"amos_{i:04d}", group="valid") for i in range(200, 300)]
    split = make_split(
        "abdominal_ct", {"source": "abdominal_ct", "seed": 0, "split": {"valid": 10, "test": 90}}, cases
    )
    assert all(split[c.uid] == "train" for c in cases[:200])
    valid = [split[c.uid] for c in cases[200:]]
    assert valid.count("valid") == 10 and valid.count("test") == 90


def test_counts_must_sum():
    with pytest.raises(ConfigError, match="datasets.ph.split"):
        make_split(
            "ph",
            {"source": "phantom", "split": {"train": 5, "valid": 1, "test": 1}},
            [Case(f"c{i}") for i in range(10)],
        )
    with pytest.raises(ConfigError):
        random_split(["a", "b"], {"train": 3}, 0)
