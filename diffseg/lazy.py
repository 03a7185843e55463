"""Packages whose public names are imported on first use (PEP 562's module ``__getattr__``).

The stage packages re-export names from modules that load jax (a second or more on a small CPU);
importing the package itself stays cheap, so the workflow's rules, every ``diffseg`` command's
start and ``diffseg status`` (well under 2 s) load only what they use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def exports(package: str, where: Mapping[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for ``package``, whose name ``n`` lives in ``package.{where[n]}``."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    return __getattr__, sorted(where)
