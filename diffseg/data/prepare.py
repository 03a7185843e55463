"""Prepare a dataset: list its cases, preprocess them, write images/labels, split.csv, dataset.json.

Everything is written into a temporary sibling folder that replaces ``out_dir`` only when complete,
so a failure (bad input, interruption) never leaves a partial dataset behind.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
from collections.abc import Mapping, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from diffseg.choices import POOLS
from diffseg.data.phantom import generate_phantom
from diffseg.data.preprocess import PreprocessOptions, normalize_intensity, preprocess_case
from diffseg.data.sources import Case, list_source
from diffseg.data.splits import make_split, split_counts, write_split_csv
from diffseg.errors import ConfigError
from diffseg.io import atomic_dir, atomic_write_json, write_nifti

log = logging.getLogger(__name__)

# Target geometry when the config does not give one (the paper's).
DEFAULT_GEOMETRY: dict[str, dict[str, list[float] | list[int]]] = {
    "prostate_mr": {"spacing": [0.75, 0.75, 2.5], "shape": [256, 256, 48]},
    "abdominal_ct": {"spacing": [1.5, 1.5, 5.0], "shape": [192, 128, 128]},
    "phantom": {"spacing": [0.75, 0.75, 2.5], "shape": [64, 64, 16]},
}
DEFAULT_CT_CLIP = {"abdominal_ct": [-991.0, 362.0]}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compute_fingerprint(data_dir: str | Path) -> str:
    """sha256 over a prepared dataset's content: its files' checksums and its description.

    Covers ``images/``, ``labels/``, ``split.csv`` and ``dataset.json`` (without its own
    ``fingerprint``), so any changed voxel, case, split or class name changes it.
    """
    data_dir = Path(data_dir)
    digest = hashlib.sha256()
    files = sorted(
        p for sub in ("images", "labels") for p in (data_dir / sub).glob("*") if not p.name.startswith(".")
    )
    for path in [*files, data_dir / "split.csv"]:
        if path.is_file():
            digest.update(f"{path.relative_to(data_dir).as_posix()} {_file_sha256(path)}\n".encode())
    info_path = data_dir / "dataset.json"
    if info_path.is_file():
        info = {k: v for k, v in json.loads(info_path.read_text()).items() if k != "fingerprint"}
        digest.update(json.dumps(info, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def data_fingerprint(data_dir: str | Path) -> str:
    """The fingerprint the data stage recorded in ``dataset.json``, else computed from the files."""
    info_path = Path(data_dir) / "dataset.json"
    if info_path.is_file():
        recorded = json.loads(info_path.read_text()).get("fingerprint")
        if recorded:
            return str(recorded)
    return compute_fingerprint(data_dir)


def source_files(ds_cfg: Mapping[str, Any]) -> list[str]:
    """The files of a dataset read from the user's folder (``path:``), for the data rule's input.

    Their modification times make Snakemake prepare the data again when a file there changes
    (and the fingerprint then retrains what depends on it). Empty for phantoms and downloads
    (the download manifest is their input).
    """
    if ds_cfg.get("source") in ("phantom", "prostate_mr", "abdominal_ct") or not ds_cfg.get("path"):
        return []
    root = Path(str(ds_cfg["path"])).expanduser()
    if not root.is_dir():
        return []  # the data stage then names the missing folder
    return sorted(
        str(p)
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _geometry(name: str, ds_cfg: Mapping[str, Any]) -> tuple[list[float], list[int]]:
    default = DEFAULT_GEOMETRY.get(str(ds_cfg.get("source")), {})
    spacing, shape = ds_cfg.get("spacing", default.get("spacing")), ds_cfg.get("shape", default.get("shape"))
    if spacing is None or shape is None:
        raise ConfigError(
            f"datasets.{name}: 'spacing' and 'shape' are required for source {ds_cfg.get('source')}"
        )
    if len(spacing) != 3 or len(shape) != 3 or min(spacing) <= 0 or min(shape) < 1:
        raise ConfigError(f"datasets.{name}: spacing {spacing} / shape {shape} must be 3 positive numbers")
    return [float(s) for s in spacing], [int(s) for s in shape]


def preprocess_options(name: str, ds_cfg: Mapping[str, Any]) -> PreprocessOptions:
    """The dataset entry's ``reorient``/``resample``/``normalize``/``crop`` (``ConfigError`` if bad).

    Files default to the reference pipeline (no reorientation, reference resampling and intensities,
    crop on the label's bounding box). Phantoms are generated on the target grid in LPS array order,
    so only ``normalize`` applies to them, and it defaults to ``legacy`` (their data as before).
    """
    where = f"datasets.{name}"
    if ds_cfg.get("source") == "phantom":
        chosen = PreprocessOptions.from_config(ds_cfg, where, PreprocessOptions.legacy())
        return PreprocessOptions(**{**PreprocessOptions.legacy().as_dict(), "normalize": chosen.normalize})
    return PreprocessOptions.from_config(ds_cfg, where)


@dataclass(frozen=True)
class CaseJob:
    """What one worker needs to prepare one case into ``out`` (picklable, for a process pool)."""

    case: Case
    out: Path  # the temporary dataset folder (``images/``, ``labels/``)
    anatomy: str
    spacing: list[float]
    shape: list[int]
    seed: int
    modality: str
    clip: Sequence[float] | None
    options: PreprocessOptions
    num_classes: int
    label_values: list[int] | None
    channels: int


def _prepare_case(job: CaseJob) -> np.ndarray:
    """Preprocess one case and write its image and label; returns the classes present ``(num_classes,)`` bool.

    Only this small array comes back: the volumes are on disk when it returns, so a pool holds at
    most one case's arrays per worker, whatever the number of cases.
    """
    case = job.case
    if case.image is None:  # phantom: generated directly on the target grid
        image, label = generate_phantom(job.anatomy, job.shape, job.spacing, job.seed, case.index)
        image = normalize_intensity(image, job.modality, job.clip, job.options.normalize)
        affine = None  # the LPS-ordered default of write_nifti
    else:
        image, label, affine = preprocess_case(
            case.channel_files or case.image,
            case.label,
            job.num_classes,
            job.spacing,
            job.shape,
            job.modality,
            job.clip,
            job.options,
            label_values=job.label_values,
            channels=job.channels,
        )
    write_nifti(job.out / "images" / f"{case.uid}.nii.gz", image, job.spacing, affine)
    write_nifti(job.out / "labels" / f"{case.uid}.nii.gz", label, job.spacing, affine)
    return np.bincount(label.ravel(), minlength=job.num_classes) > 0


def _init_process_worker(itk_threads: int, log_level: int, log_format: str | None) -> None:
    """A spawned worker: ITK's share of the job's threads, and the parent's log level and format."""
    logging.basicConfig(level=log_level, format=log_format or logging.BASIC_FORMAT)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)


def _executor(pool: str, workers: int, itk_threads: int) -> Executor:
    """A pool of ``workers`` threads, or of spawned processes (see :func:`prepare_cases`)."""
    if pool == "thread":
        return ThreadPoolExecutor(workers, thread_name_prefix="prepare")
    root = logging.getLogger()
    fmt = next((h.formatter._fmt for h in root.handlers if h.formatter is not None), None)
    # spawn, not fork: the parent has imported JAX (and tqdm may run a monitor thread), and a fork
    # of a multi-threaded process can deadlock.
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_process_worker,
        initargs=(itk_threads, root.getEffectiveLevel(), fmt),
    )


def prepare_cases(
    jobs: Sequence[CaseJob], threads: int = 1, pool: str = "thread", desc: str = ""
) -> list[np.ndarray]:
    """Run :func:`_prepare_case` over ``jobs`` with ``threads`` cases in flight at most; results in job order.

    Args:
        jobs: one per case, in the dataset's order.
        threads: the job's CPU threads: ``min(threads, len(jobs))`` cases are prepared at once, and
            SimpleITK's own filters get the rest (``threads // workers`` threads each), so the stage
            uses what it was given and no more. 1: one case after another, in this thread.
        pool: ``thread`` (default: SimpleITK, numpy and zlib release the GIL, so threads run in
            parallel without the start-up, pickling and per-process memory of processes) or
            ``process`` (spawned workers; measured in ``benchmarks/RESULTS.md, "Data stage"``).
        desc: the progress bar's label (cases done / total).

    Returns:
        Each job's classes present, ``(num_classes,)`` bool, in ``jobs``' order. A case that fails
        stops the stage: no new case starts, the ones running finish, and the first failure (in
        case order among those that failed) is raised as it was, naming the file and the problem.
    """
    if pool not in POOLS:
        raise ConfigError(f"pool: {pool!r} is not one of {list(POOLS)}")
    if threads < 1:
        raise ConfigError(f"threads: {threads} must be at least 1")
    workers = max(1, min(threads, len(jobs)))
    itk_threads = max(1, threads // workers)
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    results: list[np.ndarray | None] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=None)
    try:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)
        if workers == 1:  # no pool: the serial path, in this thread (tracebacks, debuggers, monkeypatches)
            for i, job in enumerate(jobs):
                results[i] = _prepare_case(job)
                bar.update(1)
            return cast(list[np.ndarray], results)
        failures: dict[int, BaseException] = {}
        executor = _executor(pool, workers, itk_threads)
        try:
            # A sliding window of `workers` cases: a case is submitted only when one has finished,
            # so at most `workers` cases' arrays exist at any time, whatever the number of cases.
            pending: dict[Future[np.ndarray], int] = {}
            upcoming = iter(enumerate(jobs))
            for i, job in itertools.islice(upcoming, workers):
                pending[executor.submit(_prepare_case, job)] = i
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    i = pending.pop(future)
                    err = future.exception()
                    if err is not None:
                        failures[i] = err
                        continue
                    results[i] = future.result()
                    bar.update(1)
                    if not failures:
                        for j, job in itertools.islice(upcoming, 1):
                            pending[executor.submit(_prepare_case, job)] = j
        finally:
            # On an error or an interrupt: start nothing more, let the running cases end.
            executor.shutdown(wait=True, cancel_futures=True)
        if failures:
            raise failures[min(failures)]
        return cast(list[np.ndarray], results)
    finally:
        bar.close()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def prepare_dataset(
    name: str,
    ds_cfg: Mapping[str, Any],
    out_dir: str | Path,
    resources_dir: str | Path,
    threads: int = 1,
    pool: str = "thread",
) -> dict[str, Any]:
    """Preprocess dataset ``name`` into ``out_dir`` and return its ``dataset.json`` dict.

    Args:
        name: the dataset name.
        ds_cfg: its config entry (``source``, ``anatomy``, ``num_cases``, ``seed``, ``spacing``,
            ``shape``, ``clip``, ``split``, ``path``, ``zenodo_record``, and the preprocessing switches
            ``reorient``, ``resample``, ``normalize``, ``crop``: see :func:`preprocess_options`).
        out_dir: the output folder (``results/data/{name}``): ``images/{uid}.nii.gz`` float32,
            ``labels/{uid}.nii.gz`` uint8, ``split.csv``, ``dataset.json`` (with ``fingerprint``,
            :func:`compute_fingerprint`).
        resources_dir: the dataset's download folder (``resources/{name}``, holding ``raw/``).
        threads: CPU threads to use (the data rule's ``threads``): up to this many cases are
            prepared at once (:func:`prepare_cases`); the output is the same, byte for byte, for any
            number.
        pool: ``thread`` or ``process`` workers (:func:`prepare_cases`).
    """
    out_dir = Path(out_dir)
    spacing, shape = _geometry(name, ds_cfg)
    options = preprocess_options(name, ds_cfg)
    source = list_source(name, ds_cfg, resources_dir)
    # Before the slow part: config and split-file errors come first.
    split = make_split(name, ds_cfg, source.cases, source.split_file)
    clip = ds_cfg.get("clip", DEFAULT_CT_CLIP.get(str(ds_cfg.get("source"))))
    num_classes = len(source.classes)
    seed = int(ds_cfg.get("seed", 0))

    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        common = dict(
            out=tmp,
            anatomy=str(ds_cfg.get("anatomy", "pelvis")),
            spacing=spacing,
            shape=shape,
            seed=seed,
            modality=source.modality,
            clip=clip,
            options=options,
            num_classes=num_classes,
            label_values=source.label_values,
            channels=source.channels,
        )
        jobs = [CaseJob(case=case, **common) for case in source.cases]
        found = prepare_cases(jobs, threads, pool, desc=f"prepare {name}")
        present = {case.uid: p for case, p in zip(source.cases, found, strict=True)}  # classes per label
        info = {
            "name": name,
            "source": ds_cfg.get("source"),
            "modality": source.modality,
            "classes": source.classes,
            "num_classes": num_classes,
            "spacing": spacing,
            "shape": shape,
            "num_cases": len(source.cases),
            "splits": split_counts(split),
            # How a new scan must be preprocessed to match (diffseg.data.preprocess.preprocess_scan).
            **options.as_dict(),
            **source.info(),  # channels, channel_names, label_values (own data)
        }
        source.warn_absent_classes(name, present, split)
        if clip is not None and source.modality == "CT":
            info["clip"] = [float(c) for c in clip]
        write_split_csv(tmp / "split.csv", split)
        from diffseg.data.dataset import write_cache  # loads jax: only where data is written

        write_cache(tmp, shape, source.channels, threads)  # uncompressed, memory-mappable copy of each split
        atomic_write_json(tmp / "dataset.json", info)
        info["fingerprint"] = compute_fingerprint(tmp)  # what runs trained on it are tied to
        atomic_write_json(tmp / "dataset.json", info)  # last: the dataset is complete
    log.info("prepared %s: %d cases in %s", name, len(source.cases), out_dir)
    return info
