"""Sources end to end: an MSD/nnU-Net folder, AMOS layout, and the bad-input errors (no partial output)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffseg.data import list_source, load_dataset, prepare_dataset
from diffseg.errors import ConfigError, DataError

GEOM = {"spacing": [0.75, 0.75, 2.5], "shape": [16, 16, 8]}


def _msd(root, make_case, n=4, nnunet=True, channels=None):
    meta = {"name": "Toy", "labels": {"background": 0, "a": 1, "b": 2}}
    meta["channel_names" if nnunet else "modality"] = channels or {"0": "MRI"}
    if not nnunet:  # MSD lists its cases
        meta["training"] = [
            {"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"} for i in range(n)
        ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for i in range(n):
        img = f"case{i}_0000.nii.gz" if nnunet else f"case{i}.nii.gz"
        make_case(root / "imagesTr" / img, root / "labelsTr" / f"case{i}.nii.gz", seed=i, num_classes=3)
    return root


def _no_partial(out):
    assert not out.exists()
    if out.parent.exists():  # no temporary folder left beside it either
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.parametrize("nnunet", [True, False])
def test_msd_end_to_end(tmp_path, make_case, nnunet):
    root = _msd(tmp_path / "Task01", make_case, nnunet=nnunet)
    cfg = {
        "source": "msd",
        "path": str(root),
        "seed": 0,
        **GEOM,
        "split": {"train": 2, "valid": 1, "test": 1},
    }
    info = prepare_dataset("toy", cfg, tmp_path / "out" / "toy", tmp_path / "res")
    assert info["classes"] == ["background", "a", "b"] and info["num_classes"] == 3
    assert info["modality"] == "MR" and info["num_cases"] == 4
    ds = load_dataset(tmp_path / "out" / "toy")
    uids, images, labels = ds.split("train")
    assert len(uids) == 2 and uids[0].startswith("case") and not uids[0].endswith("_0000")
    assert images.shape == (2, 16, 16, 8) and labels.dtype == np.uint8 and labels.max() <= 2
    # Rerunning overwrites cleanly.
    prepare_dataset("toy", cfg, tmp_path / "out" / "toy", tmp_path / "res")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["toy"]


def test_msd_missing_label(tmp_path, make_case):
    root = _msd(tmp_path / "T", make_case)
    (root / "labelsTr" / "case2.nii.gz").unlink()
    out = tmp_path / "out" / "t"
    with pytest.raises(DataError) as err:
        prepare_dataset("t", {"source": "msd", "path": str(root), **GEOM}, out, tmp_path)
    assert "case2_0000.nii.gz" in str(err.value) and "no label" in str(err.value)
    _no_partial(out)


def test_msd_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: empty folder"):
        list_source("t", {"source": "msd", "path": str(tmp_path / "empty")}, tmp_path)


def test_msd_multi_modality_needs_every_channel(tmp_path, make_case):
    # Two channels named, only the _0000 files present: the first missing channel file is named.
    root = _msd(tmp_path / "T", make_case, channels={"0": "T2", "1": "ADC"})
    with pytest.raises(DataError, match=r"case0_0001\.nii\.gz: channel 1 of case case0 not found"):
        list_source("t", {"source": "msd", "path": str(root)}, tmp_path)


def test_bad_case_leaves_no_partial_output(tmp_path, make_case):
    root = _msd(tmp_path / "T", make_case)
    make_case(root / "imagesTr" / "case3_0000.nii.gz", root / "labelsTr" / "case3.nii.gz", num_classes=5)
    out = tmp_path / "out" / "t"
    cfg = {"source": "msd", "path": str(root), **GEOM, "split": {"train": 2, "valid": 1, "test": 1}}
    with pytest.raises(DataError) as err:
        prepare_dataset("t", cfg, out, tmp_path)
    assert "case3.nii.gz" in str(err.value) and "3, 4" in str(err.value)
    _no_partial(out)


def _amos(tmp_path, make_case, training, validation, skip_files=()):
    """An extracted amos22.zip: raw/amos22/dataset.json (lists in the given order) + images/labels."""
    raw = tmp_path / "raw" / "amos22"
    raw.mkdir(parents=True)
    labels = {str(i): n for i, n in enumerate(["background", "spleen", "liver"])}
    meta = {"labels": labels, "training": [], "validation": []}
    for key, sub, ids in (("training", "Tr", training), ("validation", "Va", validation)):
        for i in ids:
            name = f"amos_{i:04d}.nii.gz"
            meta[key].append({"image": f"./images{sub}/{name}", "label": f"./labels{sub}/{name}"})
            if i not in skip_files:
                make_case(raw / f"images{sub}" / name, raw / f"labels{sub}" / name, seed=i, num_classes=3)
    (raw / "dataset.json").write_text(json.dumps(meta))
    return raw


def test_amos_layout(tmp_path, make_case):
    # dataset.json lists the validation cases in an order unlike their file names; MR ids > 500 skipped.
    validation = [33, 12, 600, 25, 11, 40, 18, 10, 31, 27, 14]
    _amos(tmp_path, make_case, (3, 1, 540, 2), validation)
    src = list_source("abdominal_ct", {"source": "abdominal_ct"}, tmp_path)
    assert src.classes == ["background", "spleen", "liver"] and src.modality == "CT"
    assert src.split_file == tmp_path / "raw" / "amos22" / "dataset.json"
    assert [c.uid for c in src.cases if c.group == "train"] == ["amos_0003", "amos_0001", "amos_0002"]
    assert [c.uid for c in src.cases if c.group == "valid"] == [
        f"amos_{i:04d}" for i in validation if i <= 500
    ]
    info = prepare_dataset("abdominal_ct", {"source": "abdominal_ct", **GEOM}, tmp_path / "out", tmp_path)
    # reference: 10 validation CT cases -> int(0.1 * 10) = 1 valid (the first listed), 9 test
    assert info["splits"] == {"train": 3, "valid": 1, "test": 9} and info["clip"] == [-991.0, 362.0]
    assert (tmp_path / "out" / "split.csv").read_text().count("amos_0033,valid") == 1
    assert {k: info[k] for k in ("reorient", "resample", "normalize", "crop")} == {
        "reorient": "none",
        "resample": "reference",
        "normalize": "reference",
        "crop": "label_bbox",
    }
    ds = load_dataset(tmp_path / "out")
    _, images, labels = ds.split("test")
    assert images.min() == 0 and images.max() == 1 and labels.max() == 2
    # counts: a random split of the validation cases
    cfg = {"source": "abdominal_ct", **GEOM, "split": {"valid": 2, "test": 8}}
    info = prepare_dataset("abdominal_ct", cfg, tmp_path / "out", tmp_path)
    assert info["splits"] == {"train": 3, "valid": 2, "test": 8}


def test_amos_listed_file_missing(tmp_path, make_case):
    _amos(tmp_path, make_case, (1, 2), (10, 11), skip_files=(11,))
    with pytest.raises(
        DataError, match=r"dataset\.json: validation lists .*amos_0011\.nii\.gz, which does not exist"
    ):
        list_source("abdominal_ct", {"source": "abdominal_ct"}, tmp_path)
    (tmp_path / "raw" / "amos22" / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "a"}}))
    with pytest.raises(DataError, match=r"dataset\.json: missing or empty 'training' list"):
        list_source("abdominal_ct", {"source": "abdominal_ct"}, tmp_path)


def test_prostate_source_finds_institution_txt(tmp_path, make_case):
    res = tmp_path / "prostate_mr"
    for uid in ("000001", "000002"):
        make_case(res / "raw" / "data" / f"{uid}_img.nii", res / "raw" / "data" / f"{uid}_mask.nii")
    src = list_source("prostate_mr", {"source": "prostate_mr"}, res)
    assert [c.uid for c in src.cases] == ["000001", "000002"]
    assert src.split_file == res / "institution.txt"  # expected beside data.zip; reading it says so
    (res / "raw" / "institution.txt").write_text("000001 A\n000002 A\n")
    assert (
        list_source("prostate_mr", {"source": "prostate_mr"}, res).split_file
        == res / "raw" / "institution.txt"
    )
    (res / "institution.txt").write_text("000001 A\n000002 A\n")  # the downloaded one wins
    assert list_source("prostate_mr", {"source": "prostate_mr"}, res).split_file == res / "institution.txt"


def test_prepare_reports_a_missing_institution_txt(tmp_path, make_case):
    res = tmp_path / "prostate_mr"
    make_case(res / "raw" / "data" / "000001_img.nii", res / "raw" / "data" / "000001_mask.nii")
    out = tmp_path / "out" / "prostate_mr"
    with pytest.raises(DataError, match=f"{res / 'institution.txt'}: file not found"):
        prepare_dataset("prostate_mr", {"source": "prostate_mr", **GEOM}, out, res)
    _no_partial(out)


def test_bad_preprocessing_switch(tmp_path, make_case):
    root = _msd(tmp_path / "T", make_case)
    cfg = {"source": "msd", "path": str(root), **GEOM, "normalize": "zscore"}
    with pytest.raises(ConfigError, match=r"datasets\.t\.normalize: 'zscore' is not one of"):
        prepare_dataset("t", cfg, tmp_path / "out", tmp_path)
