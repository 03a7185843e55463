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
