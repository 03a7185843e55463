"""Zenodo download against a fake server: good, corrupt, partial (Range resume), offline, rate-limited,
refused; then prepare.

The fake record serves ``data.zip`` and ``institution.txt`` as Zenodo 7013610 does, the fake AMOS
record ``amos22.zip`` as 7155725; retries sleep through a recorder, not for real.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import urllib.error
import urllib.request
import zipfile
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import nibabel as nib
import pytest
from conftest import AMOS_CLASSES, write_case

from diffseg.data import download, download_dataset, prepare_dataset
from diffseg.data.download import USER_AGENT, Retry, parse_retry_after
from diffseg.errors import DataError

# For the conftest archive (uids 001..003); the tests with it use a random split (counts).
INSTITUTIONS = b"001 A\n002 B\n003 A\n"


@pytest.fixture(autouse=True)
def sleeps(monkeypatch):
    """Every retry's wait, recorded instead of slept."""
    waits: list[float] = []
    monkeypatch.setattr(download, "DEFAULT_RETRY", Retry(sleep=waits.append))
    return waits


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
    # Each file came from the Range-capable route, with diffseg's User-Agent.
    assert record.file_requests("data.zip") == [("records", None)]
    assert manifest["files"][0]["url"] == f"{record.url}/records/7013610/files/data.zip?download=1"
    assert {h.get("User-Agent") for _, h in record.requests} == {USER_AGENT}
    assert USER_AGENT.startswith("diffseg/0.1.0 (+http")
    # A verified file is not downloaded again.
    n_file_requests = len(record.file_requests("data.zip"))
    download_dataset("prostate_mr", CFG, res)
    assert len(record.file_requests("data.zip")) == n_file_requests

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
    assert zenodo.file_requests("data.zip") == [("records", "bytes=1000-")]  # the server saw Range
    assert (out / "data.zip").read_bytes() == data  # 206 appended, or 200 restarted from zero
    assert (out / "manifest.json").exists()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_download_offline(tmp_path, monkeypatch, sleeps):
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("DIFFSEG_ZENODO_URL", url)
    with pytest.raises(DataError) as err:
        download_dataset("prostate_mr", CFG, tmp_path)
    msg = str(err.value)
    assert f"{url}/api/records/7013610: no answer (" in msg and "(after 6 attempts)" in msg
    assert sleeps == [2.0, 4.0, 8.0, 16.0, 32.0]  # connection errors: exponential backoff
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


def test_parse_retry_after():
    now = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Tue, 01 Dec 2026 12:00:30 GMT", now) == 30.0  # an HTTP date
    assert parse_retry_after("Tue, 01 Dec 2026 11:00:00 GMT", now) == 0.0  # already past
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    retry = Retry(backoff=2.0, max_wait=60.0)
    assert [retry.wait(i) for i in range(4)] == [2.0, 4.0, 8.0, 16.0]
    assert retry.wait(0, "7") == 7.0 and retry.wait(0, "3600") == 60.0  # honoured, capped


def test_rate_limited_then_served_honours_retry_after(record, tmp_path, sleeps):
    record.fail["api"] = [429, 429]  # Zenodo's rate limit, then the record
    record.fail["data.zip"] = [503]
    record.retry_after = "7"
    manifest = download_dataset("prostate_mr", CFG, tmp_path)
    assert all(f["verified"] for f in manifest["files"])
    assert sleeps == [7.0, 7.0, 7.0]  # the server's Retry-After, not the backoff
    assert (tmp_path / "prostate_mr" / "data.zip").read_bytes() == record.files["data.zip"]
    # An HTTP date is honoured too, and a long one capped.
    record.fail["api"] = [429]
    record.retry_after = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    download_dataset("prostate_mr", CFG, tmp_path)
    assert sleeps[-1] == download.DEFAULT_RETRY.max_wait == 120.0


def test_refused_download_names_status_url_and_manual_path_then_uses_a_placed_file(record, tmp_path, sleeps):
    record.fail_always["data.zip"] = 403
    out = tmp_path / "prostate_mr"
    with pytest.raises(DataError) as err:
        download_dataset("prostate_mr", CFG, tmp_path)
    msg = str(err.value)
    data = record.files["data.zip"]
    assert f"{record.url}/records/7013610/files/data.zip?download=1: HTTP 403 Forbidden" in msg
    assert f"put it at {(out / 'data.zip').resolve()}" in msg
    assert "https://zenodo.org/records/7013610/files/data.zip?download=1" in msg  # for a browser
    assert f"md5 {hashlib.md5(data).hexdigest()}, {len(data)} bytes" in msg
    assert sleeps == []  # 403 is not retried
    assert not (out / "manifest.json").exists()
    # The file placed by hand where the message says is picked up, and verified.
    (out / "data.zip").write_bytes(data)
    n = len(record.file_requests("data.zip"))
    manifest = download_dataset("prostate_mr", CFG, tmp_path)
    assert len(record.file_requests("data.zip")) == n and manifest["files"][0]["verified"]
    assert (out / "raw" / "data" / "001_img.nii").exists()


def test_refused_record_falls_back_to_placed_files(record, tmp_path, sleeps):
    # Today's code said "is 7013610 a Zenodo record id?" and never looked for files placed by hand.
    record.fail_always["api"] = 403
    out = tmp_path / "prostate_mr"
    with pytest.raises(DataError) as err:
        download_dataset("prostate_mr", CFG, tmp_path)
    msg = str(err.value)
    assert f"{record.url}/api/records/7013610: HTTP 403 Forbidden" in msg and "record id" not in msg
    assert f"put it at {(out / 'data.zip').resolve()}" in msg
    assert f"put it at {(out / 'institution.txt').resolve()}" in msg
    (out / "data.zip").write_bytes(record.files["data.zip"])
    (out / "institution.txt").write_bytes(INSTITUTIONS)
    manifest = download_dataset("prostate_mr", CFG, tmp_path)
    assert [f["verified"] for f in manifest["files"]] == [False, False]
    assert (out / "manifest.json").exists()
    # A record that does not exist (404) says so, and where to put the files.
    del record.fail_always["api"]
    with pytest.raises(DataError, match=r"HTTP 404 .*is 12345 a Zenodo record id\?.*put it at"):
        download_dataset("prostate_mr", {**CFG, "zenodo_record": 12345}, tmp_path / "other")


def test_interrupted_download_resumes_with_range_on_the_records_route(record, tmp_path, sleeps):
    record.truncate["data.zip"] = 1000  # the connection drops after 1000 bytes
    download_dataset("prostate_mr", CFG, tmp_path)
    assert record.file_requests("data.zip") == [("records", None), ("records", "bytes=1000-")]
    assert (tmp_path / "prostate_mr" / "data.zip").read_bytes() == record.files["data.zip"]
    assert sleeps == [2.0]


def test_the_api_content_route_ignores_range(record, tmp_path):
    """Why the records route: ``/api/.../content`` answers 200 with the whole file to a Range request."""
    data = record.files["data.zip"]
    api_url = f"{record.url}/api/records/7013610/files/data.zip/content"
    with download.open_url(api_url, {"Range": "bytes=1000-"}) as resp:
        assert resp.status == 200 and resp.read() == data
    part = tmp_path / "data.zip.part"
    part.write_bytes(data[:1000])
    download.download_file(api_url, tmp_path / "data.zip", hashlib.md5(data).hexdigest(), len(data))
    assert (tmp_path / "data.zip").read_bytes() == data  # restarted from zero, still right


def test_amos_archive_downloads_and_prepares(zenodo, tmp_path, amos_zip_bytes):
    zenodo.records["7155725"] = {"amos22.zip": amos_zip_bytes}
    res = tmp_path / "resources"
    manifest = download_dataset("abdominal_ct", {"source": "abdominal_ct"}, res)
    assert [(f["key"], f["verified"]) for f in manifest["files"]] == [("amos22.zip", True)]
    raw = res / "abdominal_ct" / "raw" / "amos22"
    assert {p.name for p in raw.iterdir()} == {
        "dataset.json", "imagesTr", "labelsTr", "imagesVa", "labelsVa", "imagesTs"
    }  # fmt: skip
    cfg = {"source": "abdominal_ct", "spacing": [1.5, 1.5, 5.0], "shape": [16, 16, 8],
           "split": {"valid": 1, "test": 1}}  # fmt: skip
    info = prepare_dataset("abdominal_ct", cfg, tmp_path / "data", res / "abdominal_ct")
    assert info["classes"] == AMOS_CLASSES and info["modality"] == "CT"
    assert info["splits"] == {"train": 2, "valid": 1, "test": 1}  # the MR cases (ids > 500) left out
    assert info["clip"] == [-991.0, 362.0]


def test_no_name_lookup_is_not_retried(tmp_path, monkeypatch, sleeps, prostate_zip_bytes):
    """Offline (no DNS) there is nothing to wait for: the placed files are used at once."""

    def no_dns(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", no_dns)
    out = tmp_path / "prostate_mr"
    out.mkdir()
    (out / "data.zip").write_bytes(prostate_zip_bytes)
    (out / "institution.txt").write_bytes(INSTITUTIONS)
    manifest = download_dataset("prostate_mr", CFG, tmp_path)
    assert sleeps == [] and [f["verified"] for f in manifest["files"]] == [False, False]


def test_a_failure_after_a_partial_download_says_it_resumes(record, tmp_path):
    record.truncate["data.zip"] = 1000
    record.fail["data.zip"] = [None, *[503] * 10]  # served (cut short), then server trouble
    with pytest.raises(DataError) as err:
        download_dataset("prostate_mr", CFG, tmp_path)
    part = (tmp_path / "prostate_mr" / "data.zip.part").resolve()
    size = len(record.files["data.zip"])
    assert "HTTP 503 Service Unavailable (after 6 attempts)" in str(err.value)
    assert f"rerun to resume the partial download ({part}: 1000 of {size} bytes)" in str(err.value)
    # The next run resumes it with Range.
    download_dataset("prostate_mr", CFG, tmp_path)
    assert record.file_requests("data.zip")[-1] == ("records", "bytes=1000-")
    assert (tmp_path / "prostate_mr" / "data.zip").read_bytes() == record.files["data.zip"]
