"""Benchmark: ``segmentation_metrics`` (all four metrics, 8 classes) vs medpy's ``hd95`` alone.

A realistic 256×256×48 label map with 8 foreground classes (smooth random blobs of varied sizes),
a prediction made from it by per-class shifts, erosion/dilation, boundary flips and one spurious
false-positive blob; spacing 0.75×0.75×2.5 mm; one thread.

Run:  python benchmarks/metrics.py [--repeats 5] [--out benchmarks/results/metrics.json]
The last printed line is the speed-up medpy_hd95_time / our_all_metrics_time.
"""

from __future__ import annotations

import os

# One core: set before numpy/scipy are imported so BLAS/OpenMP pools start with one thread.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
from medpy.metric import binary as medpy_binary  # noqa: E402
from scipy import ndimage  # noqa: E402
from timing import median_seconds  # noqa: E402

from diffseg.evaluate.metrics import segmentation_metrics  # noqa: E402
from diffseg.io import atomic_write_json  # noqa: E402

SHAPE = (256, 256, 48)
SPACING = (0.75, 0.75, 2.5)
NUM_CLASSES = 9  # background + 8 organs


def make_label(rng: np.random.Generator) -> np.ndarray:
    """Label map ``SHAPE`` uint8 with classes 1..8: smooth blobs with radii ~6–45 mm."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1) * np.array(SPACING)
    noise = ndimage.gaussian_filter(rng.standard_normal(SHAPE), sigma=(6, 6, 2))
    noise /= noise.std()
    # Varied organ sizes (radii in mm along x, y, z), like liver vs gallbladder vs vessels.
    radii = [
        (45, 35, 40),
        (30, 25, 30),
        (25, 20, 25),
        (18, 15, 20),
        (15, 12, 15),
        (10, 10, 12),
        (8, 6, 10),
        (6, 5, 8),
    ]
    extent = np.array(SHAPE) * np.array(SPACING)
    for c, r in enumerate(radii, start=1):
        r = np.array(r, dtype=float)
        centre = rng.uniform(r + 5, extent - r - 5)
        # Ellipsoid with a smoothly perturbed boundary (radius modulated by ±20%).
        q = np.sqrt((((grid - centre) / r) ** 2).sum(-1))
        label[q < 1.0 + 0.2 * noise] = c
    return label


def make_prediction(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible prediction: per-class shift (0–2 voxels), erosion or dilation, boundary flips."""
    pred = np.zeros_like(label)
    for c in range(1, NUM_CLASSES):
        m = label == c
        m = np.roll(m, tuple(rng.integers(-2, 3, size=2)) + (int(rng.integers(-1, 2)),), axis=(0, 1, 2))
        op = rng.integers(0, 3)
        if op == 1:
            m = ndimage.binary_erosion(m)
        elif op == 2:
            m = ndimage.binary_dilation(m)
        pred[m] = c
    # Boundary noise: ~10% of the voxels in a 1-voxel band around the objects take the label of a
    # face neighbour (local errors, as a network makes; random classes would scatter far away).
    band = ndimage.binary_dilation(pred > 0) & ~ndimage.binary_erosion(pred > 0)
    flip = np.flatnonzero(band & (rng.random(SHAPE) < 0.1))
    coords = np.array(np.unravel_index(flip, SHAPE))
    axis = rng.integers(0, 3, size=flip.size)
    coords[axis, np.arange(flip.size)] += rng.choice([-1, 1], size=flip.size)
    coords = np.clip(coords, 0, np.array(SHAPE)[:, None] - 1)
    pred.reshape(-1)[flip] = pred[tuple(coords)]
    # One small spurious false-positive island of class 3 far from its organ (common in practice).
    pred[5:9, 240:245, 40:43] = 3
    return pred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--medpy-repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "metrics.json")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    label = make_label(rng)
    pred = make_prediction(label, rng)
    classes = range(1, NUM_CLASSES)

    ours_t, ours_all = median_seconds(
        lambda: segmentation_metrics(pred, label, NUM_CLASSES, SPACING), args.repeats
    )
    df = segmentation_metrics(pred, label, NUM_CLASSES, SPACING)

    def medpy_hd95() -> list[float]:
        return [medpy_binary.hd95(pred == c, label == c, voxelspacing=SPACING) for c in classes]

    medpy_t, medpy_all = median_seconds(medpy_hd95, args.medpy_repeats)
    ratio = medpy_t / ours_t

    print(df.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"label voxels per class: {[int((label == c).sum()) for c in classes]}")
    print(f"ours (dice+nsd+hd95+cd, 8 classes): {ours_t:.3f} s (median of {args.repeats})")
    print(f"medpy hd95 only (8 classes):        {medpy_t:.3f} s (median of {args.medpy_repeats})")
    result = {
        "volume_shape": list(SHAPE),
        "spacing_mm": list(SPACING),
        "num_foreground_classes": NUM_CLASSES - 1,
        "threads": 1,
        "machine": "2-core CPU, this machine, 1 thread",
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "medpy": importlib.metadata.version("medpy"),
        "ours_all_metrics_s": ours_t,
        "ours_all_metrics_runs_s": ours_all,
        "medpy_hd95_s": medpy_t,
        "medpy_hd95_runs_s": medpy_all,
        "ratio_medpy_hd95_over_ours_all": ratio,
        "command": "OMP_NUM_THREADS=1 python benchmarks/metrics.py",
        "per_class": json.loads(df.to_json(orient="records")),
    }
    atomic_write_json(args.out, result)
    print(f"ratio medpy_hd95_time / our_all_metrics_time = {ratio:.1f}x")


if __name__ == "__main__":
    main()
