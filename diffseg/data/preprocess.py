"""Preprocessing with SimpleITK: read, validate, (reorient,) resample, pad, crop, clip/normalise, write.

Arrays returned here are in NIfTI order ``(X, Y, Z)`` = SimpleITK index order ``(i, j, k)``
(``GetArrayFromImage`` gives ``(Z, Y, X)``, so every conversion transposes).

Two pipelines, chosen per dataset by :class:`PreprocessOptions` (the ``reorient``, ``resample``,
``normalize`` and ``crop`` keys of a dataset entry):

* ``reference`` (default for files; the pipeline of ImgX-DiffSeg v0.1.0,
  ``imgx/datasets/preprocess.py``): no reorientation (the scan's own index order), resample keeping
  the pixel type with the grid's origin moved by half the spacing change, pad with 0, crop centred on
  the label's bounding box, clip (CT), z-score, rescale to [0, 1].
* ``legacy`` (diffseg before the fidelity review; phantoms keep it): reorient to LPS, resample in
  float32 keeping the origin, normalise the whole volume (MR: percentile clip + z-score; CT: clip and
  map to [-1, 1]), then centre crop/pad with the normalised minimum.

Files are written (``diffseg.io.write_nifti``) with the affine of the grid actually produced
(orientation, origin, spacing), so viewers and ``diffseg predict`` place them where the scan was.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import SimpleITK as sitk

from diffseg.choices import PREPROCESS_CHOICES
from diffseg.errors import ConfigError, DataError, fmt_mm, fmt_num, fmt_point, fmt_shape
from diffseg.io import read_nifti

log = logging.getLogger(__name__)

GEOMETRY_RTOL = 1e-3
GEOMETRY_ATOL = 1e-3  # mm; the reference's check_image_and_label used atol 1e-3 (+ rtol 1e-5)
# RAS (NIfTI affines) <-> LPS (SimpleITK physical space): flip the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class PreprocessOptions:
    """How a scan is brought onto the training grid (see the module docstring).

    Attributes:
        reorient: ``none`` (SimpleITK index order, as the reference) | ``LPS`` (``DICOMOrient``).
        resample: ``reference`` (origin + 0.5 * (new - old spacing) per physical axis, the input's pixel
            type, always resampled) | ``legacy`` (same origin, float32 images, skipped at equal spacing).
        normalize: ``reference`` (pad 0, crop, clip CT, z-score, rescale to [0, 1]) | ``legacy``
            (normalise the whole volume, then crop/pad with its minimum).
        crop: ``label_bbox`` (window centred on the labelled voxels' bounding box, as the reference)
            | ``centre`` (centred on the volume). Without a label the window is always centred.
    """

    reorient: str = "none"
    resample: str = "reference"
    normalize: str = "reference"
    crop: str = "label_bbox"

    @classmethod
    def legacy(cls) -> PreprocessOptions:
        """diffseg's preprocessing before the fidelity review (what data without these keys used)."""
        return cls(reorient="LPS", resample="legacy", normalize="legacy", crop="centre")

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any], where: str, default: PreprocessOptions | None = None
    ) -> PreprocessOptions:
        """Options from a dataset entry; absent keys take ``default``; a bad value is a ``ConfigError``."""
        default = default or cls()
        values = {}
        for key, choices in PREPROCESS_CHOICES.items():
            value = cfg.get(key, getattr(default, key))
            if value not in choices:
                raise ConfigError(f"{where}.{key}: {value!r} is not one of {list(choices)}")
            values[key] = value
        return cls(**values)

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> PreprocessOptions:
        """Options recorded in a prepared ``dataset.json``; data prepared before they were recorded
        used the legacy pipeline, so absent keys mean legacy."""
        return cls.from_config(info, "dataset.json", cls.legacy())

    def as_dict(self) -> dict[str, str]:
        """``{"reorient": ..., "resample": ..., "normalize": ..., "crop": ...}`` for ``dataset.json``."""
        return asdict(self)


class Preprocessed(NamedTuple):
    """One preprocessed case.

    Attributes:
        image: float32 ``(X, Y, Z)`` = the target shape, normalised.
        label: uint8 ``(X, Y, Z)``, or None when preprocessed without a label.
        affine: ``(4, 4)`` NIfTI (RAS) affine of the output grid, for ``diffseg.io.write_nifti``.
    """

    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray


def _read_sitk(path: str | Path) -> sitk.Image:
    """Read a file with SimpleITK, its voxels decoded and finite (any dimension, any components)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    nifti = path.name.endswith((".nii", ".nii.gz"))
    if nifti:
        # SimpleITK silently zero-fills a truncated .nii.gz and reads NaN as 0: decode the voxels
        # with nibabel first, which fails on a short file and keeps NaN/Inf.
        check_finite(read_nifti(path)[0], path)
    try:
        img = sitk.ReadImage(str(path))
        # Force the voxel data to be decoded now: a truncated .gz fails here, not later.
        voxels = sitk.GetArrayViewFromImage(img)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()
        detail = next(
            (ln for ln in reason if "rror" in ln or "exception" in ln.lower()), reason[-1] if reason else ""
        )
        raise DataError(
            f"{path}: cannot read image (unreadable or truncated file): {detail.strip()[:200]}"
        ) from None
    if not nifti:  # other formats: SimpleITK's own decode is all there is
        check_finite(voxels, path)
    return img


def read_image(path: str | Path) -> sitk.Image:
    """Read a 3D scalar medical image with SimpleITK.

    A missing, unreadable or truncated file, or one with NaN/Inf voxels, is a ``DataError``.
    """
    img = _read_sitk(path)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{path}: expected a scalar image, got {img.GetNumberOfComponentsPerPixel()} components"
        )
    if img.GetDimension() != 3:
        raise DataError(f"{path}: expected a 3D image, got {img.GetDimension()}D")
    return img


def read_channels(paths: str | Path | Sequence[str | Path], channels: int = 1) -> list[sitk.Image]:
    """The ``channels`` 3D images of one case: one file per channel, or one 4D file ``(X, Y, Z, C)``.

    Separate channel files must share their geometry (the first file's). A ``DataError`` names the
    file whose channel count or geometry is wrong.
    """
    paths = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    if len(paths) == channels:
        images = [read_image(p) for p in paths]
        for p, img in zip(paths[1:], images[1:], strict=True):
            check_geometry(images[0], img, paths[0], p, "channels")
        return images
    if len(paths) != 1:
        raise DataError(
            f"{paths[0]}: {len(paths)} channel files given, expected {channels} (or one 4D image)"
        )
    path = paths[0]
    img = _read_sitk(path)
    dim, comps = img.GetDimension(), img.GetNumberOfComponentsPerPixel()
    if dim == 4 and comps == 1:
        found = img.GetSize()[3]
        if found == channels:
            return [img[:, :, :, c] for c in range(channels)]
    elif dim == 3 and comps == channels and comps > 1:
        return [sitk.VectorIndexSelectionCast(img, c) for c in range(channels)]
    elif dim == 3:
        found = comps
    else:
        raise DataError(f"{path}: expected a 3D image or a 4D image of channels, got {dim}D")
    raise DataError(f"{path}: {found} channel(s), expected {channels}")


def to_array(img: sitk.Image) -> np.ndarray:
    """SimpleITK image -> numpy ``(X, Y, Z)``."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0))


def check_geometry(
    image: sitk.Image,
    label: sitk.Image,
    image_path: str | Path,
    label_path: str | Path,
    what: str = "image and label",
) -> None:
    """Image and label (or two channels) must share size, spacing, origin and direction (to 1e-3
    relative or 1e-3 mm).

    At least as tolerant as the reference's check (rtol 1e-5, atol 1e-3), so that every case the
    reference accepted is accepted here.
    """
    problems = []
    if image.GetSize() != label.GetSize():
        problems.append(f"size {fmt_shape(image.GetSize())} vs {fmt_shape(label.GetSize())} voxels")
    sp_i, sp_l = np.array(image.GetSpacing()), np.array(label.GetSpacing())
    if not np.allclose(sp_i, sp_l, rtol=GEOMETRY_RTOL, atol=GEOMETRY_ATOL):
        problems.append(f"spacing {fmt_mm(sp_i)} vs {fmt_mm(sp_l)}")
    o_i, o_l = np.array(image.GetOrigin()), np.array(label.GetOrigin())
    # Origins can be 0: tolerate 1e-3 of the larger of |origin| and one voxel, and at least 1e-3 mm.
    tol = GEOMETRY_ATOL + GEOMETRY_RTOL * np.maximum(np.maximum(np.abs(o_i), np.abs(o_l)), sp_i.max())
    if np.any(np.abs(o_i - o_l) > tol):
        problems.append(f"origin {fmt_point(o_i)} vs {fmt_point(o_l)}")
    if not np.allclose(image.GetDirection(), label.GetDirection(), atol=GEOMETRY_RTOL, rtol=0):
        problems.append("direction differs")
    if problems:
        raise DataError(f"{image_path} and {label_path}: {what} geometry disagree: " + "; ".join(problems))


def check_finite(arr: np.ndarray, path: str | Path) -> None:
    """NaN or Inf voxels make a ``DataError`` naming the file."""
    bad = ~np.isfinite(arr)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} NaN/Inf voxels")


def check_labels(label: np.ndarray, values: int | Sequence[int], path: str | Path) -> None:
    """Label values must be integers in ``values`` (``range(values)`` for an int); the error lists the bad."""
    found = np.unique(label)
    if isinstance(values, int):
        allowed, wanted = set(range(values)), f"outside 0..{values - 1}"
    else:
        allowed = {int(v) for v in values}
        wanted = f"not among dataset.json's labels {sorted(allowed)}"
    bad = [v for v in found.tolist() if float(v) != int(v) or int(v) not in allowed]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:20])
        raise DataError(f"{path}: label values {wanted}: {shown}")


def remap_labels(label: np.ndarray, values: Sequence[int] | None) -> np.ndarray:
    """Label values ``values[i]`` -> class ``i`` (uint8); ``values=None``: already ``0..N-1``.

    The values must have been checked (:func:`check_labels`).
    """
    if values is None:
        return label.astype(np.uint8)
    table = np.asarray(values, np.int64)
    return np.searchsorted(table, label.astype(np.int64)).astype(np.uint8)


def resample(
    img: sitk.Image, spacing: Sequence[float], is_label: bool, mode: str = "reference"
) -> sitk.Image:
    """Resample to ``spacing`` (mm) covering the same extent; linear for images, nearest for labels.

    The size is ``round(size * old / new)`` per axis (numpy rounding, half to even), the direction
    is kept and voxels outside the input are 0.

    Args:
        img: the image.
        spacing: the target spacing ``(sx, sy, sz)`` in mm, in SimpleITK index order.
        is_label: nearest-neighbour interpolation (else linear).
        mode: ``reference`` (the default, as ``PreprocessOptions``'s), as ImgX-DiffSeg v0.1.0: the
            output origin is ``origin + 0.5 * (new - old)`` added per *physical* axis (the direction
            cosines are not applied, so for flipped axes the half-voxel shift goes the other way),
            the output keeps the input's pixel type (an integer image's interpolated values are
            truncated toward 0), and an image already at ``spacing`` is still resampled. ``legacy``:
            the origin is kept, images come out float32, and an image already at ``spacing`` is
            returned as it is.
    """
    old_sp = np.array(img.GetSpacing())
    new_sp = np.array(spacing, float)
    if mode not in PREPROCESS_CHOICES["resample"]:
        raise ConfigError(f"resample: {mode!r} is not one of {list(PREPROCESS_CHOICES['resample'])}")
    if mode == "legacy" and np.allclose(old_sp, new_sp, rtol=1e-6):
        return img
    size = np.maximum(1, np.round(np.array(img.GetSize()) * old_sp / new_sp)).astype(int)
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    if mode == "reference":
        origin = np.array(img.GetOrigin()) + 0.5 * (new_sp - old_sp)
        out_type = img.GetPixelID()
    else:
        origin = np.array(img.GetOrigin())
        out_type = img.GetPixelID() if is_label else sitk.sitkFloat32
    return sitk.Resample(
        img,
        [int(s) for s in size],
        sitk.Transform(),
        interp,
        [float(o) for o in origin],
        [float(s) for s in new_sp],
        img.GetDirection(),
        0,
        out_type,
    )


def to_grid(
    img: sitk.Image, spacing: Sequence[float], options: PreprocessOptions, is_label: bool
) -> sitk.Image:
    """Reorient (``options.reorient``) and resample (``options.resample``) onto ``spacing`` (mm)."""
    if options.reorient == "LPS":
        img = sitk.DICOMOrient(img, "LPS")
    return resample(img, spacing, is_label, mode=options.resample)


def _clip_range(clip: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(c) for c in clip)
    if hi <= lo:
        raise DataError(f"clip: expected lo < hi, got [{fmt_num(lo)}, {fmt_num(hi)}]")
    return lo, hi


def normalize_intensity(
    image: np.ndarray, modality: str, clip: Sequence[float] | None = None, method: str = "reference"
) -> np.ndarray:
    """Normalise an image ``(X, Y, Z)`` to float32.

    ``method="reference"`` (the default, as ``PreprocessOptions``'s; ImgX-DiffSeg v0.1.0): CT is
    clipped to ``clip`` = [lo, hi] HU when given (``sitk.Clamp``), then z-scored with the sample
    standard deviation (``sitk.Normalize``) and rescaled so the minimum is 0 and the maximum 1
    (``sitk.RescaleIntensity``); the z-score does not change the result of the rescaling, it is kept
    to follow the reference step by step. A constant volume gives zeros. Statistics are over every
    voxel given, padding included.

    ``method="legacy"``: CT: clip to ``clip`` (default the 0.5/99.5 percentiles) and map linearly to
    [-1, 1]. MR (anything else): clip to the 0.5/99.5 percentiles (robust to hot spots), then z-score.
    """
    if method not in PREPROCESS_CHOICES["normalize"]:
        raise ConfigError(f"normalize: {method!r} is not one of {list(PREPROCESS_CHOICES['normalize'])}")
    is_ct = modality.upper() == "CT"
    if method == "reference":
        x = image.astype(np.float64)
        if is_ct and clip is not None:
            x = np.clip(x, *_clip_range(clip))
        std = float(x.std(ddof=1)) if x.size > 1 else 0.0
        if not std > 0:
            log.warning("constant image: normalised to zeros")
            return np.zeros(x.shape, np.float32)
        z = (x - x.mean()) / std
        return ((z - z.min()) / (z.max() - z.min())).astype(np.float32)
    image = image.astype(np.float32)
    if is_ct:
        # Percentiles stay numpy float64 scalars, as before (the arithmetic then runs in float64).
        lo, hi = _clip_range(clip) if clip is not None else tuple(np.percentile(image, [0.5, 99.5]))
        if hi <= lo:
            raise DataError(f"clip: expected lo < hi, got [{fmt_num(lo)}, {fmt_num(hi)}]")
        return (2.0 * (np.clip(image, lo, hi) - lo) / (hi - lo) - 1.0).astype(np.float32)
    lo, hi = np.percentile(image, [0.5, 99.5])
    image = np.clip(image, lo, hi)
    return ((image - image.mean()) / max(float(image.std()), 1e-6)).astype(np.float32)


def label_bbox(label: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """First and last index (both inclusive) of the voxels ``> 0`` per axis, or None if there are none."""
    idx = np.nonzero(label > 0)
    if len(idx[0]) == 0:
        return None
    return np.array([i.min() for i in idx]), np.array([i.max() for i in idx])


def crop_start(size: Sequence[int], shape: Sequence[int], label: np.ndarray | None = None) -> tuple[int, ...]:
    """Where the output window starts in the input, per axis (negative: that much padding before).

    An axis shorter than ``shape`` is padded symmetrically (the extra voxel after: ``pad // 2``
    before). A longer axis is cropped: centred on the volume (``(n - m) // 2``) without a label;
    with one, the window of length ``m`` starts at ``ceil((first + last - m) / 2)``, i.e. centred on
    the labelled voxels' bounding box ``[first, last]`` (a half voxel rounds up), then shifted to lie
    inside the volume. A bounding box longer than the window loses labelled voxels at both ends, as in
    the reference (ImgX-DiffSeg v0.1.0, ``imgx/datasets/util.py: try_to_get_center_crop_shape``).
    An all-background label falls back to the centred window (the reference raises there).

    Args:
        size: input size ``(X, Y, Z)``.
        shape: output size ``(X, Y, Z)``.
        label: the label ``(X, Y, Z)`` on the input grid, or None.
    """
    bbox = label_bbox(label) if label is not None else None
    if label is not None and bbox is None:
        log.warning("empty label: crop window centred on the volume")
    start = []
    for axis, (n, m) in enumerate(zip(size, shape, strict=True)):
        n, m = int(n), int(m)
        if n <= m:
            start.append(-((m - n) // 2))
        elif bbox is None:
            start.append((n - m) // 2)
        else:
            lo = -((m - int(bbox[0][axis]) - int(bbox[1][axis])) // 2)  # ceil((first + last - m) / 2)
            start.append(min(max(lo, 0), n - m))
    return tuple(start)


def apply_window(arr: np.ndarray, start: Sequence[int], shape: Sequence[int], pad_value: float) -> np.ndarray:
    """The window ``arr[start : start + shape]`` ``(X, Y, Z)``, ``pad_value`` where it leaves ``arr``."""
    out = np.full(tuple(int(s) for s in shape), pad_value, dtype=arr.dtype)
    src, dst = [], []
    for s, n, m in zip(start, arr.shape, out.shape, strict=True):
        lo, hi = max(int(s), 0), min(int(s) + m, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(s), hi - int(s)))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def crop_or_pad(arr: np.ndarray, shape: Sequence[int], pad_value: float) -> np.ndarray:
    """Centre crop and/or pad ``arr`` ``(X, Y, Z)`` to ``shape``, padding with ``pad_value``."""
    return apply_window(arr, crop_start(arr.shape, shape), shape, pad_value)


def grid_affine(grid: sitk.Image, start: Sequence[float] = (0, 0, 0)) -> np.ndarray:
    """The NIfTI (RAS) affine ``(4, 4)`` of ``grid``'s voxels from index ``start`` on.

    NIfTI voxel ``(i, j, k)`` of the written array is SimpleITK index ``start + (i, j, k)`` of ``grid``.
    """
    direction = np.array(grid.GetDirection(), float).reshape(3, 3)
    origin = np.array(grid.TransformContinuousIndexToPhysicalPoint([float(s) for s in start]))
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(grid.GetSpacing())
    affine[:3, 3] = LPS_TO_RAS @ origin
    return affine


def preprocess_case(
    image_path: str | Path | Sequence[str | Path],
    label_path: str | Path | None,
    num_classes: int,
    spacing: Sequence[float],
    shape: Sequence[int],
    modality: str,
    clip: Sequence[float] | None = None,
    options: PreprocessOptions | None = None,
    label_values: Sequence[int] | None = None,
    channels: int = 1,
) -> Preprocessed:
    """Read, validate and preprocess one case onto the training grid.

    Reference order (``options.normalize="reference"``): (reorient,) resample, pad with 0 and crop
    to ``shape`` (window from the label's bounding box when ``options.crop="label_bbox"``), then clip
    (CT) and normalise the window (padding included). Legacy order: (reorient,) resample, normalise
    the whole volume, then crop/pad with the normalised minimum. Each channel is normalised on
    its own; all share the label's crop window.

    Args:
        image_path: the scan: one file (3D, or 4D ``(X, Y, Z, C)`` when ``channels > 1``) or one
            file per channel in channel order. label_path: its label; ``None`` preprocesses the
            scan alone with a window centred on the volume.
        num_classes: label values must be ``0..num_classes-1``, unless ``label_values`` lists them
            (``label_values[i]`` becomes class ``i``).
        spacing: target spacing (mm), shape: target shape ``(X, Y, Z)``.
        modality: ``CT`` or ``MR``; clip: the CT intensity range [lo, hi] (HU) or None.
        options: the pipeline (default: the reference's).
        channels: the number of image channels.

    Returns:
        ``Preprocessed(image float32 shape (+ (C,) when channels > 1), label uint8 shape or None,
        affine (4, 4))``.
    """
    options = options or PreprocessOptions()
    first = Path(image_path) if isinstance(image_path, str | Path) else Path(image_path[0])
    imgs = read_channels(image_path, channels)
    lab = None
    if label_path is not None:
        lab = read_image(label_path)
        check_geometry(imgs[0], lab, first, label_path)
        values = sitk.GetArrayFromImage(lab)
        check_labels(values, num_classes if label_values is None else label_values, label_path)
        classes = sitk.GetImageFromArray(remap_labels(values, label_values))
        classes.CopyInformation(lab)
        lab = to_grid(classes, spacing, options, is_label=True)
    grids = [to_grid(img, spacing, options, is_label=False) for img in imgs]
    arrays = [to_array(g) for g in grids]
    label = to_array(lab).astype(np.uint8) if lab is not None else None
    if label is not None and label.shape != arrays[0].shape:
        raise DataError(f"{first} and {label_path}: sizes differ after resampling")
    start = crop_start(arrays[0].shape, shape, label if options.crop == "label_bbox" else None)
    out = []
    for image in arrays:
        if options.normalize == "legacy":
            image = normalize_intensity(image, modality, clip, "legacy")
            pad_value = float(image.min())
        else:  # the reference pads the raw intensities with 0 and normalises after the crop
            image = image.astype(np.float64)
            pad_value = 0.0
        image = apply_window(image, start, shape, pad_value)
        if options.normalize == "reference":
            image = normalize_intensity(image, modality, clip, "reference")
        out.append(image.astype(np.float32))
    if label is not None:
        kept = apply_window(label, start, shape, 0)
        lost = int(np.count_nonzero(label)) - int(np.count_nonzero(kept))
        if lost:
            log.warning("%s: %d labelled voxels fall outside the %s crop", label_path, lost, fmt_shape(shape))
        label = kept
    image = out[0] if channels == 1 else np.stack(out, axis=-1)
    return Preprocessed(image, label, grid_affine(grids[0], start))


def preprocess_scan(
    image: sitk.Image | str | Path | Sequence[sitk.Image | str | Path], info: Mapping[str, Any]
) -> tuple[np.ndarray, sitk.Image]:
    """A new scan (no label) as a trained run's data were prepared, without cropping: for ``predict``.

    Follows the options recorded in the run's ``dataset.json`` (``reorient``, ``resample``,
    ``normalize``; absent = legacy, as data prepared before they were recorded), its ``spacing``,
    ``modality``, ``clip`` and ``channels`` (absent = 1). The whole resampled scan is normalised,
    each channel on its own (training data were normalised over their crop, so the [0, 1] range can
    differ slightly where the crop cut off extremes).

    Args:
        image: the scan: an image or file, a 4D file ``(X, Y, Z, C)``, or one image/file per channel.

    Returns:
        ``(volume float32 (X, Y, Z), or (X, Y, Z, C) with several channels, grid)``: ``grid`` is the
        SimpleITK image the volume's voxels lie on (orientation, origin, spacing), to map a
        prediction back with ``sitk.Resample``.
    """
    channels = int(info.get("channels", 1))
    if isinstance(image, sitk.Image):
        images = [image]
    elif isinstance(image, str | Path):
        images = read_channels(image, channels)
    elif all(isinstance(i, sitk.Image) for i in image):
        images = list(image)
    else:
        images = read_channels(image, channels)
    if len(images) != channels:
        raise DataError(f"dataset.json: the run takes {channels} channel(s), got {len(images)} image(s)")
    options = PreprocessOptions.from_info(info)
    grids = [to_grid(img, info["spacing"], options, is_label=False) for img in images]
    volumes = [
        normalize_intensity(to_array(g), str(info.get("modality", "MR")), info.get("clip"), options.normalize)
        for g in grids
    ]
    return (volumes[0] if channels == 1 else np.stack(volumes, axis=-1)), grids[0]
