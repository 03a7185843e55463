"""The training loop of one run: steps, progress, logs, validation, checkpoints and resume.

Writes into ``run_dir``: ``train_log.csv`` (step, loss, lr, seconds, steps_per_s),
``valid.csv`` (step, mean_dice per checkpoint), ``best.json``, ``dataset.json`` (the data's
description, needed to preprocess new scans) and the orbax checkpoints. A run killed at any
point and started again continues from its latest checkpoint with the same randomness, so
it ends with the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from diffseg.data import load_dataset
from diffseg.errors import ConfigError
from diffseg.evaluate.inference import Segmenter
from diffseg.evaluate.metrics import dice
from diffseg.io import atomic_write_json, atomic_write_text
from diffseg.parallel import batch_sharding, data_mesh, replicated
from diffseg.runs import RunCheckpoints, abstract, build_model
from diffseg.train.feed import BatchFeeder
from diffseg.train.plan import choose_micro_batch
from diffseg.train.step import build_optimizer, init_state, make_train_step

LOG_COLUMNS = ["step", "loss", "lr", "seconds", "steps_per_s", "skipped"]
MAX_SKIPPED_IN_A_ROW = 100  # non-finite updates skipped in a row before the run stops with an error


def mean_foreground_dice(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in ``label`` or ``pred`` (both ``(X, Y, Z)``)."""
    scores = [dice(pred == c, label == c) for c in range(1, num_classes)]
    return float(np.nanmean(scores)) if not np.all(np.isnan(scores)) else float("nan")


def _config_hash(run_cfg: dict[str, Any]) -> str:
    """What the trained parameters depend on (not the evaluation settings)."""
    keys = ("model", "diffusion", "loss", "optim", "train", "dataset")
    text = json.dumps({k: run_cfg.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_outputs(run_dir: Path, logs: dict[str, Any]) -> None:
    atomic_write_text(
        run_dir / "train_log.csv", pd.DataFrame(logs["train"], columns=LOG_COLUMNS).to_csv(index=False)
    )
    valid = pd.DataFrame(logs["valid"], columns=["step", "mean_dice"])
    atomic_write_text(run_dir / "valid.csv", valid.to_csv(index=False))
    if logs["best"] is not None:
        atomic_write_json(run_dir / "best.json", logs["best"])


def validate(
    segmenter: Segmenter, images: np.ndarray, labels: np.ndarray, num_classes: int, key: jax.Array
) -> float:
    """Mean over validation cases ``(N, X, Y, Z)`` of the mean foreground Dice (K-step sampling)."""
    scores = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        pred = segmenter.segment(image, jax.random.fold_in(key, i))
        scores.append(mean_foreground_dice(pred, label, num_classes))
    return float(np.nanmean(scores))


def train_run(run_cfg: dict[str, Any], data_dir: str | Path, run_dir: str | Path) -> dict[str, Any]:
    """Train one run to ``train.steps`` (resuming if checkpoints exist); returns ``best.json``'s dict."""
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_cfg = run_cfg["train"]
    total, every = int(train_cfg["steps"]), int(train_cfg["checkpoint_every"])
    if total < 1 or every < 1:
        raise ConfigError(f"run {run_cfg.get('run')!r}: train.steps and train.checkpoint_every must be >= 1")

    dataset = load_dataset(data_dir)
    num_classes = int(dataset.info["num_classes"])
    _, train_images, train_labels = dataset.split("train")
    _, valid_images, valid_labels = dataset.split("valid")
    atomic_write_json(run_dir / "dataset.json", dataset.info)
    config_text = yaml.safe_dump(dict(run_cfg), sort_keys=False)
    config_path = run_dir / "config.yaml"  # the workflow writes it first: keep its mtime if equal
    if not config_path.is_file() or yaml.safe_load(config_path.read_text()) != yaml.safe_load(config_text):
        atomic_write_text(config_path, config_text)

    model = build_model(run_cfg, num_classes)
    tx, schedule = build_optimizer(run_cfg)
    mesh = data_mesh()
    copies = replicated(mesh)
    key = jax.random.key(int(train_cfg["seed"]))
    key_init, key_steps, key_valid = jax.random.split(key, 3)
    state = jax.device_put(init_state(model, tx, dataset.shape, key_init), copies)

    checkpoints = RunCheckpoints(run_dir)
    config_hash = _config_hash(run_cfg)
    logs: dict[str, Any] = {
        "config_hash": config_hash,
        "train": [],
        "valid": [],
        "best": None,
        "seconds": 0.0,
    }
    if checkpoints.latest_step() is not None:
        restored, saved_logs = checkpoints.restore(abstract(state))
        if saved_logs.get("config_hash") == config_hash:
            state, logs = restored, saved_logs
            tqdm.write(f"resuming {run_dir} from step {int(state['step'])}")
        else:  # the run's config changed: the old checkpoints belong to another experiment
            tqdm.write(f"{run_dir}: run config changed since the last checkpoint; starting over")
            checkpoints.close()
            for sub in ("checkpoints", "best"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
            checkpoints = RunCheckpoints(run_dir)

    # The data stay on the host; each step's volumes are sent ahead of the step (train/feed.py).
    choice = choose_micro_batch(model, tx, run_cfg, num_classes, mesh, dataset.shape)
    if choice.how == "auto":
        tqdm.write(f"{run_dir}: {choice.describe()}")
    step_fn = make_train_step(choice.model, tx, run_cfg, num_classes, mesh, choice.micro_batch)
    batch_size, seed = int(train_cfg["batch_size"]), int(train_cfg["seed"])
    feeder = BatchFeeder(
        train_images, train_labels, batch_size, seed, batch_sharding(mesh), int(state["step"]), total
    )
    batches = iter(feeder)
    segmenter = Segmenter(model, state["params"], run_cfg)  # compiled once, reused at each validation
    start = int(state["step"])
    log_every = max(1, int(train_cfg["log_every"]))
    clock, seconds_before = time.perf_counter(), float(logs["seconds"])
    window_start, window_step = clock, start
    skipped_before, skipped_run = int(state["skipped"]), 0
    progress = tqdm(
        total=total,
        initial=start,
        desc=f"train {run_cfg.get('run', '')}",
        unit="step",
        dynamic_ncols=True,
        mininterval=2.0,
    )
    for step in range(start + 1, total + 1):
        images, labels = next(batches)
        state, loss = step_fn(state, images, labels, key_steps)
        if step % log_every == 0 or step == total:
            loss = float(loss)  # blocks: only on logging steps, so dispatch stays asynchronous
            skipped = int(state["skipped"])  # non-finite updates skipped so far (as the reference)
            if skipped > skipped_before:
                tqdm.write(
                    f"{run_dir}: step {step}: {skipped} update(s) skipped so far (non-finite gradients)"
                )
            all_skipped = skipped - skipped_before >= step - window_step  # every update of the window
            skipped_run = skipped_run + step - window_step if all_skipped else 0
            if skipped_run >= MAX_SKIPPED_IN_A_ROW:
                raise FloatingPointError(
                    f"{run_dir}: loss is {loss} at step {step}, the last {skipped_run} updates skipped"
                    " (non-finite); lower optim.learning_rate"
                )
            skipped_before = skipped
            now = time.perf_counter()
            rate = (step - window_step) / max(now - window_start, 1e-9)
            window_start, window_step = now, step
            lr = float(schedule(step - 1))
            logs["train"].append([step, loss, lr, seconds_before + now - clock, rate, skipped])
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        progress.update(1)
        if step % every == 0 or step == total:
            segmenter.params = state["params"]
            score = validate(
                segmenter, valid_images, valid_labels, num_classes, jax.random.fold_in(key_valid, step)
            )
            logs["valid"].append([step, score])
            if logs["best"] is None or score > logs["best"]["mean_dice"]:
                logs["best"] = {"step": step, "mean_dice": score}
                checkpoints.save_best(step, state["params"])
            logs["seconds"] = seconds_before + time.perf_counter() - clock
            checkpoints.save(step, state, logs)
            _write_outputs(run_dir, logs)
            tqdm.write(
                f"step {step}: validation mean foreground Dice {score:.4f}"
                f" (best {logs['best']['mean_dice']:.4f})"
            )
    progress.close()
    feeder.close()
    checkpoints.close()
    if start == total:  # already complete: the outputs Snakemake may have removed, from the logs
        _write_outputs(run_dir, logs)
    return logs["best"]
