"""``diffseg download``, ``diffseg data`` and ``diffseg data-figure``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from diffseg.choices import POOLS
from diffseg.config import load_yaml, validate_config
from diffseg.errors import ConfigError, DataError
from diffseg.io import atomic_path

# The stage's other modules load jax: imported by the sub-commands that use them, so that every
# `diffseg` command starts fast (`diffseg status` answers in well under 2 s).


def _dataset_entry(config_path: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The workflow config, checked (:func:`validate_config`), and its ``datasets.{name}`` entry.

    ConfigError, naming the file, when the config is not valid or the entry is absent.
    """
    cfg = load_yaml(config_path)
    validate_config(cfg, config_path)
    datasets = cfg.get("datasets") or {}
    if name not in datasets:
        raise ConfigError(f"{config_path}: datasets.{name} not found (have: {sorted(datasets)})")
    return cfg, dict(datasets[name])


def _download(args: argparse.Namespace) -> int:
    cfg, entry = _dataset_entry(args.config, args.dataset)
    from diffseg.data.download import download_dataset

    download_dataset(args.dataset, entry, cfg.get("resources", "resources"), base_url=args.zenodo_url)
    return 0


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _data(args: argparse.Namespace) -> int:
    cfg, entry = _dataset_entry(args.config, args.dataset)
    out = Path(cfg.get("results", "results")) / "data" / args.dataset
    resources = Path(cfg.get("resources", "resources")) / args.dataset
    from diffseg.data.prepare import prepare_dataset

    prepare_dataset(args.dataset, entry, out, resources, threads=args.threads, pool=args.pool)
    return 0


def _display_window(info: dict[str, Any], image: np.ndarray) -> tuple[float, float]:
    """Grey-level range: the CT soft-tissue window (W400 L40) when the HU clip is known, else percentiles.

    The HU -> normalised map is the preprocessing's: legacy clip maps [lo, hi] to [-1, 1]; reference
    rescales each case's [min, max] to [0, 1], which for a clipped CT crop is [lo, hi] (air and bone
    reach the clip bounds), so the window is exact whenever the case spans the clip range.
    """
    clip = info.get("clip")
    if info.get("modality") == "CT" and clip:
        lo, hi = float(clip[0]), float(clip[1])
        unit = lambda hu: (min(max(hu, lo), hi) - lo) / (hi - lo)
        to_norm = unit if info.get("normalize", "legacy") == "reference" else lambda hu: 2.0 * unit(hu) - 1.0
        return to_norm(-160.0), to_norm(240.0)
    lo, hi = np.percentile(image, [1.0, 99.5])
    return float(lo), float(hi)


LEGEND_ROWS = 32  # legend entries per column at 7 pt in the figure's 5.6 in
LEGEND_COLUMN_INCHES = 2.0


def data_figure(data_dir: str | Path, out: str | Path, cases: int = 4) -> list[str]:
    """Mid axial slices of the first ``cases`` cases, image and label overlay, with a class legend.

    The legend lists every class when there are at most 19 (phantoms, the paper's datasets), else
    the classes in the slices shown (TotalSegmentator's 117 would not fit), in as many columns of
    ``LEGEND_ROWS`` as they need; the figure widens for them. Colours: ``diffseg.colors``.
    Returns the uids shown. Written atomically (format from the ``out`` suffix).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from diffseg.colors import SMALL, class_colormap, class_colors
    from diffseg.data.dataset import load_dataset
    from diffseg.data.splits import SPLITS
    from diffseg.report.orient import load_radiological, mark_sides

    ds = load_dataset(data_dir)
    uids = sorted(u for split in SPLITS for u in ds.uids(split))[:cases]
    if not uids:
        raise DataError(f"{Path(data_dir) / 'split.csv'}: no cases to show")
    n_cls = ds.num_classes
    colors = class_colors(n_cls)
    cmap, norm = class_colormap(n_cls)
    slices = []
    for uid in uids:
        # Radiological display from each file's affine, as every figure (diffseg.report.orient).
        image = load_radiological(ds.dir / "images" / f"{uid}.nii.gz")
        label = load_radiological(ds.dir / "labels" / f"{uid}.nii.gz")
        k = image.num_slices // 2
        slices.append((uid, image, k, image.slice(k), label.slice(k).astype(int)))
    if n_cls <= SMALL:
        listed = list(range(1, n_cls))
        title = None
    else:
        shown = set(np.unique(np.concatenate([lab.ravel() for *_, lab in slices]))) - {0}
        listed = sorted(int(c) for c in shown if 0 < c < n_cls)
        title = f"classes in these slices ({len(listed)} of {n_cls - 1})"
    legend_cols = max(1, -(-len(listed) // LEGEND_ROWS))
    legend_width = LEGEND_COLUMN_INCHES * legend_cols + 0.2
    width = 2.6 * len(uids) + legend_width
    # Constrained layout: tight_layout packed aspect-locked image axes into each other (the
    # images of neighbouring cases overlapped) and left the legend to a guessed margin.
    fig, axes = plt.subplots(2, len(uids), figsize=(width, 5.6), squeeze=False, layout="constrained")
    for j, (uid, image, k, img2d, lab2d) in enumerate(slices):
        show = dict(origin="upper", aspect=image.aspect, interpolation="nearest")
        vmin, vmax = _display_window(ds.info, image.data)
        for ax in axes[:, j]:
            ax.imshow(img2d, cmap="gray", vmin=vmin, vmax=vmax, **show)
            ax.axis("off")
            mark_sides(ax)
        axes[1, j].imshow(np.ma.masked_equal(lab2d, 0), cmap=cmap, norm=norm, alpha=0.55, **show)
        z = image.source_index(k)
        axes[0, j].set_title(f"{uid} (z={z})", fontsize=8)
    handles = [Patch(color=colors[c - 1], label=f"{c} {ds.class_names[c]}") for c in listed]
    fig.legend(
        handles=handles, loc="outside right center", fontsize=7, frameon=False, ncols=legend_cols,
        title=title, title_fontsize=7, columnspacing=0.8, handlelength=1.2,
    )  # fmt: skip
    fig.suptitle(
        f"{ds.info.get('name', Path(data_dir).name)} ({ds.info.get('modality', '')}): "
        "mid axial slices (radiological: patient's right on the left, anterior up), image and labels",
        fontsize=9,
    )
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return uids


def _figure(args: argparse.Namespace) -> int:
    data_figure(args.data, args.out, args.cases)
    return 0


def register(subparsers: Any) -> None:
    """Add the data stage's sub-commands to the ``diffseg`` parser."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = subparsers.add_parser(
        "download",
        help="download and verify a Zenodo dataset into {resources}/{NAME} (resumable; without Zenodo, "
        "files put there by hand are used: a failure names the URL, the path and the md5)",
    )
    p.add_argument("--config", required=True, help="workflow config YAML (resources, results, datasets)")
    p.add_argument("--dataset", required=True, help="dataset name under datasets:")
    p.add_argument(
        "--zenodo-url", default=None, help="Zenodo base URL (default $DIFFSEG_ZENODO_URL or zenodo.org)"
    )
    p.set_defaults(func=_download)

    p = subparsers.add_parser("data", help="preprocess a dataset into {results}/data/{NAME}")
    p.add_argument("--config", required=True, help="workflow config YAML (resources, results, datasets)")
    p.add_argument("--dataset", required=True, help="dataset name under datasets:")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="CPU threads: up to this many cases are prepared at once (the data rule passes its "
        "compute.data.threads); the output is the same for any number (default 1)",
    )
    p.add_argument(
        "--pool",
        choices=POOLS,
        default="thread",
        help="workers for --threads > 1: threads (default) or spawned processes "
        "(benchmarks/RESULTS.md, 'Data stage', compares them)",
    )
    p.set_defaults(func=_data)

    p = subparsers.add_parser("data-figure", help="figure of a few prepared cases with their labels")
    p.add_argument("--data", required=True, help="a prepared dataset folder (results/data/NAME)")
    p.add_argument("--out", required=True, help="output image (png/pdf)")
    p.add_argument("--cases", type=int, default=4, help="number of cases to show")
    p.set_defaults(func=_figure)
