"""The data stage on several threads: the same dataset byte for byte, bounded memory, errors, progress.

The raw set is the data-stage benchmark's (``benchmarks/data_stage.py``) at a tiny size: many-class
CT scans at 0.8 × 0.8 × 2.5 mm that are resampled to 1.5 mm, in the MSD layout.
"""

from __future__ import annotations

import gzip
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import data_stage  # noqa: E402

from diffseg.cli import main  # noqa: E402
from diffseg.data import prepare  # noqa: E402
from diffseg.data.prepare import compute_fingerprint, prepare_dataset  # noqa: E402
from diffseg.errors import ConfigError, DataError  # noqa: E402

CLASSES = 30
CASES = 6


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[Path, list[str]]:
    """6 raw cases 40 × 36 × 12 at 0.8 × 0.8 × 2.5 mm with 30 classes, and an MSD task listing them."""
    root = tmp_path_factory.mktemp("raw")
    uids = data_stage.write_raw(root / "raw", CASES, (40, 36, 12), (0.8, 0.8, 2.5), CLASSES)
    return data_stage.write_task(root / "task", root / "raw", uids, CLASSES), uids


def _entry(task: Path) -> dict:
    return {"source": "msd", "path": str(task), "spacing": [1.5, 1.5, 1.5], "shape": [16, 16, 16],
            "clip": [-991.0, 362.0], "seed": 0, "split": {"train": 4, "valid": 1, "test": 1}}  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of a prepared dataset but the cache manifests (they hold the files' mtimes)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not (p.parent.name == "cache" and p.suffix == ".json")
    }


@pytest.mark.parametrize("threads,pool", [(2, "thread"), (3, "thread"), (2, "process")])
def test_parallel_output_is_the_serial_output_byte_for_byte(raw, tmp_path, threads, pool):
    """Same files (images, labels, the cache, split.csv, dataset.json), same fingerprint."""
    task, _ = raw
    itk_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    serial = prepare_dataset("b", _entry(task), tmp_path / "serial", tmp_path, threads=1)
    parallel = prepare_dataset("b", _entry(task), tmp_path / "parallel", tmp_path, threads=threads, pool=pool)
    assert parallel == serial and parallel["fingerprint"] == compute_fingerprint(tmp_path / "parallel")
    a, b = _files(tmp_path / "serial"), _files(tmp_path / "parallel")
    assert list(a) == list(b) and len(a) == 2 * CASES + 2 + 6  # images, labels, split, json, cache
    assert [k for k in a if a[k] != b[k]] == []
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == itk_threads  # restored


def test_at_most_threads_cases_in_flight(raw, tmp_path, monkeypatch):
    """However many cases, no more than ``threads`` are being prepared at any moment, and a case
    hands back only its classes present (its volumes are on disk by then)."""
    task, uids = raw
    real, lock = prepare._prepare_case, threading.Lock()
    active, peak, returned = [0], [0], []

    def counted(job):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.05)  # long enough for the cases to overlap when they can
            present = real(job)
            assert (job.out / "images" / f"{job.case.uid}.nii.gz").is_file()
            returned.append(present)
            return present
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(prepare, "_prepare_case", counted)
    prepare_dataset("b", _entry(task), tmp_path / "out", tmp_path, threads=2)
    assert peak[0] == 2 and len(returned) == len(uids)
    assert all(r.dtype == bool and r.shape == (CLASSES + 1,) for r in returned)


def test_progress_counts_cases_done_of_total(raw, tmp_path, monkeypatch):
    task, _ = raw
    bars = []

    class Bar:
        def __init__(self, total, desc, **kw):
            self.total, self.desc, self.n = total, desc, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(prepare, "tqdm", Bar)
    prepare_dataset("b", _entry(task), tmp_path / "out", tmp_path, threads=2)
    assert [(b.desc, b.total, b.n) for b in bars] == [("prepare b", CASES, CASES)]


def test_a_bad_case_names_its_file_and_leaves_nothing(raw, tmp_path):
    """A truncated scan among the cases: the error names it; no dataset, no temporary folder."""
    task, uids = raw
    bad = tmp_path / "task"
    bad.mkdir()
    text = (task / "dataset.json").read_text().replace("../raw/imagesTr/case_0003", "imagesTr/case_0003")
    (bad / "dataset.json").write_text(text.replace("../raw", str(task.parent / "raw")))
    (bad / "imagesTr").mkdir()
    whole = gzip.decompress((task.parent / "raw/imagesTr/case_0003.nii.gz").read_bytes())
    (bad / "imagesTr/case_0003.nii.gz").write_bytes(gzip.compress(whole)[:-2000])
    out = tmp_path / "data" / "b"
    for threads in (1, 2):
        with pytest.raises(DataError, match=r"case_0003\.nii\.gz"):
            prepare_dataset("b", _entry(bad), out, tmp_path, threads=threads)
        assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_a_full_disk_while_writing_the_cache_is_one_error_and_leaves_nothing(raw, tmp_path, monkeypatch):
    """The cache is written with positional writes (no memory map, whose full disk is a SIGBUS):
    ENOSPC there is the stage's one disk-full error, and no dataset or temporary is kept."""
    import errno
    import os

    from diffseg.errors import DiskFullError

    task, _ = raw

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "data" / "b"
    with pytest.raises(DiskFullError, match=r"no space left on the device writing b/"):
        prepare_dataset("b", _entry(task), out, tmp_path, threads=2)
    assert list(out.parent.iterdir()) == []


def test_threads_and_pool_are_checked(raw, tmp_path):
    task, _ = raw
    with pytest.raises(ConfigError, match="pool"):
        prepare_dataset("b", _entry(task), tmp_path / "o", tmp_path, threads=2, pool="fibers")
    with pytest.raises(ConfigError, match="threads"):
        prepare_dataset("b", _entry(task), tmp_path / "o", tmp_path, threads=0)


def test_cli_takes_threads(raw, tmp_path, capsys):
    task, _ = raw
    cfg = {"results": str(tmp_path / "results"), "resources": str(tmp_path / "res"),
           "datasets": {"b": _entry(task)}}  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    args = ["data", "--config", str(tmp_path / "cfg.yaml"), "--dataset", "b"]
    assert main([*args, "--threads", "2"]) == 0
    assert (tmp_path / "results/data/b/dataset.json").is_file()
    with pytest.raises(SystemExit):
        main([*args, "--threads", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def test_the_data_rule_passes_its_threads():
    rule = (Path(__file__).resolve().parents[1] / "workflow/rules/data.smk").read_text()
    assert "--threads {threads}" in rule and 'threads: compute("data", "threads")' in rule


def test_labels_of_a_parallel_run_hold_every_class(raw, tmp_path):
    """The synthetic many-class scans keep their classes through resampling (what the benchmark
    relies on): each prepared label has most of the 30 classes."""
    task, _ = raw
    prepare_dataset("b", _entry(task), tmp_path / "out", tmp_path, threads=2)
    from diffseg.io import read_nifti

    for label in sorted((tmp_path / "out/labels").iterdir()):
        values = np.unique(read_nifti(label)[0])
        assert values[0] == 0 and len(values) > CLASSES // 2


@pytest.mark.slow
def test_benchmark_script_at_a_tiny_size(tmp_path):
    """``benchmarks/data_stage.py`` end to end: every point measured, one fingerprint, its JSON."""
    out = tmp_path / "bench.json"
    argv = ["--cases", "2", "3", "--workers", "1", "2", "--pool", "thread", "process", "--size", "24", "20",
            "8", "--shape", "16", "16", "16", "--classes", "12", "--out", str(out)]  # fmt: skip
    assert data_stage.main(argv) == 0
    result = json.loads(out.read_text())
    points = {(r["cases"], r["workers"], r["pool"]) for r in result["summary"]}
    assert points == {(n, w, p) for n in (2, 3) for w, p in ((1, "none"), (2, "thread"), (2, "process"))}
    assert all(r["main_s"] > 0 and r["peak_rss_mb"] > 50 for r in result["summary"])
    assert len({r["fingerprint"] for r in result["runs"] if r["cases"] == 3}) == 1
    assert result["raw"]["classes"] == 12 and result["machine"]["cpus"] >= 1
