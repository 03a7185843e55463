"""Shared fixtures: small NIfTI cases, archives shaped like the Zenodo records', a fake Zenodo server."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import socket
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk


def write_case(
    image_path: Path, label_path: Path, shape=(20, 18, 6), spacing=(0.6, 0.6, 3.0), seed=0, num_classes=9
) -> None:
    """A small (X, Y, Z) image/label pair with a few labelled boxes, written with SimpleITK."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    for c in range(1, num_classes):
        x, y = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
        label[x : x + 3, y : y + 3, 1 : shape[2] - 1] = c
    image = (rng.normal(100, 10, shape) + 20 * label).astype(np.float32)
    for arr, path in ((image, image_path), (label, label_path)):
        img = sitk.GetImageFromArray(arr.transpose(2, 1, 0))  # (X,Y,Z) -> SimpleITK (Z,Y,X)
        img.SetSpacing(spacing)
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(path))


def prostate_zip(tmp: Path, uids=("001", "002", "003")) -> bytes:
    """A zip in the layout of Zenodo 7013610's data.zip: data/{uid}_img.nii, data/{uid}_mask.nii."""
    src = tmp / "zipsrc"
    for i, uid in enumerate(uids):
        write_case(src / "data" / f"{uid}_img.nii", src / "data" / f"{uid}_mask.nii", seed=i)
    (src / "institution.txt").write_text("001 A\n002 B\n003 A\n")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(src).as_posix())
    return buf.getvalue()


AMOS_CLASSES = ["background", "spleen", "liver", "stomach"]


def amos_zip(tmp: Path, training=(1, 2, 540), validation=(10, 600, 11), test=(20,)) -> bytes:
    """A zip shaped like AMOS's amos22.zip (Zenodo 7155725).

    ``amos22/{imagesTr,labelsTr,imagesVa,labelsVa,imagesTs}/amos_{id:04d}.nii.gz`` and
    ``amos22/dataset.json`` (MSD-style ``labels``; ``training``/``validation`` lists of
    ``{image, label}`` in the given order, ``test`` a list of images); ids > 500 are MR.
    """
    src = tmp / "amossrc" / "amos22"
    meta = {
        "name": "AMOS",
        "labels": {str(i): n for i, n in enumerate(AMOS_CLASSES)},
        "training": [],
        "validation": [],
        "test": [],
    }
    for key, sub, ids in (("training", "Tr", training), ("validation", "Va", validation)):
        for i in ids:
            name = f"amos_{i:04d}.nii.gz"
            write_case(src / f"images{sub}" / name, src / f"labels{sub}" / name, seed=i, num_classes=4)
            meta[key].append({"image": f"./images{sub}/{name}", "label": f"./labels{sub}/{name}"})
    for i in test:
        name = f"amos_{i:04d}.nii.gz"
        write_case(src / "imagesTs" / name, tmp / "amossrc" / "unused" / name, seed=i, num_classes=4)
        meta["test"].append(f"./imagesTs/{name}")
    (src / "dataset.json").write_text(json.dumps(meta, indent=2))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(src.parent).as_posix())
    return buf.getvalue()


class FakeZenodo:
    """A local Zenodo: ``/api/records/{id}``, and each file on its two routes, as zenodo.org serves them.

    * ``/api/records/{id}/files/{key}/content`` (the API's ``links.self``) ignores ``Range``;
    * ``/records/{id}/files/{key}?download=1`` honours it (206) unless ``ignore_range``.

    On demand it misbehaves: ``fail[route]`` (route ``"api"`` for the record, else a file key) is a
    list of statuses answered first, one per request (None: served as usual), ``fail_always[route]``
    a status for every request, with ``Retry-After: retry_after`` on 429/503 when set;
    ``truncate[key] = n`` sends the file's full ``Content-Length`` but only its first n bytes, then
    drops the connection (once). Every request's path and headers are in ``requests``.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.record = "7013610"
        self.records: dict[str, dict[str, bytes]] = {self.record: self.files}
        self.md5_override: dict[str, str] = {}
        self.ignore_range = False
        self.fail: dict[str, list[int | None]] = {}  # None: serve this request
        self.fail_always: dict[str, int] = {}
        self.retry_after: str | None = None
        self.truncate: dict[str, int] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                fake.requests.append((self.path, dict(self.headers)))
                path, _, query = self.path.partition("?")
                parts = path.strip("/").split("/")
                api = parts[:2] == ["api", "records"]
                if api and len(parts) == 3:
                    return self._record(parts[2])
                if api and len(parts) == 6 and parts[3::2] == ["files", "content"]:
                    return self._file(parts[2], parts[4], ranges=False)
                download = query == "download=1"
                if parts[0] == "records" and len(parts) == 4 and parts[2] == "files" and download:
                    return self._file(parts[1], parts[3], ranges=not fake.ignore_range)
                return self._send(404, b"not found")

            def _failure(self, route: str) -> bool:
                code = fake.fail_always.get(route) or (fake.fail.get(route) or [None]).pop(0)
                if code is None:
                    return False
                headers = {"Retry-After": fake.retry_after} if fake.retry_after and code in (429, 503) else {}
                self._send(code, b'{"status": %d, "message": "go away"}' % code, headers)
                return True

            def _record(self, record: str) -> None:
                if self._failure("api"):
                    return None
                if record not in fake.records:
                    return self._send(404, b'{"status": 404, "message": "PID does not exist."}')
                files = [
                    {
                        "key": k,
                        "size": len(v),
                        "links": {"self": f"{fake.url}/api/records/{record}/files/{k}/content"},
                        "checksum": "md5:" + fake.md5_override.get(k, hashlib.md5(v).hexdigest()),
                    }
                    for k, v in fake.records[record].items()
                ]
                return self._send(200, json.dumps({"id": int(record), "files": files}).encode())

            def _file(self, record: str, key: str, ranges: bool) -> None:
                if self._failure(key):
                    return None
                data = fake.records.get(record, {}).get(key)
                if data is None:
                    return self._send(404, b"not found")
                rng = self.headers.get("Range")
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng and ranges else 0
                if start >= len(data) > 0:
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                cut = fake.truncate.pop(key, None)
                self.wfile.write(data[start:] if cut is None else data[start:cut])
                if cut is not None:  # drop the connection mid-body
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                return None

            def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def file_requests(self, key: str) -> list[tuple[str, str | None]]:
        """``(route, Range header)`` of each request for file ``key``: route ``records`` or ``api``."""
        out = []
        for path, headers in self.requests:
            if path.split("?")[0].endswith(f"/files/{key}") or path.endswith(f"/files/{key}/content"):
                out.append(("api" if path.startswith("/api/") else "records", headers.get("Range")))
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def zenodo(tmp_path, monkeypatch):
    """A running fake Zenodo serving record 7013610 with a small prostate data.zip."""
    fake = FakeZenodo()
    fake.files["data.zip"] = prostate_zip(tmp_path)
    monkeypatch.setenv("DIFFSEG_ZENODO_URL", fake.url)
    yield fake
    fake.close()


@pytest.fixture
def make_case():
    """The :func:`write_case` helper: ``make_case(image_path, label_path, **kw)``."""
    return write_case


@pytest.fixture
def prostate_zip_bytes(tmp_path) -> bytes:
    """A small data.zip in the real archive layout."""
    return prostate_zip(tmp_path / "manual")


@pytest.fixture
def amos_zip_bytes(tmp_path) -> bytes:
    """A small amos22.zip in AMOS's layout (2 CT + 1 MR training, 2 CT + 1 MR validation cases)."""
    return amos_zip(tmp_path / "amos")
