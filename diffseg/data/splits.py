"""Train/valid/test splits (the paper's, random with a fixed seed) and ``split.csv`` I/O."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffseg.data.sources import Case
from diffseg.errors import ConfigError, DataError
from diffseg.io import atomic_write_text

SPLITS = ("train", "valid", "test")
PROSTATE_SPLIT = {"train": 411, "valid": 14, "test": 164}
AMOS_SPLIT = {"valid": 10, "test": 90}  # of the 100 AMOS validation cases; train = imagesTr


def random_split(
    uids: Sequence[str], counts: Mapping[str, int], seed: int, where: str = "split"
) -> dict[str, str]:
    """Shuffle ``uids`` with ``default_rng(seed)`` and cut into train/valid/test by ``counts``.

    The uids are sorted first so the result does not depend on the listing order.
    """
    counts = {k: int(counts.get(k, 0)) for k in SPLITS}
    if sum(counts.values()) != len(uids):
        raise ConfigError(
            f"{where}: counts {counts} sum to {sum(counts.values())}, but there are {len(uids)} cases"
        )
    order = np.random.default_rng(seed).permutation(len(uids))
    ordered_uids = sorted(uids)
    ordered = [ordered_uids[i] for i in order]
    out, start = {}, 0
    for name in SPLITS:
        for uid in ordered[start : start + counts[name]]:
            out[uid] = name
        start += counts[name]
    return out


def amos_split(
    train_uids: Sequence[str],
    valid_uids: Sequence[str],
    counts: Mapping[str, int],
    seed: int,
    where: str = "split",
) -> dict[str, str]:
    """AMOS: every imagesTr case is train; the imagesVa cases split randomly into valid/test."""
    sub = random_split(valid_uids, {k: counts.get(k, AMOS_SPLIT[k]) for k in AMOS_SPLIT}, seed, where)
    return {**dict.fromkeys(sorted(train_uids), "train"), **sub}


def make_split(name: str, ds_cfg: Mapping[str, Any], cases: Sequence[Case]) -> dict[str, str]:
    """The split of dataset ``name``: ``{uid: "train" | "valid" | "test"}``."""
    source, seed = ds_cfg.get("source"), int(ds_cfg.get("seed", 0))
    where = f"datasets.{name}.split"
    uids = [c.uid for c in cases]
    if len(set(uids)) != len(uids):
        raise DataError(f"dataset {name}: duplicate case ids")
    if source == "abdominal_ct":
        counts = ds_cfg.get("split") or AMOS_SPLIT
        return amos_split(
            [c.uid for c in cases if c.group == "train"],
            [c.uid for c in cases if c.group != "train"],
            counts,
            seed,
            where,
        )
    counts = ds_cfg.get("split") or (PROSTATE_SPLIT if source == "prostate_mr" else None)
    if counts is None:
        raise ConfigError(f"{where}: required for source {source} (e.g. {{train: 12, valid: 2, test: 6}})")
    return random_split(uids, counts, seed, where)


def split_counts(split: Mapping[str, str]) -> dict[str, int]:
    """``{"train": n, "valid": n, "test": n}``."""
    return {s: sum(1 for v in split.values() if v == s) for s in SPLITS}


def write_split_csv(path: str | Path, split: Mapping[str, str]) -> None:
    """Write ``uid,split`` rows (sorted by uid) atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["uid", "split"])
    for uid in sorted(split):
        w.writerow([uid, split[uid]])
    atomic_write_text(path, buf.getvalue())


def read_split_csv(path: str | Path) -> dict[str, str]:
    """Read ``split.csv`` into ``{uid: split}``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and ("uid" not in rows[0] or "split" not in rows[0]):
        raise DataError(f"{path}: expected columns uid,split")
    bad = {r["split"] for r in rows} - set(SPLITS)
    if bad:
        raise DataError(f"{path}: unknown split names {sorted(bad)}")
    return {r["uid"]: r["split"] for r in rows}
