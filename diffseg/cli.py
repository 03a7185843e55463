"""The ``diffseg`` command line: one sub-command per pipeline stage.

Each stage package owns its sub-commands in its own ``cli.py`` with a ``register(subparsers)``
function; this module only collects them, so stages can change without touching each other.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from diffseg.errors import InputError
from diffseg.host_memory import reuse_freed_memory

STAGES = ("diffseg.data.cli", "diffseg.train.cli", "diffseg.evaluate.cli", "diffseg.report.cli")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every stage's sub-commands registered."""
    parser = argparse.ArgumentParser(prog="diffseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real missing dependency, not a stage not yet written
                raise
            continue
        module.register(sub)
    return parser


def _quiet_libraries() -> None:
    """Keep the terminal for progress: orbax logs every checkpoint operation at INFO via absl."""
    import logging

    for name in ("absl", "jax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.WARNING)
    except ImportError:  # absl comes with jax/orbax; nothing to quiet without it
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; sub-commands set ``func`` and return an exit code."""
    args = build_parser().parse_args(argv)
    reuse_freed_memory()  # before any computation starts JAX's threads
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except (InputError, FileNotFoundError) as err:
        # Bad input: one clear line naming the file and the problem, no traceback.
        print(f"diffseg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
