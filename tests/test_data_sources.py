"""Sources end to end: an MSD/nnU-Net folder, AMOS layout, and the bad-input errors (no partial output)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffseg.data import list_source, load_dataset, prepare_dataset
from diffseg.errors import DataError

GEOM = {"spacing": [0.75, 0.75, 2.5], "shape": [16, 16, 8]}


def _msd(root, make_case, n=4, nnunet=True, channels=None):
    meta = {"name": "Toy", "labels": {"background": 0, "a": 1, "b": 2}}
    meta["channel_names" if nnunet else "modality"] = channels or {"0": "MRI"}
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


def test_msd_multi_modality(tmp_path, make_case):
    root = _msd(tmp_path / "T", make_case, channels={"0": "T2", "1": "ADC"})
    with pytest.raises(DataError, match="only single-modality images are supported"):
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


def test_amos_layout(tmp_path, make_case):
    raw = tmp_path / "raw" / "amos22"
    raw.mkdir(parents=True)
    labels = {str(i): n for i, n in enumerate(["background", "spleen", "liver"])}
    (raw / "dataset.json").write_text(json.dumps({"labels": labels}))
    for sub, ids in (("Tr", (1, 2, 3, 540)), ("Va", (10, 11, 12, 600))):
        for i in ids:
            make_case(
                raw / f"images{sub}" / f"amos_{i:04d}.nii.gz",
                raw / f"labels{sub}" / f"amos_{i:04d}.nii.gz",
                seed=i,
                num_classes=3,
            )
    src = list_source("abdominal_ct", {"source": "abdominal_ct"}, tmp_path)
    assert src.classes == ["background", "spleen", "liver"] and src.modality == "CT"
    assert [c.uid for c in src.cases if c.group == "train"] == ["amos_0001", "amos_0002", "amos_0003"]
    assert [c.uid for c in src.cases if c.group == "valid"] == ["amos_0010", "amos_0011", "amos_0012"]
    info = prepare_dataset(
        "abdominal_ct",
        {"source": "abdominal_ct", **GEOM, "split": {"valid": 1, "test": 2}},
        tmp_path / "out",
        tmp_path,
    )
    assert info["splits"] == {"train": 3, "valid": 1, "test": 2} and info["clip"] == [-991.0, 362.0]
