"""Orbax checkpoints of a run: the latest full state (to resume) and the best parameters.

``{run_dir}/checkpoints/{step}/`` holds the latest training state with the run's logs (so a
resumed run continues its ``train_log.csv``/``valid.csv`` exactly where the state is);
``{run_dir}/best/{step}/`` holds the parameters with the best validation mean Dice. Orbax
writes each step into a temporary directory and renames it when complete, so a job killed
mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from diffseg.errors import DataError


def _manager(directory: Path, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(directory.absolute(), options=options)


class RunCheckpoints:
    """The latest state and the best parameters of one run directory."""

    def __init__(self, run_dir: str | Path):
        run_dir = Path(run_dir)
        self.latest = _manager(run_dir / "checkpoints")
        self.best = _manager(run_dir / "best")

    def latest_step(self) -> int | None:
        """Step of the latest saved state, None when the run has not saved one yet."""
        return self.latest.latest_step()

    def save(self, step: int, state: Any, logs: dict[str, Any]) -> None:
        """Save the training state and the logs up to ``step``; blocks until written."""
        self.latest.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), logs=ocp.args.JsonSave(logs))
        )
        self.latest.wait_until_finished()

    def restore(self, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """The latest ``(state, logs)``; ``abstract_state`` gives structure, shapes and shardings."""
        step = self.latest.latest_step()
        restored = self.latest.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), logs=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["logs"]

    def save_best(self, step: int, params: Any) -> None:
        """Keep ``params`` as the run's best (replacing the previous best)."""
        self.best.save(step, args=ocp.args.StandardSave(params))
        self.best.wait_until_finished()

    def close(self) -> None:
        """Finish pending writes and release the managers."""
        self.latest.close()
        self.best.close()


def restore_best(run_dir: str | Path, abstract_params: Any) -> tuple[Any, int]:
    """The best parameters of a trained run and their step."""
    manager = _manager(Path(run_dir) / "best", read_only=True)
    step = manager.latest_step()
    if step is None:
        raise DataError(f"{Path(run_dir) / 'best'}: no checkpoint; train the run first")
    params = manager.restore(step, args=ocp.args.StandardRestore(abstract_params))
    manager.close()
    return params, step


def abstract(tree: Any) -> Any:
    """Shape/dtype/sharding stand-ins for ``tree``, for restoring without a real copy."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
