"""Splits: the reference's per-institution prostate rule and AMOS dataset.json order; random counts."""

from __future__ import annotations

import json

import pytest

from diffseg.data import (
    Case,
    make_split,
    random_split,
    read_split_csv,
    reference_amos_split,
    reference_prostate_split,
    write_split_csv,
)
from diffseg.data.splits import prostate_rule, split_counts
from diffseg.errors import ConfigError, DataError

# Seven institutions whose reference-rule totals are the paper's 411/14/164 (589 cases). The real
# record's sizes are not used here: these are chosen so that sum(int(0.75 n) - 4) = 411 (train),
# 7 * 2 = 14 (valid) and sum(n - int(0.75 n) + 2) = 164 (test):
# int(0.75 n) = 93, 72, 45, 67, 72, 45, 45 (sum 439).
SIZES_589 = {"UCL": 125, "Prostate3T": 97, "ProstateDx": 61, "ProstateMRI": 90, "bergen": 96,
             "Nijmegen": 60, "Rutgers": 60}  # fmt: skip


def _institution_file(path, sizes, interleave=True):
    """``<uid> <institution>`` lines with 6-digit uids (000001, ...); institutions interleaved."""
    queues = {inst: n for inst, n in sizes.items()}
    lines, uid = [], 0
    while any(queues.values()):
        for inst in sizes:
            for _ in range(1 if interleave else queues[inst]):
                if queues[inst]:
                    uid += 1
                    queues[inst] -= 1
                    lines.append(f"{uid:06d} {inst}")
    path.write_text("\n".join(lines) + "\n")
    return [line.split() for line in lines]


def test_rule_on_a_hand_computed_example(tmp_path):
    # A: 8 cases -> int(6.0) - 2 = 4: valid a1 a2, train a3 a4, test a5..a8.
    # B: 10 cases -> int(7.5) - 2 = 5: valid b1 b2, train b3 b4 b5, test b6..b10.
    a = [f"00010{i}" for i in range(1, 9)]
    b = [f"0002{i:02d}" for i in range(1, 11)]
    lines = [f"{u} A" for u in a[:3]] + [f"{u} B" for u in b[:5]] + [f"{u} A" for u in a[3:]]
    lines += [f"{u} B" for u in b[5:]]
    (tmp_path / "institution.txt").write_text("\n".join(lines) + "\n\n")  # a trailing blank line
    split = reference_prostate_split(tmp_path / "institution.txt")
    expect = dict.fromkeys(a[:2] + b[:2], "valid")
    expect |= dict.fromkeys(a[2:4] + b[2:5], "train") | dict.fromkeys(a[4:] + b[5:], "test")
    assert split == expect
    assert prostate_rule(8) == (2, 4) and prostate_rule(10) == (2, 5) and prostate_rule(125) == (2, 91)


def test_589_cases_over_7_institutions_give_411_14_164(tmp_path):
    rows = _institution_file(tmp_path / "institution.txt", SIZES_589)
    assert len(rows) == 589 and rows[0][0] == "000001"
    cases = [Case(uid) for uid, _ in rows]
    split = make_split("prostate_mr", {"source": "prostate_mr"}, cases, tmp_path / "institution.txt")
    assert split_counts(split) == {"train": 411, "valid": 14, "test": 164}
    for inst, n in SIZES_589.items():  # per institution, in file order: 2 valid, train, then test
        got = [split[uid] for uid, i in rows if i == inst]
        train_end = int(0.75 * n) - 2
        assert got == ["valid"] * 2 + ["train"] * (train_end - 2) + ["test"] * (n - train_end)
    # The same split whatever the listing order of the cases; uids stay 6-digit text in split.csv.
    assert make_split("p", {"source": "prostate_mr"}, cases[::-1], tmp_path / "institution.txt") == split
    write_split_csv(tmp_path / "split.csv", split)
    assert read_split_csv(tmp_path / "split.csv") == split
    assert (tmp_path / "split.csv").read_text().splitlines()[1] == "000001,valid"


def test_counts_give_the_random_split(tmp_path):
    _institution_file(tmp_path / "institution.txt", SIZES_589)
    cases = [Case(f"{i:06d}") for i in range(1, 590)]
    cfg = {"source": "prostate_mr", "seed": 0, "split": {"train": 411, "valid": 14, "test": 164}}
    split = make_split("prostate_mr", cfg, cases, tmp_path / "institution.txt")
    assert split_counts(split) == {"train": 411, "valid": 14, "test": 164}
    assert split == make_split("prostate_mr", cfg, cases[::-1])  # no institution.txt needed
    assert split != make_split("prostate_mr", {**cfg, "seed": 1}, cases)
    ref = make_split("prostate_mr", {"source": "prostate_mr"}, cases, tmp_path / "institution.txt")
    assert split != ref


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("000001 A\n000002\n", r"institution\.txt: line 2: expected '<uid> <institution>'"),
        ("000001 A\n000002 A B\n", r"institution\.txt: line 2: expected"),
        ("000001 A\n\n000001 B\n", r"institution\.txt: line 3: uid 000001 already listed on line 1"),
        ("\n\n", r"institution\.txt: no '<uid> <institution>' lines"),
        ("".join(f"{i:06d} A\n" for i in range(1, 6)), r"institution A has 5 cases; .* at least 6"),
    ],
)
def test_malformed_institution_file(tmp_path, text, message):
    (tmp_path / "institution.txt").write_text(text)
    with pytest.raises(DataError, match=message) as err:
        reference_prostate_split(tmp_path / "institution.txt")
    assert str(tmp_path / "institution.txt") in str(err.value)


def test_institution_file_and_images_must_agree(tmp_path):
    path = tmp_path / "institution.txt"
    rows = _institution_file(path, {"A": 6, "B": 8})
    cases = [Case(uid, image=tmp_path / "data" / f"{uid}_img.nii") for uid, _ in rows]
    with pytest.raises(DataError, match=r"institution\.txt: 1 listed uids have no image: 000014"):
        make_split("p", {"source": "prostate_mr"}, cases[:-1], path)
    extra = Case("000099", image=tmp_path / "data" / "000099_img.nii")
    with pytest.raises(DataError, match=r"institution\.txt: no line for 1 images: .*000099_img\.nii"):
        make_split("p", {"source": "prostate_mr"}, [*cases, extra], path)
    with pytest.raises(DataError, match=r"missing\.txt: file not found .*7013610"):
        make_split("p", {"source": "prostate_mr"}, cases, tmp_path / "missing.txt")


def _amos_json(path, training, validation):
    def entries(ids, sub):
        return [
            {"image": f"./images{sub}/amos_{i:04d}.nii.gz", "label": f"./labels{sub}/amos_{i:04d}.nii.gz"}
            for i in ids
        ]

    labels = {"0": "background", "1": "spleen"}
    meta = {"labels": labels, "training": entries(training, "Tr"), "validation": entries(validation, "Va")}
    path.write_text(json.dumps(meta))


def test_amos_reference_follows_dataset_json_order(tmp_path):
    # 20 CT validation cases in an order unlike the file names' (and 2 MR cases, ids > 500, among them).
    validation = [
        317,
        12,
        400,
        7,
        590,
        250,
        33,
        101,
        5,
        498,
        64,
        222,
        610,
        18,
        301,
        77,
        150,
        9,
        444,
        260,
        3,
        88,
    ]
    training = [1, 2, 4, 540, 6]
    _amos_json(tmp_path / "dataset.json", training, validation)
    split = reference_amos_split(tmp_path / "dataset.json")
    ct = [i for i in validation if i <= 500]
    assert len(ct) == 20
    assert [u for u, s in split.items() if s == "valid"] == ["amos_0317", "amos_0012"]  # int(0.1 * 20)
    assert sorted(u for u, s in split.items() if s == "test") == sorted(f"amos_{i:04d}" for i in ct[2:])
    assert sorted(u for u, s in split.items() if s == "train") == [
        "amos_0001",
        "amos_0002",
        "amos_0004",
        "amos_0006",
    ]
    cases = [Case(u, group="train" if s == "train" else "valid") for u, s in sorted(split.items())]
    assert make_split("abdominal_ct", {"source": "abdominal_ct"}, cases, tmp_path / "dataset.json") == split
    # 100 validation cases: the first 10 valid, the other 90 test.
    _amos_json(tmp_path / "dataset.json", training, list(range(400, 300, -1)))
    split = reference_amos_split(tmp_path / "dataset.json")
    assert split_counts(split) == {"train": 4, "valid": 10, "test": 90}
    assert {u for u, s in split.items() if s == "valid"} == {f"amos_{i:04d}" for i in range(400, 390, -1)}


def test_amos_counts_give_a_random_split():
    cases = [Case(f"amos_{i:04d}", group="train") for i in range(200)]
    cases += [Case(f"amos_{i:04d}", group="valid") for i in range(200, 300)]
    cfg = {"source": "abdominal_ct", "seed": 0, "split": {"valid": 10, "test": 90}}
    split = make_split("abdominal_ct", cfg, cases)
    assert all(split[c.uid] == "train" for c in cases[:200])
    valid = [split[c.uid] for c in cases[200:]]
    assert valid.count("valid") == 10 and valid.count("test") == 90
    assert [split[c.uid] for c in cases[200:210]] != ["valid"] * 10  # shuffled, not the first 10


def test_split_config_errors():
    cases = [Case(f"c{i}") for i in range(10)]
    with pytest.raises(ConfigError, match="datasets.ph.split"):
        make_split("ph", {"source": "phantom", "split": {"train": 5, "valid": 1, "test": 1}}, cases)
    with pytest.raises(ConfigError, match="datasets.ph.split: required"):
        make_split("ph", {"source": "phantom"}, cases)
    with pytest.raises(ConfigError, match="datasets.ph.split: no reference split for source phantom"):
        make_split("ph", {"source": "phantom", "split": "reference"}, cases)
    with pytest.raises(ConfigError, match="datasets.p.split: expected 'reference' or counts"):
        make_split("p", {"source": "prostate_mr", "split": "institution"}, cases)
    with pytest.raises(ConfigError):
        random_split(["a", "b"], {"train": 3}, 0)
