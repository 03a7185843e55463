"""Zenodo downloads: checksummed, resumable, atomic; the manifest is written last.

``resources/{dataset}/{key}`` is each downloaded file (``.part`` while incomplete): the archive and
any file beside it in the record (prostate_mr: ``institution.txt``, which the reference split
reads), ``resources/{dataset}/raw/`` the archive's extracted content and
``resources/{dataset}/manifest.json`` the Snakemake output, which exists only once everything above
is verified and in place.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import importlib.metadata
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from diffseg import __version__
from diffseg.errors import DataError
from diffseg.io import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

ZENODO_URL = "https://zenodo.org"
ZENODO_URL_ENV = "DIFFSEG_ZENODO_URL"
# Zenodo answers anonymous clients (Python-urllib) with 403/429 at times: say who asks. The URL is
# the package's (pyproject's [project.urls]) once it has one.
PROJECT_URL = "https://github.com/diffseg/diffseg"


def _project_url() -> str:
    try:
        meta = importlib.metadata.metadata("diffseg")
    except importlib.metadata.PackageNotFoundError:
        return PROJECT_URL
    urls = [u.split(",", 1)[-1].strip() for u in meta.get_all("Project-URL") or []]
    return next(iter(urls), None) or meta.get("Home-page") or PROJECT_URL


USER_AGENT = f"diffseg/{__version__} (+{_project_url()})"
# source -> (Zenodo record, archive file key, other file keys downloaded beside it)
RECORDS: dict[str, tuple[int, str, tuple[str, ...]]] = {
    "prostate_mr": (7013610, "data.zip", ("institution.txt",)),
    "abdominal_ct": (7155725, "amos22.zip", ()),
}
CHUNK = 1 << 20
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})  # worth another try (rate limit, server trouble)
# No HTTP answer, or the answer broke off: worth another try too.
CONNECTION_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


@dataclass(frozen=True)
class Retry:
    """How requests are retried on 429/5xx and connection errors.

    ``attempts`` tries in all; before each retry the server's ``Retry-After`` (seconds or an HTTP
    date) is honoured, else the wait doubles from ``backoff`` seconds; no wait exceeds ``max_wait``.
    ``sleep`` does the waiting (tests pass a fast one).
    """

    attempts: int = 6
    backoff: float = 2.0
    max_wait: float = 120.0
    sleep: Callable[[float], None] = time.sleep

    def wait(self, retry: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        asked = parse_retry_after(retry_after)
        wait = asked if asked is not None else self.backoff * 2.0**retry
        return min(max(wait, 0.0), self.max_wait)


DEFAULT_RETRY = Retry()


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` in seconds: ``"120"`` or an HTTP date (``"Wed, 21 Oct 2026 07:28:00 GMT"``)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class DownloadError(DataError):
    """A request that failed for good: ``url``, HTTP ``status`` (None: no answer), ``reason``."""

    def __init__(self, url: str, status: int | None, reason: str, attempts: int = 1) -> None:
        self.url, self.status, self.reason, self.attempts = url, status, reason, attempts
        what = f"HTTP {status} {reason}".rstrip() if status is not None else f"no answer ({reason})"
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"{url}: {what}{tries}")


def zenodo_base(base_url: str | None = None) -> str:
    """The Zenodo base URL: the argument, else ``$DIFFSEG_ZENODO_URL``, else https://zenodo.org."""
    return (base_url or os.environ.get(ZENODO_URL_ENV) or ZENODO_URL).rstrip("/")


def file_url(base: str, record: int | str, key: str) -> str:
    """A file's download URL, ``{base}/records/{id}/files/{key}?download=1``: the route that honours
    ``Range`` (resuming), unlike the API's ``/api/records/{id}/files/{key}/content``."""
    return f"{base}/records/{record}/files/{urllib.parse.quote(key)}?download=1"


def md5sum(path: str | Path) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _reason(err: BaseException) -> str:
    return str(getattr(err, "reason", None) or err) or type(err).__name__


def open_url(
    url: str, headers: Mapping[str, str] | None = None, timeout: float = 60, retry: Retry | None = None
) -> Any:
    """GET ``url`` with diffseg's User-Agent, retrying 429/5xx and connection errors (``retry``).

    Returns the open response; raises ``DownloadError`` (status and URL) on another HTTP error or a
    failed name lookup (offline) at once, or when the retries are spent.
    """
    retry = retry or DEFAULT_RETRY
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    for attempt in range(1, retry.attempts + 1):
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            status, reason, after = err.code, str(err.reason or ""), err.headers.get("Retry-After")
            err.close()
            if status not in RETRY_STATUS:
                raise DownloadError(url, status, reason, attempt) from None
        except CONNECTION_ERRORS as err:
            status, reason, after = None, _reason(err), None
            if isinstance(getattr(err, "reason", None), socket.gaierror):  # no DNS: offline, for good
                raise DownloadError(url, None, reason, attempt) from None
        if attempt == retry.attempts:
            raise DownloadError(url, status, reason, attempt)
        wait = retry.wait(attempt - 1, after)
        what = f"HTTP {status} {reason}" if status is not None else f"no answer ({reason})"
        log.warning("%s: %s; retrying in %.0f s (%d of %d)", url, what, wait, attempt + 1, retry.attempts)
        retry.sleep(wait)
    raise AssertionError("unreachable")


def fetch_record(
    record: int | str, base_url: str | None = None, timeout: float = 30, retry: Retry | None = None
) -> list[dict[str, Any]]:
    """The files of a Zenodo record: ``[{key, md5, size, url}]`` from ``{base}/api/records/{id}``.

    ``url`` is the Range-capable download route (:func:`file_url`). Raises ``DownloadError`` (HTTP
    status, URL) when the record cannot be fetched, ``DataError`` when the reply is not a record.
    """
    base = zenodo_base(base_url)
    url = f"{base}/api/records/{record}"
    try:
        with open_url(url, timeout=timeout, retry=retry) as resp:
            meta = json.load(resp)
    except json.JSONDecodeError as err:
        raise DataError(f"{url}: the Zenodo API reply is not JSON ({err})") from None
    except CONNECTION_ERRORS as err:  # the reply broke off
        raise DownloadError(url, None, _reason(err)) from None
    files = []
    for f in meta.get("files", []) if isinstance(meta, dict) else []:
        checksum = str(f.get("checksum", ""))
        algo, _, digest = checksum.partition(":")
        files.append(
            {
                "key": f["key"],
                "md5": digest if algo == "md5" else None,
                "size": f.get("size"),
                "url": file_url(base, record, f["key"]),
            }
        )
    if not files:
        raise DataError(f"{url}: the record lists no files")
    return files


def download_file(
    url: str,
    dest: str | Path,
    md5: str | None = None,
    size: int | None = None,
    timeout: float = 60,
    retry: Retry | None = None,
) -> Path:
    """Stream ``url`` to ``dest`` via ``dest.part``, resuming a partial file, then verify and rename.

    A partial ``.part`` (an earlier run, or this one's connection dropping mid-file, which is
    retried as ``retry`` says) is resumed with a ``Range`` request; a server that ignores it
    (replies 200) restarts the download from zero. A checksum mismatch deletes the partial file and
    raises ``DataError`` with both checksums; a failed request raises ``DownloadError``.
    """
    retry = retry or DEFAULT_RETRY
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    broken = 0  # responses that broke off
    while True:
        offset = part.stat().st_size if part.exists() else 0
        if size is not None and offset > size:  # cannot be a prefix of the file: start over
            part.unlink()
            offset = 0
        if size is not None and offset == size:
            break  # complete: check it
        try:
            resp = open_url(url, {"Range": f"bytes={offset}-"} if offset else {}, timeout, retry)
        except DownloadError as err:
            if err.status == 416 and offset:  # our .part is already the whole file (or garbage)
                break
            raise
        try:
            with resp:
                expected = _stream(resp, url, part, offset, size, dest.name)
            got = part.stat().st_size
            if expected is None or got >= expected:
                break
            reason = f"the reply broke off at byte {got} of {expected}"
        except CONNECTION_ERRORS as err:
            reason = (
                f"the reply broke off at byte {part.stat().st_size if part.exists() else 0}: {_reason(err)}"
            )
        broken += 1
        if broken >= retry.attempts:
            raise DownloadError(url, None, reason, broken)
        wait = retry.wait(broken - 1)
        log.warning("%s: %s; resuming in %.0f s (%d of %d)", url, reason, wait, broken + 1, retry.attempts)
        retry.sleep(wait)
    if md5 is not None:
        got_md5 = md5sum(part)
        if got_md5 != md5:
            part.unlink(missing_ok=True)
            raise DataError(
                f"{url}: checksum mismatch for {dest}: expected md5 {md5}, got {got_md5}; "
                "the partial file was deleted, rerun to download again"
            )
    elif size is not None and part.stat().st_size != size:
        n = part.stat().st_size
        part.unlink(missing_ok=True)
        raise DataError(f"{url}: {dest} has {n} bytes, expected {size}; deleted, rerun to download again")
    os.replace(part, dest)
    return dest


def _stream(resp: Any, url: str, part: Path, offset: int, size: int | None, name: str) -> int | None:
    """Write a response to ``part`` (appended after ``offset`` on a 206 that starts there, else from
    zero); returns the whole file's expected size (None when unknown)."""
    if offset and resp.status == 206 and _range_start(resp) != offset:
        part.unlink()  # not the bytes asked for: start over
        raise ConnectionError(
            f"Content-Range {resp.headers.get('Content-Range')!r} does not start at {offset}"
        )
    if offset and resp.status != 206:
        log.warning("%s ignored the Range request: restarting the download", url)
        offset = 0
    total = size if size is not None else _content_length(resp, offset)
    with (
        open(part, "ab" if offset else "wb") as f,
        tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=name, disable=None) as bar,
    ):
        for block in iter(lambda: resp.read(CHUNK), b""):
            f.write(block)
            bar.update(len(block))
    return total


def _range_start(resp: Any) -> int | None:
    """The first byte of a 206's ``Content-Range: bytes START-END/TOTAL``."""
    value = resp.headers.get("Content-Range") or ""
    try:
        return int(value.removeprefix("bytes").strip().split("-")[0])
    except ValueError:
        return None


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
    retry: Retry | None = None,
) -> dict[str, Any]:
    """Download, verify and extract a Zenodo dataset into ``resources_dir/name``; return the manifest.

    Every file of the source (the archive and, for prostate_mr, ``institution.txt``) is checked
    against the md5 Zenodo publishes. Requests carry diffseg's User-Agent and are retried on 429/5xx
    and connection errors (``retry``); partial files are resumed. When the record cannot be fetched
    (offline, any HTTP error), files already in place are used unverified (a zip must pass its CRC
    test); a missing or failed file is a ``DataError`` saying what happened (HTTP status, URL) and
    where to put the file by hand (with its md5 and size when known), where the next run picks it up.

    Args:
        name: the dataset name (folder under ``resources_dir``).
        ds_cfg: its config entry: ``source`` (prostate_mr | abdominal_ct), optional ``zenodo_record``.
        resources_dir: the downloads folder.
        base_url: Zenodo base URL (default ``$DIFFSEG_ZENODO_URL`` or https://zenodo.org).
        retry: attempts, backoff and the sleep function (default :data:`DEFAULT_RETRY`).
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
    manual = {key: file_url(ZENODO_URL, record, key) for key in keys}  # for a browser: zenodo.org's
    try:
        files = fetch_record(record, base, timeout=timeout, retry=retry)
    except DataError as err:  # any failure (offline, 403, 429 for too long, not a record...)
        hint = ""
        if isinstance(err, DownloadError) and err.status in (404, 410):
            hint = f" (is {record} a Zenodo record id?)"
        return _placed_by_hand(name, source, record, keys, out, f"{err}{hint}", manual)
    by_key = {f["key"]: f for f in files}
    entries = []
    for key in keys:
        dest = out / key
        entry = by_key.get(key)
        if entry is None:
            why = f"{api}: record {record} has no file {key!r} (files: {sorted(by_key)})"
            if not _usable_unverified(dest):
                raise DataError(f"{why}; {_put_it(manual[key], dest)}, then rerun")
            log.warning("%s: using %s without checking its md5", why, dest)
            entries.append(_unverified(key, dest, manual[key]))
            continue
        if dest.exists():
            if entry["md5"] is None or md5sum(dest) == entry["md5"]:
                log.info("%s already present and verified: not downloading again", dest)
            else:
                log.warning("%s does not match the published md5: downloading it again", dest)
                dest.unlink()
        if not dest.exists():
            try:
                download_file(entry["url"], dest, entry["md5"], entry["size"], timeout=timeout, retry=retry)
            except DownloadError as err:
                raise DataError(_failed_file(err, entry, dest, manual[key])) from None
        entries.append({**entry, "verified": entry["md5"] is not None})
    return _finish(name, source, record, entries, out / archive_key, out)


def _put_it(manual_url: str, dest: Path, entry: Mapping[str, Any] | None = None) -> str:
    """``download URL (md5 ..., N bytes) and put it at DEST``: what to do by hand."""
    facts = []
    if entry is not None and entry.get("md5"):
        facts.append(f"md5 {entry['md5']}")
    if entry is not None and entry.get("size") is not None:
        facts.append(f"{entry['size']} bytes")
    known = f" ({', '.join(facts)})" if facts else ""
    return f"download {manual_url}{known} and put it at {dest.resolve()}"


def _failed_file(err: DownloadError, entry: Mapping[str, Any], dest: Path, manual_url: str) -> str:
    """What happened to a file's download, and the two ways on: resume, or put the file in place."""
    part = dest.with_name(dest.name + ".part")
    by_hand = f"{_put_it(manual_url, dest, entry)}, where it is picked up (and checked against that md5)"
    if part.exists() and part.stat().st_size:
        of = f" of {entry['size']}" if entry.get("size") is not None else ""
        got = f"{part.resolve()}: {part.stat().st_size}{of} bytes"
        return f"{err}; rerun to resume the partial download ({got}), or {by_hand}"
    return f"{err}; {by_hand}, then rerun"


def _unverified(key: str, path: Path, url: str) -> dict[str, Any]:
    return {"key": key, "md5": None, "size": path.stat().st_size, "url": url, "verified": False}


def _placed_by_hand(
    name: str, source: str, record: int | str, keys: tuple[str, ...], out: Path, why: str, manual: dict
) -> dict[str, Any]:
    """Zenodo's record could not be had (``why``): use the files placed by hand, unverified."""
    missing = [key for key in keys if not _usable_unverified(out / key)]
    if missing:
        what = "; ".join(_put_it(manual[k], out / k) for k in missing)
        raise DataError(
            f"{why}; {what} (it is picked up there; the md5 of each file is listed on "
            f"https://zenodo.org/records/{record}), then rerun"
        )
    entries = []
    for key in keys:
        log.warning(
            "%s: using %s without checking its md5%s",
            why,
            out / key,
            " (zip CRC test passed)" if key.endswith(".zip") else "",
        )
        entries.append(_unverified(key, out / key, manual[key]))
    return _finish(name, source, record, entries, out / keys[0], out)


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
