"""Zenodo downloads: checksummed, resumable, atomic; the manifest is written last.

``resources/{dataset}/{key}`` is each downloaded file (``.part`` while incomplete): the archive and
any file beside it in the record (prostate_mr: ``institution.txt``, which the reference split
reads), ``resources/{dataset}/raw/`` the archive's extracted content and
``resources/{dataset}/manifest.json`` the Snakemake output, which exists only once everything above
is verified and in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from diffseg.errors import DataError
from diffseg.io import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

ZENODO_URL = "https://zenodo.org"
ZENODO_URL_ENV = "DIFFSEG_ZENODO_URL"
# source -> (Zenodo record, archive file key, other file keys downloaded beside it)
RECORDS: dict[str, tuple[int, str, tuple[str, ...]]] = {
    "prostate_mr": (7013610, "data.zip", ("institution.txt",)),
    "abdominal_ct": (7155725, "amos22.zip", ()),
}
CHUNK = 1 << 20
OFFLINE_ERRORS = (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError)


def zenodo_base(base_url: str | None = None) -> str:
    """The Zenodo base URL: the argument, else ``$DIFFSEG_ZENODO_URL``, else https://zenodo.org."""
    return (base_url or os.environ.get(ZENODO_URL_ENV) or ZENODO_URL).rstrip("/")


def md5sum(path: str | Path) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _reason(err: BaseException) -> str:
    return str(getattr(err, "reason", None) or err)


def fetch_record(record: int | str, base_url: str | None = None, timeout: float = 30) -> list[dict[str, Any]]:
    """The files of a Zenodo record: ``[{key, md5, size, url}]`` from ``{base}/api/records/{id}``.

    Network failures propagate (``URLError``/timeouts) so the caller can fall back to a local file.
    """
    url = f"{zenodo_base(base_url)}/api/records/{record}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            meta = json.load(resp)
    except urllib.error.HTTPError as err:
        raise DataError(f"{url}: HTTP {err.code} {err.reason} (is {record} a Zenodo record id?)") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{url}: the Zenodo API reply is not JSON ({err})") from None
    files = []
    for f in meta.get("files", []):
        checksum = str(f.get("checksum", ""))
        algo, _, digest = checksum.partition(":")
        files.append(
            {
                "key": f["key"],
                "md5": digest if algo == "md5" else None,
                "size": f.get("size"),
                "url": (f.get("links") or {}).get("self")
                or f"{zenodo_base(base_url)}/records/{record}/files/{f['key']}/content",
            }
        )
    if not files:
        raise DataError(f"{url}: the record lists no files")
    return files


def download_file(
    url: str, dest: str | Path, md5: str | None = None, size: int | None = None, timeout: float = 60
) -> Path:
    """Stream ``url`` to ``dest`` via ``dest.part``, resuming a partial file, then verify and rename.

    A server that ignores the ``Range`` header (replies 200) restarts the download from zero. A
    checksum mismatch deletes the partial file and raises ``DataError`` with both checksums.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:  # cannot be a prefix of the file: start over
        part.unlink()
        offset = 0
    complete = size is not None and offset == size
    if not complete:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:  # our .part is already the whole file (or garbage): check it
                resp = None
            else:
                raise DataError(f"{url}: HTTP {err.code} {err.reason} while downloading {dest}") from None
        if resp is not None:
            with resp:
                if offset and resp.status != 206:
                    log.warning("%s ignored the Range request: restarting the download", url)
                    offset = 0
                mode = "ab" if offset else "wb"
                total = size if size is not None else _content_length(resp, offset)
                with (
                    open(part, mode) as f,
                    tqdm(
                        total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name, disable=None
                    ) as bar,
                ):
                    for block in iter(lambda: resp.read(CHUNK), b""):
                        f.write(block)
                        bar.update(len(block))
    if md5 is not None:
        got = md5sum(part)
        if got != md5:
            part.unlink(missing_ok=True)
            raise DataError(
                f"{url}: checksum mismatch for {dest}: expected md5 {md5}, got {got}; "
                "the partial file was deleted, rerun to download again"
            )
    os.replace(part, dest)
    return dest


def _content_length(resp: Any, offset: int) -> int | None:
    n = resp.headers.get("Content-Length")
    return int(n) + offset if n is not None else None


def zip_ok(path: str | Path) -> bool:
    """True when ``path`` is a zip archive whose every member passes the CRC test."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (zipfile.BadZipFile, OSError):
        return False


def extract(archive: str | Path, out_dir: str | Path) -> Path:
    """Extract a zip into ``out_dir`` atomically (via a temporary sibling folder)."""
    archive, out_dir = Path(archive), Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        try:
            with zipfile.ZipFile(archive) as z:
                root = tmp.resolve()
                for name in z.namelist():  # refuse members that would escape the folder
                    if not (root / name).resolve().is_relative_to(root):
                        raise DataError(f"{archive}: unsafe member path {name!r}")
                z.extractall(tmp)
        except zipfile.BadZipFile as err:
            raise DataError(f"{archive}: not a valid zip archive ({err})") from None
    return out_dir


def _usable_unverified(path: Path) -> bool:
    """Offline check of a file placed by hand: a zip must pass its CRC test, another file be non-empty."""
    if not path.is_file():
        return False
    return zip_ok(path) if path.suffix == ".zip" else path.stat().st_size > 0


def download_dataset(
    name: str,
    ds_cfg: Mapping[str, Any],
    resources_dir: str | Path,
    base_url: str | None = None,
    timeout: float = 60,
) -> dict[str, Any]:
    """Download, verify and extract a Zenodo dataset into ``resources_dir/name``; return the manifest.

    Every file of the source (the archive and, for prostate_mr, ``institution.txt``) is checked
    against the md5 Zenodo publishes. Offline, files already in place are used unverified (a zip
    must pass its CRC test); a missing one is a ``DataError`` naming what to fetch and where to put it.

    Args:
        name: the dataset name (folder under ``resources_dir``).
        ds_cfg: its config entry: ``source`` (prostate_mr | abdominal_ct), optional ``zenodo_record``.
        resources_dir: the downloads folder.
        base_url: Zenodo base URL (default ``$DIFFSEG_ZENODO_URL`` or https://zenodo.org).
    """
    source = ds_cfg.get("source")
    if source not in RECORDS:
        raise DataError(
            f"datasets.{name}.source: {source!r} is not downloadable (expected one of {sorted(RECORDS)})"
        )
    record, archive_key, extra_keys = RECORDS[source]
    record = ds_cfg.get("zenodo_record") or record
    keys = (archive_key, *extra_keys)
    out = Path(resources_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest_path.unlink(missing_ok=True)  # the manifest means "done": never leave a stale one
    base = zenodo_base(base_url)
    api = f"{base}/api/records/{record}"
    manual = {key: f"https://zenodo.org/records/{record}/files/{key}" for key in keys}
    try:
        files = fetch_record(record, base, timeout=timeout)
    except OFFLINE_ERRORS as err:
        missing = [key for key in keys if not _usable_unverified(out / key)]
        if missing:
            what = "; ".join(f"download {manual[k]} and put it at {(out / k).resolve()}" for k in missing)
            raise DataError(
                f"{api}: cannot reach Zenodo ({_reason(err)}); {what} (it is picked up there), then rerun"
            ) from None
        entries = []
        for key in keys:
            log.warning(
                "%s unreachable (%s): using %s without checking its md5%s",
                api,
                _reason(err),
                out / key,
                " (zip CRC test passed)" if key.endswith(".zip") else "",
            )
            size = (out / key).stat().st_size
            entries.append({"key": key, "md5": None, "size": size, "url": manual[key], "verified": False})
        return _finish(name, source, record, entries, out / archive_key, out)
    entries = []
    for key in keys:
        entry = next((f for f in files if f["key"] == key), None)
        if entry is None:
            raise DataError(
                f"{api}: record {record} has no file {key!r} (files: {[f['key'] for f in files]})"
            )
        dest = out / key
        if dest.exists():
            if entry["md5"] is None or md5sum(dest) == entry["md5"]:
                log.info("%s already present and verified: not downloading again", dest)
            else:
                log.warning("%s does not match the published md5: downloading it again", dest)
                dest.unlink()
        if not dest.exists():
            try:
                download_file(entry["url"], dest, entry["md5"], entry["size"], timeout=timeout)
            except OFFLINE_ERRORS as err:
                raise DataError(
                    f"{entry['url']}: download failed ({_reason(err)}); rerun to resume, or download it "
                    f"manually and put it at {dest.resolve()}"
                ) from None
        entries.append({**entry, "verified": entry["md5"] is not None})
    return _finish(name, source, record, entries, out / archive_key, out)


def _finish(
    name: str, source: str, record: int | str, entries: list[dict[str, Any]], archive: Path, out: Path
) -> dict[str, Any]:
    """Extract the archive and write the manifest (last); ``entries`` are the files, archive first."""
    raw = extract(archive, out / "raw")
    manifest = {
        "dataset": name,
        "source": source,
        "record": int(record) if str(record).isdigit() else record,
        "files": entries,
        "extracted": str(raw),
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest
