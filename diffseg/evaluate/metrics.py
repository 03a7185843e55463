"""Segmentation metrics: Dice, NSD, HD95 and centroid distance, per foreground class.

Small pure numpy/scipy functions in the style of DeepMind's ``surface-distance``, with the voxel
spacing given explicitly in mm, in array axis order. Definitions: docs/DEFINITIONS.md,
"Metrics":

- Dice = 2|P∩G| / (|P|+|G|); NaN only when both masks are empty.
- Surface voxels = mask XOR binary_erosion(mask) with scipy's default face-connected structuring
  element and ``border_value=0`` (an object touching the array edge has a surface there).
- Directed surface distances (mm): for every surface voxel of A, the Euclidean distance to the
  nearest surface voxel of B, by ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``.
  This is exactly medpy's ``__surface_distances``.
- HD95 = max(P95(d(P→G)), P95(d(G→P))), numpy's default linear interpolation.
  NB: medpy 0.5.2's ``hd95`` pools both directed sets before taking one percentile,
  ``percentile(hstack(d(P→G), d(G→P)), 95)``; that value is never larger than ours and equals it
  when both directions agree (e.g. symmetric errors). Both are built from the same distances.
- NSD(τ) = (#{s ∈ S_P : d(s, S_G) <= τ} + #{s ∈ S_G : d(s, S_P) <= τ}) / (|S_P| + |S_G|).
  A class empty in exactly one mask has no surface pairs: its NSD is NaN (``nsd_empty="nan"``,
  the reference's, so means leave it out) or 0 (``"zero"``); Dice is 0 there either way.
- CD = Euclidean distance (mm) between the centroids (mean voxel index × spacing).

Speed: every distance is computed on the bounding box of the union of the two masks, padded by
one voxel. This is exact: both surfaces lie inside the box, so the nearest surface voxel of any
point of the box is inside the box too, and the erosion sees the same (zero) neighbours outside.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from diffseg.errors import fmt_mm, fmt_num

__all__ = [
    "METRIC_COLUMNS",
    "centroid_distance",
    "dice",
    "hd95",
    "nsd",
    "segmentation_metrics",
    "surface_distances",
    "surface_mask",
]

#: NSD of a class empty in exactly one mask: NaN (the reference's) or 0.
NSD_EMPTY = ("nan", "zero")
#: Column order of the DataFrame returned by :func:`segmentation_metrics`.
METRIC_COLUMNS = ("class", "dice", "nsd", "hd95", "cd", "missed", "label_voxels", "pred_voxels")

Box = tuple[slice, ...]


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def _as_spacing(spacing: Sequence[float] | np.ndarray, ndim: int) -> np.ndarray:
    """Spacing as a float64 array of shape ``(ndim,)``, all finite and > 0 (mm)."""
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.shape != (ndim,):
        raise ValueError(f"spacing must have one value per array axis ({ndim}), got {fmt_mm(sp)}")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be finite and > 0 mm, got {fmt_mm(sp)}")
    return sp


def _check_pair(pred_mask: np.ndarray, label_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two binary masks as bool arrays of the same shape."""
    p, g = np.asarray(pred_mask), np.asarray(label_mask)
    if p.shape != g.shape:
        raise ValueError(f"pred shape {p.shape} and label shape {g.shape} differ")
    if p.ndim == 0:
        raise ValueError("masks must have at least one axis")
    return p.astype(bool, copy=False), g.astype(bool, copy=False)


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------
def _bbox(mask: np.ndarray) -> Box | None:
    """Tight bounding box of a bool mask as slices, or None when the mask is empty."""
    found = ndimage.find_objects(mask.astype(np.uint8, copy=False), max_label=1)
    return found[0]


def _union_box(a: Box | None, b: Box | None, shape: tuple[int, ...], margin: int = 1) -> Box:
    """Bounding box of the union of two boxes (at least one not None), padded and clipped."""
    boxes = [x for x in (a, b) if x is not None]
    return tuple(
        slice(max(min(x[d].start for x in boxes) - margin, 0), min(max(x[d].stop for x in boxes) + margin, n))
        for d, n in enumerate(shape)
    )


def surface_mask(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a binary mask: ``mask XOR erosion(mask)`` (face connectivity, border 0).

    Args:
        mask: bool array, any shape.
    Returns:
        bool array, same shape.
    """
    mask = np.asarray(mask, dtype=bool)
    # border_value=0: voxels on the array edge count as surface (same as medpy).
    return mask ^ ndimage.binary_erosion(mask, border_value=0)


def _directed_distances(p: np.ndarray, g: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both directed surface-distance sets (mm) of two non-empty bool masks on the same grid."""
    sp_p, sp_g = surface_mask(p), surface_mask(g)
    # EDT of the complement of a surface = distance (mm) to the nearest voxel of that surface.
    d_pg = ndimage.distance_transform_edt(~sp_g, sampling=spacing)[sp_p]
    d_gp = ndimage.distance_transform_edt(~sp_p, sampling=spacing)[sp_g]
    return d_pg, d_gp


def surface_distances(
    pred_mask: np.ndarray,
    label_mask: np.ndarray,
    spacing: Sequence[float] | np.ndarray,
    crop: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances between two non-empty binary masks.

    Args:
        pred_mask, label_mask: bool (or 0/1) arrays of the same shape, e.g. ``(X, Y, Z)``.
        spacing: voxel size in mm per array axis, length ``ndim``.
        crop: compute on the padded bounding box of the union (exact; only faster).
    Returns:
        ``(d_pred_to_label, d_label_to_pred)``: float64 arrays of shape ``(|S_P|,)`` and
        ``(|S_G|,)`` in mm, surface voxels in C order.
    Raises:
        ValueError: if either mask is empty, or shapes/spacing do not match.
    """
    p, g = _check_pair(pred_mask, label_mask)
    sp = _as_spacing(spacing, p.ndim)
    bp, bg = _bbox(p), _bbox(g)
    if bp is None or bg is None:
        raise ValueError("surface distances need two non-empty masks")
    if crop:
        box = _union_box(bp, bg, p.shape)
        p, g = p[box], g[box]
    return _directed_distances(p, g, sp)


# --------------------------------------------------------------------------------------------
# Metrics on distance sets / binary masks
# --------------------------------------------------------------------------------------------
def _hd95_from(d_pg: np.ndarray, d_gp: np.ndarray) -> float:
    """max of the two directed 95th percentiles (mm), numpy's linear interpolation."""
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def _nsd_from(d_pg: np.ndarray, d_gp: np.ndarray, tolerance_mm: float) -> float:
    """Share of the surface voxels of both masks within ``tolerance_mm`` (<=) of the other."""
    within = np.count_nonzero(d_pg <= tolerance_mm) + np.count_nonzero(d_gp <= tolerance_mm)
    return within / (d_pg.size + d_gp.size)


def dice(pred_mask: np.ndarray, label_mask: np.ndarray) -> float:
    """Dice = 2|P∩G| / (|P|+|G|) of two binary masks of the same shape; NaN if both are empty."""
    p, g = _check_pair(pred_mask, label_mask)
    denom = np.count_nonzero(p) + np.count_nonzero(g)
    return float("nan") if denom == 0 else 2.0 * np.count_nonzero(p & g) / denom


def hd95(pred_mask: np.ndarray, label_mask: np.ndarray, spacing: Sequence[float] | np.ndarray) -> float:
    """95% Hausdorff distance (mm) of two binary masks; NaN if either mask is empty."""
    p, g = _check_pair(pred_mask, label_mask)
    if not p.any() or not g.any():
        return float("nan")
    return _hd95_from(*surface_distances(p, g, spacing))


def nsd(
    pred_mask: np.ndarray,
    label_mask: np.ndarray,
    spacing: Sequence[float] | np.ndarray,
    tolerance_mm: float = 1.0,
) -> float:
    """Normalised surface Dice at ``tolerance_mm``; 0 if exactly one mask is empty, NaN if both."""
    p, g = _check_pair(pred_mask, label_mask)
    has_p, has_g = bool(p.any()), bool(g.any())
    if not (has_p and has_g):
        return float("nan") if not (has_p or has_g) else 0.0
    return _nsd_from(*surface_distances(p, g, spacing), tolerance_mm)


def _centroid(mask: np.ndarray, offset: Sequence[int]) -> np.ndarray:
    """Centroid (voxel index units, shape ``(ndim,)``) of a non-empty bool mask located at ``offset``."""
    n = np.count_nonzero(mask)
    out = np.empty(mask.ndim)
    for d in range(mask.ndim):
        # Integer projections: the numerator is exact, so cropping does not change the result.
        counts = mask.sum(axis=tuple(a for a in range(mask.ndim) if a != d), dtype=np.int64)
        idx = np.arange(offset[d], offset[d] + mask.shape[d], dtype=np.int64)
        out[d] = int(counts @ idx) / n
    return out


def _cd_from(p: np.ndarray, g: np.ndarray, spacing: np.ndarray, offset: Sequence[int]) -> float:
    return float(np.linalg.norm((_centroid(p, offset) - _centroid(g, offset)) * spacing))


def centroid_distance(
    pred_mask: np.ndarray, label_mask: np.ndarray, spacing: Sequence[float] | np.ndarray
) -> float:
    """Distance (mm) between the centroids of two binary masks; NaN if either mask is empty."""
    p, g = _check_pair(pred_mask, label_mask)
    sp = _as_spacing(spacing, p.ndim)
    if not p.any() or not g.any():
        return float("nan")
    return _cd_from(p, g, sp, (0,) * p.ndim)


# --------------------------------------------------------------------------------------------
# Multi-class entry point
# --------------------------------------------------------------------------------------------
def _check_labels(
    pred: np.ndarray, label: np.ndarray, num_classes: int, spacing: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a pair of label maps; returns ``(pred, label, spacing)`` ready for find_objects."""
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {pred.shape} and label shape {label.shape} differ")
    if pred.ndim not in (2, 3):
        raise ValueError(f"label maps must be 2D or 3D, got shape {pred.shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (background + classes), got {num_classes!r}")
    sp = _as_spacing(spacing, pred.ndim)
    out = []
    for name, arr in (("pred", pred), ("label", label)):
        if arr.dtype == bool:
            arr = arr.view(np.uint8)
        elif arr.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}")
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(f"{name} values must lie in [0, {num_classes - 1}], got [{lo}, {hi}]")
        out.append(arr)
    return out[0], out[1], sp


def segmentation_metrics(
    pred: np.ndarray,
    label: np.ndarray,
    num_classes: int,
    spacing: Sequence[float] | np.ndarray,
    tolerance_mm: float = 1.0,
    nsd_empty: str = "nan",
) -> pd.DataFrame:
    """Dice, NSD, HD95 and centroid distance for every foreground class of two label maps.

    Args:
        pred: integer label map, shape ``(X, Y, Z)`` or ``(X, Y)``, values in ``[0, num_classes)``.
        label: ground truth, same shape and value range as ``pred``.
        num_classes: number of classes including background 0.
        spacing: voxel size in mm per array axis, length ``ndim``.
        tolerance_mm: NSD tolerance τ in mm (a surface voxel counts if its distance is <= τ).
        nsd_empty: NSD of a class empty in exactly one mask: ``"nan"`` (left out of means, as the
            reference averages it) or ``"zero"``.
    Returns:
        DataFrame with one row per class ``1..num_classes-1`` and columns ``class`` (int),
        ``dice``, ``nsd`` (in [0, 1]), ``hd95``, ``cd`` (mm), ``missed`` (bool: in the label, not
        predicted), ``label_voxels``, ``pred_voxels`` (int). Conventions for empty masks:
        label only (miss) → dice 0, nsd NaN (0 with ``nsd_empty="zero"``), hd95/cd NaN, missed
        True; prediction only (false positive) → the same with missed False; both empty → all
        NaN, missed False.
    Raises:
        ValueError: mismatched shapes, spacing length != ndim, non-integer labels, values out of
        range, bad ``num_classes`` or ``tolerance_mm``.
    """
    pred, label, sp = _check_labels(pred, label, num_classes, spacing)
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {fmt_num(tolerance_mm)}")
    if nsd_empty not in NSD_EMPTY:
        raise ValueError(f"nsd_empty must be one of {', '.join(NSD_EMPTY)}, got {nsd_empty!r}")
    # One pass per map gives every class's bounding box, instead of num_classes full-volume scans.
    boxes_g = ndimage.find_objects(label, max_label=num_classes - 1)
    boxes_p = ndimage.find_objects(pred, max_label=num_classes - 1)

    nan = float("nan")
    rows = []
    for c in range(1, num_classes):
        bg, bp = boxes_g[c - 1], boxes_p[c - 1]
        row: dict[str, object] = {
            "class": c,
            "dice": nan,
            "nsd": nan,
            "hd95": nan,
            "cd": nan,
            "missed": False,
            "label_voxels": 0,
            "pred_voxels": 0,
        }
        if bg is None and bp is None:
            rows.append(row)
            continue
        box = _union_box(bg, bp, label.shape)
        g = label[box] == c
        p = pred[box] == c
        n_g, n_p = np.count_nonzero(g), np.count_nonzero(p)
        row.update(label_voxels=n_g, pred_voxels=n_p)
        if bp is None or bg is None:
            # Miss (label only) or false positive (prediction only): no surface pairs exist.
            row.update(dice=0.0, nsd=nan if nsd_empty == "nan" else 0.0, missed=bp is None)
        else:
            d_pg, d_gp = _directed_distances(p, g, sp)
            row.update(
                dice=2.0 * np.count_nonzero(p & g) / (n_p + n_g),
                nsd=_nsd_from(d_pg, d_gp, tolerance_mm),
                hd95=_hd95_from(d_pg, d_gp),
                cd=_cd_from(p, g, sp, [s.start for s in box]),
            )
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(METRIC_COLUMNS))
    return df.astype({"class": np.int64, "missed": bool, "label_voxels": np.int64, "pred_voxels": np.int64})
