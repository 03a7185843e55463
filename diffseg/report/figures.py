"""Figures 2 and 3 of the paper (matplotlib Agg + seaborn).

* Figure 3: mean Dice per class (one bar per model), the class's mean volume share (in %)
  beside its name, one panel per dataset; the legend gives each model's Spearman r. Up to 20
  classes the classes run along x (the paper's layout); more (TotalSegmentator's 117) run down
  the y axis in columns of at most 60, so every name stays readable (``figure3_layout``).
* Figure 2: example slices of test cases: image, ground truth, the non-diffusion
  prediction and the diffusion prediction, a few cases per dataset, in the radiological
  convention of every figure (``diffseg.report.orient``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from diffseg.colors import class_colormap  # noqa: E402
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


# Figure 3's layout by class count. Up to VERTICAL_MAX classes: the paper's vertical bars, one
# column per class, labels at 35°. More (TotalSegmentator has 117): one row per class, names
# horizontal, in columns of at most ROWS_PER_COLUMN rows; the figure grows with the classes.
VERTICAL_MAX = 20
ROWS_PER_COLUMN = 60
MAX_COLUMNS = 4  # beyond 240 classes the columns grow longer, not the figure wider
ROW_INCHES = 0.17  # per class row: 7 pt names with a gap, the bars of up to 4 models readable
COLUMN_INCHES = 5.6  # a horizontal column: ~2.3 in of names, the Dice axis beside them
VERTICAL_INCHES = 2.4  # a vertical panel's axes (the paper's figure: 10 × 3.6 in per dataset)
VERTICAL_DECOR_INCHES = 1.5  # its title and the names at 35° below it
HORIZONTAL_DECOR_INCHES = 1.6  # a horizontal panel's title and Dice scales above and below


def class_label(name: str, share: float) -> str:
    """A class's tick label: its name and its mean volume share in %."""
    return f"{name} ({100 * share:.2f}%)"


def figure3_layout(num_classes: int) -> tuple[str, int, float]:
    """How Figure 3 draws a dataset of ``num_classes`` foreground classes.

    Returns ``(orientation, columns, height)``: ``vertical`` (one panel, classes along x) or
    ``horizontal`` (classes down the y axis, split into ``columns`` side-by-side panels of at most
    ``ROWS_PER_COLUMN`` rows, or ``MAX_COLUMNS`` longer ones), and the height of the panel's axes in
    inches, which grows with the rows.
    """
    if num_classes <= VERTICAL_MAX:
        return "vertical", 1, VERTICAL_INCHES
    columns = min(MAX_COLUMNS, -(-num_classes // ROWS_PER_COLUMN))
    rows = -(-num_classes // columns)  # balanced columns: 117 classes -> 2 x 59 rows
    return "horizontal", columns, ROW_INCHES * rows


def _vertical_panel(ax: plt.Axes, d: pd.DataFrame, order: list[str], share: pd.Series) -> None:
    """The paper's layout: a group of bars per class along x, names at 35° below."""
    sns.barplot(data=d, x="class_name", y="dice", hue="model", order=order, ax=ax)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([class_label(c, share[c]) for c in order], rotation=35, ha="right")
    ax.set_ylim(0, 1)
    ax.set_xlabel("")
    ax.set_ylabel("mean Dice")


def _horizontal_panel(
    ax: plt.Axes, d: pd.DataFrame, order: list[str], share: pd.Series, hue_order: list[str]
) -> None:
    """One row per class (largest share on top), names horizontal, Dice along x at top and bottom."""
    sns.barplot(
        data=d, y="class_name", x="dice", hue="model", order=order, hue_order=hue_order, orient="h", ax=ax
    )
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([class_label(c, share[c]) for c in order], fontsize=7)
    for row in range(1, len(order), 2):  # bands on every other row: the eye follows a row to its bars
        ax.axhspan(row - 0.5, row + 0.5, color="0.93", zorder=0, linewidth=0)
    ax.set_ylim(len(order) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.grid(axis="x", color="0.8", linewidth=0.5)
    ax.set_axisbelow(True)
    ax.tick_params(axis="x", labeltop=True, top=True, labelsize=8)  # the Dice scale at both ends
    ax.set_ylabel("")
    ax.set_xlabel("mean Dice", fontsize=8)
    ax.margins(y=0)
    if ax.get_legend() is not None:
        ax.get_legend().remove()


def figure3(
    runs_dir: str | Path, models: Sequence[tuple[str, str]], outputs: Sequence[str | Path]
) -> pd.DataFrame:
    """Draw Figure 3 and return its data (``dataset, run, class, class_name, dice, volume_share, n``).

    One panel per dataset, its classes ordered by mean volume share (largest first); the layout
    follows the class count (:func:`figure3_layout`), so 8 classes look as in the paper and 117
    stay readable (names never overlap). ``outputs`` ending in ``.csv`` get the data (every class
    of every model), the others the drawing (format from the suffix).
    """
    frames, rho = [], {}
    for dataset, run in models:
        cs = class_summary(read_metrics(metrics_path(runs_dir, dataset, run)))
        rho[dataset, run] = class_spearman(cs)[0]
        cs.insert(0, "run", run)
        cs.insert(0, "dataset", dataset)
        frames.append(cs)
    data = pd.concat(frames, ignore_index=True)
    datasets = list(dict.fromkeys(d for d, _ in models))
    layouts = {ds: figure3_layout(data.loc[data["dataset"] == ds, "class_name"].nunique()) for ds in datasets}
    width = max([10.0] + [COLUMN_INCHES * cols for o, cols, _ in layouts.values() if o == "horizontal"])
    heights = [layouts[ds][2] for ds in datasets]
    # Constrained layout finds the room the names, titles and legends need around each panel;
    # the figure's height is the axes' plus an estimate of that room.
    decor = {"vertical": VERTICAL_DECOR_INCHES, "horizontal": HORIZONTAL_DECOR_INCHES}
    extra = sum(decor[layouts[ds][0]] for ds in datasets)
    fig = plt.figure(figsize=(width, sum(heights) + extra), layout="constrained")
    grid = fig.add_gridspec(len(datasets), 1, height_ratios=heights)  # constrained: the axes' ratios
    for i, dataset in enumerate(datasets):
        d = data[data["dataset"] == dataset].copy()
        # The class's share is the same for every model (a property of the labels): take the mean.
        share = d.groupby("class_name")["volume_share"].mean()
        order = share.sort_values(ascending=False, kind="stable").index.tolist()
        d["model"] = [f"{r} (r={rho[dataset, r]:.2f})" for r in d["run"]]
        hue_order = list(dict.fromkeys(d["model"]))
        orientation, columns, _ = layouts[dataset]
        axes = [fig.add_subplot(cell) for cell in grid[i].subgridspec(1, columns)]
        if orientation == "vertical":
            _vertical_panel(axes[0], d, order, share)
        else:
            rows = -(-len(order) // columns)
            for k, ax in enumerate(axes):
                part = order[k * rows : (k + 1) * rows]
                _horizontal_panel(ax, d[d["class_name"].isin(part)], part, share, hue_order)
        # Beside the axes: inside, it hid the bars of the last classes.
        legend = dict(title="model (Spearman r)", fontsize=7, title_fontsize=8, loc="upper left",
                      bbox_to_anchor=(1.01, 1))  # fmt: skip
        if orientation == "vertical":
            axes[0].set_title(f"{dataset}: mean Dice per class (class volume share in brackets)")
            axes[0].legend(**legend)
        else:
            axes[0].set_title(
                f"{dataset}: mean Dice per class, {len(order)} classes by volume share (in brackets)",
                loc="left",
                pad=22,  # above the top Dice scale
            )
            handles, labels = axes[0].get_legend_handles_labels()  # the bars' (its legend is removed)
            axes[-1].legend(handles, labels, **legend)
    figures = [o for o in outputs if Path(o).suffix.lower() != ".csv"]
    for out in outputs:
        if Path(out).suffix.lower() == ".csv":
            with atomic_path(out) as tmp:
                data.to_csv(tmp, index=False)
    save(fig, figures)
    return data


def _num_classes(data_dir: Path, *labels: DisplayVolume) -> int:
    """The dataset's class count (``dataset.json``), else the largest label value shown + 1.

    From the dataset when it can be read, so a class keeps its colour in every row of Figure 2.
    """
    try:
        return int(json.loads((data_dir / "dataset.json").read_text())["num_classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return max(int(lab.data.max()) for lab in labels) + 1


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
        cmap, norm = class_colormap(_num_classes(results / "data" / ds, label, *preds))
        show = dict(origin="upper", aspect=image.aspect, interpolation="nearest")
        ax_row[0].imshow(image.slice(k), cmap="gray", **show)
        for ax, lab in zip(ax_row[1:], [label, *preds], strict=True):
            ax.imshow(image.slice(k), cmap="gray", **show)
            ax.imshow(np.ma.masked_equal(lab.slice(k), 0), cmap=cmap, norm=norm, alpha=0.6, **show)
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
