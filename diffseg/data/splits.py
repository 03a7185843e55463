"""Train/valid/test splits (the reference's rules, or random with a fixed seed) and ``split.csv`` I/O.

``split: reference`` (the default for prostate_mr and abdominal_ct) reproduces ImgX-DiffSeg v0.1.0:

* prostate_mr (``imgx/datasets/male_pelvic_mr/male_pelvic_mr_dataset_builder.py``): the record's
  ``institution.txt`` (``<uid> <institution>`` lines) groups the cases; per institution, in file
  order, the first 2 are valid, the next up to index ``int(0.75 n) - 2`` train, the rest test
  (589 cases over 7 institutions: 411/14/164).
* abdominal_ct (``imgx/datasets/amos_ct/amos_ct_dataset_builder.py``): ``dataset.json``'s
  ``training`` CT cases train; its ``validation`` CT cases in file order: the first
  ``int(0.1 n)`` valid, the rest test (100 -> 10/90).

Counts (``split: {train: n, valid: n, test: n}``) give a random split with ``seed`` instead (AMOS:
the validation cases are shuffled into valid/test, the training cases stay train).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffseg.data.sources import Case, amos_lists
from diffseg.errors import ConfigError, DataError
from diffseg.io import atomic_write_text

SPLITS = ("train", "valid", "test")
REFERENCE = "reference"
REFERENCE_SOURCES = ("prostate_mr", "abdominal_ct")
PROSTATE_SPLIT = {"train": 411, "valid": 14, "test": 164}  # what the reference rule gives on the record
PROSTATE_NUM_VALID = 2  # per institution (reference: num_examples_valid)
PROSTATE_TRAIN_RATIO = 0.75  # reference: PELVIC_TRAIN_RATIO
# With fewer cases an institution's first two would be both valid and test under the reference rule.
PROSTATE_MIN_CASES = 6
AMOS_SPLIT = {"valid": 10, "test": 90}  # of the 100 AMOS validation CT cases; train = the training list
AMOS_VALID_RATIO = 0.1  # reference: AMOS_VALID_RATIO
SHOWN = 5  # ids shown in an error message


def _shown(items: Sequence[Any]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(str(i) for i in items[:SHOWN]) + more


def read_institutions(path: str | Path) -> list[tuple[str, str]]:
    """``institution.txt`` as ``[(uid, institution), ...]`` in file order.

    Each non-blank line is ``<uid> <institution>`` (two fields separated by white space; uids are
    kept as text, leading zeros included). A malformed line or a repeated uid is a ``DataError``
    naming the file and the line number.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: file not found (the prostate_mr reference split needs institution.txt of Zenodo "
            "record 7013610: `diffseg download` puts it here; or give split counts for a random split)"
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    rows: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing one) carry nothing, as pandas skips them
        fields = line.split()
        if len(fields) != 2:
            raise DataError(
                f"{path}: line {number}: expected '<uid> <institution>', got {line.strip()[:80]!r}"
            )
        uid, institution = fields
        if uid in seen:
            raise DataError(f"{path}: line {number}: uid {uid} already listed on line {seen[uid]}")
        seen[uid] = number
        rows.append((uid, institution))
    if not rows:
        raise DataError(f"{path}: no '<uid> <institution>' lines")
    return rows


def prostate_rule(n: int) -> tuple[int, int]:
    """The reference's cut points for an institution of ``n`` cases: ``(num_valid, train_end)``.

    Cases ``[0, num_valid)`` are valid, ``[num_valid, train_end)`` train, ``[train_end, n)`` test, with
    ``train_end = int(0.75 n) - 2``: the reference subtracts the 2 valid cases from a count but uses it
    as an end index, so train + valid = ``int(0.75 n) - 2`` cases, not 75 %.
    """
    return PROSTATE_NUM_VALID, int(n * PROSTATE_TRAIN_RATIO) - PROSTATE_NUM_VALID


def reference_prostate_split(path: str | Path) -> dict[str, str]:
    """The reference's per-institution split from an ``institution.txt`` path: ``{uid: split}``.

    Per institution, with its uids in file order: the first 2 valid, then train up to index
    ``int(0.75 n) - 2`` (exclusive), the rest test (see :func:`prostate_rule`). An institution with
    fewer than 6 cases is a ``DataError`` (the reference would put cases in valid and test both).
    """
    path = Path(path)
    by_institution: dict[str, list[str]] = {}
    for uid, institution in read_institutions(path):
        by_institution.setdefault(institution, []).append(uid)
    split: dict[str, str] = {}
    for institution, uids in by_institution.items():
        if len(uids) < PROSTATE_MIN_CASES:
            raise DataError(
                f"{path}: institution {institution} has {len(uids)} cases; the reference split needs at "
                f"least {PROSTATE_MIN_CASES} (2 valid, then int(0.75 n) - 2 >= 2)"
            )
        num_valid, train_end = prostate_rule(len(uids))
        for i, uid in enumerate(uids):
            split[uid] = "valid" if i < num_valid else "train" if i < train_end else "test"
    return split


def reference_amos_split(path: str | Path) -> dict[str, str]:
    """The reference's AMOS split from its ``dataset.json``: ``{uid: split}`` (CT cases, ids <= 500).

    The ``training`` cases train; the ``validation`` cases in the file's order: the first
    ``int(0.1 n)`` valid, the rest test.
    """
    path = Path(path)
    lists = amos_lists(path)
    validation = [uid for uid, _, _ in lists["validation"]]
    num_valid = int(len(validation) * AMOS_VALID_RATIO)
    if num_valid == 0:
        raise DataError(
            f"{path}: {len(validation)} validation CT cases; the reference split (the first 10 % valid) "
            "needs at least 10"
        )
    split = dict.fromkeys((uid for uid, _, _ in lists["training"]), "train")
    for i, uid in enumerate(validation):
        if uid in split:
            raise DataError(f"{path}: {uid} is listed in both 'training' and 'validation'")
        split[uid] = "valid" if i < num_valid else "test"
    return split


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
    """AMOS, random: every training case is train; the validation cases split randomly into valid/test."""
    sub = random_split(valid_uids, {k: counts.get(k, AMOS_SPLIT[k]) for k in AMOS_SPLIT}, seed, where)
    return {**dict.fromkeys(sorted(train_uids), "train"), **sub}


def _check_same_cases(split: Mapping[str, str], cases: Sequence[Case], path: Path) -> None:
    """The split file and the listed cases must name the same uids (``DataError`` otherwise)."""
    listed = {c.uid for c in cases}
    no_image = [u for u in split if u not in listed]
    if no_image:
        raise DataError(f"{path}: {len(no_image)} listed uids have no image: {_shown(no_image)}")
    missing = [c for c in cases if c.uid not in split]
    if missing:
        files = [str(c.image or c.uid) for c in missing]
        raise DataError(f"{path}: no line for {len(missing)} images: {_shown(files)}")


def make_split(
    name: str, ds_cfg: Mapping[str, Any], cases: Sequence[Case], split_file: str | Path | None = None
) -> dict[str, str]:
    """The split of dataset ``name``: ``{uid: "train" | "valid" | "test"}``.

    Args:
        name: the dataset name (for error messages).
        ds_cfg: its config entry: ``source``, ``seed``, ``split`` (``reference`` -- the default for
            prostate_mr and abdominal_ct -- or counts ``{train, valid, test}`` for a random split).
        cases: the listed cases (AMOS: ``group`` train/valid).
        split_file: the source's reference-split file (``Source.split_file``): ``institution.txt``
            for prostate_mr, ``dataset.json`` for abdominal_ct.
    """
    source, seed = ds_cfg.get("source"), int(ds_cfg.get("seed", 0))
    where = f"datasets.{name}.split"
    uids = [c.uid for c in cases]
    if len(set(uids)) != len(uids):
        raise DataError(f"dataset {name}: duplicate case ids")
    rule = ds_cfg.get("split", REFERENCE if source in REFERENCE_SOURCES else None)
    if rule == REFERENCE:
        if source not in REFERENCE_SOURCES:
            raise ConfigError(
                f"{where}: no reference split for source {source} (give counts, e.g. "
                "{train: 12, valid: 2, test: 6})"
            )
        if split_file is None:
            raise DataError(f"dataset {name}: the reference split needs the source's split file")
        path = Path(split_file)
        ref = reference_prostate_split(path) if source == "prostate_mr" else reference_amos_split(path)
        _check_same_cases(ref, cases, path)
        return {uid: ref[uid] for uid in uids}
    if rule is None:
        raise ConfigError(f"{where}: required for source {source} (e.g. {{train: 12, valid: 2, test: 6}})")
    if not isinstance(rule, Mapping) or set(rule) - set(SPLITS):
        raise ConfigError(
            f"{where}: expected 'reference' or counts {{train: n, valid: n, test: n}}, got {rule!r}"
        )
    if source == "abdominal_ct":
        return amos_split(
            [c.uid for c in cases if c.group == "train"],
            [c.uid for c in cases if c.group != "train"],
            rule,
            seed,
            where,
        )
    return random_split(uids, rule, seed, where)


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
