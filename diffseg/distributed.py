"""One run as several processes, on JAX's own distributed runtime (``jax.distributed``).

A pod slice or a multi-node job runs the same ``diffseg train`` once per host (or per GPU); each
process joins JAX's distributed runtime before its backend starts, and from then on
``jax.devices()`` holds every process's devices, ``jax.local_devices()`` this one's. A step's
collectives (the gradient all-reduce) are XLA's over those devices: NCCL on GPUs, the TPU
interconnect, gloo over TCP between CPU processes. diffseg launches nothing and sends nothing
itself: the launcher is SLURM's ``srun``, a TPU VM's ``--worker=all``, or a hand-started process
per host with the same three values (:func:`add_arguments`).

:func:`join` decides whether this process is one of several: explicit values (flags, or
``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``), a SLURM job step of several
tasks (``srun -n N``), or ``--distributed`` (JAX detects SLURM, Cloud TPU pods and MPI itself).
A process that dies ends the others: its peers' next collective fails at once (its sockets are
closed) or, if its host vanished, the runtime's heartbeat (:data:`HEARTBEAT_S`) ends them; either
way :func:`fail` prints one line and exits without waiting at JAX's shutdown barrier.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

from diffseg.errors import InputError

# Seconds without a heartbeat before the runtime declares a process dead and stops the others
# (JAX's default is 100); a compile or a validation does not stop heartbeats (a thread sends them).
HEARTBEAT_S = int(os.environ.get("DIFFSEG_HEARTBEAT_S", "20"))
JOIN_TIMEOUT_S = int(os.environ.get("DIFFSEG_JOIN_TIMEOUT_S", "120"))  # every process must start by then


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: ``index`` of ``count`` (0 of 1 alone); ``how`` it was launched."""

    index: int = 0
    count: int = 1
    how: str = "one process"

    @property
    def writer(self) -> bool:
        """Whether this process writes the run's files (logs, valid.csv, best.json): process 0 only."""
        return self.index == 0

    def describe(self) -> str:
        return f"process {self.index} of {self.count} ({self.how})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--coordinator``, ``--num-processes``, ``--process-id`` (a hand launch) and ``--distributed``."""
    group = parser.add_argument_group("several processes (one run over several hosts)")
    group.add_argument(
        "--coordinator",
        default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
        metavar="HOST:PORT",
        help="process 0's address and a free port, the same for every process (env JAX_COORDINATOR_ADDRESS)",
    )
    group.add_argument(
        "--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"), metavar="N",
        help="how many processes run the job (env JAX_NUM_PROCESSES)",
    )  # fmt: skip
    group.add_argument(
        "--process-id", type=int, default=_env_int("JAX_PROCESS_ID"), metavar="I",
        help="this process's index, 0..N-1; 0 writes the run's files (env JAX_PROCESS_ID)",
    )  # fmt: skip
    group.add_argument(
        "--distributed",
        action="store_true",
        help="join JAX's distributed runtime with what JAX detects (a Cloud TPU pod slice, SLURM, MPI);"
        " a SLURM step of several tasks (srun -n N) joins without it",
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def _slurm_tasks(env: dict[str, str]) -> int:
    """Tasks of this SLURM job step (``srun -n N``): what JAX's SLURM detection reads; 1 outside one."""
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    return int(env["SLURM_NTASKS"]) if all(env.get(k) for k in needed) else 1


def launch_of(
    args: argparse.Namespace, env: dict[str, str] | None = None
) -> tuple[dict[str, Any], str] | None:
    """``(jax.distributed.initialize keyword arguments, how)`` when this process is one of several, else None.

    Explicit values win; one of them without the others is an ``InputError`` (a hand launch needs
    all three, the same coordinator on every process)."""
    env = dict(os.environ) if env is None else env
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if args.num_processes is not None and args.num_processes <= 1 and args.coordinator is None:
        return None  # JAX_NUM_PROCESSES=1: alone
    if any(v is not None for v in explicit) and not args.distributed:
        if None in explicit:
            raise InputError(
                "a hand launch needs --coordinator HOST:PORT, --num-processes N and --process-id I"
                " together (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
            )
        kwargs = {"coordinator_address": args.coordinator, "num_processes": args.num_processes,
                  "process_id": args.process_id}  # fmt: skip
        return kwargs, f"coordinator {args.coordinator}"
    tasks = _slurm_tasks(env)
    if tasks > 1:
        return {"local_device_ids": _slurm_gpus(env)}, f"SLURM job {env['SLURM_JOB_ID']}, {tasks} tasks"
    if args.distributed:
        kwargs = {k: v for k, v in zip(("coordinator_address", "num_processes", "process_id"), explicit,
                                       strict=True) if v is not None}  # fmt: skip
        return kwargs, "detected by JAX"
    return None


def _slurm_gpus(env: dict[str, str]) -> list[int] | None:
    """Every GPU SLURM bound to this task (``CUDA_VISIBLE_DEVICES``), not JAX's default of one GPU
    numbered by the task's local id, which assumes every GPU of the node is visible to every task."""
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v for v in visible.split(",") if v.strip()]
    return list(range(len(ids))) if ids else None


def join(args: argparse.Namespace) -> Processes:
    """Join JAX's distributed runtime when this process is one of several (before any JAX
    computation); returns where this process stands. Alone, nothing happens: ``Processes()``."""
    launch = launch_of(args)
    if launch is None:
        return Processes()
    kwargs, how = launch
    import jax

    try:
        jax.distributed.initialize(
            **kwargs, initialization_timeout=JOIN_TIMEOUT_S, heartbeat_timeout_seconds=HEARTBEAT_S
        )
    except Exception as err:  # a coordinator that never answers, a port in use, a wrong count
        raise InputError(f"could not join the run's other processes ({how}): {one_line(err)}") from err
    return Processes(jax.process_index(), jax.process_count(), how)


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one short line (XLA's runtime errors span many)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Words in the runtime's errors that mean a peer is gone, not that this process failed.
_PEER_GONE = ("gloo", "connection closed", "connection reset", "heartbeat", "coordination service",
              "barrier", "unavailable", "nccl", "socket closed")  # fmt: skip


def fail(processes: Processes, command: str, err: BaseException, code: int = 1) -> NoReturn:
    """End this process of a multi-process run with one line, at once.

    Not a normal exit: JAX's exit handler waits at a shutdown barrier for every process, which a
    dead peer never reaches (the survivors would then abort with a page of runtime logs)."""
    text = one_line(err)
    if any(word in text.lower() for word in _PEER_GONE):
        what = f"another process of the run stopped ({text})"
    else:
        what = f"{type(err).__name__}: {text}"
    print(
        f"diffseg {command}: {processes.describe()}: {what}; the run stops; run the same command"
        " again to resume from its last checkpoint",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(code)


class AgreedStop:
    """The signal to stop at, the same in every process of a run: ``signum()`` after each step.

    ``stop.signum`` is the signal this process received (None: none; ``diffseg.train.loop``'s
    handler sets it). Alone, that is the answer. Several processes (SIGTERM may reach them at
    different steps, or only one) each put theirs into a tiny all-reduce dispatched after the
    step and read the previous step's result: every process stops after the same step, one step
    after the first signal, and the read never waits for the step in flight.
    """

    def __init__(self, stop: Any, mesh: Any):
        import jax
        import jax.numpy as jnp

        from diffseg.parallel import batch_sharding, replicated

        self._stop, self._mesh = stop, mesh
        self._several = jax.process_count() > 1
        self._pending: Any = None
        self._split = batch_sharding(mesh)
        if self._several:  # the largest signal number received by any process (0: none)
            self._max = jax.jit(jnp.max, out_shardings=replicated(mesh))

    def signum(self) -> int | None:
        if not self._several:
            return self._stop.signum
        import numpy as np

        from diffseg.train.feed import process_batch

        n = self._mesh.size
        mine = np.full(n, self._stop.signum or 0, np.int32)  # (devices,): this process's vote in its rows
        vote = self._max(process_batch(mine, mine, np.arange(n), self._split)[0])
        previous, self._pending = self._pending, vote
        return (int(previous) or None) if previous is not None else None
