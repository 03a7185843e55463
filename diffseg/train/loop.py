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
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import yaml

from diffseg.data import load_dataset
from diffseg.data.prepare import data_fingerprint
from diffseg.errors import ConfigError
from diffseg.evaluate.inference import Segmenter
from diffseg.evaluate.metrics import dice
from diffseg.io import atomic_write_json, atomic_write_text, remove_temporaries
from diffseg.parallel import batch_sharding, data_mesh, replicated, training_devices
from diffseg.progress import Progress
from diffseg.runs import RunCheckpoints, abstract, build_model
from diffseg.train.feed import BatchFeeder
from diffseg.train.plan import choose_micro_batch
from diffseg.train.step import build_optimizer, init_state, make_train_step

# session: which start of the process ran the step (0 first, 1 after the first resume, ...);
# skipped: updates skipped so far because their loss or gradients were not finite.
LOG_COLUMNS = ["step", "loss", "lr", "seconds", "steps_per_s", "session", "skipped"]
MAX_SKIPPED_IN_A_ROW = 100  # non-finite updates skipped in a row before the run stops with an error


def mean_foreground_dice(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in ``label`` or ``pred`` (both ``(X, Y, Z)``)."""
    scores = [dice(pred == c, label == c) for c in range(1, num_classes)]
    return float(np.nanmean(scores)) if not np.all(np.isnan(scores)) else float("nan")


# Settings that change what is logged, validated or how long it trains, not the parameters of a
# given step: changing them continues the run instead of starting it over. ``devices`` only splits
# a step's arithmetic (the same update up to float rounding): a run continues on another count.
NOT_HASHED = {"train": ("steps", "log_every", "checkpoint_every", "platform", "devices")}


def config_hash(run_cfg: dict[str, Any]) -> str:
    """What the trained parameters of a step depend on (not logging, evaluation or run length)."""
    keys = ("model", "diffusion", "loss", "optim", "train", "dataset")
    chosen = {k: run_cfg.get(k) for k in keys}
    for section, names in NOT_HASHED.items():
        chosen[section] = {k: v for k, v in (chosen.get(section) or {}).items() if k not in names}
    text = json.dumps(chosen, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived: the state was saved at ``step``; the same command resumes."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum, self.step, self.exit_code = signum, step, 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"{run_dir}: {name} received; checkpoint saved at step {step}; run again to resume")


class _StopOnSignal:
    """Turns SIGTERM (SLURM's time limit, preemption) and SIGINT into a flag the loop checks per step.

    A second SIGINT raises ``KeyboardInterrupt`` at once (Ctrl-C twice: no save).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _owner(saved: dict[str, Any] | None, run_dir: Path) -> tuple[Any, Any] | None:
    """``(dataset, run)`` whose checkpoints ``run_dir`` holds (older runs: from its config.yaml)."""
    if saved is not None and saved.get("identity"):
        return saved["identity"]["dataset"], saved["identity"]["run"]
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        old = yaml.safe_load(config_path.read_text()) or {}
        return old.get("dataset"), old.get("run")
    return None


def _check_finite(state: dict[str, Any], run_dir: Path, step: int, saved_step: int | None) -> None:
    """``FloatingPointError`` before a save when the parameters are not finite.

    The step skips non-finite updates, so this guards against what skipping cannot catch
    (a finite loss with parameters already broken): a non-finite state is never checkpointed.
    """
    finite = jax.tree.reduce(
        jnp.logical_and, jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), state["params"]), jnp.bool_(True)
    )
    if not bool(finite):
        where = f"the last checkpoint (step {saved_step}) is kept" if saved_step else "nothing was saved"
        raise FloatingPointError(
            f"{run_dir}: parameters not finite at step {step}; {where};"
            " lower optim.learning_rate or check the data"
        )


def _write_outputs(run_dir: Path, logs: dict[str, Any]) -> None:
    rows = [list(r) + [0] * (len(LOG_COLUMNS) - len(r)) for r in logs["train"]]  # older logs: no session
    atomic_write_text(run_dir / "train_log.csv", pd.DataFrame(rows, columns=LOG_COLUMNS).to_csv(index=False))
    valid = pd.DataFrame(logs["valid"], columns=["step", "mean_dice"])
    atomic_write_text(run_dir / "valid.csv", valid.to_csv(index=False))
    if logs["best"] is not None:
        atomic_write_json(run_dir / "best.json", logs["best"])


def validate(
    segmenter: Segmenter, images: np.ndarray, labels: np.ndarray, num_classes: int, key: jax.Array
) -> float:
    """Mean over validation cases ``(N, X, Y, Z[, C])`` of the mean foreground Dice (K-step sampling)."""
    scores = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        pred = segmenter.segment(image, jax.random.fold_in(key, i))
        scores.append(mean_foreground_dice(pred, label, num_classes))
    return float(np.nanmean(scores))


def train_run(run_cfg: dict[str, Any], data_dir: str | Path, run_dir: str | Path) -> dict[str, Any]:
    """Train one run to ``train.steps``, resuming its checkpoints when they fit; returns ``best.json``'s dict.

    Checkpoints are resumed when the run's :func:`config_hash` and data fingerprint match, and
    belong to the same ``(dataset, run)``; another run's folder is refused (``ConfigError``), a
    changed config or dataset starts the run over. ``train.steps`` raised continues, as does a
    changed ``train.devices`` (the devices come from :func:`diffseg.parallel.training_devices`,
    one line on stderr says which); lowered
    below the latest checkpoint is a ``ConfigError``. SIGTERM/SIGINT save the state after the
    current step and raise :class:`TrainingInterrupted`.
    """
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_cfg = run_cfg["train"]
    total, every = int(train_cfg["steps"]), int(train_cfg["checkpoint_every"])
    if total < 1 or every < 1:
        raise ConfigError(f"run {run_cfg.get('run')!r}: train.steps and train.checkpoint_every must be >= 1")
    devices, device_note = training_devices(run_cfg)  # before any work: a bad train.devices fails fast

    dataset = load_dataset(data_dir)
    fingerprint = data_fingerprint(data_dir)
    identity = {"dataset": run_cfg.get("dataset"), "run": run_cfg.get("run")}
    chash = config_hash(run_cfg)
    remove_temporaries(run_dir)  # atomic writers' temporaries left by a killed job
    checkpoints = RunCheckpoints(run_dir)  # removes orbax's temporaries
    saved = checkpoints.restore_logs() if checkpoints.latest_step() is not None else None
    owner = _owner(saved, run_dir) if checkpoints.latest_step() is not None else None
    if owner is not None and None not in owner and owner != (identity["dataset"], identity["run"]):
        checkpoints.close()
        raise ConfigError(
            f"{run_dir}: holds the checkpoints of run {owner[1]!r} of dataset {owner[0]!r}, not"
            f" {identity['run']!r} of {identity['dataset']!r}; refusing to replace them: give another --out"
        )
    restart_reason = None
    if checkpoints.latest_step() is not None and saved is None:
        checkpoints.restore(None)  # nothing readable: raises a DataError naming the folder
    if saved is not None:
        if saved.get("config_hash") != chash:
            restart_reason = "the run's config changed since its checkpoints were written"
        elif saved.get("data_fingerprint") != fingerprint:
            restart_reason = f"the prepared data in {data_dir} changed since its checkpoints were written"
        elif int(saved.get("step", 0)) > total:
            checkpoints.close()
            raise ConfigError(
                f"{run_dir}: trained to step {saved['step']}, beyond train.steps={total}; set train.steps"
                f" >= {saved['step']}, or delete {run_dir / 'checkpoints'} and {run_dir / 'best'} to retrain"
            )

    num_classes = int(dataset.info["num_classes"])
    _, train_images, train_labels = dataset.split("train")
    _, valid_images, valid_labels = dataset.split("valid")
    atomic_write_json(run_dir / "dataset.json", {**dataset.info, "fingerprint": fingerprint})
    config_text = yaml.safe_dump(dict(run_cfg), sort_keys=False)
    config_path = run_dir / "config.yaml"  # the workflow writes it first: keep its mtime if equal
    if not config_path.is_file() or yaml.safe_load(config_path.read_text()) != yaml.safe_load(config_text):
        atomic_write_text(config_path, config_text)

    model = build_model(run_cfg, num_classes)
    tx, schedule = build_optimizer(run_cfg)
    print(f"{run_dir}: {device_note}", file=sys.stderr, flush=True)
    mesh = data_mesh(devices)
    copies = replicated(mesh)
    key = jax.random.key(int(train_cfg["seed"]))
    key_init, key_steps, key_valid = jax.random.split(key, 3)
    state = jax.device_put(init_state(model, tx, dataset.shape, key_init, dataset.channels), copies)

    logs: dict[str, Any] = {
        "config_hash": chash,
        "data_fingerprint": fingerprint,
        "identity": identity,
        "run_id": uuid.uuid4().hex[:16],  # a fresh start: its predictions are never another's
        "session": 0,
        "step": 0,
        "train": [],
        "valid": [],
        "best": None,
        "seconds": 0.0,
    }
    progress_desc = f"train {run_cfg.get('run', '')}"
    if restart_reason is not None:  # its own run, another experiment: the old checkpoints are obsolete
        print(f"{run_dir}: {restart_reason}; starting over from step 0", file=sys.stderr, flush=True)
        checkpoints.close()
        for sub in ("checkpoints", "best"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        checkpoints = RunCheckpoints(run_dir)
    elif saved is not None:
        # Onto this job's devices, whichever the state was saved from (train.devices may differ).
        restored, saved_logs = checkpoints.restore(abstract(state), copies)
        state = restored
        logs = {**logs, **saved_logs, "session": int(saved_logs.get("session", 0)) + 1}
        print(
            f"resuming {run_dir} from step {int(state['step'])} of {total} (session {logs['session']})",
            file=sys.stderr,
            flush=True,
        )

    # The data stay on the host; each step's volumes are sent ahead of the step (train/feed.py).
    choice = choose_micro_batch(model, tx, run_cfg, num_classes, mesh, dataset.shape)
    if choice.how == "auto":
        print(f"{run_dir}: {choice.describe()}", file=sys.stderr, flush=True)
    step_fn = make_train_step(choice.model, tx, run_cfg, num_classes, mesh, choice.micro_batch)
    batch_size, seed = int(train_cfg["batch_size"]), int(train_cfg["seed"])
    feeder = BatchFeeder(
        train_images,
        train_labels,
        batch_size,
        seed,
        batch_sharding(mesh),
        int(state["step"]),
        total,
        sampling=str(train_cfg["sampling"]),
    )
    batches = iter(feeder)
    segmenter = Segmenter(model, state["params"], run_cfg)  # compiled once, reused at each validation
    start = int(state["step"])
    log_every = max(1, int(train_cfg["log_every"]))
    clock, seconds_before = time.perf_counter(), float(logs["seconds"])
    window_start, window_step = clock, start
    saved_step = start or None
    skipped_before, skipped_run = int(state["skipped"]), 0
    progress = Progress(total, progress_desc, initial=start)
    with _StopOnSignal() as stop:
        for step in range(start + 1, total + 1):
            images, labels = next(batches)
            state, loss = step_fn(state, images, labels, key_steps)
            progress.update(1)
            if step % log_every == 0 or step == total:
                loss = float(loss)  # blocks: only on logging steps, so dispatch stays asynchronous
                skipped = int(state["skipped"])  # non-finite updates skipped so far (as the reference)
                if skipped > skipped_before:
                    progress.write(f"{run_dir}: step {step}: {skipped} update(s) skipped so far (non-finite)")
                all_skipped = skipped - skipped_before >= step - window_step  # every update of the window
                skipped_run = skipped_run + step - window_step if all_skipped else 0
                if skipped_run >= MAX_SKIPPED_IN_A_ROW:
                    raise FloatingPointError(
                        f"{run_dir}: loss is {loss} at step {step}, the last {skipped_run} updates skipped"
                        " (non-finite); lower optim.learning_rate or check the data"
                    )
                skipped_before = skipped
                now = time.perf_counter()
                rate = (step - window_step) / max(now - window_start, 1e-9)
                window_start, window_step = now, step
                lr = float(schedule(step - 1))
                logs["train"].append(
                    [step, loss, lr, seconds_before + now - clock, rate, logs["session"], skipped]
                )
                progress.log(loss=loss, lr=lr)
            interrupted = stop.signum is not None
            if step % every == 0 or step == total or interrupted:
                _check_finite(state, run_dir, step, saved_step)  # never save a non-finite state
                if step % every == 0 or step == total:
                    segmenter.params = state["params"]
                    score = validate(
                        segmenter,
                        valid_images,
                        valid_labels,
                        num_classes,
                        jax.random.fold_in(key_valid, step),
                    )
                    logs["valid"].append([step, score])
                    if logs["best"] is None or score > logs["best"]["mean_dice"]:
                        logs["best"] = {
                            "step": step,
                            "mean_dice": score,
                            "config_hash": chash,
                            "data_fingerprint": fingerprint,
                            "run_id": logs["run_id"],
                        }
                        checkpoints.save_best(step, state["params"])
                    progress.write(
                        f"step {step}: validation mean foreground Dice {score:.4f}"
                        f" (best {logs['best']['mean_dice']:.4f})"
                    )
                logs["seconds"] = seconds_before + time.perf_counter() - clock
                logs["step"] = step
                checkpoints.save(step, state, logs)
                saved_step = step
                _write_outputs(run_dir, logs)
            if interrupted:
                progress.close()
                feeder.close()
                checkpoints.close()
                raise TrainingInterrupted(int(stop.signum), step, run_dir)
    progress.close()
    feeder.close()
    checkpoints.close()
    if start == total:  # already complete: the outputs Snakemake may have removed, from the logs
        _write_outputs(run_dir, logs)
    return logs["best"]
