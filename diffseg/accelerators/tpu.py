"""The TPU compiler aimed at a slice this machine does not have (``diffseg plan --target tpu-*``).

libtpu, the TPU runtime that jax's ``tpu`` extra installs as a wheel at jax's version, also holds
the TPU compiler, and describes a slice by its topology without opening a chip:
``jax.experimental.topologies.get_topology_desc("v3:2x2", "tpu")`` gives the 8 compile-only
TensorCores of a v3-8. A step compiled on arrays sharded over them returns the slice's own
per-device memory plan and a cost analysis (FLOPs, and ``optimal_seconds``: the compiler's
estimate of the step's time). Nothing here runs on, or needs, a TPU; the plan process runs JAX on
its CPU backend (``diffseg.cli`` sets ``JAX_PLATFORMS=cpu`` for ``--target``).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import MutableMapping
from typing import Any

from diffseg.accelerators.targets import TpuTarget
from diffseg.errors import ConfigError

TPU_PLAN_EXTRA = 'the tpu extra: pip install -e ".[tpu]" (libtpu at jax\'s version, no TPU needed)'


def planning_environment(target: TpuTarget, env: MutableMapping[str, str] | None = None) -> None:
    """Tell libtpu, before it loads, that it plans for a slice and opens no chip.

    Off a TPU VM libtpu asks Google Cloud's metadata server what it runs on and, failing, logs
    warnings and an error about worker hostnames; the slice being planned answers both. libtpu also
    takes a machine-wide lock (``/tmp/libtpu_lockfile``) that guards the chips, so a second process
    loading it fails ("Internal error when accessing libtpu multi-process lockfile"): a plan opens
    no chip, so it skips the lock, and several plans, or a plan beside a training job on a TPU VM,
    run at once. Values the user set are kept.
    """
    env = os.environ if env is None else env
    env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    env.setdefault("TPU_SKIP_MDS_QUERY", "1")
    env.setdefault("TPU_ACCELERATOR_TYPE", target.accelerator_type)
    env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    env.setdefault("TPU_WORKER_ID", "0")


def tpu_topology(target: TpuTarget) -> Any:
    """``jax.experimental.topologies.TopologyDescription`` of ``target``'s compile-only devices."""
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"compiling for {target.name} needs {TPU_PLAN_EXTRA}")
    from jax.experimental import topologies

    planning_environment(target)
    options = {"chip_config_name": target.chip_config} if target.chip_config else {}
    topology = topologies.get_topology_desc(target.topology, "tpu", **options)
    kinds = {d.device_kind for d in topology.devices}
    if len(topology.devices) != target.devices or kinds != {target.device_kind}:
        # a libtpu that maps cores to devices, or names them, otherwise than the table says
        raise ConfigError(
            f"--target {target.name}: libtpu describes {target.topology} as {len(topology.devices)}"
            f" devices of kind {sorted(kinds)}, diffseg's table says {target.devices} {target.device_kind!r};"
            " upgrade diffseg or libtpu together with jax"
        )
    return topology


# libtpu's words when a program does not fit, e.g. "... exceeds available HBM (15.48G)" (0.0.42) or
# "Used 20.61G of 15.48G hbm" (older releases): the second number is the HBM a program may use.
_AVAILABLE = re.compile(r"available HBM \(([\d.]+)([KMGT]?)\)|Used [\d.]+[KMGT]? of ([\d.]+)([KMGT]?) hbm")
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def usable_hbm(target: TpuTarget, mesh: Any) -> int | None:
    """The HBM one of ``target``'s devices lets a program use, in libtpu's own figure (the chip's
    HBM less the runtime's reservation: 15.48 GiB of a v3 core's 16 GiB), or ``None`` when libtpu
    does not say it.

    libtpu gives the figure only when it refuses a program too large for it, so a trivial program
    of twice the device's HBM is compiled (in seconds; never run) to read it. A real TPU reports
    the same quantity as ``memory_stats()["bytes_limit"]``, which training's ``micro_batch: auto``
    reads: plan and training budget from the same number."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    columns = target.memory_bytes // 32  # float32 rows of 8 × columns: the whole HBM per device
    spec = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
    too_big = jax.ShapeDtypeStruct((8 * target.devices, columns), jnp.float32, sharding=spec)
    try:
        jax.jit(lambda a: a + 1).lower(too_big).compile()  # argument and result: twice the HBM
    except Exception as err:  # libtpu's RESOURCE_EXHAUSTED, a JaxRuntimeError
        found = _AVAILABLE.search(str(err))
        if found:
            number, unit = (found.group(1), found.group(2)) if found.group(1) else found.group(3, 4)
            return int(float(number) * _UNIT[unit])
    return None
