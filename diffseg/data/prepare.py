"""Prepare a dataset: list its cases, preprocess them, write images/labels, split.csv, dataset.json.

Everything is written into a temporary sibling folder that replaces ``out_dir`` only when complete,
so a failure (bad input, interruption) never leaves a partial dataset behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from diffseg.data.dataset import write_cache
from diffseg.data.phantom import generate_phantom
from diffseg.data.preprocess import PreprocessOptions, normalize_intensity, preprocess_case, write_nifti
from diffseg.data.sources import list_source
from diffseg.data.splits import make_split, split_counts, write_split_csv
from diffseg.errors import ConfigError
from diffseg.io import atomic_dir, atomic_write_json

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


def prepare_dataset(
    name: str, ds_cfg: Mapping[str, Any], out_dir: str | Path, resources_dir: str | Path
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
    present: dict[str, np.ndarray] = {}  # the classes in each prepared label

    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        for case in tqdm(source.cases, desc=f"prepare {name}", unit="case", disable=None):
            if case.image is None:  # phantom: generated directly on the target grid
                image, label = generate_phantom(
                    ds_cfg.get("anatomy", "pelvis"), shape, spacing, seed, case.index
                )
                image = normalize_intensity(image, source.modality, clip, options.normalize)
                affine = None  # the LPS-ordered default of write_nifti
            else:
                image, label, affine = preprocess_case(
                    case.channel_files or case.image,
                    case.label,
                    num_classes,
                    spacing,
                    shape,
                    source.modality,
                    clip,
                    options,
                    label_values=source.label_values,
                    channels=source.channels,
                )
            present[case.uid] = np.bincount(label.ravel(), minlength=num_classes) > 0
            write_nifti(tmp / "images" / f"{case.uid}.nii.gz", image, spacing, affine)
            write_nifti(tmp / "labels" / f"{case.uid}.nii.gz", label, spacing, affine)
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
        write_cache(tmp, shape, source.channels)  # uncompressed, memory-mappable copy of each split
        atomic_write_json(tmp / "dataset.json", info)
        info["fingerprint"] = compute_fingerprint(tmp)  # what runs trained on it are tied to
        atomic_write_json(tmp / "dataset.json", info)  # last: the dataset is complete
    log.info("prepared %s: %d cases in %s", name, len(source.cases), out_dir)
    return info
