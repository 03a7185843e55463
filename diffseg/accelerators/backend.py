"""Which backend and devices a job got, said at its start; a run that asks for a GPU gets one or stops.

``train.platform`` in a run config: ``any`` (the default: whatever JAX finds) or ``gpu``, ``tpu``,
``cpu``. ``config/paper.yaml`` asks for ``gpu``: its 12 500 steps take days on a CPU, so a job that
would silently train there (a CPU-only jaxlib, a node without a visible GPU) stops at once and
says how to install CUDA JAX. ``DIFFSEG_ALLOW_CPU=1`` (any route: local, Snakemake, SLURM) or
``--set train.platform=any`` (``diffseg train``) lets it train where it is; neither changes the
run's parameters, so neither restarts a run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from diffseg.errors import ConfigError
from diffseg.runconfig import RunConfig, RunConfigLike

ALLOW_CPU_VAR = "DIFFSEG_ALLOW_CPU"
INSTALL_HINT = (
    'install CUDA JAX in this environment: pip install -e ".[cuda12]" (pip), or after'
    ' conda env create -f environment.yml: pip install -e ".[cuda12]" (README, "GPU set-up");'
    " check with: python -c 'import jax; print(jax.devices())'"
)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def compute_capability(device: Any) -> tuple[int, int] | None:
    """``(major, minor)`` of a CUDA device, ``None`` for other devices."""
    text = getattr(device, "compute_capability", None)
    if not text:
        return None
    major, _, minor = str(text).partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        return None


def describe_devices(devices: Sequence[Any], backend: str) -> str:
    """One line: the backend, how many devices, and for GPUs their name, capability and memory."""
    if not devices:
        return f"backend {backend}: no devices"
    first = devices[0]
    kind = getattr(first, "device_kind", "") or first.platform
    text = f"backend {backend}: {len(devices)} device(s), {kind}"
    cc = compute_capability(first)
    if cc is not None:
        text += f" (compute capability {cc[0]}.{cc[1]})"
    stats = first.memory_stats() if hasattr(first, "memory_stats") else None
    if stats and stats.get("bytes_limit") and backend != "cpu":
        text += f", allocator {_gib(stats['bytes_limit'])} per device"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if backend == "gpu" and visible is not None:
        text += f" (CUDA_VISIBLE_DEVICES={visible})"
    return text


def bf16_warning(devices: Sequence[Any], bf16: bool) -> str | None:
    """A warning when bf16 is asked for on GPUs without bfloat16 tensor cores (before Ampere, 8.0)."""
    if not bf16 or not devices:
        return None
    cc = compute_capability(devices[0])
    if cc is None or cc >= (8, 0):
        return None
    kind = getattr(devices[0], "device_kind", "this GPU")
    return (
        f"train.bf16: true, but {kind} (compute capability {cc[0]}.{cc[1]}) has no bfloat16 tensor cores:"
        " its bf16 convolutions run as float32 arithmetic, slower than float32 itself; set train.bf16: false"
    )


def check_platform(run_cfg: RunConfigLike, backend: str, env: Mapping[str, str] | None = None) -> None:
    """``ConfigError`` when the run asks for ``train.platform`` X and JAX's backend is another.

    ``DIFFSEG_ALLOW_CPU=1`` lets a run that asks for an accelerator train on the CPU.
    """
    run_cfg = RunConfig.of(run_cfg)
    env = os.environ if env is None else env
    wanted = run_cfg.train.platform
    if wanted in ("any", backend):
        return
    if backend == "cpu" and env.get(ALLOW_CPU_VAR, "") not in ("", "0"):
        return
    run = run_cfg.run or "this run"
    raise ConfigError(
        f"train.platform: {wanted}: run {run!r} asks for a {wanted.upper()}, but JAX found only the"
        f" {backend.upper()} here. To use the {wanted.upper()}, {INSTALL_HINT}. To train on the"
        f" {backend.upper()} anyway (days for the paper's runs): {ALLOW_CPU_VAR}=1, or"
        f" --set train.platform=any"
    )


def report(run_cfg: RunConfig | None, say: Any) -> None:
    """Say the backend and devices (and any bf16 warning); check ``train.platform`` when given a run."""
    import jax

    backend = jax.default_backend()
    devices = jax.local_devices()
    say(describe_devices(devices, backend))
    if run_cfg is not None:
        warning = bf16_warning(devices, run_cfg.train.bf16)
        if warning:
            say(f"warning: {warning}")
