"""The ``diffseg`` command line: one sub-command per pipeline stage.

Each stage package owns its sub-commands in its own ``cli.py`` with a ``register(subparsers)``
function; this module only collects them, so stages can change without touching each other.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from diffseg.errors import InputError, disk_full_cause
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


def compilation_cache(min_seconds: float | None = None) -> None:
    """Keep XLA's compiled programs on disk (``$DIFFSEG_CACHE/jax``, default ``~/.cache/diffseg/jax``).

    The runs of a table share most programs (the same network's initialisation, its sampling
    for validation and test), and a compilation costs seconds to a minute on a small CPU. The
    cache is keyed by the program, the backend and the compile options, so a hit is the same
    executable. ``DIFFSEG_JAX_CACHE=0`` turns it off; JAX's own settings
    (``JAX_COMPILATION_CACHE_DIR``) win.
    """
    import os
    from pathlib import Path

    if os.environ.get("DIFFSEG_JAX_CACHE", "1") == "0" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    cache = str(Path(os.environ.get("DIFFSEG_CACHE", Path.home() / ".cache" / "diffseg")) / "jax")
    if "jax" not in sys.modules:  # JAX reads its settings from the environment when first imported,
        # so commands that never compile (status, table, ...) do not pay for importing it here
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
        if min_seconds is not None:
            os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(float(min_seconds))
        return
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", cache)
    if min_seconds is not None:  # JAX's default keeps programs that took 1 s or more to compile
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_seconds))


def claim_devices(args: argparse.Namespace) -> None:
    """Before JAX starts: this job's own GPUs (``--gpus N``) or TPU chips (``--tpus N|all``), both set
    by the workflow (``diffseg.accelerators.slots``), and the memory share JAX's allocator takes of
    a GPU (``diffseg.accelerators.memory``). A machine has one kind or the other, so the other
    option finds no devices and claims nothing."""
    import os

    from diffseg.accelerators.memory import DEFAULT_MEM_FRACTION, MEM_FRACTION_VAR
    from diffseg.accelerators.slots import claim_gpus, claim_tpus

    if getattr(args, "target", None):
        # A plan for a named card or TPU slice compiles for it with its own compiler and runs
        # nothing: no accelerator backend to start (without a GPU, the CUDA plugin would print a
        # traceback; on a TPU VM, it would take the chips), and no persistent cache (its entries
        # are loaded executables, which need the hardware).
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # the plugin's check needs a GPU
        os.environ["DIFFSEG_JAX_CACHE"] = "0"
    if getattr(args, "gpus", None) is not None:
        ids = claim_gpus(int(args.gpus))
        if ids:
            print(f"diffseg {args.command}: GPU(s) {', '.join(ids)} claimed for this job", file=sys.stderr)
    if getattr(args, "tpus", None) is not None:
        ids = claim_tpus(args.tpus)
        if ids:
            box = os.environ.get("TPU_VISIBLE_CHIPS") == ",".join(ids)  # the whole host sets nothing
            what = f"(libtpu port {os.environ.get('TPU_PROCESS_PORT')})" if box else "(the whole host)"
            print(f"diffseg {args.command}: TPU chip(s) {', '.join(ids)} {what} claimed for this job",
                  file=sys.stderr)  # fmt: skip
    os.environ.setdefault(MEM_FRACTION_VAR, str(DEFAULT_MEM_FRACTION))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; sub-commands set ``func`` and return an exit code."""
    args = build_parser().parse_args(argv)
    reuse_freed_memory()  # before any computation starts JAX's threads
    try:
        claim_devices(args)
    except InputError as err:
        print(f"diffseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    _quiet_libraries()
    compilation_cache()
    try:
        return int(args.func(args) or 0)
    except (InputError, FileNotFoundError) as err:
        # Bad input: one clear line naming the file and the problem, no traceback.
        print(f"diffseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        cause = disk_full_cause(err)  # a full disk met outside diffseg's own writers (a library's)
        if cause is None:
            raise
        where = f" writing {cause.filename}" if cause.filename else ""
        print(
            f"diffseg {args.command}: error: no space left on the device{where}; completed outputs and"
            " checkpoints are kept: free some space there and run the same command again",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
