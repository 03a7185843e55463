"""``diffseg train``: train one run from its resolved config (the workflow's train rule)."""

from __future__ import annotations

import argparse

from diffseg.config import apply_overrides, load_yaml, parse_overrides


def _train(args: argparse.Namespace) -> int:
    from diffseg.train.loop import train_run

    run_cfg = apply_overrides(load_yaml(args.run_config), parse_overrides(args.set))
    best = train_run(run_cfg, args.data, args.out)
    print(f"best validation mean foreground Dice {best['mean_dice']:.4f} at step {best['step']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` to the ``diffseg`` command line."""
    parser = subparsers.add_parser("train", help="train one run (resumes from its last checkpoint)")
    parser.add_argument(
        "--run-config", required=True, help="resolved run config (results/runs/D/R/config.yaml)"
    )
    parser.add_argument("--data", required=True, help="preprocessed dataset folder (results/data/D)")
    parser.add_argument("--out", required=True, help="run folder for logs and checkpoints")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.steps=10")
    parser.set_defaults(func=_train)
