"""Shared fixtures: small NIfTI cases and a fake Zenodo server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
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


class FakeZenodo:
    """Serves ``/api/records/{record}`` and ``/files/{key}``; records request headers; honours Range."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.record = "7013610"
        self.md5_override: dict[str, str] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, dict[str, str]]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                fake.requests.append((self.path, dict(self.headers)))
                if self.path == f"/api/records/{fake.record}":
                    body = json.dumps(
                        {
                            "id": int(fake.record),
                            "files": [
                                {
                                    "key": k,
                                    "size": len(v),
                                    "links": {"self": f"{fake.url}/files/{k}"},
                                    "checksum": "md5:" + fake.md5_override.get(k, hashlib.md5(v).hexdigest()),
                                }
                                for k, v in fake.files.items()
                            ],
                        }
                    ).encode()
                    return self._send(200, body)
                key = self.path.removeprefix("/files/")
                if key not in fake.files:
                    return self._send(404, b"not found")
                data = fake.files[key]
                rng = self.headers.get("Range")
                if rng and not fake.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    self.send_header("Content-Length", str(len(data) - start))
                    self.end_headers()
                    self.wfile.write(data[start:])
                    return None
                return self._send(200, data)

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

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
