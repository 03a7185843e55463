"""The training loop of one run: steps, progress, logs, validation, checkpoints and resume.

Writes into ``run_dir``: ``train_log.csv`` (step, loss, lr, seconds, steps_per_s),
``valid.csv`` (step, mean_dice per checkpoint), ``best.json``, ``dataset.json`` (the data's
description, needed to preprocess new scans), the orbax checkpoints, ``status.json`` (what this
process is doing, for ``diffseg status``: :mod:`diffseg.runs.heartbeat`) and TensorBoard's event
files (:mod:`diffseg.train.tensorboard`). A run killed at any
point and started again continues from its latest checkpoint with the same randomness, so
it ends with the same parameters as an uninterrupted run.

:func:`train_run` reads as its three steps: :func:`_resume_or_start` (the folder's checkpoints
resumed, or a fresh state), :func:`_step_loop` (train, log, and :func:`_validate_and_save`), and
one exit that closes the checkpoints, the batch feeder and the progress bar whatever ends the run.

A run of several processes (``diffseg.distributed``) runs this loop in every process over one
mesh of all their devices; only the writer (process 0: ``_Run.writer``) writes the run's files,
and a signal stops every process after the same step (``diffseg.distributed.AgreedStop``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import yaml
from jax.sharding import Mesh

from diffseg.data import load_dataset
from diffseg.data.prepare import data_fingerprint
from diffseg.distributed import AgreedStop
from diffseg.errors import ConfigError
from diffseg.evaluate.inference import Segmenter
from diffseg.evaluate.metrics import dice
from diffseg.io import atomic_write_json, atomic_write_text, remove_temporaries
from diffseg.parallel import batch_sharding, data_mesh, local_copy, place, replicated, training_devices
from diffseg.progress import Progress
from diffseg.runconfig import RunConfig, RunConfigLike, config_hash
from diffseg.runs import RunCheckpoints, abstract, build_model
from diffseg.runs.heartbeat import Heartbeat
from diffseg.train.feed import BatchFeeder
from diffseg.train.plan import choose_micro_batch
from diffseg.train.step import build_optimizer, init_state, make_train_step
from diffseg.train.tensorboard import EventLog, class_tags, mid_slice_panel, remove_events, truncate_after

# session: which start of the process ran the step (0 first, 1 after the first resume, ...);
# skipped: updates skipped so far because their loss or gradients were not finite.
LOG_COLUMNS = ["step", "loss", "lr", "seconds", "steps_per_s", "session", "skipped"]
MAX_SKIPPED_IN_A_ROW = 100  # non-finite updates skipped in a row before the run stops with an error


def class_dice(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice ``(num_classes - 1,)`` of each foreground class of ``pred`` against ``label`` (both
    ``(X, Y, Z)``); NaN for a class absent from both."""
    return np.array([dice(pred == c, label == c) for c in range(1, num_classes)], np.float64)


def _nanmean(values: np.ndarray, axis: int | None = None) -> Any:
    """``np.nanmean`` that returns NaN for an all-NaN slice without numpy's RuntimeWarning."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def mean_foreground_dice(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in ``label`` or ``pred`` (both ``(X, Y, Z)``)."""
    return float(_nanmean(class_dice(pred, label, num_classes)))


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
) -> tuple[np.ndarray, np.ndarray]:
    """K-step sampling of the validation cases ``(N, X, Y, Z[, C])``: the Dice ``(N, classes - 1)``
    of each case and foreground class, and the first case's prediction ``(X, Y, Z)`` (for TensorBoard).

    The run's validation score (``valid.csv``, ``best.json``) is :func:`mean_case_dice` of it."""
    scores, first = [], None
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        pred = segmenter.segment(image, jax.random.fold_in(key, i))
        first = pred if first is None else first
        scores.append(class_dice(pred, label, num_classes))
    return np.array(scores, np.float64).reshape(len(scores), num_classes - 1), first


def mean_case_dice(scores: np.ndarray) -> float:
    """Mean over cases of each case's mean foreground Dice (the classes it or its truth has);
    ``scores`` ``(cases, classes - 1)`` as :func:`validate` returns them."""
    return float(_nanmean(_nanmean(scores, axis=1)))


def train_run(run_cfg: RunConfigLike, data_dir: str | Path, run_dir: str | Path) -> dict[str, Any]:
    """Train one run to ``train.steps``, resuming its checkpoints when they fit; returns ``best.json``'s dict.

    Checkpoints are resumed when the run's :func:`config_hash` and data fingerprint match, and
    belong to the same ``(dataset, run)``; another run's folder is refused (``ConfigError``), a
    changed config or dataset starts the run over. ``train.steps`` raised continues, as does a
    changed ``train.devices`` (the devices come from :func:`diffseg.parallel.training_devices`,
    one line on stderr says which); lowered below the latest checkpoint is a ``ConfigError``.
    SIGTERM/SIGINT save the state after the current step and raise :class:`TrainingInterrupted`.
    However the run ends (the last step, a signal, a non-finite stop, an error), what it opened
    is closed on the way out.
    """
    run_cfg = RunConfig.of(run_cfg)
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    total, every = run_cfg.train.steps, run_cfg.train.checkpoint_every
    if total < 1 or every < 1:
        raise ConfigError(f"run {run_cfg.run!r}: train.steps and train.checkpoint_every must be >= 1")
    devices, device_note = training_devices(run_cfg)  # before any work: a bad train.devices fails fast
    beat = _heartbeat(run_cfg, run_dir, devices)
    with _saying_how_it_ended(beat), contextlib.ExitStack() as opened:  # one exit: closes what the run opened
        run = _resume_or_start(run_cfg, data_dir, run_dir, (devices, device_note), beat, opened)
        start = int(run.state["step"])
        _step_loop(run, opened)
    if start == total and run.writer:  # already complete: the outputs Snakemake may have removed
        _write_outputs(run_dir, run.logs)
    return run.logs["best"]


def _heartbeat(run_cfg: RunConfig, run_dir: Path, devices: list[Any]) -> Heartbeat:
    """The session's ``status.json`` writer: the run's identity and the devices it trains on."""
    platform = devices[0].platform if devices else "cpu"
    return Heartbeat(
        run_dir, enabled=jax.process_index() == 0, dataset=run_cfg.dataset, run=run_cfg.run,
        total=run_cfg.train.steps, platform=platform, devices=len(devices),
        accelerators=len(devices) if platform in ("gpu", "tpu") else 0, step=None,
    )  # fmt: skip


@contextlib.contextmanager
def _saying_how_it_ended(beat: Heartbeat) -> Any:
    """``status.json`` says ``done``, ``interrupted`` or ``failed`` (with the error) however the
    session ends; only a SIGKILL leaves ``training``, which ``diffseg status`` then checks."""
    try:
        yield
    except (TrainingInterrupted, KeyboardInterrupt) as stop:
        beat.update("interrupted", message=str(stop) or type(stop).__name__)
        raise
    except BaseException as err:
        beat.update("failed", message=f"{type(err).__name__}: {err}".splitlines()[0][:500])
        raise
    total = beat.fields["total"]
    beat.update("done" if beat.fields.get("step") == total else "interrupted", step=beat.fields.get("step"))


@dataclass
class _Run:
    """One run being trained: what its steps, validations and saves share.

    ``state`` is the training state (replicated on ``mesh``), ``logs`` what its checkpoints carry
    (``train``/``valid`` rows, ``best``, ``session``, ``seconds``, identity); ``saved_step`` the
    step of the latest checkpoint this process knows of (None before any).
    """

    cfg: RunConfig
    run_dir: Path
    checkpoints: RunCheckpoints
    state: dict[str, Any]
    logs: dict[str, Any]
    model: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh
    num_classes: int
    shape: tuple[int, ...]
    train_data: tuple[np.ndarray, np.ndarray]  # images (N, X, Y, Z[, C]), labels (N, X, Y, Z)
    valid_data: tuple[np.ndarray, np.ndarray]
    key_steps: jax.Array
    key_valid: jax.Array
    class_names: list[str]
    events: EventLog  # TensorBoard
    beat: Heartbeat  # status.json
    saved_step: int | None = None
    writer: bool = True  # writes the run's files: the only process, or process 0 of several

    @property
    def total(self) -> int:
        return self.cfg.train.steps


def _resume_or_start(
    run_cfg: RunConfig,
    data_dir: Path,
    run_dir: Path,
    devices_and_note: tuple[list[Any], str],
    beat: Heartbeat,
    opened: contextlib.ExitStack,
) -> _Run:
    """The run's data, network and state: its latest checkpoint when it fits, else a fresh start.

    Refuses another run's folder or a ``train.steps`` below its checkpoints before writing
    anything; a changed config or dataset deletes the old checkpoints (after saying so).
    """
    dataset = load_dataset(data_dir)
    fingerprint = data_fingerprint(data_dir)
    identity = {"dataset": run_cfg.dataset, "run": run_cfg.run}
    chash = config_hash(run_cfg)
    writer = jax.process_index() == 0
    if writer:
        remove_temporaries(run_dir)  # atomic writers' temporaries left by a killed job
    checkpoints = RunCheckpoints(run_dir)  # removes orbax's temporaries
    opened.callback(checkpoints.close)
    saved, restart_reason = _resume_decision(checkpoints, run_cfg, run_dir, data_dir, chash, fingerprint)
    num_classes = int(dataset.info["num_classes"])
    train_data, valid_data = dataset.split("train")[1:], dataset.split("valid")[1:]
    if writer:
        _write_run_files(run_dir, run_cfg, dataset.info, fingerprint)

    model = build_model(run_cfg, num_classes)
    tx, schedule = build_optimizer(run_cfg)
    devices, device_note = devices_and_note  # and the line saying which
    say = print if writer else lambda *a, **k: None  # noqa: E731 (one process speaks for the run)
    say(f"{run_dir}: {device_note}", file=sys.stderr, flush=True)
    mesh = data_mesh(devices)
    copies = replicated(mesh)
    key_init, key_steps, key_valid = jax.random.split(jax.random.key(run_cfg.train.seed), 3)
    state = place(init_state(model, tx, dataset.shape, key_init, dataset.channels), copies)
    logs = _fresh_logs(chash, fingerprint, identity)
    if restart_reason is not None:  # its own run, another experiment: the old checkpoints are obsolete
        say(f"{run_dir}: {restart_reason}; starting over from step 0", file=sys.stderr, flush=True)
        checkpoints.start_over()
        if writer:
            remove_events(run_dir)  # its old curves are another experiment's
    elif saved is not None:
        # Onto this job's devices, whichever the state was saved from (train.devices may differ).
        state, saved_logs = checkpoints.restore(abstract(state), copies)
        logs = {**logs, **saved_logs, "session": int(saved_logs.get("session", 0)) + 1}
        say(
            f"resuming {run_dir} from step {int(state['step'])} of {run_cfg.train.steps}"
            f" (session {logs['session']})",
            file=sys.stderr,
            flush=True,
        )
    if writer:  # what a killed session logged after the checkpoint is logged again from it
        truncate_after(run_dir, int(state["step"]))
    events = EventLog(run_dir, int(logs["session"]), enabled=writer and run_cfg.train.tensorboard)
    opened.callback(events.close)
    return _Run(
        cfg=run_cfg, run_dir=run_dir, checkpoints=checkpoints, state=state, logs=logs, model=model, tx=tx,
        schedule=schedule, mesh=mesh, num_classes=num_classes, shape=dataset.shape, train_data=train_data,
        valid_data=valid_data, key_steps=key_steps, key_valid=key_valid, class_names=dataset.class_names,
        events=events, beat=beat, writer=writer,
    )  # fmt: skip


def _resume_decision(
    checkpoints: RunCheckpoints,
    run_cfg: RunConfig,
    run_dir: Path,
    data_dir: Path,
    chash: str,
    fingerprint: str,
) -> tuple[dict[str, Any] | None, str | None]:
    """``(logs of the latest checkpoint or None, why the run starts over or None)``.

    Raises ``ConfigError`` for another run's folder or a ``train.steps`` below the latest
    checkpoint, and ``DataError`` when checkpoints exist but none can be read.
    """
    latest = checkpoints.latest_step()
    saved = checkpoints.restore_logs() if latest is not None else None
    owner = _owner(saved, run_dir) if latest is not None else None
    mine = (run_cfg.dataset, run_cfg.run)
    if owner is not None and None not in owner and owner != mine:
        raise ConfigError(
            f"{run_dir}: holds the checkpoints of run {owner[1]!r} of dataset {owner[0]!r}, not"
            f" {mine[1]!r} of {mine[0]!r}; refusing to replace them: give another --out"
        )
    if latest is not None and saved is None:
        checkpoints.restore(None)  # nothing readable: raises a DataError naming the folder
    if saved is None:
        return None, None
    if saved.get("config_hash") != chash:
        return saved, "the run's config changed since its checkpoints were written"
    if saved.get("data_fingerprint") != fingerprint:
        return saved, f"the prepared data in {data_dir} changed since its checkpoints were written"
    total = run_cfg.train.steps
    if int(saved.get("step", 0)) > total:
        raise ConfigError(
            f"{run_dir}: trained to step {saved['step']}, beyond train.steps={total}; set train.steps"
            f" >= {saved['step']}, or delete {run_dir / 'checkpoints'} and {run_dir / 'best'} to retrain"
        )
    return saved, None


def _write_run_files(run_dir: Path, run_cfg: RunConfig, info: dict[str, Any], fingerprint: str) -> None:
    """``dataset.json`` (the data's description, for ``predict``) and ``config.yaml`` (when it differs)."""
    atomic_write_json(run_dir / "dataset.json", {**info, "fingerprint": fingerprint})
    config_text = yaml.safe_dump(run_cfg.to_dict(), sort_keys=False)
    config_path = run_dir / "config.yaml"  # the workflow writes it first: keep its mtime if equal
    if not config_path.is_file() or yaml.safe_load(config_path.read_text()) != yaml.safe_load(config_text):
        atomic_write_text(config_path, config_text)


def _fresh_logs(chash: str, fingerprint: str, identity: dict[str, Any]) -> dict[str, Any]:
    return {
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


@dataclass
class _Clock:
    """This session's time and the logging window: steps/s since the last logged step, and the
    non-finite updates skipped (so far when the window began; how many in a row)."""

    started: float  # perf_counter() when this session's steps began
    seconds_before: float  # training time of the earlier sessions
    window_start: float
    window_step: int
    skipped_before: int
    skipped_run: int = 0

    def seconds(self) -> float:
        """Training time of the run so far, all sessions."""
        return self.seconds_before + time.perf_counter() - self.started


def _step_loop(run: _Run, opened: contextlib.ExitStack) -> None:
    """Steps ``state["step"] + 1 .. train.steps``: train; log every ``log_every`` step; validate
    and save every ``checkpoint_every`` and the last; at SIGTERM/SIGINT save, then raise
    :class:`TrainingInterrupted`."""
    train_cfg, total = run.cfg.train, run.total
    # The data stay on the host; each step's volumes are sent ahead of the step (train/feed.py).
    choice = choose_micro_batch(run.model, run.tx, run.cfg, run.num_classes, run.mesh, run.shape)
    if choice.how == "auto" and run.writer:
        print(f"{run.run_dir}: {choice.describe()}", file=sys.stderr, flush=True)
    step_fn = make_train_step(choice.model, run.tx, run.cfg, run.num_classes, run.mesh, choice.micro_batch)
    start = int(run.state["step"])
    feeder = BatchFeeder(
        *run.train_data, train_cfg.batch_size, train_cfg.seed, batch_sharding(run.mesh),
        start, total, sampling=train_cfg.sampling,
    )  # fmt: skip
    opened.callback(feeder.close)
    batches = iter(feeder)
    # Compiled once, reused at each validation. Every process validates its own copy of the
    # parameters on its own devices: the same score everywhere; process 0 writes it.
    segmenter = Segmenter(run.model, local_copy(run.state["params"]), run.cfg)
    log_every, every = max(1, train_cfg.log_every), train_cfg.checkpoint_every
    now = time.perf_counter()
    clock = _Clock(now, float(run.logs["seconds"]), now, start, int(run.state["skipped"]))
    run.saved_step = start or None
    quiet = None if run.writer else opened.enter_context(open(os.devnull, "w"))  # noqa: SIM115
    progress = Progress(total, f"train {run.cfg.run or ''}", initial=start, stream=quiet)
    opened.callback(progress.close)
    run.beat.update(
        step=start, saved_step=run.saved_step, session=run.logs["session"], seconds=clock.seconds_before,
        config_hash=run.logs["config_hash"], data_fingerprint=run.logs["data_fingerprint"],
        run_id=run.logs["run_id"], best=run.logs["best"], log_every=log_every,
    )  # fmt: skip
    stop = AgreedStop(opened.enter_context(_StopOnSignal()), run.mesh)
    for step in range(start + 1, total + 1):
        images, labels = next(batches)
        run.state, loss = step_fn(run.state, images, labels, run.key_steps)
        progress.update(1)
        if step % log_every == 0 or step == total:
            _log_step(run, clock, progress, step, loss)
        due, signum = step % every == 0 or step == total, stop.signum()  # read once
        if due or signum:
            _validate_and_save(run, clock, progress, segmenter, step, validate_now=due)
        if signum:
            raise TrainingInterrupted(signum, step, run.run_dir)


def _log_step(run: _Run, clock: _Clock, progress: Progress, step: int, loss: jax.Array) -> None:
    """A row of ``train_log.csv`` for ``step``; ``FloatingPointError`` when updates keep being skipped."""
    loss = float(loss)  # blocks: only on logging steps, so dispatch stays asynchronous
    skipped = int(run.state["skipped"])  # non-finite updates skipped so far (as the reference)
    if skipped > clock.skipped_before:
        progress.write(f"{run.run_dir}: step {step}: {skipped} update(s) skipped so far (non-finite)")
    all_skipped = skipped - clock.skipped_before >= step - clock.window_step  # every update of the window
    clock.skipped_run = clock.skipped_run + step - clock.window_step if all_skipped else 0
    if clock.skipped_run >= MAX_SKIPPED_IN_A_ROW:
        raise FloatingPointError(
            f"{run.run_dir}: loss is {loss} at step {step}, the last {clock.skipped_run} updates skipped"
            " (non-finite); lower optim.learning_rate or check the data"
        )
    clock.skipped_before = skipped
    now = time.perf_counter()
    rate = (step - clock.window_step) / max(now - clock.window_start, 1e-9)
    clock.window_start, clock.window_step = now, step
    lr = float(run.schedule(step - 1))
    row = [step, loss, lr, clock.seconds_before + now - clock.started, rate, run.logs["session"], skipped]
    run.logs["train"].append(row)
    progress.log(loss=loss, lr=lr)
    run.events.scalars(step, {"train/loss": loss, "train/lr": lr, "train/steps_per_s": rate})
    run.beat.update(step=step, seconds=row[3], s_per_step=1.0 / rate if rate > 0 else None)


def _validate_and_save(
    run: _Run, clock: _Clock, progress: Progress, segmenter: Segmenter, step: int, validate_now: bool
) -> None:
    """Checkpoint ``step`` with its logs (validated first when ``validate_now``; the best parameters
    kept) and rewrite the run's CSV/JSON outputs. A non-finite state is never saved."""
    _check_finite(run.state, run.run_dir, step, run.saved_step)
    if validate_now:
        segmenter.params = local_copy(run.state["params"])
        valid_images, valid_labels = run.valid_data
        key = jax.random.fold_in(run.key_valid, step)
        scores, first = validate(segmenter, valid_images, valid_labels, run.num_classes, key)
        score = mean_case_dice(scores)
        run.logs["valid"].append([step, score])
        _summarise_validation(run, step, score, scores, first)
        if run.logs["best"] is None or score > run.logs["best"]["mean_dice"]:
            run.logs["best"] = {
                "step": step,
                "mean_dice": score,
                "config_hash": run.logs["config_hash"],
                "data_fingerprint": run.logs["data_fingerprint"],
                "run_id": run.logs["run_id"],
            }
            run.checkpoints.save_best(step, run.state["params"])
        best = run.logs["best"]["mean_dice"]
        progress.write(f"step {step}: validation mean foreground Dice {score:.4f} (best {best:.4f})")
    run.logs["seconds"] = clock.seconds()
    run.logs["step"] = step
    run.checkpoints.save(step, run.state, run.logs)
    run.saved_step = step
    if run.writer:
        _write_outputs(run.run_dir, run.logs)
    run.beat.update(step=step, saved_step=step, seconds=run.logs["seconds"], best=run.logs["best"])


def _summarise_validation(run: _Run, step: int, score: float, scores: np.ndarray, first: np.ndarray) -> None:
    """TensorBoard's validation points at ``step``: the mean, each class (mean over the cases,
    classes absent from every case left out) and the first case's middle slice."""
    per_class = _nanmean(scores, axis=0)
    values = {"valid/mean_dice": score}
    tags = class_tags(run.class_names)
    values.update({t: v for t, v in zip(tags, per_class, strict=True) if np.isfinite(v)})
    run.events.scalars(step, values)
    image, label = run.valid_data[0][0], run.valid_data[1][0]
    panel = mid_slice_panel(image, label, np.asarray(first), run.num_classes)
    run.events.image(step, "valid/mid_slice", panel)
    run.events.flush()
