"""Procedural phantoms: determinism, every class present, small structures, speed-independent checks."""

from __future__ import annotations

import numpy as np
import pytest

from diffseg.data import CLASSES, generate_phantom

# The demo shapes of config/config.yaml
DEMO = {"pelvis": ((48, 48, 16), (0.75, 0.75, 2.5)), "abdomen": ((64, 48, 16), (1.5, 1.5, 5.0))}
SMALL = {
    "pelvis": ["seminal_vesicle", "neurovascular_bundle"],
    "abdomen": ["esophagus", "right_adrenal_gland", "left_adrenal_gland", "duodenum"],
}


@pytest.mark.parametrize("anatomy", ["pelvis", "abdomen"])
def test_deterministic(anatomy):
    shape, spacing = DEMO[anatomy]
    a = generate_phantom(anatomy, shape, spacing, seed=3, index=1)
    b = generate_phantom(anatomy, shape, spacing, seed=3, index=1)
    c = generate_phantom(anatomy, shape, spacing, seed=3, index=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1]) and not np.array_equal(a[0], c[0])
    assert a[0].dtype == np.float32 and a[1].dtype == np.uint8 and a[0].shape == shape == a[1].shape


@pytest.mark.parametrize("anatomy", ["pelvis", "abdomen"])
def test_every_class_present_and_small_structures(anatomy):
    shape, spacing = DEMO[anatomy]
    names = CLASSES[anatomy]
    assert names[0] == "background" and len(names) == {"pelvis": 9, "abdomen": 16}[anatomy]
    for index in range(8):
        image, label = generate_phantom(anatomy, shape, spacing, seed=0, index=index)
        share = np.bincount(label.ravel(), minlength=len(names)) / label.size
        missing = [n for n, s in zip(names, share, strict=True) if s == 0]
        assert not missing, f"case {index}: missing {missing}"
        for name in SMALL[anatomy]:
            assert share[names.index(name)] < 0.005, (index, name, share[names.index(name)])
        assert np.isfinite(image).all()


def test_intensities_overlap_and_noise():
    image, label = generate_phantom("pelvis", *DEMO["pelvis"], seed=0, index=0)
    # Not trivially separable: the intensity ranges of neighbouring classes overlap.
    lo = [np.percentile(image[label == c], 5) for c in (3, 4, 5)]
    hi = [np.percentile(image[label == c], 95) for c in (3, 4, 5)]
    assert max(lo) < min(hi)
    assert image[label == 1].std() > 0  # noise inside a uniform organ


def test_ct_like_hu():
    image, label = generate_phantom("abdomen", *DEMO["abdomen"], seed=0, index=0)
    assert image.min() < -900  # air outside the body
    liver = np.median(image[label == CLASSES["abdomen"].index("liver")])
    assert 20 < liver < 100


def test_spacing_matters():
    """Organs are placed in mm: a coarser grid over the same extent shows the same anatomy."""
    _, fine = generate_phantom("pelvis", (64, 64, 16), (0.75, 0.75, 2.5), seed=0, index=0)
    _, coarse = generate_phantom("pelvis", (32, 32, 16), (1.5, 1.5, 2.5), seed=0, index=0)
    share_f = np.bincount(fine.ravel(), minlength=9) / fine.size
    share_c = np.bincount(coarse.ravel(), minlength=9) / coarse.size
    np.testing.assert_allclose(share_f[1:4], share_c[1:4], atol=0.01)


# The paper's shapes and spacings (config/paper.yaml, config/rehearsal.yaml)
PAPER = {"pelvis": ((256, 256, 48), (0.75, 0.75, 2.5)), "abdomen": ((192, 128, 128), (1.5, 1.5, 5.0))}


@pytest.mark.parametrize("anatomy", ["pelvis", "abdomen"])
def test_bounding_boxes_change_nothing(anatomy, monkeypatch):
    """Shapes are evaluated in their bounding boxes only: the same bits as on the whole grid."""
    from diffseg.data import phantom

    shape, spacing = DEMO[anatomy]
    boxed = [generate_phantom(anatomy, shape, spacing, seed=2, index=i) for i in range(3)]
    monkeypatch.setattr(phantom._Pose, "box", lambda self, center, half: self.full())
    for i, (image, label) in enumerate(boxed):
        image_full, label_full = generate_phantom(anatomy, shape, spacing, seed=2, index=i)
        np.testing.assert_array_equal(image, image_full)
        np.testing.assert_array_equal(label, label_full)


def test_box_holds_the_shape():
    """A box is a superset of every voxel within its half extents, whatever the pose."""
    from diffseg.data.phantom import _Pose

    axes = [np.linspace(-1, 1, 40), np.linspace(-0.8, 0.8, 30), np.linspace(-2, 2, 50)]
    for theta in (-0.2, 0.0, 0.15):
        pose = _Pose(axes, theta, (0.05, -0.03, 0.1))
        x, y, z = pose.coords(pose.full())
        center, half = (0.3, -0.2, 0.5), (0.25, 0.1, 0.4)
        inside = (np.abs(x - center[0]) <= half[0]) & (np.abs(y - center[1]) <= half[1])
        inside = inside & (np.abs(z - center[2]) <= half[2])
        box = pose.box(center, half)
        outside = inside.copy()
        outside[box] = False
        assert inside.any() and not outside.any()
        assert np.prod([s.stop - s.start for s in box]) < inside.size / 4  # and it is a small box


@pytest.mark.parametrize("anatomy", ["pelvis", "abdomen"])
def test_paper_shapes(anatomy):
    """At the paper's shapes (the rehearsal's): shapes, dtypes, every class, small structures."""
    shape, spacing = PAPER[anatomy]
    names = CLASSES[anatomy]
    image, label = generate_phantom(anatomy, shape, spacing, seed=0, index=0)
    assert image.shape == label.shape == shape and image.dtype == np.float32 and label.dtype == np.uint8
    assert label.flags.c_contiguous and image.flags.c_contiguous
    share = np.bincount(label.ravel(), minlength=len(names)) / label.size
    assert len(share) == len(names) and (share > 0).all(), share
    for name in SMALL[anatomy]:
        assert share[names.index(name)] < 0.005
    assert np.isfinite(image).all()


def test_gaussian_filter_is_scipys():
    from scipy import ndimage

    from diffseg.data.phantom import _gaussian_filter

    a = np.random.default_rng(0).normal(0, 1, (40, 30, 12)).astype(np.float32)
    for sigma in (2.0, (0.7, 0.7, 0.3), (0.0, 1.5, 0.3)):
        np.testing.assert_array_equal(_gaussian_filter(a, sigma), ndimage.gaussian_filter(a, sigma))


def test_anatomy_lies_where_the_lps_affine_says():
    """Arrays are LPS: +X towards the patient's left, +Y posterior (the files' default affine)."""

    def centre(label, name, anatomy):
        return np.argwhere(label == CLASSES[anatomy].index(name)).mean(axis=0)

    _, pelvis = generate_phantom("pelvis", (48, 48, 16), (0.75, 0.75, 2.5), seed=0, index=0)
    assert centre(pelvis, "bladder", "pelvis")[1] < centre(pelvis, "rectum", "pelvis")[1]  # anterior
    _, abdomen = generate_phantom("abdomen", (64, 48, 16), (1.5, 1.5, 5.0), seed=0, index=0)
    assert centre(abdomen, "liver", "abdomen")[0] < centre(abdomen, "spleen", "abdomen")[0]  # right
