"""Which backend and devices a job got, said at its start; a run that asks for an accelerator gets
one or stops.

``train.platform`` in a run config: ``any`` (the default: whatever JAX finds), ``accelerator`` (a
GPU or a TPU, whichever this machine has), or ``gpu``, ``tpu``, ``cpu``. ``config/paper.yaml`` asks
for ``accelerator``: its 12 500 steps take days on a CPU, so a job that would silently train there
(a CPU-only jaxlib, a node without a visible GPU or TPU) stops at once and says how to install
CUDA JAX or TPU JAX. ``DIFFSEG_ALLOW_CPU=1`` (any route: local, Snakemake, SLURM) or
``--set train.platform=any`` (``diffseg train``) lets it train where it is; neither changes the
run's parameters, so neither restarts a run.

A TPU that another process holds (libtpu lets one process open a chip) is one line naming what to
do (:func:`start_backend`), not libtpu's log.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from diffseg.errors import ConfigError
from diffseg.runconfig import RunConfig, RunConfigLike

ALLOW_CPU_VAR = "DIFFSEG_ALLOW_CPU"
INSTALL = {
    "gpu": 'NVIDIA GPUs: pip install -e ".[cuda12]"',
    "tpu": 'a Cloud TPU VM: pip install -e ".[tpu]"',
}
CHECK = "check with: python -c 'import jax; print(jax.devices())'"
# What each train.platform accepts of JAX's backends.
ACCEPTS = {"any": ("cpu", "gpu", "tpu"), "accelerator": ("gpu", "tpu"), "gpu": ("gpu",), "tpu": ("tpu",),
           "cpu": ("cpu",)}  # fmt: skip


def install_hint(platform: str) -> str:
    """The install line(s) for ``platform`` (``accelerator``: both), as README gives them."""
    lines = [f"on {INSTALL[p]}" for p in ("gpu", "tpu") if p in ACCEPTS[platform]]
    where = "; or ".join(lines)
    conda = "conda: conda env create -f environment.yml first"
    return f"install JAX for it in this environment: {where} ({conda}); {CHECK}"


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


def _memory_text(device: Any, backend: str) -> str:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or not stats.get("bytes_limit") or backend == "cpu":
        return ""
    if backend == "tpu":
        return f", HBM per device {_gib(stats['bytes_limit'])}"
    return f", allocator {_gib(stats['bytes_limit'])} per device"


def describe_devices(devices: Sequence[Any], backend: str, env: Mapping[str, str] | None = None) -> str:
    """One line: the backend, how many devices, their kind and memory; for GPUs the compute
    capability, for TPUs the chips and the cores per chip; and the claim that restricted them."""
    env = os.environ if env is None else env
    if not devices:
        return f"backend {backend}: no devices"
    first = devices[0]
    kind = getattr(first, "device_kind", "") or first.platform
    text = f"backend {backend}: {len(devices)} device(s), {kind}"
    cc = compute_capability(first)
    if cc is not None:
        text += f" (compute capability {cc[0]}.{cc[1]})"
    if backend == "tpu":
        chips = len({tuple(getattr(d, "coords", ()) or (d.id,)) for d in devices})
        cores = getattr(first, "num_cores", None)
        text += f" ({chips} chip(s)" + (f", {cores} TensorCore(s) per device)" if cores else ")")
    text += _memory_text(first, backend)
    visible = {"gpu": "CUDA_VISIBLE_DEVICES", "tpu": "TPU_VISIBLE_CHIPS"}.get(backend)
    if visible and env.get(visible) is not None:
        text += f" ({visible}={env[visible]})"
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
    """``ConfigError`` when the run asks for ``train.platform`` X and JAX's backend is not one X takes.

    ``DIFFSEG_ALLOW_CPU=1`` lets a run that asks for an accelerator train on the CPU.
    """
    run_cfg = RunConfig.of(run_cfg)
    env = os.environ if env is None else env
    wanted = run_cfg.train.platform
    if backend in ACCEPTS[wanted]:
        return
    if backend == "cpu" and env.get(ALLOW_CPU_VAR, "") not in ("", "0"):
        return
    run = run_cfg.run or "this run"
    asked = "a GPU or a TPU" if wanted == "accelerator" else f"a {wanted.upper()}"
    raise ConfigError(
        f"train.platform: {wanted}: run {run!r} asks for {asked}, but JAX found only the"
        f" {backend.upper()} here. To use {asked}, {install_hint(wanted)}. To train on the"
        f" {backend.upper()} anyway (days for the paper's runs): {ALLOW_CPU_VAR}=1, or"
        f" --set train.platform=any"
    )


def tpu_busy(error: BaseException) -> str | None:
    """One line for libtpu's refusal to open chips another process holds, else ``None``."""
    text = str(error)
    held = ("in use", "busy", "already", "Resource temporarily", "lockfile")
    if ("TPU" not in text and "libtpu" not in text) or not any(s in text for s in held):
        return None
    return (
        "the TPU is held by another process (libtpu lets one process open a chip): wait for it to end"
        " (`sudo lsof -w /dev/accel* /dev/vfio/*` names it), or run each job on its own chips"
        " (the workflow's compute.{stage}.tpu; diffseg train --tpus N)"
    )


def start_backend() -> str:
    """Start JAX's backend and return its name; a TPU held by another process is a ``ConfigError``."""
    import jax

    try:
        return jax.default_backend()
    except RuntimeError as err:
        line = tpu_busy(err)
        if line is None:
            raise
        raise ConfigError(line) from None


def report(run_cfg: RunConfig | None, say: Any) -> None:
    """Say the backend and devices (and any bf16 warning); check ``train.platform`` when given a run."""
    import jax

    backend = start_backend()
    devices = jax.local_devices()
    say(describe_devices(devices, backend))
    if run_cfg is not None:
        warning = bf16_warning(devices, run_cfg.train.bf16)
        if warning:
            say(f"warning: {warning}")
