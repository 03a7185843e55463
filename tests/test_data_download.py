"""Zenodo download against a fake server: good, corrupt, partial (Range resume), offline; then prepare.

The fake record serves ``data.zip`` and ``institution.txt`` as Zenodo 7013610 does.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import zipfile

import nibabel as nib
import pytest
from conftest import write_case

from diffseg.data import download_dataset, prepare_dataset
from diffseg.errors import DataError

# For the conftest archive (uids 001..003); the tests with it use a random split (counts).
INSTITUTIONS = b"001 A\n002 B\n003 A\n"


@pytest.fixture
def record(zenodo):
    """The fake Zenodo record 7013610 with both of its files."""
    zenodo.files["institution.txt"] = INSTITUTIONS
    return zenodo


def real_layout(tmp_path, institutions):
    """``(data.zip bytes, institution.txt bytes)`` as in the record: 6-digit uids, data/{uid}_img.nii."""
    buf = io.BytesIO()
    lines = []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        uid = 0
        for institution, n in institutions.items():
            for _ in range(n):
                uid += 1
                img, mask = tmp_path / "src" / f"{uid:06d}_img.nii", tmp_path / "src" / f"{uid:06d}_mask.nii"
                write_case(img, mask, seed=uid)
                z.write(img, f"data/{img.name}")
                z.write(mask, f"data/{mask.name}")
                lines.append(f"{uid:06d} {institution}")
    return buf.getvalue(), ("\n".join(lines) + "\n").encode()


CFG = {
    "source": "prostate_mr",
    "zenodo_record": 7013610,
    "seed": 0,
    "spacing": [0.75, 0.75, 2.5],
    "shape": [16, 16, 8],
    "split": {"train": 1, "valid": 1, "test": 1},
}


def test_download_good_then_prepare(record, tmp_path):
    res = tmp_path / "resources"
    manifest = download_dataset("prostate_mr", CFG, res)
    out = res / "prostate_mr"
    assert (out / "manifest.json").exists() and (out / "data.zip").exists()
    assert (out / "institution.txt").read_bytes() == INSTITUTIONS  # beside data.zip
    assert not (out / "data.zip.part").exists()
    assert [f["key"] for f in manifest["files"]] == ["data.zip", "institution.txt"]
    assert manifest["files"][0]["md5"] == hashlib.md5(record.files["data.zip"]).hexdigest()
    assert manifest["files"][1]["md5"] == hashlib.md5(INSTITUTIONS).hexdigest()
    assert all(f["verified"] for f in manifest["files"])
    assert json.loads((out / "manifest.json").read_text())["record"] == 7013610
    assert (out / "raw" / "data" / "001_img.nii").exists()
    # A verified file is not downloaded again.
    n_file_requests = sum(p.startswith("/files/") for p, _ in record.requests)
    download_dataset("prostate_mr", CFG, res)
    assert sum(p.startswith("/files/") for p, _ in record.requests) == n_file_requests

    info = prepare_dataset("prostate_mr", CFG, tmp_path / "data" / "prostate_mr", out)
    assert info["num_classes"] == 9 and info["classes"][0] == "background"
    assert info["splits"] == {"train": 1, "valid": 1, "test": 1}
    img = nib.load(tmp_path / "data/prostate_mr/images/001.nii.gz")
    assert img.shape == (16, 16, 8) and img.get_data_dtype() == "float32"
    assert tuple(float(z) for z in img.header.get_zooms()) == (0.75, 0.75, 2.5)
    lab = nib.load(tmp_path / "data/prostate_mr/labels/001.nii.gz")
    assert lab.get_data_dtype() == "uint8"
    assert (tmp_path / "data/prostate_mr/split.csv").read_text().startswith("uid,split\n")


def test_download_checksum_mismatch(record, tmp_path):
    zenodo = record
    zenodo.md5_override["data.zip"] = "0" * 32
    with pytest.raises(DataError) as err:
        download_dataset("prostate_mr", CFG, tmp_path)
    msg = str(err.value)
    assert "checksum mismatch" in msg and "0" * 32 in msg and "data.zip" in msg and zenodo.url in msg
    assert hashlib.md5(zenodo.files["data.zip"]).hexdigest() in msg
    out = tmp_path / "prostate_mr"
    assert not (out / "data.zip").exists() and not (out / "data.zip.part").exists()
    assert not (out / "manifest.json").exists() and not (out / "raw").exists()


@pytest.mark.parametrize("ignore_range", [False, True])
def test_download_resumes_partial(record, tmp_path, ignore_range):
    zenodo = record
    zenodo.ignore_range = ignore_range
    data = zenodo.files["data.zip"]
    out = tmp_path / "prostate_mr"
    out.mkdir()
    (out / "data.zip.part").write_bytes(data[:1000])
    download_dataset("prostate_mr", CFG, tmp_path)
    ranges = [h.get("Range") for p, h in zenodo.requests if p == "/files/data.zip"]
    assert ranges == ["bytes=1000-"]  # the server saw the Range header
    assert (out / "data.zip").read_bytes() == data  # 206 appended, or 200 restarted from zero
    assert (out / "manifest.json").exists()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_download_offline(tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("DIFFSEG_ZENODO_URL", url)
    with pytest.raises(DataError) as err:
        download_dataset("prostate_mr", CFG, tmp_path)
    msg = str(err.value)
    assert f"{url}/api/records/7013610" in msg
    assert str((tmp_path / "prostate_mr" / "data.zip").resolve()) in msg
    assert "https://zenodo.org/records/7013610/files/institution.txt" in msg
    assert str((tmp_path / "prostate_mr" / "institution.txt").resolve()) in msg
    assert not (tmp_path / "prostate_mr" / "manifest.json").exists()


def test_offline_accepts_manual_file(tmp_path, monkeypatch, caplog, prostate_zip_bytes):
    monkeypatch.setenv("DIFFSEG_ZENODO_URL", f"http://127.0.0.1:{_closed_port()}")
    out = tmp_path / "res" / "prostate_mr"
    out.mkdir(parents=True)
    (out / "data.zip").write_bytes(prostate_zip_bytes)
    # Offline, both files of the record must be in place: the error names the missing one.
    with pytest.raises(DataError) as err:
        download_dataset("prostate_mr", CFG, tmp_path / "res")
    assert "institution.txt" in str(err.value) and "data.zip and put" not in str(err.value)
    (out / "institution.txt").write_bytes(INSTITUTIONS)
    manifest = download_dataset("prostate_mr", CFG, tmp_path / "res")
    assert [(f["key"], f["verified"]) for f in manifest["files"]] == [
        ("data.zip", False),
        ("institution.txt", False),
    ]
    assert (out / "manifest.json").exists() and (out / "raw/data/002_mask.nii").exists()
    assert "md5" in caplog.text
    # A corrupt manual file is refused.
    (out / "data.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="data.zip"):
        download_dataset("prostate_mr", CFG, tmp_path / "res")
    assert not (out / "manifest.json").exists()


def test_institution_checksum_mismatch(record, tmp_path):
    record.md5_override["institution.txt"] = "f" * 32
    with pytest.raises(DataError, match="checksum mismatch for .*institution.txt"):
        download_dataset("prostate_mr", CFG, tmp_path)
    assert not (tmp_path / "prostate_mr" / "manifest.json").exists()
    assert not (tmp_path / "prostate_mr" / "institution.txt").exists()


def test_record_without_institution_txt(zenodo, tmp_path):
    with pytest.raises(DataError, match="record 7013610 has no file 'institution.txt'"):
        download_dataset("prostate_mr", CFG, tmp_path)


def test_real_layout_reference_split_end_to_end(zenodo, tmp_path):
    # 6-digit uids, institution.txt beside data.zip; A: 6 cases -> 2 valid, 0 train, 4 test;
    # B: 8 cases -> 2 valid, 2 train (int(6.0) - 2 = 4), 4 test.
    zenodo.files["data.zip"], zenodo.files["institution.txt"] = real_layout(tmp_path, {"A": 6, "B": 8})
    res = tmp_path / "resources"
    download_dataset("prostate_mr", {"source": "prostate_mr"}, res)
    assert (res / "prostate_mr" / "institution.txt").exists()
    cfg = {"source": "prostate_mr", "spacing": [0.75, 0.75, 2.5], "shape": [16, 16, 8]}  # split: reference
    data = tmp_path / "data" / "prostate_mr"
    info = prepare_dataset("prostate_mr", cfg, data, res / "prostate_mr")
    assert info["splits"] == {"train": 2, "valid": 4, "test": 8}
    rows = (data / "split.csv").read_text().splitlines()
    assert rows[:4] == ["uid,split", "000001,valid", "000002,valid", "000003,test"]
    assert rows[7:11] == ["000007,valid", "000008,valid", "000009,train", "000010,train"]
    img = nib.load(data / "images" / "000001.nii.gz")
    assert img.shape == (16, 16, 8) and nib.aff2axcodes(img.affine) == ("L", "P", "S")  # SimpleITK's default
