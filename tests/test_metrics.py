"""Segmentation metrics against hand computations, a brute-force reference and medpy."""

import math

import numpy as np
import pandas as pd
import pytest
from medpy.metric import binary as medpy_binary
from scipy import ndimage
from scipy.spatial.distance import cdist

from diffseg.evaluate.metrics import (
    centroid_distance,
    dice,
    hd95,
    nsd,
    segmentation_metrics,
    surface_distances,
    surface_mask,
)

SPACING = (0.5, 1.0, 3.0)
# medpy's directed distances (module-level name, no class mangling applies here).
medpy_surface_distances = getattr(medpy_binary, "__surface_distances")


def box_pair(shift: tuple[int, int, int], shape=(16, 16, 16), lo=4, n=6) -> tuple[np.ndarray, np.ndarray]:
    """Label = an n³ box at ``lo``; prediction = the same box shifted by ``shift`` voxels."""
    g = np.zeros(shape, dtype=bool)
    g[lo : lo + n, lo : lo + n, lo : lo + n] = True
    return np.roll(g, shift, axis=(0, 1, 2)), g


def blobs(rng: np.random.Generator, shape=(40, 36, 14), sigma=(3, 3, 1), level=0.6) -> np.ndarray:
    """Smooth random bool blobs."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return f > level * f.std()


def brute_force_distances(p: np.ndarray, g: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances by all pairwise distances between surface voxel centres (mm)."""
    sp, sg = (np.argwhere(surface_mask(m)) * np.asarray(spacing) for m in (p, g))
    d = cdist(sp, sg)
    return d.min(axis=1), d.min(axis=0)


# ---------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_box_shifted_one_voxel_hd95_and_cd_equal_spacing(axis):
    """Every distance is 0 or s_k, and the far face (36 of 152 surface voxels) is at s_k."""
    shift = [0, 0, 0]
    shift[axis] = 1
    p, g = box_pair(tuple(shift))
    assert hd95(p, g, SPACING) == SPACING[axis]
    assert centroid_distance(p, g, SPACING) == pytest.approx(SPACING[axis], abs=1e-12)
    assert dice(p, g) == pytest.approx(2 * 180 / 432)  # overlap 6·6·5 of two 216-voxel boxes
    d_pg, d_gp = surface_distances(p, g, SPACING)
    assert d_pg.size == d_gp.size == 216 - 64  # n³ - (n-2)³ surface voxels
    assert d_pg.max() == d_gp.max() == SPACING[axis]
    assert np.count_nonzero(d_pg == SPACING[axis]) >= 36


def test_box_shifted_diagonally_cd_and_brute_force_hd95():
    p, g = box_pair((1, 1, 1))
    assert centroid_distance(p, g, SPACING) == pytest.approx(math.sqrt(0.25 + 1 + 9), abs=1e-12)
    ref = brute_force_distances(p, g, SPACING)
    expected = max(np.percentile(ref[0], 95), np.percentile(ref[1], 95))
    assert hd95(p, g, SPACING) == pytest.approx(expected, abs=1e-9)


def test_nsd_tolerance_just_above_and_below_a_known_shift():
    """Shift by one voxel along axis 0 (0.5 mm): distances are exactly 0 or 0.5 mm.

    Per direction 152 surface voxels; at 0.5 mm: the far face (6·6 = 36) plus the interior of the
    near face (4·4 = 16, whose lateral faces are >= 1 mm away) = 52, so NSD(τ < 0.5) = 100/152.
    """
    p, g = box_pair((1, 0, 0))
    assert nsd(p, g, SPACING, tolerance_mm=0.49) == pytest.approx(100 / 152, abs=1e-12)
    assert nsd(p, g, SPACING, tolerance_mm=0.51) == 1.0
    assert nsd(p, g, SPACING, tolerance_mm=0.5) == 1.0  # `<=` τ
    df = segmentation_metrics(p.astype(np.uint8), g.astype(np.uint8), 2, SPACING, tolerance_mm=0.49)
    assert df.loc[0, "nsd"] == pytest.approx(100 / 152, abs=1e-12)


def test_centroid_distance_of_a_known_translation():
    rng = np.random.default_rng(3)
    g = np.zeros((30, 30, 12), dtype=bool)
    g[5:15, 8:20, 2:6] = blobs(rng, (10, 12, 4), sigma=1.0, level=-0.3)
    g[5, 8, 2] = True
    p = np.roll(g, (7, -3, 4), axis=(0, 1, 2))  # no wrap-around: the blob stays inside
    expected = math.hypot(7 * 0.5, -3 * 1.0, 4 * 3.0)
    assert centroid_distance(p, g, SPACING) == pytest.approx(expected, abs=1e-9)
    assert dice(p, p) == 1.0 and hd95(p, p, SPACING) == 0.0 and nsd(p, p, SPACING, 0.0) == 1.0


def test_identical_and_surface_at_array_edge():
    """An object touching the array edge has surface voxels there (border_value = 0)."""
    m = np.zeros((5, 5, 5), dtype=bool)
    m[:, :, :] = True
    assert surface_mask(m).sum() == 125 - 27
    df = segmentation_metrics(m.astype(np.uint8), m.astype(np.uint8), 2, SPACING)
    assert df.loc[0, ["dice", "nsd", "hd95", "cd"]].tolist() == [1.0, 1.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Against medpy and a brute-force reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_dice_and_distances_match_medpy_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    g = blobs(rng)
    p = ndimage.binary_dilation(np.roll(blobs(rng) | g, 1, axis=2)) if seed % 2 else blobs(rng)
    assert dice(p, g) == pytest.approx(medpy_binary.dc(p, g), abs=1e-12)
    d_pg, d_gp = surface_distances(p, g, SPACING)
    # Directed distances are medpy's exactly (same erosion, same EDT, same voxel order).
    np.testing.assert_allclose(d_pg, medpy_surface_distances(p, g, SPACING), rtol=0, atol=1e-9)
    np.testing.assert_allclose(d_gp, medpy_surface_distances(g, p, SPACING), rtol=0, atol=1e-9)
    # medpy 0.5.2's hd95 pools both directions; ours (docs/DEFINITIONS.md) is the max of the directed ones.
    pooled = np.percentile(np.hstack([d_pg, d_gp]), 95)
    assert pooled == pytest.approx(medpy_binary.hd95(p, g, voxelspacing=SPACING), abs=1e-6)
    ours = hd95(p, g, SPACING)
    assert ours == pytest.approx(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)), abs=1e-12)
    assert ours >= pooled - 1e-12


def test_hd95_equals_medpy_for_symmetric_errors():
    """Where both directions agree (a pure shift of a box), both definitions coincide."""
    for shift in [(1, 0, 0), (0, 2, 0), (0, 0, 1), (2, 0, 0)]:
        p, g = box_pair(shift)
        assert hd95(p, g, SPACING) == pytest.approx(medpy_binary.hd95(p, g, voxelspacing=SPACING), abs=1e-6)


def test_hd95_is_max_of_directed_not_medpys_pooled_percentile():
    """A spurious 3³ island a few mm away: only d(P→G) has a tail, d(G→P) is all zeros.

    docs/DEFINITIONS.md's HD95 is P95(d(P→G)) here; medpy 0.5.2 pools both sets (330 values, 26 non-zero)
    and so reports a smaller number. The difference is the definition, not the distances.
    """
    p, g = box_pair((0, 0, 0))
    p[12:15, 12:15, 2:5] = True
    ref_pg, ref_gp = brute_force_distances(p, g, SPACING)
    assert not ref_gp.any()
    assert hd95(p, g, SPACING) == pytest.approx(np.percentile(ref_pg, 95), abs=1e-9)
    assert medpy_binary.hd95(p, g, voxelspacing=SPACING) == pytest.approx(
        np.percentile(np.hstack([ref_pg, ref_gp]), 95), abs=1e-9
    )
    assert medpy_binary.hd95(p, g, voxelspacing=SPACING) < hd95(p, g, SPACING) - 0.5


def test_distances_match_brute_force():
    rng = np.random.default_rng(11)
    g = blobs(rng, (24, 20, 10))
    p = blobs(rng, (24, 20, 10))
    for a, b in zip(surface_distances(p, g, SPACING), brute_force_distances(p, g, SPACING), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)


def test_cropping_gives_exactly_the_uncropped_values():
    rng = np.random.default_rng(5)
    shape = (64, 60, 20)
    g = np.zeros(shape, dtype=bool)
    p = np.zeros(shape, dtype=bool)
    g[20:40, 15:45, 5:12] = blobs(rng, (20, 30, 7), sigma=(2, 2, 1), level=-0.2)
    p[22:44, 14:40, 4:12] = blobs(rng, (22, 26, 8), sigma=(2, 2, 1), level=-0.2)
    for crop_d, full_d in zip(
        surface_distances(p, g, SPACING, crop=True), surface_distances(p, g, SPACING, crop=False), strict=True
    ):
        np.testing.assert_array_equal(crop_d, full_d)
    full_pg, full_gp = surface_distances(p, g, SPACING, crop=False)
    row = segmentation_metrics(p.astype(np.int16), g.astype(np.int16), 2, SPACING, tolerance_mm=1.5).iloc[0]
    assert row["hd95"] == max(np.percentile(full_pg, 95), np.percentile(full_gp, 95))
    n_within = np.count_nonzero(full_pg <= 1.5) + np.count_nonzero(full_gp <= 1.5)
    assert row["nsd"] == n_within / (full_pg.size + full_gp.size)
    assert row["dice"] == dice(p, g)
    assert row["cd"] == centroid_distance(p, g, SPACING)  # integer numerators: bit-identical


def test_multiclass_matches_per_class_binary_functions():
    rng = np.random.default_rng(2)
    shape = (48, 40, 12)
    label = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)
    for c in range(1, 6):
        label[blobs(rng, shape, sigma=(2, 2, 1), level=1.5)] = c
        pred[blobs(rng, shape, sigma=(2, 2, 1), level=1.5)] = c
    df = segmentation_metrics(pred, label, 8, SPACING, tolerance_mm=2.0)
    assert list(df.columns[:6]) == ["class", "dice", "nsd", "hd95", "cd", "missed"]
    assert df["class"].tolist() == list(range(1, 8))
    for _, row in df.iterrows():
        c = int(row["class"])
        p, g = pred == c, label == c
        assert row["label_voxels"] == g.sum() and row["pred_voxels"] == p.sum()
        if not g.any() and not p.any():
            assert row[["dice", "nsd", "hd95", "cd"]].isna().all() and not row["missed"]
            continue
        assert row["dice"] == pytest.approx(dice(p, g), abs=1e-12)
        assert row["nsd"] == pytest.approx(nsd(p, g, SPACING, 2.0), abs=1e-12)
        np.testing.assert_allclose(row["hd95"], hd95(p, g, SPACING), atol=1e-12)
        np.testing.assert_allclose(row["cd"], centroid_distance(p, g, SPACING), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Empty masks, 2D, bad input
# ---------------------------------------------------------------------------------------------
def test_miss_false_positive_and_both_empty():
    label = np.zeros((20, 20, 6), dtype=np.int64)
    pred = np.zeros_like(label)
    label[2:6, 2:6, 1:3] = 1  # class 1: in label only -> miss
    pred[10:14, 10:14, 2:4] = 2  # class 2: predicted only -> false positive
    # class 3: empty in both
    df = segmentation_metrics(pred, label, 4, SPACING).set_index("class")
    # NSD of a class empty in exactly one mask: NaN by default (the reference leaves it out of its
    # means), 0 on request; the miss is counted either way.
    assert df.loc[1, "dice"] == 0 and np.isnan(df.loc[1, "nsd"]) and bool(df.loc[1, "missed"])
    assert np.isnan(df.loc[2, "nsd"])
    zero = segmentation_metrics(pred, label, 4, SPACING, nsd_empty="zero").set_index("class")
    assert zero.loc[1, "nsd"] == 0 and zero.loc[2, "nsd"] == 0 and np.isnan(zero.loc[3, "nsd"])
    assert zero.drop(columns="nsd").equals(df.drop(columns="nsd"))
    with pytest.raises(ValueError, match="nsd_empty must be one of nan, zero"):
        segmentation_metrics(pred, label, 4, SPACING, nsd_empty="skip")
    assert np.isnan(df.loc[1, "hd95"]) and np.isnan(df.loc[1, "cd"])
    assert df.loc[1, "label_voxels"] == 32 and df.loc[1, "pred_voxels"] == 0
    assert df.loc[2, "dice"] == 0 and not bool(df.loc[2, "missed"])
    assert np.isnan(df.loc[2, "hd95"]) and np.isnan(df.loc[2, "cd"])
    assert df.loc[3, ["dice", "nsd", "hd95", "cd"]].isna().all() and not bool(df.loc[3, "missed"])
    assert df["missed"].dtype == bool
    # The binary functions follow the same conventions.
    e = np.zeros((4, 4), dtype=bool)
    f = e.copy()
    f[1, 1] = True
    assert dice(e, f) == 0 and nsd(e, f, (1, 1)) == 0 and np.isnan(hd95(e, f, (1, 1)))
    assert np.isnan(dice(e, e)) and np.isnan(nsd(e, e, (1, 1))) and np.isnan(centroid_distance(f, e, (1, 1)))


def test_2d_input():
    g = np.zeros((30, 40), dtype=np.uint8)
    g[5:15, 10:30] = 1
    g[20:28, 2:8] = 2
    p = np.roll(g, 2, axis=1)  # shift by 2 columns = 1.6 mm
    df = segmentation_metrics(p, g, 3, (0.5, 0.8))
    np.testing.assert_allclose(df["cd"], [1.6, 1.6], atol=1e-12)
    np.testing.assert_allclose(df["hd95"], [1.6, 1.6], atol=1e-12)
    for c in (1, 2):
        assert df.loc[c - 1, "hd95"] == pytest.approx(
            medpy_binary.hd95(p == c, g == c, voxelspacing=(0.5, 0.8)), abs=1e-6
        )
        assert df.loc[c - 1, "dice"] == pytest.approx(medpy_binary.dc(p == c, g == c), abs=1e-12)


@pytest.mark.parametrize(
    ("pred", "label", "num_classes", "spacing", "match"),
    [
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 5), int), 3, (1, 1, 1), r"\(4, 4, 4\).*\(4, 4, 5\)"),
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), 3, (1, 1), "spacing"),
        (np.zeros((4, 4, 4), float), np.zeros((4, 4, 4), int), 3, (1, 1, 1), "integer"),
        (np.full((4, 4, 4), 3), np.zeros((4, 4, 4), int), 3, (1, 1, 1), r"\[0, 2\]"),
        (np.full((4, 4, 4), -1), np.zeros((4, 4, 4), int), 3, (1, 1, 1), r"\[0, 2\]"),
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), 1, (1, 1, 1), "num_classes"),
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), 3, (1, 0, 1), "spacing"),
        (np.zeros(4, int), np.zeros(4, int), 3, (1,), "2D or 3D"),
    ],
)
def test_bad_inputs_raise(pred, label, num_classes, spacing, match):
    with pytest.raises(ValueError, match=match):
        segmentation_metrics(pred, label, num_classes, spacing)


def test_bad_tolerance_and_binary_shape_mismatch_raise():
    z = np.zeros((4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="tolerance"):
        segmentation_metrics(z, z, 2, (1, 1), tolerance_mm=-1.0)
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(np.zeros((3, 3)), np.ones((3, 3)), (1, 1))


def test_returns_dataframe_with_stable_dtypes():
    z = np.zeros((6, 6), dtype=np.uint8)
    z[1:3, 1:3] = 1
    df = segmentation_metrics(z, z, 3, (1.0, 1.0))
    assert isinstance(df, pd.DataFrame)
    assert df["class"].dtype == np.int64 and df["missed"].dtype == bool
    assert all(df[c].dtype == np.float64 for c in ("dice", "nsd", "hd95", "cd"))
