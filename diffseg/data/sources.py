"""Case listings per data source: phantom, prostate_mr (Zenodo 7013610), abdominal_ct (AMOS), msd.

Source ``msd`` is a user's folder in either of two layouts, told apart by its ``dataset.json``:

* Medical Segmentation Decathlon: ``modality`` (``{"0": "T2", "1": "ADC"}``), ``labels`` value -> name
  and a ``training`` list of ``{"image", "label"}`` paths; an image with several modalities is one
  4D NIfTI ``(X, Y, Z, C)``. The cases are the ``training`` list, and a file name is the uid as it
  is (``case_0001.nii.gz`` is case ``case_0001``).
* nnU-Net v2: ``channel_names``, ``labels`` name -> value, ``file_ending``: channel ``c`` of case
  ``uid`` is ``imagesTr/{uid}_{c:04d}{file_ending}``, its label ``labelsTr/{uid}{file_ending}``
  (or, with a ``dataset`` key, the files it lists per case).

A source also names the file its reference split comes from (``Source.split_file``): the prostate
record's ``institution.txt``, AMOS's ``dataset.json``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffseg.choices import DATASET_CHOICES
from diffseg.data.phantom import CLASSES, MODALITY
from diffseg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SOURCES = DATASET_CHOICES["source"]
AMOS_CT_MAX_ID = 500  # AMOS ids above 500 are MR
NIFTI = (".nii.gz", ".nii")
INSTITUTION_FILE = "institution.txt"  # Zenodo 7013610, beside data.zip: "<uid> <institution>" lines


@dataclass(frozen=True)
class Case:
    """One case: files to read (``image``/``label``) or a phantom ``index`` to generate.

    ``group`` is the case's origin in the archive (AMOS: ``train`` = imagesTr, ``valid`` = imagesVa).
    ``channel_files`` are the image's files in channel order when each channel has its own file
    (nnU-Net; ``image`` is then the first); empty: ``image`` holds every channel (3D or 4D).
    """

    uid: str
    image: Path | None = None
    label: Path | None = None
    index: int = 0
    group: str | None = None
    channel_files: tuple[Path, ...] = ()

    @property
    def image_files(self) -> tuple[Path, ...]:
        """The image's files: one per channel, or the single (3D or 4D) file."""
        return self.channel_files or ((self.image,) if self.image is not None else ())


@dataclass
class Source:
    """A listed source: class names (background first), modality (``CT``/``MR``), cases.

    ``split_file`` is the file the source's reference split is read from (None: no reference split).
    ``channel_names`` names the image channels (one by default); ``label_values`` are the label
    values in the files, by class (``label_values[i]`` is class ``i``; None: ``0..N-1``).
    """

    classes: list[str]
    modality: str
    cases: list[Case] = field(default_factory=list)
    split_file: Path | None = None
    channel_names: list[str] | None = None
    label_values: list[int] | None = None

    @property
    def channels(self) -> int:
        """Number of image channels."""
        return len(self.channel_names) if self.channel_names else 1

    def info(self) -> dict[str, Any]:
        """What ``dataset.json`` records beyond the classes: ``channels`` and ``channel_names`` when
        there are several (absent = 1), ``label_values`` when the files' values are not ``0..N-1``."""
        out: dict[str, Any] = {}
        if self.channels > 1:
            out["channels"] = self.channels
            out["channel_names"] = list(self.channel_names or [])
        if self.label_values is not None:
            out["label_values"] = [int(v) for v in self.label_values]
        return out

    def warn_absent_classes(
        self, name: str, present: Mapping[str, Any], split: Mapping[str, str]
    ) -> list[str]:
        """Log a warning naming each class found in no training case; returns their names.

        Args:
            present: ``{uid: bool array (num_classes,)}``, the classes in each prepared label.
            split: ``{uid: "train" | "valid" | "test"}``.
        """
        seen = [False] * len(self.classes)
        for uid, where in split.items():
            if where == "train" and uid in present:
                seen = [a or bool(b) for a, b in zip(seen, present[uid], strict=True)]
        values = self.label_values or list(range(len(self.classes)))
        absent = [c for c, hit in enumerate(seen) if not hit and c > 0]
        for c in absent:
            log.warning(
                "%s: class %r (label value %d) is absent from every training case: the network "
                "cannot learn it",
                name,
                self.classes[c],
                values[c],
            )
        return [self.classes[c] for c in absent]


def _strip_nifti(name: str) -> str | None:
    for ext in NIFTI:
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


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


def _label_table(path: Path, labels: Any) -> list[tuple[int, str]]:
    """``(value, name)`` pairs sorted by value.

    From MSD (``{"0": "background"}``) or nnU-Net v2 (``{"background": 0}``) ``labels``.
    """
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path}: missing or empty 'labels'")
    try:
        if all(str(k).isdigit() for k in labels):
            pairs = [(int(k), str(v)) for k, v in labels.items()]
        else:
            pairs = [(int(v), str(k)) for k, v in labels.items()]
    except (TypeError, ValueError):
        raise DataError(
            f"{path}: 'labels' must map integer values to names (regions are not supported)"
        ) from None
    values = [v for v, _ in pairs]
    if len(set(values)) != len(values) or min(values) < 0:
        raise DataError(f"{path}: 'labels' values must be distinct integers >= 0, got {sorted(values)}")
    return sorted(pairs)


def _class_names(path: Path, labels: Any) -> list[str]:
    """Class names by value, the values ``0..N-1`` without gaps (AMOS)."""
    pairs = _label_table(path, labels)
    if [v for v, _ in pairs] != list(range(len(pairs))):
        raise DataError(f"{path}: label values must be 0..N-1 without gaps, got {[v for v, _ in pairs]}")
    return [name for _, name in pairs]


def _msd_labels(meta: Path, info: Mapping[str, Any]) -> tuple[list[str], list[int]]:
    """Class names and their label values (0 = background first; gaps allowed, remapped later)."""
    pairs = _label_table(meta, info.get("labels"))
    if pairs[0][0] != 0:
        raise DataError(f"{meta}: 'labels' has no value 0 (background); values {[v for v, _ in pairs]}")
    if len(pairs) < 2:
        raise DataError(f"{meta}: 'labels' lists only the background: nothing to segment")
    return [n for _, n in pairs], [v for v, _ in pairs]


def _channel_names(meta: Path, channels: Any, key: str) -> list[str]:
    """Channel names in channel order from ``{"0": "T2", "1": "ADC"}``."""
    if not isinstance(channels, dict) or not channels:
        raise DataError(f'{meta}: {key!r} must be a non-empty {{"0": name, ...}} object')
    if sorted(str(k) for k in channels) != sorted(str(i) for i in range(len(channels))):
        raise DataError(
            f"{meta}: {key!r} keys must be the channel numbers 0..{len(channels) - 1}, got {sorted(channels)}"
        )
    return [str(channels[k]) for k in sorted(channels, key=int)]


def _relative(root: Path, meta: Path, where: str, value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise DataError(f"{meta}: {where} is not a file path")
    return root / value


def _msd_cases(root: Path, meta: Path, info: Mapping[str, Any], channels: int) -> list[Case]:
    """MSD: the ``training`` list of ``{"image", "label"}``; each listed file must exist.

    nnU-Net v1 folders list their cases so too, each channel in its own file beside the listed
    name (``{uid}_0000.nii.gz``, ...): those are read when the listed file is absent.
    """
    entries = info.get("training")
    if not isinstance(entries, list) or not entries:
        raise DataError(
            f"{meta}: missing or empty 'training' list (an MSD dataset.json lists its cases there)"
        )
    cases, seen = [], {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{meta}: training[{i}] is not an {{'image': ..., 'label': ...}} entry")
        img = _relative(root, meta, f"training[{i}].image", entry.get("image"))
        label = _relative(root, meta, f"training[{i}].label", entry.get("label"))
        uid = _strip_nifti(img.name)
        if uid is None:
            raise DataError(f"{meta}: training[{i}] lists {img.name}, not a NIfTI file (.nii, .nii.gz)")
        if uid in seen:
            raise DataError(f"{meta}: training[{i}] and training[{seen[uid]}] both list case {uid}")
        seen[uid] = i
        ext = img.name[len(uid) :]
        v1 = tuple(img.with_name(f"{uid}_{c:04d}{ext}") for c in range(channels))
        files = v1 if not img.is_file() and all(p.is_file() for p in v1) else ()  # nnU-Net v1
        for kind, path in (("image", files[0] if files else img), ("label", label)):
            if not path.is_file():
                raise DataError(f"{meta}: training[{i}] lists {kind} {path}, which does not exist")
        cases.append(Case(uid, files[0] if files else img, label, channel_files=files))
    return cases


def _nnunet_cases(root: Path, meta: Path, info: Mapping[str, Any], channels: int) -> list[Case]:
    """nnU-Net v2: ``imagesTr/{uid}_{c:04d}{file_ending}`` per channel c, ``labelsTr/{uid}{file_ending}``.

    With a ``dataset`` key (``{uid: {"images": [...], "label": ...}}``) its files, else the cases
    whose channel 0 is in ``imagesTr/``; ``numTraining``, when given, must match their number.
    """
    ending = info.get("file_ending", ".nii.gz")
    if ending not in NIFTI:
        raise DataError(f"{meta}: file_ending {ending!r}: only NIfTI images (.nii.gz, .nii) are supported")
    listed = info.get("dataset")
    cases = []
    if listed is not None:
        if not isinstance(listed, dict) or not listed:
            raise DataError(f"{meta}: 'dataset' must map case ids to {{'images': [...], 'label': ...}}")
        for uid, entry in listed.items():
            images = entry.get("images") if isinstance(entry, dict) else None
            if not isinstance(images, list) or len(images) != channels:
                raise DataError(f"{meta}: dataset.{uid}.images must list the {channels} channel file(s)")
            files = tuple(_relative(root, meta, f"dataset.{uid}.images", f) for f in images)
            label = _relative(root, meta, f"dataset.{uid}.label", entry.get("label"))
            for path in (*files, label):
                if not path.is_file():
                    raise DataError(f"{meta}: dataset.{uid} lists {path}, which does not exist")
            cases.append(Case(str(uid), files[0], label, channel_files=files))
        return cases
    img_dir, lab_dir = root / "imagesTr", root / "labelsTr"
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: folder not found")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    by_uid: dict[str, set[int]] = {}
    for path in sorted(img_dir.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(ending):
            continue
        m = pattern.match(path.name)
        if m is None:
            raise DataError(
                f"{path}: no channel suffix (nnU-Net v2 names channel files {{case}}_0000{ending}, ...)"
            )
        by_uid.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not by_uid:
        raise DataError(f"{img_dir}: no {{case}}_0000{ending} images (empty folder)")
    for uid, found in sorted(by_uid.items()):
        files = tuple(img_dir / f"{uid}_{c:04d}{ending}" for c in range(channels))
        for c, path in enumerate(files):
            if c not in found:
                raise DataError(
                    f"{path}: channel {c} of case {uid} not found ({channels} channels in {meta})"
                )
        extra = sorted(c for c in found if c >= channels)
        if extra:
            raise DataError(
                f"{img_dir / f'{uid}_{extra[0]:04d}{ending}'}: channel {extra[0]}, but {meta} names "
                f"{channels} channel(s)"
            )
        label = lab_dir / f"{uid}{ending}"
        if not label.is_file():
            raise DataError(f"{files[0]}: no label {label} for this image")
        cases.append(Case(uid, files[0], label, channel_files=files))
    expected = info.get("numTraining")
    if isinstance(expected, int) and expected != len(cases):
        raise DataError(f"{meta}: numTraining is {expected}, but {img_dir} holds {len(cases)} cases")
    return cases


def msd_source(name: str, ds_cfg: Mapping[str, Any]) -> Source:
    """A user's folder, MSD or nnU-Net v2 layout (module docstring), told apart by its dataset.json.

    ``channel_names`` (with ``file_ending``) is nnU-Net v2, ``modality`` MSD. The modality of the
    dataset is CT when its first channel is, else MR.
    """
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
    classes, values = _msd_labels(meta, info)
    if "channel_names" in info:
        channels = _channel_names(meta, info["channel_names"], "channel_names")
        cases = _nnunet_cases(root, meta, info, len(channels))
    elif "modality" in info:
        channels = _channel_names(meta, info["modality"], "modality")
        cases = _msd_cases(root, meta, info, len(channels))
    else:
        raise DataError(
            f"{meta}: neither 'channel_names' (nnU-Net v2) nor 'modality' (Medical Segmentation "
            "Decathlon): cannot tell the layout"
        )
    modality = "CT" if channels[0].upper() == "CT" else "MR"
    label_values = values if values != list(range(len(values))) else None
    return Source(classes, modality, cases, channel_names=channels, label_values=label_values)


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
