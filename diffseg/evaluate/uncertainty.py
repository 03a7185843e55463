"""Is a diffusion model's sample spread informative? Small pure functions over numpy arrays.

A diffusion run segments a case N times with different noise; the voxel-wise entropy of the N
label maps (``diffseg.evaluate.inference.vote_and_entropy``) is its uncertainty, and the
majority vote its segmentation. These functions score the entropy against where the vote is
wrong:

* :func:`entropy_histogram`: voxel counts per distinct entropy value (N samples give few
  distinct values), the whole of what the scores below need, and small enough to pool over
  every case of a test split.
* :func:`auroc` / :func:`auroc_from_histogram`: the probability that a wrong voxel has a higher
  entropy than a right one, ties counting one half (the Mann-Whitney U statistic / (n_wrong ×
  n_right)): 1 = entropy ranks every error above every correct voxel, 0.5 = no better than chance.
* :func:`error_rate_bins`: the share of wrong voxels per entropy bin (a calibration-style curve).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DECIMALS = 5  # entropies equal up to float32 rounding share one histogram value


def entropy_histogram(entropy: np.ndarray, wrong: np.ndarray, decimals: int = DECIMALS) -> pd.DataFrame:
    """Voxels and wrong voxels per distinct entropy value.

    Args:
        entropy: ``(X, Y, Z)`` (any shape) voxel entropy in nats.
        wrong: same shape, bool: the segmentation is wrong there.
        decimals: entropies are rounded to this many decimals before counting.

    Returns:
        Columns ``entropy`` (ascending, unique), ``voxels``, ``wrong`` (int64 counts).
    """
    entropy, wrong = np.asarray(entropy), np.asarray(wrong, dtype=bool)
    if entropy.shape != wrong.shape:
        raise ValueError(f"entropy {entropy.shape} and wrong {wrong.shape} differ in shape")
    values, inverse = np.unique(np.round(entropy.astype(np.float64), decimals), return_inverse=True)
    voxels = np.bincount(inverse.ravel(), minlength=len(values))
    errors = np.bincount(inverse.ravel(), weights=wrong.ravel(), minlength=len(values))
    return pd.DataFrame(
        {"entropy": values, "voxels": voxels.astype(np.int64), "wrong": errors.astype(np.int64)}
    )


def merge_histograms(histograms: list[pd.DataFrame]) -> pd.DataFrame:
    """Pool several :func:`entropy_histogram` results (e.g. every test case) into one."""
    if not histograms:
        return pd.DataFrame({"entropy": [], "voxels": [], "wrong": []})
    pooled = pd.concat(histograms).groupby("entropy", sort=True)[["voxels", "wrong"]].sum()
    return pooled.reset_index()


def auroc_from_histogram(histogram: pd.DataFrame) -> float:
    """AUROC of entropy for "this voxel is wrong" from an :func:`entropy_histogram`.

    Exact with ties (they count one half); NaN when every voxel is wrong or none is.
    """
    wrong = histogram["wrong"].to_numpy(np.float64)
    right = histogram["voxels"].to_numpy(np.float64) - wrong
    n_wrong, n_right = wrong.sum(), right.sum()
    if n_wrong == 0 or n_right == 0:
        return float("nan")
    right_below = np.cumsum(right) - right  # right voxels with a strictly lower entropy
    return float(np.sum(wrong * (right_below + 0.5 * right)) / (n_wrong * n_right))


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """AUROC of ``scores`` for ``positives`` (bool, same shape), ties counting one half."""
    return auroc_from_histogram(entropy_histogram(scores, positives))


def error_rate_bins(histogram: pd.DataFrame, bins: int, top: float) -> pd.DataFrame:
    """The share of wrong voxels per entropy bin: ``bins`` equal bins over ``[0, top]``.

    Args:
        histogram: an :func:`entropy_histogram` (pooled or not).
        bins: the number of bins.
        top: the upper end, e.g. ``log(min(samples, classes))``, the largest entropy N samples
            of C classes can have; larger values fall in the last bin.

    Returns:
        One row per bin: ``low, high, voxels, wrong, error_rate`` (NaN in an empty bin).
    """
    edges = np.linspace(0.0, float(top), bins + 1)
    index = np.clip(np.searchsorted(edges, histogram["entropy"].to_numpy(), side="right") - 1, 0, bins - 1)
    voxels = np.bincount(index, weights=histogram["voxels"], minlength=bins)
    wrong = np.bincount(index, weights=histogram["wrong"], minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(voxels > 0, wrong / voxels, np.nan)
    return pd.DataFrame(
        {
            "low": edges[:-1],
            "high": edges[1:],
            "voxels": voxels.astype(np.int64),
            "wrong": wrong.astype(np.int64),
            "error_rate": rate,
        }
    )
