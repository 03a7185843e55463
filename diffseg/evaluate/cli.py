"""``diffseg test`` (a run's test split -> test/metrics.csv) and ``diffseg predict`` (a new scan)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffseg.accelerators.slots import add_device_arguments


def _say(text: str) -> None:
    print(f"diffseg: {text}", file=sys.stderr, flush=True)


def _test(args: argparse.Namespace) -> int:
    from diffseg.accelerators.backend import report
    from diffseg.evaluate.testset import evaluate_run

    report(None, _say)

    metrics = evaluate_run(args.run_dir, args.data, seed=args.seed)
    per_case = metrics.groupby("uid")["dice"].mean()
    print(
        f"{args.run_dir}: {per_case.size} test cases, mean foreground Dice {per_case.mean():.4f}, "
        f"{int(metrics['missed'].sum())} missed structures"
    )
    return 0


def entropy_path(mask_path: Path) -> Path:
    """Default uncertainty map path: ``mask.nii.gz`` -> ``mask_entropy.nii.gz``."""
    name = mask_path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return mask_path.with_name(name.removesuffix(suffix) + "_entropy" + suffix)
    return mask_path.with_name(name + "_entropy.nii.gz")


def _predict(args: argparse.Namespace) -> int:
    from diffseg.accelerators.backend import report
    from diffseg.evaluate.predict import predict_scan
    from diffseg.runs import load_trained

    report(None, _say)
    model, params, run_cfg, info = load_trained(args.run)
    out = Path(args.output)
    uncertainty = args.uncertainty or (entropy_path(out) if args.samples > 1 else None)
    predict_scan(model, params, run_cfg, info, args.image, out, args.samples, uncertainty, args.seed)
    print(f"wrote {out}" + (f" and {uncertainty}" if uncertainty else ""))
    return 0


def _sampling_steps(args: argparse.Namespace) -> int:
    from diffseg.accelerators.backend import report
    from diffseg.evaluate.studies import sampling_steps_run

    report(None, _say)
    metrics = sampling_steps_run(args.run_dir, args.data, args.steps, seed=args.seed)
    for k, m in metrics.groupby("steps"):
        print(f"{args.run_dir}: K={k}: mean foreground Dice {m.groupby('uid')['dice'].mean().mean():.4f}, "
              f"{m.groupby('uid')['seconds'].first().mean():.3g} s/case")  # fmt: skip
    return 0


def _uncertainty(args: argparse.Namespace) -> int:
    from diffseg.accelerators.backend import report
    from diffseg.evaluate.studies import uncertainty_run
    from diffseg.evaluate.uncertainty import auroc_from_histogram

    report(None, _say)
    cases, histogram = uncertainty_run(args.run_dir, args.data, args.samples, seed=args.seed)
    one, vote, auroc = cases["dice_one"].mean(), cases["dice_vote"].mean(), auroc_from_histogram(histogram)
    print(
        f"{args.run_dir}: {len(cases)} cases x {args.samples} samples: Dice one {one:.4f}, vote {vote:.4f};"
        f" voxel AUROC of entropy {auroc:.4f}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``test`` and ``predict`` to the ``diffseg`` command line."""
    test = subparsers.add_parser("test", help="segment a run's test split and write test/metrics.csv")
    test.add_argument("--run-dir", required=True, help="trained run folder (results/runs/D/R)")
    test.add_argument("--data", required=True, help="preprocessed dataset folder (results/data/D)")
    test.add_argument("--seed", type=int, default=0, help="sampling seed for diffusion runs")
    add_device_arguments(test)
    test.set_defaults(func=_test)

    steps = subparsers.add_parser(
        "sampling-steps", help="a diffusion run's test split at several sampling steps K (sampling_steps/)"
    )
    steps.add_argument("--run-dir", required=True, help="trained run folder (results/runs/D/R)")
    steps.add_argument("--data", required=True, help="preprocessed dataset folder (results/data/D)")
    steps.add_argument("--steps", type=int, nargs="+", required=True, help="the K values, e.g. 1 2 3 5 10 25")
    steps.add_argument("--seed", type=int, default=0, help="sampling seed (the test job's: 0)")
    add_device_arguments(steps)
    steps.set_defaults(func=_sampling_steps)

    unc = subparsers.add_parser(
        "uncertainty", help="N samples per test case of a diffusion run: entropy vs errors (uncertainty/)"
    )
    unc.add_argument("--run-dir", required=True, help="trained run folder (results/runs/D/R)")
    unc.add_argument("--data", required=True, help="preprocessed dataset folder (results/data/D)")
    unc.add_argument("--samples", type=int, required=True, help="samples per case (at least 2)")
    unc.add_argument("--seed", type=int, default=0, help="sampling seed (the test job's: 0)")
    add_device_arguments(unc)
    unc.set_defaults(func=_uncertainty)

    predict = subparsers.add_parser("predict", help="segment a new NIfTI scan with a trained run")
    predict.add_argument(
        "image",
        nargs="+",
        help="input scan (.nii or .nii.gz); for a run on several channels one 4D NIfTI or one file "
        "per channel, in the training data's channel order",
    )
    predict.add_argument("--run", required=True, help="trained run folder (results/runs/D/R)")
    predict.add_argument("-o", "--output", required=True, help="output mask (.nii.gz), on the input's grid")
    predict.add_argument(
        "--samples",
        type=int,
        default=1,
        help="diffusion samples; > 1 writes their majority vote and an entropy map",
    )
    predict.add_argument("--uncertainty", help="entropy map path (default: OUTPUT with _entropy)")
    predict.add_argument("--seed", type=int, default=0)
    add_device_arguments(predict)
    predict.set_defaults(func=_predict)
