"""How much of a device's memory a training step may plan to use: one rule for all callers,
parameterised by platform.

- **GPU.** JAX's GPU allocator reserves a fixed share of the card at start-up
  (``XLA_PYTHON_CLIENT_MEM_FRACTION``, 0.75 in JAX). diffseg's GPU jobs own their card (one job per
  card, ``diffseg.accelerators.slots``), so they let the allocator take ``DEFAULT_MEM_FRACTION``
  of it unless the user set the variable. A step then plans to fill at most ``1 - HEADROOM["gpu"]``
  of what the allocator holds: room for fragmentation and library workspaces (cuDNN, cuBLAS).
- **TPU.** JAX does not preallocate a TPU: there is no allocator share, and the TPU compiler
  assigns every buffer of a program at compile time (a program larger than what the device lets
  a program use does not compile at all). That usable HBM is the chip's less libtpu's own
  reservation (15.48 GiB of a v3 core's 16 GiB): a real TPU reports it as ``bytes_limit`` and
  libtpu's compiler says it for a slice that is not here (``diffseg.accelerators.tpu.usable_hbm``).
  A step plans to fill at most ``1 - HEADROOM["tpu"]`` of it: what the compiled step does not
  count, chiefly the next batch the host places on the device while a step runs.
- **CPU.** The machine's memory, with the GPU's headroom.

On a real device the usable bytes are read back (``memory_stats()["bytes_limit"]``: a GPU's
allocator share, a TPU core's HBM less the runtime's reservation); for hardware this machine does
not have (``diffseg plan --target``/``--device-memory``), they come from the device's memory
through :func:`usable_bytes`. Both then go through :func:`step_budget`, so training's
``micro_batch: auto`` and ``diffseg plan`` reach the same answer for the same device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

MEM_FRACTION_VAR = "XLA_PYTHON_CLIENT_MEM_FRACTION"
DEFAULT_MEM_FRACTION = 0.90  # JAX's own default is 0.75: a card shared by several processes
HEADROOM = {"gpu": 0.10, "tpu": 0.05, "cpu": 0.10}  # share of the usable memory a step leaves free


def memory_fraction(env: Mapping[str, str] | None = None) -> float:
    """The share of a GPU's memory JAX's allocator takes in diffseg's jobs (the user's setting wins)."""
    env = os.environ if env is None else env
    text = env.get(MEM_FRACTION_VAR)
    if text is None:
        return DEFAULT_MEM_FRACTION
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{MEM_FRACTION_VAR}={text!r}: expected a number in (0, 1]") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{MEM_FRACTION_VAR}={text!r}: expected a number in (0, 1]")
    return value


def usable_share(platform: str = "gpu", env: Mapping[str, str] | None = None) -> float:
    """The share of a device's memory a job can allocate: JAX's allocator share on a GPU, all of it
    on a TPU (no preallocation) or a CPU."""
    return memory_fraction(env) if platform == "gpu" else 1.0


def usable_bytes(device_bytes: int, platform: str = "gpu", env: Mapping[str, str] | None = None) -> int:
    """What a diffseg job can allocate on a device of ``device_bytes``: on a GPU, what JAX's
    allocator holds; elsewhere the whole memory."""
    return int(device_bytes * usable_share(platform, env))


def step_budget(usable: int, platform: str = "gpu") -> int:
    """Bytes one training step may plan to use on a device where a job can allocate ``usable``."""
    return int(usable * (1.0 - HEADROOM[platform]))


@dataclass(frozen=True)
class Budget:
    """A device's step budget and how it was reached: ``bytes = device × share × (1 − headroom)``."""

    platform: str
    device_bytes: int
    share: float  # JAX's allocator share (GPU) or 1.0
    headroom: float
    source: str = ""  # where device_bytes comes from, when not the device's memory itself

    @property
    def bytes(self) -> int:
        return step_budget(int(self.device_bytes * self.share), self.platform)

    def explain(self) -> str:
        """The rule in words and numbers, for a plan's text."""
        gib = 2**30
        text = f"{self.bytes / gib:.2f} GiB = {self.device_bytes / gib:.2f} GiB"
        if self.source:
            text += f" ({self.source})"
        if self.platform == "gpu":
            text += f" × {self.share:.2f} (JAX's allocator, {MEM_FRACTION_VAR})"
        elif self.platform == "tpu":
            text += " (JAX does not preallocate a TPU)"
        return text + f" × {1 - self.headroom:.2f} (headroom)"


def budget_for(
    device_bytes: int, platform: str = "gpu", env: Mapping[str, str] | None = None, source: str = ""
) -> Budget:
    """The step budget of a device of ``device_bytes`` that this machine may not have (for a TPU,
    best the HBM a program may use there, as libtpu says it: ``diffseg.accelerators.tpu.usable_hbm``)."""
    return Budget(platform, int(device_bytes), usable_share(platform, env), HEADROOM[platform], source)
