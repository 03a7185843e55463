"""Case listings per data source: phantom, prostate_mr (Zenodo 7013610), abdominal_ct (AMOS), msd.

A source also names the file its reference split comes from (``Source.split_file``): the prostate
record's ``institution.txt``, AMOS's ``dataset.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffseg.data.phantom import CLASSES, MODALITY
from diffseg.errors import ConfigError, DataError

SOURCES = ("phantom", "prostate_mr", "abdominal_ct", "msd")
AMOS_CT_MAX_ID = 500  # AMOS ids above 500 are MR
NIFTI = (".nii.gz", ".nii")
INSTITUTION_FILE = "institution.txt"  # Zenodo 7013610, beside data.zip: "<uid> <institution>" lines


@dataclass(frozen=True)
class Case:
    """One case: files to read (``image``/``label``) or a phantom ``index`` to generate.

    ``group`` is the case's origin in the archive (AMOS: ``train`` = imagesTr, ``valid`` = imagesVa).
    """

    uid: str
    image: Path | None = None
    label: Path | None = None
    index: int = 0
    group: str | None = None


@dataclass
class Source:
    """A listed source: class names (background first), modality (``CT``/``MR``), cases.

    ``split_file`` is the file the source's reference split is read from (None: no reference split).
    """

    classes: list[str]
    modality: str
    cases: list[Case] = field(default_factory=list)
    split_file: Path | None = None


def _strip_nifti(name: str) -> str | None:
    for ext in NIFTI:
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def _nifti_files(folder: Path) -> list[Path]:
    # Skip macOS resource forks ("._x.nii.gz") that the MSD tarballs carry.
    return sorted(p for p in folder.iterdir() if _strip_nifti(p.name) and not p.name.startswith("."))


def phantom_source(name: str, ds_cfg: Mapping[str, Any]) -> Source:
    """``num_cases`` generated cases ``case_000``, ... for ``anatomy`` (pelvis | abdomen)."""
    anatomy = ds_cfg.get("anatomy", "pelvis")
    if anatomy not in CLASSES:
        raise ConfigError(f"datasets.{name}.anatomy: {anatomy!r} is not one of {sorted(CLASSES)}")
    n = int(ds_cfg.get("num_cases", 20))
    return Source(
        list(CLASSES[anatomy]), MODALITY[anatomy], [Case(f"case_{i:03d}", index=i) for i in range(n)]
    )


def find_institution_file(raw: Path, resources_dir: Path | None = None) -> Path | None:
    """``institution.txt``: downloaded beside ``data.zip`` (``resources_dir``), else inside ``raw``.

    When neither exists, the place it is expected (``resources_dir/institution.txt``, or None without
    ``resources_dir``), so that reading it names where to put it.
    """
    beside = Path(resources_dir) / INSTITUTION_FILE if resources_dir is not None else None
    if beside is not None and beside.is_file():
        return beside
    found = sorted(p for p in raw.rglob(INSTITUTION_FILE) if p.is_file()) if raw.is_dir() else []
    return found[0] if found else beside


def prostate_source(raw: Path, resources_dir: Path | None = None) -> Source:
    """The prostate MR archive: ``raw/**/data/{uid}_img.nii`` with ``{uid}_mask.nii`` beside it.

    ``split_file`` is the record's ``institution.txt`` (see :func:`find_institution_file`).
    """
    if not raw.is_dir():
        raise DataError(f"{raw}: extracted prostate_mr folder not found (run `diffseg download` first)")
    images = sorted(p for p in raw.rglob("*_img.nii*") if not p.name.startswith("."))
    if not images:
        raise DataError(f"{raw}: no *_img.nii files found (is this the extracted data.zip?)")
    cases = []
    for img in images:
        uid = img.name.split("_img.nii")[0]
        label = next(
            (
                img.with_name(f"{uid}_mask{ext}")
                for ext in (".nii", ".nii.gz")
                if img.with_name(f"{uid}_mask{ext}").exists()
            ),
            None,
        )
        if label is None:
            raise DataError(f"{img}: no label {img.with_name(uid + '_mask.nii')} for this image")
        cases.append(Case(uid, img, label))
    return Source(list(CLASSES["pelvis"]), "MR", cases, find_institution_file(raw, resources_dir))


def amos_uid(image: str) -> tuple[str, int] | None:
    """``"./imagesTr/amos_0001.nii.gz"`` -> ``("amos_0001", 1)``; None when the name has no number."""
    uid = _strip_nifti(Path(image).name)
    m = re.search(r"(\d+)$", uid or "")
    return (uid, int(m.group(1))) if uid is not None and m is not None else None


def amos_lists(meta: Path) -> dict[str, list[tuple[str, Path, Path]]]:
    """AMOS ``dataset.json``'s ``training`` and ``validation`` lists, CT cases only (ids <= 500).

    Returns:
        ``{"training": [(uid, image, label), ...], "validation": [...]}`` in the file's order, the
        paths resolved against the folder of ``dataset.json``.
    """
    info = _read_json(meta)
    out: dict[str, list[tuple[str, Path, Path]]] = {}
    for key in ("training", "validation"):
        entries = info.get(key)
        if not isinstance(entries, list) or not entries:
            raise DataError(f"{meta}: missing or empty {key!r} list (is this AMOS's dataset.json?)")
        cases = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise DataError(f"{meta}: {key}[{i}] is not an {{'image': ..., 'label': ...}} entry")
            if not isinstance(entry.get("label"), str):
                raise DataError(f"{meta}: {key}[{i}] ({entry['image']}) has no label")
            parsed = amos_uid(entry["image"])
            if parsed is None:
                raise DataError(f"{meta}: {key}[{i}]: no case number in {entry['image']!r}")
            uid, number = parsed
            if number > AMOS_CT_MAX_ID:
                continue  # MR cases (ids > 500) are not part of the CT dataset
            cases.append((uid, meta.parent / entry["image"], meta.parent / entry["label"]))
        out[key] = cases
    return out


def amos_source(raw: Path) -> Source:
    """AMOS CT cases (ids <= 500) as ``dataset.json`` lists them, in its order.

    ``training`` (imagesTr) -> group ``train``, ``validation`` (imagesVa) -> group ``valid``;
    ``split_file`` is the ``dataset.json``.
    """
    if not raw.is_dir():
        raise DataError(f"{raw}: extracted abdominal_ct folder not found (run `diffseg download` first)")
    meta = next(iter(sorted(raw.rglob("dataset.json"))), None)
    if meta is None:
        raise DataError(f"{raw}: no dataset.json found (is this the extracted amos22.zip?)")
    classes = _class_names(meta, _read_json(meta).get("labels"))
    lists = amos_lists(meta)
    cases = []
    for key, group in (("training", "train"), ("validation", "valid")):
        for uid, img, label in lists[key]:
            if not img.is_file():
                raise DataError(f"{meta}: {key} lists {img}, which does not exist")
            if not label.is_file():
                raise DataError(f"{img}: no label {label} for this image (listed in {meta})")
            cases.append(Case(uid, img, label, group=group))
    if not cases:
        raise DataError(f"{meta}: no AMOS CT cases (ids <= {AMOS_CT_MAX_ID}) listed")
    return Source(classes, "CT", cases, meta)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read JSON ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def _class_names(path: Path, labels: Any) -> list[str]:
    """Class names by value from MSD (``{"0": "background"}``) or nnU-Net v2 (``{"background": 0}``)."""
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path}: missing or empty 'labels'")
    try:
        if all(str(k).isdigit() for k in labels):
            by_value = {int(k): str(v) for k, v in labels.items()}
        else:
            by_value = {int(v): str(k) for k, v in labels.items()}
    except (TypeError, ValueError):
        raise DataError(
            f"{path}: 'labels' must map integer values to names (regions are not supported)"
        ) from None
    if sorted(by_value) != list(range(len(by_value))):
        raise DataError(f"{path}: label values must be 0..N-1 without gaps, got {sorted(by_value)}")
    return [by_value[i] for i in range(len(by_value))]


def msd_source(name: str, ds_cfg: Mapping[str, Any]) -> Source:
    """A Medical Segmentation Decathlon / nnU-Net folder: dataset.json, imagesTr/, labelsTr/."""
    if "path" not in ds_cfg:
        raise ConfigError(f"datasets.{name}.path: required for source msd (the dataset folder)")
    root = Path(ds_cfg["path"]).expanduser()
    meta = root / "dataset.json"
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    if not any(root.iterdir()):
        raise DataError(f"{root}: empty folder (expected dataset.json, imagesTr/, labelsTr/)")
    if not meta.exists():
        raise DataError(f"{meta}: not found (an MSD/nnU-Net folder needs dataset.json, imagesTr/, labelsTr/)")
    info = _read_json(meta)
    classes = _class_names(meta, info.get("labels"))
    channels = info.get("channel_names") or info.get("modality") or {"0": "MR"}
    if len(channels) != 1:
        raise DataError(
            f"{meta}: {len(channels)} modalities {list(channels.values())}: "
            "only single-modality images are supported"
        )
    modality = "CT" if str(next(iter(channels.values()))).upper() == "CT" else "MR"
    img_dir, lab_dir = root / "imagesTr", root / "labelsTr"
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: folder not found")
    images = _nifti_files(img_dir)
    if not images:
        raise DataError(f"{img_dir}: no NIfTI images (empty folder)")
    cases = []
    for img in images:
        stem = _strip_nifti(img.name) or ""
        uid = re.sub(r"_0000$", "", stem)  # nnU-Net channel suffix
        if re.search(r"_\d{4}$", stem) and not stem.endswith("_0000"):
            raise DataError(f"{img}: a second channel: only single-modality images are supported")
        ext = ".nii.gz" if img.name.endswith(".nii.gz") else ".nii"
        label = lab_dir / f"{uid}{ext}"
        if not label.exists():
            raise DataError(f"{img}: no label {label} for this image")
        cases.append(Case(uid, img, label))
    return Source(classes, modality, cases)


def list_source(name: str, ds_cfg: Mapping[str, Any], resources_dir: str | Path) -> Source:
    """The cases of dataset ``name``; downloaded sources are read from ``resources_dir/raw``."""
    source = ds_cfg.get("source")
    raw = Path(resources_dir) / "raw"
    if source == "phantom":
        return phantom_source(name, ds_cfg)
    if source == "prostate_mr":
        return prostate_source(raw, Path(resources_dir))
    if source == "abdominal_ct":
        return amos_source(raw)
    if source == "msd":
        return msd_source(name, ds_cfg)
    raise ConfigError(f"datasets.{name}.source: {source!r} is not one of {list(SOURCES)}")
