"""Training curves: the training loss and the validation Dice of every run against the step.

Reads each run's ``train_log.csv`` (``step, loss, ...``, one row per logged step) and
``valid.csv`` (``step, mean_dice``, one row per validation), the training stage's output
contract (``docs/ARCHITECTURE.md``), and draws one figure with a panel per dataset and
quantity: loss (log scale, smoothed over a few logged steps when there are many) above,
validation mean foreground Dice below, one line per run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from diffseg.errors import DataError  # noqa: E402
from diffseg.io import atomic_path  # noqa: E402


def read_curves(runs_dir: str | Path, models: Sequence[tuple[str, str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The loss and validation curves of ``models`` (``(dataset, run)`` pairs), long format.

    Returns:
        ``(train, valid)``: ``dataset, run, step, loss`` and ``dataset, run, step, mean_dice``.

    Raises:
        DataError: a run's file is missing or lacks its columns.
    """
    train, valid = [], []
    for dataset, run in models:
        base = Path(runs_dir) / dataset / run
        for name, cols, out in (
            ("train_log.csv", ["step", "loss"], train),
            ("valid.csv", ["step", "mean_dice"], valid),
        ):
            path = base / name
            if not path.is_file():
                raise DataError(f"{path}: missing (the training curves need every run's {name})")
            df = pd.read_csv(path)
            if not set(cols) <= set(df.columns):
                raise DataError(f"{path}: needs columns {cols}, has {list(df.columns)}")
            out.append(df[cols].assign(dataset=dataset, run=run))
    cols_t, cols_v = ["dataset", "run", "step", "loss"], ["dataset", "run", "step", "mean_dice"]
    t = pd.concat(train, ignore_index=True)[cols_t] if train else pd.DataFrame(columns=cols_t)
    v = pd.concat(valid, ignore_index=True)[cols_v] if valid else pd.DataFrame(columns=cols_v)
    return t, v


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (shorter at the start); NaN-free input."""
    if window <= 1 or len(values) < 2:
        return values.astype(float)
    c = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    n = np.minimum(np.arange(1, len(values) + 1), window)
    return (c[1:] - c[np.arange(1, len(values) + 1) - n]) / n


DIM_STYLES = {"2d": "--", "3d": "-"}


def run_styles(runs: Sequence[str]) -> dict[str, dict[str, object]]:
    """A distinct ``(colour, line style)`` per run: the colour says the variant (``diff``,
    ``diff-noise``, ...: the same in 2D and 3D), the line style the dimension (2D dashed)."""
    variants = sorted({run.split("-", 1)[1] if "-" in run else run for run in runs})
    cmap = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
    colour = {v: cmap(i % cmap.N) for i, v in enumerate(variants)}
    styles = {}
    for run in runs:
        dim, _, variant = run.partition("-")
        styles[run] = {"color": colour[variant or dim], "ls": DIM_STYLES.get(dim, ":")}
    return styles


def plot_curves(train: pd.DataFrame, valid: pd.DataFrame, outputs: Sequence[str | Path]) -> None:
    """Draw ``read_curves``'s frames into each of ``outputs`` (.png, .pdf; written atomically).

    One legend for the whole figure, beside the panels, so no line is hidden under it.
    """
    datasets = sorted(set(train["dataset"]) | set(valid["dataset"])) or ["(no runs)"]
    styles = run_styles(sorted(set(train["run"]) | set(valid["run"])))
    fig, axes = plt.subplots(
        2, len(datasets), figsize=(5.0 * len(datasets), 6.5), squeeze=False, sharex="col"
    )
    for j, ds in enumerate(datasets):
        ax_l, ax_d = axes[0, j], axes[1, j]
        for run, df in train[train["dataset"] == ds].groupby("run", sort=True):
            df = df.sort_values("step")
            loss = df["loss"].to_numpy(dtype=float)
            window = max(1, len(loss) // 50)  # ~50 points of smoothing on long runs, none on short
            ax_l.plot(df["step"], smooth(loss, window), label=run, lw=1.2, **styles[run])
        for run, df in valid[valid["dataset"] == ds].groupby("run", sort=True):
            df = df.sort_values("step")
            ax_d.plot(df["step"], df["mean_dice"], marker="o", ms=3, label=run, lw=1.2, **styles[run])
        if (train["dataset"] == ds).any() and (train.loc[train["dataset"] == ds, "loss"] > 0).all():
            ax_l.set_yscale("log")
        ax_l.set_title(ds)
        ax_l.set_ylabel("training loss")
        ax_d.set_ylabel("validation mean Dice")
        ax_d.set_xlabel("step")
        ax_d.set_ylim(0, 1)
        for ax in (ax_l, ax_d):
            ax.grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.tight_layout()
    if handles:
        labels = sorted(handles, key=lambda r: (r.partition("-")[2], r))  # a variant's 2D and 3D together
        fig.legend([handles[k] for k in labels], labels, loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=8, frameon=False)  # fmt: skip
    for out in outputs:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=Path(out).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def curves(runs_dir: str | Path, models: Sequence[tuple[str, str]], outputs: Sequence[str | Path]) -> None:
    """The training-curves figure of ``models`` (``(dataset, run)``) from ``{results}/runs``."""
    plot_curves(*read_curves(runs_dir, models), outputs)


def parse_models(items: Sequence[str]) -> list[tuple[str, str]]:
    """``["dataset/run", ...]`` as ``(dataset, run)`` pairs."""
    out = []
    for item in items:
        dataset, sep, run = item.partition("/")
        if not sep or not dataset or not run or "/" in run:
            raise DataError(f"--models: {item!r} is not dataset/run")
        out.append((dataset, run))
    return out
