"""Studies beyond the paper on a trained diffusion run's test split (``diffseg.matrix`` ``STUDIES``).

* :func:`sampling_steps_run`: the test split segmented with K sampling steps for each K asked
  (the trained network unchanged, the schedule resampled to K steps:
  ``GaussianDiffusion.from_config(..., num_steps=K)``), with the paper's metrics and the
  seconds each case took (compilation excluded). ``sampling_steps/metrics.csv``.
* :func:`uncertainty_run`: N samples per test case; their majority vote, voxel entropy, the
  Dice of one sample and of the vote, the mean entropy over the voxels some sample calls
  foreground, and the entropy histogram of right and wrong voxels
  (``diffseg.evaluate.uncertainty``). ``uncertainty/cases.csv`` and ``uncertainty/histogram.csv``.

Both draw case ``i``'s noise as the test job does (``fold_in(key(seed), i)``; sample ``s > 0``
of the uncertainty study from ``fold_in`` of that key with ``s``), so K = the run's
``sample_steps`` and the first sample reproduce ``test/metrics.csv``. Both carry the checkpoint
identity (``best.json``) in every row, and keep what they finished: a stopped job resumes per
K (per case), unless the checkpoint changed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from diffseg.data import load_dataset
from diffseg.errors import DataError
from diffseg.evaluate.inference import Segmenter, vote_and_entropy
from diffseg.evaluate.testset import IDENTITY, case_metrics
from diffseg.evaluate.uncertainty import entropy_histogram, merge_histograms
from diffseg.io import atomic_write_json, atomic_write_text, remove_temporaries
from diffseg.progress import Progress


class _TestSplit:
    """A trained diffusion run and its dataset's test split, and a stamped output folder."""

    def __init__(self, run_dir: str | Path, data_dir: str | Path, out: str, seed: int):
        from diffseg.runs import load_trained

        self.run_dir = Path(run_dir)
        self.model, self.params, self.run_cfg, _ = load_trained(self.run_dir)
        if not self.run_cfg.diffusion.enabled:
            raise DataError(f"{self.run_dir}: not a diffusion run; the {out} study samples a diffusion model")
        best = json.loads((self.run_dir / "best.json").read_text())
        self.identity = {k: best.get(k) for k in IDENTITY}
        dataset = load_dataset(data_dir)
        self.info = dataset.info
        self.uids, self.images, self.labels = dataset.split("test")
        self.tolerance = float(self.run_cfg.evaluate.tolerance_mm)
        self.nsd_empty = self.run_cfg.evaluate.nsd_empty
        self.out_dir = self.run_dir / out
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_temporaries(self.out_dir)
        stamp = self.out_dir / "checkpoint.json"  # which checkpoint (and seed) the partial files come from
        if not stamp.is_file() or json.loads(stamp.read_text()) != {**self.identity, "seed": seed}:
            for old in self.out_dir.glob("part-*"):
                old.unlink()
            atomic_write_json(stamp, {**self.identity, "seed": seed})

    def segmenter(self, sample_steps: int | None = None) -> Segmenter:
        cfg = self.run_cfg
        if sample_steps is not None:
            cfg = cfg.replace("diffusion.sample_steps", int(sample_steps))
        return Segmenter(self.model, self.params, cfg, window=self.info["shape"])

    def metrics(self, pred: np.ndarray, label: np.ndarray) -> pd.DataFrame:
        return case_metrics(pred, label, self.info, self.tolerance, self.nsd_empty)

    def stamped(self, frame: pd.DataFrame) -> pd.DataFrame:
        for key in IDENTITY:
            frame[key if key != "step" else "checkpoint_step"] = self.identity[key]
        return frame


def sampling_steps_run(
    run_dir: str | Path, data_dir: str | Path, steps: Sequence[int], seed: int = 0
) -> pd.DataFrame:
    """Segment the test split with each number of sampling steps in ``steps``.

    Returns (and writes to ``{run_dir}/sampling_steps/metrics.csv``) one row per K × case ×
    foreground class: ``steps, uid`` and the columns of ``test/metrics.csv``'s metrics, plus
    ``seconds`` (the case's segmentation, compilation excluded) and ``sample_steps`` (the K the
    run was configured with).
    """
    split = _TestSplit(run_dir, data_dir, "sampling_steps", seed)
    key = jax.random.key(seed)
    configured = split.run_cfg.diffusion.sample_steps
    progress = Progress(
        len(steps) * len(split.uids), f"sampling steps {split.run_cfg.run or ''}", unit="case"
    )
    frames = []
    for k in (int(k) for k in steps):
        part = split.out_dir / f"part-K{k}.csv"
        if part.is_file():  # finished before a stop, with this checkpoint (the stamp)
            frames.append(pd.read_csv(part, dtype={"uid": str}))
            progress.update(len(split.uids))
            continue
        segmenter = split.segmenter(k)
        segmenter.segment(split.images[0], key)  # compile (and warm up) outside the timing
        rows = []
        for i, (uid, image, label) in enumerate(zip(split.uids, split.images, split.labels, strict=True)):
            start = time.perf_counter()
            pred = segmenter.segment(image, jax.random.fold_in(key, i))  # numpy: the device is done
            seconds = time.perf_counter() - start
            df = split.metrics(pred, label)
            df.insert(0, "uid", uid)
            df.insert(0, "steps", k)
            df["seconds"] = seconds
            rows.append(df)
            progress.update(1)
            progress.log(K=k, uid=uid, dice=float(df["dice"].mean()), seconds=seconds)
        frame = pd.concat(rows, ignore_index=True)
        atomic_write_text(part, frame.to_csv(index=False))
        frames.append(frame)
    progress.close()
    metrics = pd.concat(frames, ignore_index=True)
    metrics["sample_steps"] = configured
    metrics = split.stamped(metrics)
    atomic_write_text(split.out_dir / "metrics.csv", metrics.to_csv(index=False))
    return metrics


def uncertainty_run(
    run_dir: str | Path, data_dir: str | Path, samples: int, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Draw ``samples`` segmentations of every test case; score their entropy against the vote's errors.

    Returns (and writes to ``{run_dir}/uncertainty/``):

    * ``cases.csv``, one row per case: ``uid, samples, dice_one`` (mean foreground Dice of the
      first sample, the test job's), ``dice_vote`` (of the majority vote), ``mean_entropy`` (nats,
      over the voxels some sample labels foreground: available without the truth, and not
      diluted by the background), ``foreground_voxels`` (those voxels), ``wrong_voxels`` (where
      the vote differs from the truth), ``voxels``, ``max_entropy`` (``log(min(samples,
      classes))``) and the checkpoint identity.
    * ``histogram.csv``: voxels and wrong voxels per distinct entropy value, over every voxel of
      every case (``entropy_histogram``), from which AUROC and error rates per bin follow.
    """
    if samples < 2:
        raise DataError(f"uncertainty: {samples} sample(s); the spread needs at least 2")
    split = _TestSplit(run_dir, data_dir, "uncertainty", seed)
    key = jax.random.key(seed)
    segmenter = split.segmenter()
    num_classes = int(split.info["num_classes"])
    progress = Progress(len(split.uids), f"uncertainty {split.run_cfg.run or ''}", unit="case")
    rows, histograms = [], []
    for i, (uid, image, label) in enumerate(zip(split.uids, split.images, split.labels, strict=True)):
        part = split.out_dir / f"part-{uid}.json"
        if part.is_file():
            saved = json.loads(part.read_text())
            if saved["row"]["samples"] == samples:
                rows.append(saved["row"])
                histograms.append(pd.DataFrame(saved["histogram"]))
                progress.update(1)
                continue
        case_key = jax.random.fold_in(key, i)
        keys = [case_key] + [jax.random.fold_in(case_key, s) for s in range(1, samples)]
        maps = np.stack([segmenter.segment(image, k) for k in keys])  # (samples, X, Y, Z)
        vote, entropy = vote_and_entropy(maps, num_classes)
        wrong = vote != label
        foreground = (maps > 0).any(axis=0)
        row = {
            "uid": uid,
            "samples": samples,
            "dice_one": float(split.metrics(maps[0], label)["dice"].mean()),
            "dice_vote": float(split.metrics(vote, label)["dice"].mean()),
            "mean_entropy": float(entropy[foreground].mean()) if foreground.any() else 0.0,
            "foreground_voxels": int(foreground.sum()),
            "wrong_voxels": int(wrong.sum()),
            "voxels": int(wrong.size),
            "max_entropy": math.log(min(samples, num_classes)),
        }
        histogram = entropy_histogram(entropy, wrong)
        atomic_write_json(part, {"row": row, "histogram": histogram.to_dict(orient="list")})
        rows.append(row)
        histograms.append(histogram)
        progress.update(1)
        progress.log(
            uid=uid, dice_one=row["dice_one"], dice_vote=row["dice_vote"], entropy=row["mean_entropy"]
        )
    progress.close()
    cases = split.stamped(pd.DataFrame(rows))
    pooled = merge_histograms(histograms)
    atomic_write_text(split.out_dir / "histogram.csv", pooled.to_csv(index=False))
    atomic_write_text(split.out_dir / "cases.csv", cases.to_csv(index=False))
    return cases, pooled
