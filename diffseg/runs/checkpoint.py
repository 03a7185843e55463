"""Orbax checkpoints of a run: the latest full state (to resume) and the best parameters.

``{run_dir}/checkpoints/{step}/`` holds the latest training state with the run's logs (so a
resumed run continues its ``train_log.csv``/``valid.csv`` exactly where the state is);
``{run_dir}/best/{step}/`` holds the parameters with the best validation mean Dice. Orbax
writes each step into a temporary directory and renames it when complete, so a job killed
mid-save leaves the previous checkpoint intact; its temporary folder is removed on the next
start. Two of each are kept, so that a corrupt latest state falls back to the one before.

Checkpoints load onto whatever devices the loading process has: every restored array is given
a sharding on the current devices (replicated over all local ones unless the caller says
otherwise), so orbax never tries the sharding it was saved with (a run trained on 8 GPUs loads
on a laptop's CPU, and a run resumes on a different number of devices).

In a run of several processes every process opens the same folders (a shared file system) and
takes part in each save and restore (orbax's multi-process checkpointing: each writes its shards,
process 0 the metadata and the logs); what diffseg deletes itself, process 0 deletes while the
others wait (:func:`_on_primary`).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Sharding

from diffseg.errors import DataError, disk_full_cause
from diffseg.io import check_free_space, disk_full, remove_temporaries
from diffseg.parallel import data_mesh, replicated


def _on_primary(what: str, action: Any) -> None:
    """``action()`` in process 0 only, the other processes waiting for it (one process: just ``action()``)."""
    if jax.process_index() == 0:
        action()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"diffseg checkpoints: {what}")


def _manager(directory: Path, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(directory.absolute(), options=options)


class CorruptCheckpointWarning(UserWarning):
    """The latest checkpoint could not be read; an older one is used instead."""


class RunCheckpoints:
    """The latest state and the best parameters of one run directory."""

    def __init__(self, run_dir: str | Path):
        run_dir = Path(run_dir)
        self.dirs = {"latest": run_dir / "checkpoints", "best": run_dir / "best"}
        self._open()

    def _open(self) -> None:
        # before orbax lists the steps
        _on_primary("temporaries", lambda: [remove_temporaries(f) for f in self.dirs.values()])
        self.latest = _manager(self.dirs["latest"])
        self.best = _manager(self.dirs["best"])

    def start_over(self) -> None:
        """Delete every saved state and best parameters: the run trains again from step 0."""
        self.close()
        _on_primary("start over", lambda: [shutil.rmtree(f, ignore_errors=True) for f in self.dirs.values()])
        self._open()

    def latest_step(self) -> int | None:
        """Step of the latest saved state, None when the run has not saved one yet."""
        return self.latest.latest_step()

    def _guarded(self, which: str, step: int, tree: Any, write: Any) -> None:
        """Run ``write()`` (an orbax save of ``tree``) unless the device lacks the space for it.

        A full device is a ``DiskFullError`` naming the folder and the space, raised before orbax
        starts (its writer threads would end in a cascade of tracebacks), or from orbax's own
        failure; either way its temporary folder is removed and the previous checkpoint kept.
        """
        folder = self.dirs[which]
        kept = self.latest.latest_step() if which == "latest" else self.best.latest_step()
        keep = f"the checkpoint of step {kept} is kept" if kept is not None else ""
        # The arrays, and orbax's metadata, index and lock files beside them (~1 MiB at most).
        needed = int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree))) + 2**20
        check_free_space(folder, needed, f"saving the {which} checkpoint of step {step}", keep)
        try:
            write()
        except Exception as err:
            if disk_full_cause(err) is None:
                raise
            if jax.process_index() == 0:  # no barrier: a peer may have failed otherwise
                remove_temporaries(folder)
            raise disk_full(folder, f"saving the {which} checkpoint of step {step}", needed, keep) from err

    def save(self, step: int, state: Any, logs: dict[str, Any]) -> None:
        """Save the training state and the logs up to ``step``; blocks until written."""

        def write() -> None:
            args = ocp.args.Composite(state=ocp.args.StandardSave(state), logs=ocp.args.JsonSave(logs))
            self.latest.save(step, args=args)
            self.latest.wait_until_finished()

        self._guarded("latest", step, state, write)

    def restore_logs(self) -> dict[str, Any] | None:
        """The logs of the latest readable checkpoint (cheap: no arrays), None without one."""
        for step in sorted(self.latest.all_steps(), reverse=True):
            try:
                return self.latest.restore(step, args=ocp.args.Composite(logs=ocp.args.JsonRestore()))["logs"]
            except Exception:  # orbax raises many types for a damaged folder; restore() reports it
                continue
        return None

    def restore(self, abstract_state: Any, sharding: Sharding | None = None) -> tuple[Any, dict[str, Any]]:
        """The latest readable ``(state, logs)``; ``abstract_state`` gives structure and shapes.

        Arrays are placed with ``sharding`` when given, else as ``abstract_state``'s leaves are
        (when they carry a sharding), else replicated on the local devices (:func:`on_devices`):
        the devices the state was saved from do not matter. A checkpoint that cannot be read is
        deleted with a :class:`CorruptCheckpointWarning` and the one before it is used; with none
        readable, a ``DataError`` names the folder.
        """
        failures = []
        for step in sorted(self.latest.all_steps(), reverse=True):
            try:
                restored = self.latest.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(on_devices(abstract_state, sharding)),
                        logs=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as err:  # noqa: BLE001 (orbax: ValueError, FileNotFoundError, OSError, ...)
                failures.append(f"{self.dirs['latest'] / str(step)}: {type(err).__name__}: {err}")
                continue
            for bad in failures:
                warnings.warn(
                    f"unreadable checkpoint {bad.split(': ')[0]} deleted; resuming from step {step}"
                    f" ({bad.split(': ', 1)[1][:300]})",
                    CorruptCheckpointWarning,
                    stacklevel=2,
                )
            if failures:
                self._drop_latest_after(step)
            self.drop_best_after(step)
            return restored["state"], restored["logs"]
        raise DataError(
            f"{self.dirs['latest']}: no readable checkpoint ({'; '.join(f[:300] for f in failures)});"
            f" delete {self.dirs['latest'].parent} to train the run from the start"
        )

    def _drop_latest_after(self, step: int) -> None:
        later = [s for s in self.latest.all_steps() if s > step]
        folder = self.dirs["latest"]
        _on_primary("drop later", lambda: [shutil.rmtree(folder / str(s), ignore_errors=True) for s in later])
        self.latest.close()
        self.latest = _manager(self.dirs["latest"])

    def drop_best_after(self, step: int) -> None:
        """Forget best parameters saved after ``step`` (a kill between the best and the state save)."""
        later = [s for s in self.best.all_steps() if s > step]
        folder = self.dirs["best"]
        _on_primary("drop best", lambda: [shutil.rmtree(folder / str(s), ignore_errors=True) for s in later])
        if later:
            self.best.close()
            self.best = _manager(self.dirs["best"])

    def save_best(self, step: int, params: Any) -> None:
        """Keep ``params`` as the run's best (the previous best stays as the fallback)."""
        if step in self.best.all_steps():  # written before a kill, now recomputed: replace it
            _on_primary("replace best", lambda: shutil.rmtree(self.dirs["best"] / str(step)))
            self.best.close()
            self.best = _manager(self.dirs["best"])

        def write() -> None:
            self.best.save(step, args=ocp.args.StandardSave(params))
            self.best.wait_until_finished()

        self._guarded("best", step, params, write)

    def close(self) -> None:
        """Finish pending writes and release the managers."""
        self.latest.close()
        self.best.close()


def restore_best(
    run_dir: str | Path, abstract_params: Any, sharding: Sharding | None = None
) -> tuple[Any, int]:
    """The best parameters of a trained run and their step (``best.json``'s, when it names one kept).

    ``abstract_params`` (e.g. from ``jax.eval_shape``) gives structure, shapes and dtypes; the
    parameters come back with ``sharding`` (default: replicated on every local device), whatever
    devices the run was trained on.
    """
    manager = _manager(Path(run_dir) / "best", read_only=True)
    step = manager.latest_step()
    best_json = Path(run_dir) / "best.json"
    if best_json.is_file():
        named = json.loads(best_json.read_text()).get("step")
        if named in manager.all_steps():
            step = named
    if step is None:
        raise DataError(f"{Path(run_dir) / 'best'}: no checkpoint; train the run first")
    params = manager.restore(step, args=ocp.args.StandardRestore(on_devices(abstract_params, sharding)))
    manager.close()
    return params, step


def abstract(tree: Any) -> Any:
    """Shape/dtype/sharding stand-ins for ``tree``, for restoring without a real copy."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def on_devices(tree: Any, sharding: Sharding | None = None) -> Any:
    """Restore targets for ``tree`` (arrays, numpy arrays or ``jax.ShapeDtypeStruct``): each leaf's
    shape and dtype, placed on this process's devices.

    ``sharding``, when given, places every leaf; else a leaf that carries a sharding (a
    ``jax.Array``, or a stand-in made from one) keeps it and the others are replicated on every
    local device. Without a target
    sharding orbax would use the one saved in the checkpoint, which names the saving process's
    devices ("Topology mismatch detected" on a machine with fewer).
    """
    default = sharding if sharding is not None else replicated(data_mesh())

    def target(leaf: Any) -> Any:
        if leaf is None:
            return None
        own = getattr(leaf, "sharding", None)
        place = own if isinstance(own, Sharding) and sharding is None else default
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=place)

    return jax.tree.map(target, tree)
