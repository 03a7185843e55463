"""``diffseg train``: train one run from its resolved config (the workflow's train rule)."""

from __future__ import annotations

import argparse
import sys

from diffseg.accelerators.slots import add_device_arguments
from diffseg.config import apply_overrides, complete_run_config, load_yaml, parse_overrides
from diffseg.distributed import add_arguments as add_distributed_arguments
from diffseg.errors import InputError
from diffseg.runconfig import RunConfig


def _say(text: str) -> None:
    print(f"diffseg: {text}", file=sys.stderr, flush=True)


def _train(args: argparse.Namespace) -> int:
    from diffseg.distributed import fail, join

    processes = join(args)  # before JAX's backend starts: one of several processes, or alone
    if processes.count > 1:
        _say(processes.describe())  # the job's first line: which process of how many
    try:
        return _train_here(args)
    except SystemExit:
        raise
    except Exception as err:
        if processes.count > 1:  # the others stop too (a peer gone, or the same error): one line, no hang
            fail(processes, "train", err, 2 if isinstance(err, InputError) else 1)
        raise


def _train_here(args: argparse.Namespace) -> int:
    import jax

    from diffseg.accelerators.backend import check_platform, report
    from diffseg.train.loop import TrainingInterrupted, train_run

    saved = apply_overrides(load_yaml(args.run_config), parse_overrides(args.set))
    run_cfg = RunConfig.from_dict(complete_run_config(saved), where=args.run_config)  # checked once
    report(run_cfg, _say)
    check_platform(run_cfg, jax.default_backend())  # before any data is read or step compiled
    try:
        best = train_run(run_cfg, args.data, args.out)
    except TrainingInterrupted as stop:  # 143 for SIGTERM, 130 for SIGINT, as a shell reports them
        print(f"diffseg train: {stop}", file=sys.stderr)
        return stop.exit_code
    if jax.process_index() == 0:  # one process speaks for a run of several
        print(f"best validation mean foreground Dice {best['mean_dice']:.4f} at step {best['step']}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from diffseg.accelerators.backend import report
    from diffseg.train.plan import parse_bytes, plan

    report(None, _say)
    memory = parse_bytes(args.device_memory) if args.device_memory else None
    target = None
    if args.target:
        from diffseg.accelerators.targets import get_target

        target = get_target(args.target)
    facts, text = plan(
        load_yaml(args.configfile), args.dataset, args.run, parse_overrides(args.set),
        compile_step=not args.no_compile, device_memory=memory, target=target, every=not args.chosen_only,
    )  # fmt: skip
    print(text, end="")
    if args.json:
        from diffseg.io import atomic_write_json

        atomic_write_json(args.json, facts)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``plan`` to the ``diffseg`` command line."""
    parser = subparsers.add_parser("train", help="train one run (resumes from its last checkpoint)")
    parser.add_argument(
        "--run-config", required=True, help="resolved run config (results/runs/D/R/config.yaml)"
    )
    parser.add_argument("--data", required=True, help="preprocessed dataset folder (results/data/D)")
    parser.add_argument("--out", required=True, help="run folder for logs and checkpoints")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.steps=10")
    add_device_arguments(parser)
    add_distributed_arguments(parser)
    parser.set_defaults(func=_train)

    parser = subparsers.add_parser(
        "plan", help="what a run will train and XLA's plan of one step (compiled, not run)"
    )
    parser.add_argument("--configfile", default="config/config.yaml", help="workflow config YAML")
    parser.add_argument("--dataset", required=True, help="a key of datasets: in the config")
    parser.add_argument("--run", required=True, help="run name, e.g. 3d-diff")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. train.batch_size=4")
    parser.add_argument(
        "--device-memory", help="say whether the step fits a GPU card of this much, e.g. 24GB or 80GiB"
    )
    parser.add_argument(
        "--target",
        help="compile for this GPU card or TPU slice with its own compiler here, without it: GPUs"
        " (the gpu-plan extra) h100-80gb, h200, a100-40gb, a100-80gb, a6000, v100-16gb, or a"
        " GpuTargetConfigProto .txtpb file; TPU slices (the tpu extra) tpu-v3-8, tpu-v4-8,"
        " tpu-v5p-8, tpu-v5e-8, tpu-v6e-8, and the pod slice tpu-v3-32 (4 hosts)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip XLA's compilation (fast)")
    parser.add_argument(
        "--chosen-only",
        action="store_true",
        help="with --target/--device-memory: compile only the plans the choice needs, not every"
        " micro-batch with and without remat (a paper-sized TPU plan is minutes per compile)",
    )
    parser.add_argument("--json", help="also write the numbers as JSON here")
    parser.set_defaults(func=_plan)
