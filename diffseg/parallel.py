"""Data parallelism over the local devices: one mesh, batch axis split, parameters replicated.

Training uses the devices ``train.devices`` selects (:func:`training_devices`): ``auto`` takes
the most local devices that split the batch evenly, so a batch of 8 trains on 2 of 3 GPUs
rather than failing. A run of several processes (``diffseg.distributed``) trains on every device
of every process: the mesh spans them, each process holds its devices' shards (:func:`place`).
Evaluation and prediction use every local device (their batches are rounded up to the device
count). Parameters are replicated, so the device count changes only
how a step's arithmetic is split: a run may continue, and be loaded, on any number of devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffseg.errors import ConfigError
from diffseg.runconfig import RunConfig, RunConfigLike


def data_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every local device); the batch axis is split along ``"data"``."""
    return Mesh(np.array(list(devices) if devices is not None else jax.local_devices()), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays ``(batch, ...)`` split over the devices along the batch axis."""
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (parameters, optimizer state, the training volumes)."""
    return NamedSharding(mesh, PartitionSpec())


def place(tree: Any, sharding: NamedSharding) -> Any:
    """``tree``'s arrays (the same values in every process) as global arrays with ``sharding``.

    One process: ``jax.device_put``. Several: each process builds only its own devices' shards
    (``device_put`` cannot reach another process's devices)."""
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def one(x: Any) -> jax.Array:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)


def local_copy(tree: Any) -> Any:
    """A fully replicated tree of global arrays as host arrays of this process's copy (no
    communication), e.g. parameters for a computation on this process's devices alone."""
    if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
        return tree
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _names(devices: Sequence[Any]) -> str:
    return ", ".join(f"{d.platform}:{d.id}" for d in devices)


def _fits(n: int, batch_size: int, micro_batch: Any) -> bool:
    """Whether ``n`` devices split ``batch_size`` volumes evenly, into whole micro-batches when set."""
    if batch_size % n:
        return False
    if isinstance(micro_batch, int) and not isinstance(micro_batch, bool) and micro_batch >= 1:
        return (batch_size // n) % micro_batch == 0
    return True  # null or auto: any whole per-device batch


def _rule(batch_size: int, micro_batch: Any) -> str:
    rule = f"train.batch_size={batch_size} must divide evenly"
    if isinstance(micro_batch, int) and not isinstance(micro_batch, bool):
        rule += f" into whole micro-batches of train.micro_batch={micro_batch} per device"
    return rule


def training_devices(run_cfg: RunConfigLike, devices: Sequence[Any] | None = None) -> tuple[list[Any], str]:
    """The devices a run trains on, and one line saying which and, when not all, why.

    ``devices``: those available (default ``jax.devices()``: this process's, or in a run of
    several processes every process's, all of which then train). ``train.devices``:

    * ``auto`` (the default; also when the key is absent, as in older runs' configs): the
      largest ``n`` of the available devices such that ``train.batch_size % n == 0`` and, when
      ``train.micro_batch`` is an integer ``m``, ``(batch_size / n) % m == 0``;
    * a positive integer ``n``: exactly the first ``n`` devices.

    A request that cannot be met (more devices than available, a count that does not divide
    the batch, no count at all that fits ``train.micro_batch``) is a ``ConfigError`` naming
    ``train.devices`` (or ``train.micro_batch``), the value, the rule and the nearest valid value.
    """
    run_cfg = RunConfig.of(run_cfg)
    if devices is None and jax.process_count() > 1:
        return _every_process(run_cfg, jax.devices())
    available = list(devices) if devices is not None else jax.local_devices()
    train = run_cfg.train
    wanted, batch_size, micro_batch = train.devices, train.batch_size, train.micro_batch
    valid = [n for n in range(1, len(available) + 1) if _fits(n, batch_size, micro_batch)]
    rule = _rule(batch_size, micro_batch)
    here = f"{len(available)} device(s) here ({_names(available)})"
    if wanted == "auto":
        if not valid:  # only a micro-batch that divides no per-device batch gets here
            raise ConfigError(
                f"train.micro_batch={micro_batch!r}: {rule}, on no device count up to the {here};"
                f" choose a divisor of train.batch_size={batch_size}"
            )
        n = valid[-1]
        why = "" if n == len(available) else f": {rule}"
        chosen = available[:n]
        return chosen, f"using {n} of {len(available)} devices ({_names(chosen)}){why}"
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
        raise ConfigError(f"train.devices must be auto or a positive integer, got {wanted!r}")
    if wanted in valid:
        chosen = available[:wanted]
        note = f"using {wanted} of {len(available)} devices ({_names(chosen)}): train.devices={wanted}"
        return chosen, note
    if wanted > len(available):
        problem = f"asks for more devices than the {here}"
    else:
        problem = rule
    # The nearest count that works on this machine (ties: both).
    best = min((abs(n - wanted) for n in valid), default=None)
    nearest = " or ".join(str(n) for n in valid if abs(n - wanted) == best) if valid else None
    hint = f"nearest valid value: {nearest}" if nearest else "no count fits here"
    raise ConfigError(f"train.devices={wanted}: {problem}; {hint} (or train.devices: auto)")


def _every_process(run_cfg: RunConfig, available: list[Any]) -> tuple[list[Any], str]:
    """A run of several processes trains on every device of every process (each holds a part of
    the batch, none idles): the batch must split over all of them; ``train.devices`` may only say so."""
    train, processes, n = run_cfg.train, jax.process_count(), len(available)
    here = jax.local_device_count()
    where = f"the {n} devices of the run's {processes} processes ({here} per process here)"
    if train.devices not in ("auto", n):
        raise ConfigError(f"train.devices={train.devices!r}: a run of several processes trains on {where};"
                          " set train.devices: auto")  # fmt: skip
    if not _fits(n, train.batch_size, train.micro_batch):
        raise ConfigError(f"{_rule(train.batch_size, train.micro_batch)} over {where}: choose a"
                          f" train.batch_size that is a multiple of {n}")  # fmt: skip
    return available, f"using {where}"
