"""How much of a device's memory a training step may plan to use: one rule for all callers.

JAX's GPU allocator reserves a fixed share of the card at start-up
(``XLA_PYTHON_CLIENT_MEM_FRACTION``, 0.75 in JAX). diffseg's GPU jobs own their card (one job per
card, ``diffseg.accelerators.slots``), so they let the allocator take ``DEFAULT_MEM_FRACTION`` of it unless
the user set the variable. A step is then planned to fill at most ``1 - HEADROOM`` of what the
allocator holds, leaving room for fragmentation and library workspaces (cuDNN, cuBLAS).

On a real device the allocator's share is read back (``memory_stats()["bytes_limit"]``); for a card
this machine does not have (``diffseg plan --target``), it is the card's memory times
:func:`memory_fraction`. Both then go through :func:`step_budget`, so training's
``micro_batch: auto`` and ``diffseg plan`` reach the same answer for the same card.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

MEM_FRACTION_VAR = "XLA_PYTHON_CLIENT_MEM_FRACTION"
DEFAULT_MEM_FRACTION = 0.90  # JAX's own default is 0.75: a card shared by several processes
HEADROOM = 0.10  # share of the allocator's memory a step leaves free


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


def allocator_bytes(card_bytes: int, env: Mapping[str, str] | None = None) -> int:
    """What JAX's allocator holds on a card of ``card_bytes`` in a diffseg job."""
    return int(card_bytes * memory_fraction(env))


def step_budget(allocator_limit: int, headroom: float = HEADROOM) -> int:
    """Bytes one training step may plan to use on a device whose allocator holds ``allocator_limit``."""
    return int(allocator_limit * (1.0 - headroom))
