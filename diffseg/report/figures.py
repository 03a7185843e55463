"""Figures 2 and 3 of the paper (matplotlib Agg + seaborn).

* Figure 3: mean Dice per class (one point/bar per model), the class's mean volume share
  (in %) beside its name, one panel per dataset; the legend gives each model's Spearman r.
* Figure 2: example slices of test cases: image, ground truth, the non-diffusion
  prediction and the diffusion prediction, a few cases per dataset, in the radiological
  convention of every figure (``diffseg.report.orient``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from diffseg.errors import DataError  # noqa: E402
from diffseg.io import atomic_path  # noqa: E402
from diffseg.report.orient import DisplayVolume, load_radiological, mark_sides  # noqa: E402
from diffseg.report.stats import class_spearman, class_summary  # noqa: E402
from diffseg.report.tables import metrics_path, read_metrics  # noqa: E402


def save(fig: plt.Figure, outputs: Sequence[str | Path]) -> None:
    """Save a figure to each path (format from the suffix), atomically."""
    for out in outputs:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight")
    plt.close(fig)


def figure3(
    runs_dir: str | Path, models: Sequence[tuple[str, str]], outputs: Sequence[str | Path]
) -> pd.DataFrame:
    """Draw Figure 3 and return its data (``dataset, run, class, class_name, dice, volume_share``)."""
    frames, rho = [], {}
    for dataset, run in models:
        cs = class_summary(read_metrics(metrics_path(runs_dir, dataset, run)))
        rho[dataset, run] = class_spearman(cs)[0]
        cs.insert(0, "run", run)
        cs.insert(0, "dataset", dataset)
        frames.append(cs)
    data = pd.concat(frames, ignore_index=True)
    datasets = list(dict.fromkeys(d for d, _ in models))
    fig, axes = plt.subplots(len(datasets), 1, figsize=(10, 3.6 * len(datasets)), squeeze=False)
    for ax, dataset in zip(axes[:, 0], datasets, strict=True):
        d = data[data["dataset"] == dataset].copy()
        # The class's share is the same for every model (a property of the labels): take the mean.
        share = d.groupby("class_name")["volume_share"].mean()
        order = share.sort_values(ascending=False).index.tolist()
        d["model"] = [f"{r} (r={rho[dataset, r]:.2f})" for r in d["run"]]
        sns.barplot(data=d, x="class_name", y="dice", hue="model", order=order, ax=ax)
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([f"{c} ({100 * share[c]:.2f}%)" for c in order], rotation=35, ha="right")
        ax.set_ylim(0, 1)
        ax.set_xlabel("")
        ax.set_ylabel("mean Dice")
        ax.set_title(f"{dataset}: mean Dice per class (class volume share in brackets)")
        # Beside the axes: inside, it hid the bars of the last classes.
        legend = dict(fontsize=7, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        ax.legend(title="model (Spearman r)", **legend)
    fig.tight_layout()
    save(fig, outputs)
    return data


def _load(path: Path) -> DisplayVolume:
    if not path.exists():
        raise DataError(f"{path}: not found (needed for Figure 2)")
    return load_radiological(path)


def figure2(
    results: str | Path,
    panels: Sequence[Mapping[str, Any]],
    outputs: Sequence[str | Path],
    cases: int = 2,
) -> list[tuple[str, str]]:
    """Draw Figure 2: per dataset, ``cases`` test cases × (image, truth, N, Y) axial slices.

    Args:
        results: the results folder (``{results}/data``, ``{results}/runs``).
        panels: dicts ``dataset, seg_run, diff_run`` (the non-diffusion and diffusion runs).
        outputs: image paths to write.
        cases: test cases shown per dataset: the first ``cases`` test uids (sorted) of the
            non-diffusion run's metrics, for a reproducible choice.

    Returns:
        The ``(dataset, uid)`` shown. Each row's slice is the axial slice with the most
        foreground in the ground truth, shown radiologically (patient's right on the left,
        anterior up; aspect from the voxel size) from each file's affine; its title gives the
        slice's index along the file's own array axis.
    """
    results = Path(results)
    rows = []
    for p in panels:
        m = read_metrics(metrics_path(results / "runs", p["dataset"], p["seg_run"]))
        for uid in sorted(m["uid"].unique())[:cases]:
            rows.append((p, uid))
    if not rows:
        raise DataError("Figure 2: no test cases to show")
    cols = ["image", "ground truth", "non-diffusion", "diffusion"]
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)), squeeze=False)
    for (p, uid), ax_row in zip(rows, axes, strict=True):
        ds = p["dataset"]
        image = _load(results / "data" / ds / "images" / f"{uid}.nii.gz")
        label = _load(results / "data" / ds / "labels" / f"{uid}.nii.gz")
        preds = [
            _load(results / "runs" / ds / run / "test" / "predictions" / f"{uid}.nii.gz")
            for run in (p["seg_run"], p["diff_run"])
        ]
        for name, vol in (("prediction", preds[0]), ("prediction", preds[1]), ("label", label)):
            if vol.data.shape != image.data.shape:
                raise DataError(
                    f"Figure 2: {ds}/{uid}: the {name} is on another grid than the image "
                    f"({'×'.join(map(str, vol.data.shape))} against {'×'.join(map(str, image.data.shape))})"
                )
        k = int(np.argmax((label.data > 0).reshape(-1, label.num_slices).sum(0)))
        vmax = max(int(label.data.max()), 1)
        show = dict(origin="upper", aspect=image.aspect, interpolation="nearest")
        ax_row[0].imshow(image.slice(k), cmap="gray", **show)
        for ax, lab in zip(ax_row[1:], [label, *preds], strict=True):
            ax.imshow(image.slice(k), cmap="gray", **show)
            ax.imshow(
                np.ma.masked_equal(lab.slice(k), 0),
                cmap="tab20",
                vmin=0,
                vmax=max(vmax, 19),
                alpha=0.6,
                **show,
            )
        z = image.source_index(k)
        titles = [
            f"{ds}\n{uid} z={z}",
            cols[1],
            f"{cols[2]} ({p['seg_run']})",
            f"{cols[3]} ({p['diff_run']})",
        ]
        for ax, title in zip(ax_row, titles, strict=True):
            ax.set_title(title, fontsize=8)
            ax.axis("off")
            mark_sides(ax)
    fig.tight_layout()
    save(fig, outputs)
    return [(p["dataset"], uid) for p, uid in rows]
