"""Figures 2 and 3 from synthetic NIfTI volumes and metrics (they are drawn and saved)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from diffseg.errors import DataError
from diffseg.report.figures import figure2, figure3


def _nii(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([0.75, 0.75, 2.5, 1.0])), str(path))


@pytest.fixture
def results(tmp_path):
    rng = np.random.default_rng(0)
    label = np.zeros((16, 16, 4), np.uint8)
    label[4:10, 4:10, 2] = 1
    label[11:13, 11:13, 1:3] = 2
    for uid in ("c1", "c2"):
        _nii(tmp_path / "data/ds/images" / f"{uid}.nii.gz", rng.normal(size=label.shape).astype(np.float32))
        _nii(tmp_path / "data/ds/labels" / f"{uid}.nii.gz", label)
        for run, shift in (("3d-seg", 1), ("3d-diff", 0)):
            _nii(tmp_path / "runs/ds" / run / "test/predictions" / f"{uid}.nii.gz", np.roll(label, shift, 0))
    for run in ("3d-seg", "3d-diff"):
        rows = [
            (u, c, f"class{c}", d, d, 1.0, 1.0, False, s)
            for u in ("c1", "c2")
            for c, d, s in ((1, 0.9, 0.05), (2, 0.4, 0.002), (3, 0.7, 0.02))
        ]
        m = pd.DataFrame(
            rows,
            columns=["uid", "class", "class_name", "dice", "nsd", "hd95", "cd", "missed", "volume_share"],
        )
        (tmp_path / "runs/ds" / run / "test").mkdir(parents=True, exist_ok=True)
        m.to_csv(tmp_path / "runs/ds" / run / "test/metrics.csv", index=False)
    return tmp_path


def test_figure2(results, tmp_path):
    outs = [tmp_path / "fig/f2.png", tmp_path / "fig/f2.pdf"]
    shown = figure2(results, [{"dataset": "ds", "seg_run": "3d-seg", "diff_run": "3d-diff"}], outs, cases=2)
    assert shown == [("ds", "c1"), ("ds", "c2")]
    assert all(p.stat().st_size > 1000 for p in outs)
    (results / "runs/ds/3d-diff/test/predictions/c1.nii.gz").unlink()
    with pytest.raises(DataError, match="c1.nii.gz"):
        figure2(results, [{"dataset": "ds", "seg_run": "3d-seg", "diff_run": "3d-diff"}], outs)


def test_figure3(results, tmp_path):
    outs = [tmp_path / "f3.png"]
    data = figure3(results / "runs", [("ds", "3d-seg"), ("ds", "3d-diff")], outs)
    assert len(data) == 6
    assert data.set_index(["run", "class"]).loc[("3d-seg", 2), "volume_share"] == pytest.approx(0.002)
    assert outs[0].stat().st_size > 1000


# --- Radiological display (diffseg.report.orient): one convention for every figure -------------

SPACING = (0.5, 2.0, 3.0)  # anisotropic in-plane, so a swapped aspect shows


def _marked(codes: str) -> tuple[np.ndarray, np.ndarray]:
    """A 6×5×4 volume stored in ``codes`` order with one voxel at the patient's right-anterior-
    superior corner, and its affine (voxel sizes ``SPACING`` along the array axes)."""
    vol = np.zeros((6, 5, 4), np.uint8)
    # Towards R, A, S is the last index where the axis code names that side, else the first.
    vol[tuple(-1 if c in "RAS" else 0 for c in codes)] = 1
    affine = np.diag([*(s if c in "RAS" else -s for c, s in zip(codes, SPACING, strict=True)), 1.0])
    return vol, affine


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "RPI"])
def test_radiological_puts_right_anterior_at_top_left(codes):
    from diffseg.report.orient import radiological

    vol, affine = _marked(codes)
    assert "".join(nib.aff2axcodes(affine)) == codes
    d = radiological(vol, affine)
    # rows A -> P (y, 2.0 mm), columns R -> L (x, 0.5 mm), slices I -> S.
    assert d.data.shape == (5, 6, 4) and d.spacing == SPACING[1::-1] + SPACING[2:]
    assert d.aspect == pytest.approx(4.0)
    k = d.num_slices - 1  # the most superior slice
    assert np.argwhere(d.slice(k)).tolist() == [[0, 0]]  # top-left: anterior up, patient's right left
    assert vol[..., d.source_index(k)].any()  # the file's own index of that slice


def test_radiological_follows_the_affine_not_the_array_order():
    """Array axis 0 along A-P (2 mm), axis 1 along R-L (0.5 mm), axis 2 towards inferior."""
    from diffseg.report.orient import radiological

    vol = np.zeros((5, 6, 4), np.uint8)
    vol[-1, -1, 0] = 1  # most anterior, rightmost, most superior
    affine = np.array([[0, 0.5, 0, 0], [2.0, 0, 0, 0], [0, 0, -3.0, 0], [0, 0, 0, 1]])
    assert nib.aff2axcodes(affine) == ("A", "R", "I")
    d = radiological(vol, affine)
    assert d.spacing == (2.0, 0.5, 3.0) and d.aspect == pytest.approx(4.0)
    assert np.argwhere(d.data).tolist() == [[0, 0, 3]]
    assert (d.source_axis, d.source_flipped, d.source_index(3)) == (2, True, 0)


def _shown(monkeypatch) -> list:
    """Capture the figures the drawing code closes (the first image of each axes)."""
    import matplotlib.pyplot as plt

    figs, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figs.append(fig), close(fig)))
    return figs


@pytest.mark.parametrize("codes", ["RAS", "LPS"])
def test_every_figure_shows_the_same_orientation(tmp_path, monkeypatch, codes):
    """Figure 2 and the data figure put the marker at the top-left with the same aspect."""
    import json

    from diffseg.data.cli import data_figure

    vol, affine = _marked(codes)
    # A block of foreground (so Figure 2 picks the superior slice) around the marker's corner.
    label = np.zeros_like(vol)
    label[tuple(slice(-2, None) if c in "RAS" else slice(0, 2) for c in codes[:2])] = 1
    label[..., :3] = 0
    label[vol > 0] = 2
    image = (10.0 * vol).astype(np.float32)
    data = tmp_path / "data/ds"
    for sub, arr in (("images", image), ("labels", label)):
        (data / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr, affine), str(data / sub / "c1.nii.gz"))
    columns = ["uid", "class", "class_name", "dice", "nsd", "hd95", "cd", "missed", "volume_share"]
    for run in ("3d-seg", "3d-diff"):
        test = tmp_path / "runs/ds" / run / "test"
        (test / "predictions").mkdir(parents=True)
        nib.save(nib.Nifti1Image(label, affine), str(test / "predictions/c1.nii.gz"))
        metrics = pd.DataFrame([("c1", 1, "a", 1.0, 1.0, 0.0, 0.0, False, 0.1)], columns=columns)
        metrics.to_csv(test / "metrics.csv", index=False)
    info = {"classes": ["bg", "a", "b"], "num_classes": 3, "spacing": list(SPACING), "shape": [6, 5, 4]}
    (data / "dataset.json").write_text(json.dumps(info))
    (data / "split.csv").write_text("uid,split\nc1,test\n")
    figs = _shown(monkeypatch)
    figure2(tmp_path, [{"dataset": "ds", "seg_run": "3d-seg", "diff_run": "3d-diff"}], [tmp_path / "f2.png"])
    data_figure(data, tmp_path / "ph.png", cases=1)
    assert len(figs) == 2
    for fig in figs:
        images = [ax.images for ax in fig.axes if ax.images]
        assert images
        for ims in images:
            shown = np.asarray(ims[0].get_array())
            assert shown.shape == (5, 6)
            assert np.unravel_index(np.argmax(shown), shown.shape) == (0, 0)  # the marker: top-left
            assert ims[0].origin == "upper" and ims[0].axes.get_aspect() == pytest.approx(4.0)


# --- Many classes (TotalSegmentator: 117): Figure 3 grows with the classes, names never overlap ---


def _many_class_metrics(runs, dataset: str, classes: int, name_of=lambda c: f"organ_{c:03d}_left") -> None:
    """Metrics of two runs, 3 cases × ``classes`` classes, shares spread over 3 decades."""
    rng = np.random.default_rng(classes)
    share = np.geomspace(0.1, 1e-4, classes)
    for run in ("3d-seg", "3d-diff"):
        rows = [
            (u, c, name_of(c), float(rng.uniform(0.3, 0.9)), 0.5, 1.0, 1.0, False, share[c - 1])
            for u in ("c1", "c2", "c3")
            for c in range(1, classes + 1)
        ]
        cols = ["uid", "class", "class_name", "dice", "nsd", "hd95", "cd", "missed", "volume_share"]
        (runs / dataset / run / "test").mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows, columns=cols).to_csv(runs / dataset / run / "test/metrics.csv", index=False)


def _drawn_figure3(monkeypatch, runs, datasets, outs):
    """Figure 3 drawn and saved; returns (its data, the figure as laid out, its renderer)."""
    import diffseg.report.figures as figures

    shown, save = [], figures.save

    def drawn(fig, outputs):
        fig.canvas.draw()  # the layout as saved; the renderer measures its texts afterwards
        shown.append((fig, fig.canvas.get_renderer()))
        save(fig, outputs)

    monkeypatch.setattr(figures, "save", drawn)
    data = figure3(runs, [(d, r) for d in datasets for r in ("3d-seg", "3d-diff")], outs)
    return data, *shown[0]


def _overlaps(boxes) -> list[tuple[int, int]]:
    """Pairs of boxes (matplotlib ``Bbox``) whose interiors intersect (touching edges allowed)."""
    return [
        (i, j)
        for i in range(len(boxes))
        for j in range(i + 1, len(boxes))
        if min(boxes[i].x1, boxes[j].x1) - max(boxes[i].x0, boxes[j].x0) > 0.5
        and min(boxes[i].y1, boxes[j].y1) - max(boxes[i].y0, boxes[j].y0) > 0.5
    ]


def test_figure3_with_117_classes_is_readable(tmp_path, monkeypatch):
    """117 classes (and an 8-class dataset beside them): one row per class, in columns, names
    horizontal; the figure grows with the classes; no two names overlap, and no name covers
    another column's bars; the CSV output holds every class of every model."""
    from diffseg.report.figures import ROW_INCHES, figure3_layout

    runs = tmp_path / "runs"
    _many_class_metrics(runs, "totalseg", 117)
    _many_class_metrics(runs, "small", 8)
    outs = [tmp_path / "f3.png", tmp_path / "f3.csv"]
    data, fig, renderer = _drawn_figure3(monkeypatch, runs, ["totalseg", "small"], outs)
    assert figure3_layout(8) == ("vertical", 1, pytest.approx(2.4))
    assert figure3_layout(117)[:2] == ("horizontal", 2)  # 2 columns of 59 rows
    width, height = fig.get_size_inches()
    assert height >= 59 * ROW_INCHES + 2.4 and width >= 10
    csv = pd.read_csv(outs[1])
    assert len(csv) == len(data) == 2 * (117 + 8) and set(csv["class"]) == set(range(1, 118))
    assert outs[0].stat().st_size > 10_000

    horizontal = [ax for ax in fig.axes if len(ax.get_yticklabels()) > 20]
    assert len(horizontal) == 2
    names, boxes = [], []
    for ax in horizontal:
        labels = [t for t in ax.get_yticklabels() if t.get_visible() and t.get_text()]
        names += [t.get_text().split(" (")[0] for t in labels]
        boxes += [t.get_window_extent(renderer) for t in labels]
    assert sorted(names) == sorted(f"organ_{c:03d}_left" for c in range(1, 118))
    assert _overlaps(boxes) == []
    # The names of the second column stay clear of the first column's axes (its bars).
    first = horizontal[0].get_window_extent(renderer)
    assert all(b.x0 >= first.x1 for b in boxes[59:])
    # Each name fits its row: the rows are at least as tall as the text.
    pitch = abs(boxes[1].y0 - boxes[0].y0)
    assert all(b.height <= pitch for b in boxes)


def test_figure3_grows_with_the_class_count(tmp_path, monkeypatch):
    """More classes, a taller figure: the rows keep their height (up to 4 columns, then longer)."""
    from diffseg.report.figures import MAX_COLUMNS, ROW_INCHES, ROWS_PER_COLUMN, figure3_layout

    sizes = {}
    for k in (8, 40, 117):
        runs = tmp_path / f"runs{k}"
        _many_class_metrics(runs, "ds", k)
        sizes[k] = _drawn_figure3(monkeypatch, runs, ["ds"], [tmp_path / f"f{k}.png"])[1].get_size_inches()
    assert sizes[8][1] < sizes[40][1] < sizes[117][1]
    assert sizes[117][1] >= 59 * ROW_INCHES
    assert figure3_layout(20)[0] == "vertical" and figure3_layout(21)[:2] == ("horizontal", 1)
    assert figure3_layout(ROWS_PER_COLUMN * MAX_COLUMNS + 100)[1] == MAX_COLUMNS


def test_figure3_up_to_20_classes_keeps_the_papers_layout_without_overlap(tmp_path, monkeypatch):
    """20 long names at 35°: consecutive names, parallel strips, lie a strip's height apart or more."""
    import math

    runs = tmp_path / "runs"
    _many_class_metrics(runs, "ds", 20, name_of=lambda c: f"portal_vein_and_splenic_vein_{c}")
    _, fig, renderer = _drawn_figure3(monkeypatch, runs, ["ds"], [tmp_path / "f.png"])
    (ax,) = [a for a in fig.axes if a.get_xticklabels() and a.get_xticklabels()[0].get_rotation() == 35]
    labels = ax.get_xticklabels()
    assert len(labels) == 20
    ticks = [ax.transData.transform((x, 0))[0] for x in ax.get_xticks()]
    pitch = min(b - a for a, b in zip(ticks, ticks[1:], strict=False))
    label = labels[0]
    rotation = label.get_rotation()
    label.set_rotation(0)
    text_height = label.get_window_extent(renderer).height  # the strip's height, unrotated
    label.set_rotation(rotation)
    assert pitch * math.sin(math.radians(rotation)) >= text_height


def test_class_colours_stay_distinct_for_many_classes():
    """Up to 19 classes: tab20's colour c, as always; 117: neighbouring ids differ, repeats 60 apart."""
    import matplotlib

    from diffseg.colors import class_colormap, class_colors

    assert class_colors(16) == [matplotlib.colormaps["tab20"](c) for c in range(1, 16)]
    colors = class_colors(118)
    assert len(colors) == 117
    assert all(colors[i] != colors[i + 1] for i in range(116))
    assert len(set(colors[:60])) == 60 and colors[0] == colors[60]
    cmap, norm = class_colormap(118)
    assert [cmap(norm(c)) for c in (1, 2, 117)] == [colors[0], colors[1], colors[116]]


def test_data_figure_legend_fits_with_117_classes(tmp_path, monkeypatch):
    """The data figure lists the classes in its slices (not all 117), in columns that fit the figure."""
    import json

    from diffseg.data.cli import data_figure
    from diffseg.io import write_nifti

    data = tmp_path / "data/ts"
    names = ["background"] + [f"organ_{c:03d}_with_a_long_name" for c in range(1, 118)]
    for i in range(4):
        label = np.zeros((40, 36, 6), np.uint8)
        for c in range(1, 118):  # 117 blocks on three slices; the mid slice (3) holds a third
            z, k = divmod(c - 1, 40)
            label[(k % 8) * 5 : (k % 8) * 5 + 4, (k // 8) * 7 : (k // 8) * 7 + 6, 2 + z] = c
        write_nifti(data / "images" / f"c{i}.nii.gz", label.astype(np.float32), (1.0, 1.0, 2.0))
        write_nifti(data / "labels" / f"c{i}.nii.gz", label, (1.0, 1.0, 2.0))
    info = {"name": "ts", "modality": "MR", "classes": names, "num_classes": 118,
            "spacing": [1.0, 1.0, 2.0], "shape": [40, 36, 6]}  # fmt: skip
    (data / "dataset.json").write_text(json.dumps(info))
    (data / "split.csv").write_text("uid,split\n" + "".join(f"c{i},train\n" for i in range(4)))
    figs = _shown(monkeypatch)
    data_figure(data, tmp_path / "ts.png")
    (fig,) = figs
    legend = fig.legends[0]
    shown = {int(t.get_text().split()[0]) for t in legend.get_texts()}
    assert shown == set(range(41, 81))  # the mid slice's classes only
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # closed: drawn again on a canvas of its own, as when saved
    canvas.draw()
    renderer = canvas.get_renderer()
    box, page = legend.get_window_extent(renderer), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1
    images = [ax.get_window_extent(renderer) for ax in fig.axes if ax.images]
    assert _overlaps([*images, box]) == []  # neither the cases' images nor the legend overlap
