"""Preprocessing with SimpleITK: read, validate, resample, clip/normalise, centre crop/pad, write.

Arrays returned here are in NIfTI order ``(X, Y, Z)`` (SimpleITK's ``GetArrayFromImage`` gives
``(Z, Y, X)``, so every conversion transposes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from diffseg.errors import DataError
from diffseg.io import atomic_path

GEOMETRY_RTOL = 1e-3


def read_image(path: str | Path) -> sitk.Image:
    """Read a medical image with SimpleITK.

    A missing, unreadable or truncated file, or one with NaN/Inf voxels, is a ``DataError``.
    """
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
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{path}: expected a scalar image, got {img.GetNumberOfComponentsPerPixel()} components"
        )
    if img.GetDimension() != 3:
        raise DataError(f"{path}: expected a 3D image, got {img.GetDimension()}D")
    if not nifti:  # other formats: SimpleITK's own decode is all there is
        check_finite(voxels, path)
    return img


def to_array(img: sitk.Image) -> np.ndarray:
    """SimpleITK image -> numpy ``(X, Y, Z)``."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0))


def check_geometry(
    image: sitk.Image, label: sitk.Image, image_path: str | Path, label_path: str | Path
) -> None:
    """Image and label must share size, spacing, origin and direction (to 1e-3 relative)."""
    problems = []
    if image.GetSize() != label.GetSize():
        problems.append(f"size {image.GetSize()} vs {label.GetSize()}")
    sp_i, sp_l = np.array(image.GetSpacing()), np.array(label.GetSpacing())
    if not np.allclose(sp_i, sp_l, rtol=GEOMETRY_RTOL, atol=0):
        problems.append(f"spacing {tuple(sp_i.round(4))} vs {tuple(sp_l.round(4))}")
    o_i, o_l = np.array(image.GetOrigin()), np.array(label.GetOrigin())
    # Origins can be 0: tolerate 1e-3 of the larger of |origin| and one voxel.
    tol = GEOMETRY_RTOL * np.maximum(np.maximum(np.abs(o_i), np.abs(o_l)), sp_i.max())
    if np.any(np.abs(o_i - o_l) > tol):
        problems.append(f"origin {tuple(o_i.round(3))} vs {tuple(o_l.round(3))}")
    if not np.allclose(image.GetDirection(), label.GetDirection(), atol=GEOMETRY_RTOL, rtol=0):
        problems.append("direction differs")
    if problems:
        raise DataError(
            f"{image_path} and {label_path}: image and label geometry disagree: " + "; ".join(problems)
        )


def check_finite(arr: np.ndarray, path: str | Path) -> None:
    """NaN or Inf voxels make a ``DataError`` naming the file."""
    bad = ~np.isfinite(arr)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} NaN/Inf voxels")


def check_labels(label: np.ndarray, num_classes: int, path: str | Path) -> None:
    """Label values must be integers in ``0..num_classes-1``; the error lists the bad values."""
    values = np.unique(label)
    bad = [v for v in values.tolist() if v < 0 or v >= num_classes or float(v) != int(v)]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:20])
        raise DataError(f"{path}: label values outside 0..{num_classes - 1}: {shown}")


def resample(img: sitk.Image, spacing: Sequence[float], is_label: bool) -> sitk.Image:
    """Resample to ``spacing`` (mm) covering the same extent; linear for images, nearest for labels."""
    old_sp = np.array(img.GetSpacing())
    new_sp = np.array(spacing, float)
    if np.allclose(old_sp, new_sp, rtol=1e-6):
        return img
    size = np.maximum(1, np.round(np.array(img.GetSize()) * old_sp / new_sp)).astype(int)
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    out_type = img.GetPixelID() if is_label else sitk.sitkFloat32
    return sitk.Resample(
        img,
        [int(s) for s in size],
        sitk.Transform(),
        interp,
        img.GetOrigin(),
        [float(s) for s in new_sp],
        img.GetDirection(),
        0,
        out_type,
    )


def normalize_intensity(image: np.ndarray, modality: str, clip: Sequence[float] | None = None) -> np.ndarray:
    """Normalise an image ``(X, Y, Z)`` to float32.

    CT: clip to ``clip`` = [lo, hi] HU (default the 0.5/99.5 percentiles) and map linearly to [-1, 1].
    MR (anything else): clip to the 0.5/99.5 percentiles (robust to hot spots), then z-score.
    """
    image = image.astype(np.float32)
    if modality.upper() == "CT":
        lo, hi = (float(c) for c in clip) if clip is not None else np.percentile(image, [0.5, 99.5])
        if hi <= lo:
            raise DataError(f"clip: expected lo < hi, got [{lo}, {hi}]")
        return (2.0 * (np.clip(image, lo, hi) - lo) / (hi - lo) - 1.0).astype(np.float32)
    lo, hi = np.percentile(image, [0.5, 99.5])
    image = np.clip(image, lo, hi)
    return ((image - image.mean()) / max(float(image.std()), 1e-6)).astype(np.float32)


def crop_or_pad(arr: np.ndarray, shape: Sequence[int], pad_value: float) -> np.ndarray:
    """Centre crop and/or pad ``arr`` ``(X, Y, Z)`` to ``shape``, padding with ``pad_value``."""
    out = np.full(tuple(int(s) for s in shape), pad_value, dtype=arr.dtype)
    src, dst = [], []
    for n, m in zip(arr.shape, out.shape, strict=True):
        if n >= m:  # crop
            start = (n - m) // 2
            src.append(slice(start, start + m))
            dst.append(slice(0, m))
        else:  # pad
            start = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def preprocess_case(
    image_path: str | Path,
    label_path: str | Path,
    num_classes: int,
    spacing: Sequence[float],
    shape: Sequence[int],
    modality: str,
    clip: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read, validate and preprocess one case.

    Returns:
        image float32 ``shape`` = ``(X, Y, Z)`` (normalised), label uint8 ``(X, Y, Z)``.
    """
    img = read_image(image_path)
    lab = read_image(label_path)
    check_geometry(img, lab, image_path, label_path)
    check_labels(sitk.GetArrayViewFromImage(lab), num_classes, label_path)
    # Reorient to one axis convention so every case has the same array layout.
    img = sitk.DICOMOrient(img, "LPS")
    lab = sitk.DICOMOrient(sitk.Cast(lab, sitk.sitkUInt8), "LPS")
    img = resample(img, spacing, is_label=False)
    lab = resample(lab, spacing, is_label=True)
    image = to_array(img).astype(np.float32)
    label = to_array(lab).astype(np.uint8)
    image = normalize_intensity(image, modality, clip)
    image = crop_or_pad(image, shape, float(image.min()))
    label = crop_or_pad(label, shape, 0)
    return image, label


def write_nifti(path: str | Path, array: np.ndarray, spacing: Sequence[float]) -> None:
    """Write ``array`` ``(X, Y, Z)`` atomically as NIfTI with an affine carrying ``spacing`` (mm).

    Arrays here are in LPS order (preprocessing reorients with ``DICOMOrient(..., "LPS")``), and
    NIfTI affines are RAS: the first two axes get negative steps, so that SimpleITK (``predict``)
    and viewers read the file in the same orientation as the arrays the network was trained on.
    """
    sx, sy, sz = (float(s) for s in spacing)
    affine = np.diag([-sx, -sy, sz, 1.0])
    img = nib.Nifti1Image(array, affine)
    img.header.set_zooms(tuple(float(s) for s in spacing))
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def read_nifti(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a NIfTI written by :func:`write_nifti`: array ``(X, Y, Z)`` and spacing (mm)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for corrupt files
        raise DataError(
            f"{path}: cannot read image (unreadable or truncated file): {type(err).__name__}: {err}"
        ) from None
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return arr, zooms  # type: ignore[return-value]
