"""Zenodo download against a fake server: good, corrupt, partial (Range resume), offline; then prepare."""

from __future__ import annotations

import hashlib
import json
import socket

import nibabel as nib
import pytest

from diffseg.data import download_dataset, prepare_dataset
from diffseg.errors import DataError

CFG = {
    "source": "prostate_mr",
    "zenodo_record": 7013610,
    "seed": 0,
    "spacing": [0.75, 0.75, 2.5],
    "shape": [16, 16, 8],
    "split": {"train": 1, "valid": 1, "test": 1},
}


def test_download_good_then_prepare(zenodo, tmp_path):
    res = tmp_path / "resources"
    manifest = download_dataset("prostate_mr", CFG, res)
    out = res / "prostate_mr"
    assert (out / "manifest.json").exists() and (out / "data.zip").exists()
    assert not (out / "data.zip.part").exists()
    assert manifest["files"][0]["md5"] == hashlib.md5(zenodo.files["data.zip"]).hexdigest()
    assert json.loads((out / "manifest.json").read_text())["record"] == 7013610
    assert (out / "raw" / "data" / "001_img.nii").exists()
    # A verified file is not downloaded again.
    n_file_requests = sum(p.startswith("/files/") for p, _ in zenodo.requests)
    download_dataset("prostate_mr", CFG, res)
    assert sum(p.startswith("/files/") for p, _ in zenodo.requests) == n_file_requests

    info = prepare_dataset("prostate_mr", CFG, tmp_path / "data" / "prostate_mr", out)
    assert info["num_classes"] == 9 and info["classes"][0] == "background"
    assert info["splits"] == {"train": 1, "valid": 1, "test": 1}
    img = nib.load(tmp_path / "data/prostate_mr/images/001.nii.gz")
    assert img.shape == (16, 16, 8) and img.get_data_dtype() == "float32"
    assert tuple(float(z) for z in img.header.get_zooms()) == (0.75, 0.75, 2.5)
    lab = nib.load(tmp_path / "data/prostate_mr/labels/001.nii.gz")
    assert lab.get_data_dtype() == "uint8"
    assert (tmp_path / "data/prostate_mr/split.csv").read_text().startswith("uid,split\n")


def test_download_checksum_mismatch(zenodo, tmp_path):
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
def test_download_resumes_partial(zenodo, tmp_path, ignore_range):
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
    assert not (tmp_path / "prostate_mr" / "manifest.json").exists()


def test_offline_accepts_manual_file(tmp_path, monkeypatch, caplog, prostate_zip_bytes):
    monkeypatch.setenv("DIFFSEG_ZENODO_URL", f"http://127.0.0.1:{_closed_port()}")
    out = tmp_path / "res" / "prostate_mr"
    out.mkdir(parents=True)
    (out / "data.zip").write_bytes(prostate_zip_bytes)
    manifest = download_dataset("prostate_mr", CFG, tmp_path / "res")
    assert manifest["files"][0]["verified"] is False
    assert (out / "manifest.json").exists() and (out / "raw/data/002_mask.nii").exists()
    assert "md5" in caplog.text
    # A corrupt manual file is refused.
    (out / "data.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="data.zip"):
        download_dataset("prostate_mr", CFG, tmp_path / "res")
    assert not (out / "manifest.json").exists()
