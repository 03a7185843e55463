"""Evaluate a trained run on its dataset's test split: predictions and ``test/metrics.csv``.

Uses the best checkpoint by validation mean foreground Dice. Predictions already written
for that checkpoint are reused, so an interrupted evaluation resumes where it stopped; the
stamp ``test/predictions/checkpoint.json`` ties them to the checkpoint's identity (step, run
config hash, data fingerprint, run id, from ``best.json``), and any mismatch recomputes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd

from diffseg.data import load_dataset
from diffseg.evaluate.inference import Segmenter
from diffseg.evaluate.metrics import segmentation_metrics
from diffseg.io import (
    atomic_write_json,
    atomic_write_text,
    read_affine,
    read_nifti,
    remove_temporaries,
    write_nifti,
)
from diffseg.progress import Progress

COLUMNS = [
    "uid",
    "class",
    "class_name",
    "dice",
    "nsd",
    "hd95",
    "cd",
    "missed",
    "volume_share",
    "label_voxels",
    "pred_voxels",
    "checkpoint_step",
    "config_hash",
    "data_fingerprint",
    "run_id",
]
# What identifies the parameters that made a prediction (best.json's keys besides mean_dice).
IDENTITY = ("step", "config_hash", "data_fingerprint", "run_id")


def case_metrics(
    pred: np.ndarray, label: np.ndarray, info: dict[str, Any], tolerance_mm: float, nsd_empty: str = "nan"
) -> pd.DataFrame:
    """Metrics of one case ``(X, Y, Z)`` with class names and each class's share of the volume."""
    df = segmentation_metrics(
        pred, label, int(info["num_classes"]), info["spacing"], tolerance_mm, nsd_empty=nsd_empty
    )
    df["class_name"] = [info["classes"][c] for c in df["class"]]
    df["volume_share"] = df["label_voxels"] / label.size
    return df


def evaluate_run(run_dir: str | Path, data_dir: str | Path, seed: int = 0) -> pd.DataFrame:
    """Segment every test case with the run's best parameters; write predictions and metrics.csv."""
    from diffseg.runs import load_trained

    run_dir, data_dir = Path(run_dir), Path(data_dir)
    model, params, run_cfg, _ = load_trained(run_dir)
    best = json.loads((run_dir / "best.json").read_text())
    dataset = load_dataset(data_dir)
    info = dataset.info
    uids, images, labels = dataset.split("test")
    out_dir = run_dir / "test" / "predictions"
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out_dir)  # a killed writer's partial files
    identity = {k: best.get(k) for k in IDENTITY}
    stamp = out_dir / "checkpoint.json"  # which checkpoint the predictions there come from
    if not stamp.is_file() or json.loads(stamp.read_text()) != identity:
        for old in out_dir.glob("*.nii.gz"):
            old.unlink()
        atomic_write_json(stamp, identity)

    segmenter = Segmenter(model, params, run_cfg, window=info["shape"])  # windows of the training shape
    key = jax.random.key(seed)
    tolerance = float(run_cfg.evaluate.tolerance_mm)
    frames = []
    progress = Progress(len(uids), f"test {run_cfg.run or ''}", unit="case")
    for i, (uid, image, label) in enumerate(zip(uids, images, labels, strict=True)):
        path = out_dir / f"{uid}.nii.gz"
        if path.is_file():
            pred = read_nifti(path)[0].astype(np.uint8)
        else:
            pred = segmenter.segment(image, jax.random.fold_in(key, i))
            # On the prepared label's own grid, so it overlays the case in a viewer.
            write_nifti(path, pred, info["spacing"], read_affine(data_dir / "labels" / f"{uid}.nii.gz"))
        df = case_metrics(pred, label, info, tolerance, run_cfg.evaluate.nsd_empty)
        df.insert(0, "uid", uid)
        frames.append(df)
        progress.update(1)
        progress.log(uid=uid, dice=float(np.nanmean(df["dice"])) if df["dice"].notna().any() else "nan")
    progress.close()
    metrics = pd.concat(frames, ignore_index=True)
    metrics["checkpoint_step"] = int(best["step"])
    for key in ("config_hash", "data_fingerprint", "run_id"):
        metrics[key] = best.get(key)
    metrics = metrics[COLUMNS]
    atomic_write_text(run_dir / "test" / "metrics.csv", metrics.to_csv(index=False))
    return metrics
