"""Procedural pelvis (MR-like) and abdomen (CT-like) phantoms, deterministic by (seed, case index).

Organs are ellipsoids, shells, vertical tubes and torus arcs placed in physical space (mm), so
the voxel spacing matters: a phantom's extent is ``shape * spacing`` and an anisotropic grid
samples the same anatomy anisotropically. To stay non-trivial, each case draws its own pose
(global rotation/translation), organ sizes, positions and rotations, class intensities that
overlap between organs, smooth texture, a multiplicative bias field (MR), partial-volume
averaging along the thick slices, blur and noise. Small structures (seminal vesicles,
neurovascular bundles, adrenal glands, esophagus) stay below 0.5 % of the volume but are painted
last so every case contains every class.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

CLASSES: dict[str, list[str]] = {
    "pelvis": [
        "background",
        "bladder",
        "bone",
        "obturator_internus",
        "transition_zone",
        "central_gland",
        "rectum",
        "seminal_vesicle",
        "neurovascular_bundle",
    ],
    "abdomen": [
        "background",
        "spleen",
        "right_kidney",
        "left_kidney",
        "gallbladder",
        "esophagus",
        "liver",
        "stomach",
        "aorta",
        "inferior_vena_cava",
        "pancreas",
        "right_adrenal_gland",
        "left_adrenal_gland",
        "duodenum",
        "bladder",
        "prostate_uterus",
    ],
}
MODALITY: dict[str, str] = {"pelvis": "MR", "abdomen": "CT"}

# The canonical anatomy is drawn in units of R = half the smaller in-plane extent (mm), which
# keeps physical shapes (a sphere stays a sphere in mm whatever the spacing).
#
# Speed: the patient's pose is a rotation about Z and a translation, so the canonical
# coordinates are separable: X and Y depend on (i, j) only, Z on k only; they are kept as
# broadcastable ``(X, Y, 1)`` and ``(1, 1, Z)`` arrays instead of full grids. Each shape is
# evaluated only inside its bounding box (a ``_Field``), with the same float64 arithmetic per
# voxel as on the full grid, so a case is bit-for-bit the same as when every shape was
# evaluated everywhere, at a fraction of the time (full-size cases in well under a second).
Grid = tuple[np.ndarray, np.ndarray, np.ndarray]
Box = tuple[slice, slice, slice]


@dataclass
class _Mask:
    """A boolean mask inside a box of the fine grid (False outside it)."""

    box: Box
    values: np.ndarray  # broadcastable to the box's shape

    def __and__(self, other: _Mask) -> _Mask:
        if other.box != self.box:
            raise ValueError("masks on different boxes")
        return _Mask(self.box, self.values & other.values)


@dataclass
class _Field:
    """A shape's normalised radius or distance inside its bounding box; +inf (outside) elsewhere.

    ``x, y, z`` are the canonical coordinates of the box (broadcastable). ``full`` marks a field
    evaluated on the whole grid, the only kind that may be compared with ``>``.
    """

    box: Box
    values: np.ndarray
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    full: bool = False

    def __lt__(self, t: float) -> _Mask:  # type: ignore[override]
        return _Mask(self.box, self.values < t)

    def __le__(self, t: float) -> _Mask:  # type: ignore[override]
        return _Mask(self.box, self.values <= t)

    def __gt__(self, t: float) -> _Mask:  # type: ignore[override]
        if not self.full:
            raise ValueError("'>' needs a field evaluated on the whole grid (outside its box it is +inf)")
        return _Mask(self.box, self.values > t)


@dataclass
class _Canvas:
    """High-resolution painting target: label and intensity, both ``(X, Y, Z * sub)``."""

    label: np.ndarray
    image: np.ndarray
    rng: np.random.Generator

    def paint(self, mask: _Mask, cls: int | None, value: float) -> None:
        """Paint ``mask`` with class ``cls`` (``None`` keeps the labels) and intensity ``value``."""
        image = self.image[mask.box]  # views: basic slicing
        where = np.broadcast_to(mask.values, image.shape)
        if cls is not None:
            np.copyto(self.label[mask.box], np.uint8(cls), where=where)
        np.copyto(image, np.float32(value), where=where)


def _rot(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """3x3 rotation matrix from angles in degrees about x, then y, then z."""
    a, b, c = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Pose:
    """The fine grid's canonical coordinates: the unrotated axes and the patient's pose.

    Canonical ``(xr, yr) = Rot(theta) ((x, y) - (tx, ty))`` and ``zr = z - tz``, with ``x, y, z``
    the 1D axes (float64, canonical units) of the grid's voxel centres.
    """

    def __init__(self, axes: Sequence[np.ndarray], theta: float, t: Sequence[float]):
        self.axes = [np.asarray(a, np.float64) for a in axes]
        self.theta = theta
        self.tx, self.ty, self.tz = t
        self.shape = tuple(len(a) for a in self.axes)

    def coords(self, box: Box) -> Grid:
        """Canonical ``(x (nx, ny, 1), y (nx, ny, 1), z (1, 1, nz))`` float32 of a box."""
        x = self.axes[0][box[0]][:, None, None]
        y = self.axes[1][box[1]][None, :, None]
        z = self.axes[2][box[2]][None, None, :]
        theta, tx, ty = self.theta, self.tx, self.ty
        xr = np.cos(theta) * (x - tx) + np.sin(theta) * (y - ty)
        yr = -np.sin(theta) * (x - tx) + np.cos(theta) * (y - ty)
        zr = z - self.tz
        return xr.astype(np.float32), yr.astype(np.float32), zr.astype(np.float32)

    def box(self, center: Sequence[float], half: Sequence[float]) -> Box:
        """Index box holding every voxel within ``half`` (canonical, per axis) of ``center``."""
        c, s = np.cos(self.theta), np.sin(self.theta)
        cx, cy, cz = (float(v) for v in center)
        hx, hy, hz = (float(v) for v in half)
        # The canonical rectangle rotated back into the grid's frame, and its bounding box.
        ux, uy = c * cx - s * cy + self.tx, s * cx + c * cy + self.ty
        hu, hv = abs(c) * hx + abs(s) * hy, abs(s) * hx + abs(c) * hy
        lows, highs = (ux - hu, uy - hv, cz + self.tz - hz), (ux + hu, uy + hv, cz + self.tz + hz)
        box = []
        for axis, lo, hi in zip(self.axes, lows, highs, strict=True):
            i0 = max(int(np.searchsorted(axis, lo)) - 1, 0)  # one voxel of margin on each side
            i1 = min(int(np.searchsorted(axis, hi, side="right")) + 1, len(axis))
            box.append(slice(i0, max(i0, i1)))
        return tuple(box)  # type: ignore[return-value]

    def full(self) -> Box:
        return tuple(slice(0, n) for n in self.shape)  # type: ignore[return-value]


class _Anatomy:
    """Shape primitives on the canonical coordinates with per-case random jitter."""

    def __init__(self, pose: _Pose, rng: np.random.Generator, jitter: float = 1.0):
        self.pose = pose
        self.rng = rng
        self.jitter = jitter

    def _j(self, scale: float) -> float:
        return float(self.rng.normal(0.0, scale * self.jitter))

    def ellipsoid_r(
        self,
        center: Sequence[float],
        radii: Sequence[float],
        rot_deg: Sequence[float] = (0, 0, 0),
        size_jitter: float = 0.12,
        pos_jitter: float = 0.04,
        rot_jitter: float = 12.0,
        full: bool = False,
    ) -> _Field:
        """Normalised radius: < 1 inside a randomly perturbed, rotated ellipsoid (``full``: whole grid)."""
        c = np.asarray(center, float) + [self._j(pos_jitter) for _ in range(3)]
        common = self.rng.uniform(1 - size_jitter, 1 + size_jitter)
        r = np.asarray(radii, float) * common * self.rng.uniform(0.93, 1.07, 3)
        rot = _rot(
            rot_deg[0] + self._j(rot_jitter / 2),
            rot_deg[1] + self._j(rot_jitter / 2),
            rot_deg[2] + self._j(rot_jitter),
        )
        # p - c = rot (u, v, w) with |(u/r0, v/r1, w/r2)| < 1: an axis-aligned half extent.
        half = np.sqrt((rot**2) @ (r**2))
        box = self.pose.full() if full else self.pose.box(c, half)
        x, y, z = self.pose.coords(box)
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        # Coordinates in the ellipsoid's own frame: R^T (p - c), per axis; the same operations,
        # in the same order, as on full grids (so the same values), in cache-sized X chunks.
        plane = [rot[0, a] * dx + rot[1, a] * dy for a in range(3)]  # (nx, ny, 1)
        line = [rot[2, a] * dz for a in range(3)]  # (1, 1, nz)
        q = np.empty(np.broadcast_shapes(dx.shape, dz.shape), np.result_type(plane[0], line[0]))
        step = max(1, (1 << 15) // max(1, q.shape[1] * q.shape[2]))
        buf = np.empty((min(step, q.shape[0]), *q.shape[1:]), q.dtype)  # reused: no page faults
        for i0 in range(0, q.shape[0], step):
            out = q[i0 : i0 + step]
            u = buf[: out.shape[0]]
            for a in range(3):
                np.add(plane[a][i0 : i0 + step], line[a], out=u)
                u /= r[a]
                np.square(u, out=u)
                if a == 0:
                    out[...] = u
                else:
                    out += u
            np.sqrt(out, out=out)
        return _Field(box, q, x, y, z, full=full)

    def tube_d(
        self,
        xy: Sequence[float],
        radius: float,
        z_range: Sequence[float],
        wiggle: float = 0.05,
        pos_jitter: float = 0.03,
    ) -> _Field:
        """Normalised distance to a wiggly vertical tube (< 1 inside), inf outside z_range."""
        cx = xy[0] + self._j(pos_jitter)
        cy = xy[1] + self._j(pos_jitter)
        r = radius * self.rng.uniform(0.85, 1.15)
        ph, fx, fy = self.rng.uniform(0, 2 * np.pi, 3)
        z0, z1 = z_range
        zc, zh = (max(z0, -1e6) + min(z1, 1e6)) / 2, (min(z1, 1e6) - max(z0, -1e6)) / 2
        box = self.pose.box((cx, cy, zc), (r + abs(wiggle), r + abs(wiggle), zh))
        x, y, z = self.pose.coords(box)
        # The centreline drifts smoothly with z so the tube is not a straight extrusion.
        px = cx + wiggle * np.sin(1.7 * z + ph + fx)
        py = cy + wiggle * np.cos(1.3 * z + ph + fy)
        d = np.sqrt((x - px) ** 2 + (y - py) ** 2) / r
        return _Field(box, np.where((z >= z0) & (z <= z1), d, np.inf), x, y, z)

    def arc_d(
        self, center: Sequence[float], rho: float, angles_deg: Sequence[float], radius: float
    ) -> _Field:
        """Normalised distance to a torus arc in a tilted plane (a C-shaped tube)."""
        c = np.asarray(center, float) + [self._j(0.03) for _ in range(3)]
        rot = _rot(self._j(10.0), self._j(10.0), self._j(15.0))
        tube = radius * self.rng.uniform(0.85, 1.15)
        reach = rho + tube  # the torus lies within this distance of its centre
        box = self.pose.box(c, (reach, reach, reach))
        x, y, z = self.pose.coords(box)
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        u = rot[0, 0] * dx + rot[1, 0] * dy + rot[2, 0] * dz
        v = rot[0, 1] * dx + rot[1, 1] * dy + rot[2, 1] * dz
        w = rot[0, 2] * dx + rot[1, 2] * dy + rot[2, 2] * dz
        ang = np.rad2deg(np.arctan2(v, u))
        a0, a1 = angles_deg
        d = np.sqrt((np.sqrt(u**2 + v**2) - rho) ** 2 + w**2) / tube
        return _Field(box, np.where((ang >= a0) & (ang <= a1), d, np.inf), x, y, z)


def _gaussian_filter(a: np.ndarray, sigma: float | Sequence[float]) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(a, sigma)``, the same values, faster on large volumes.

    Axis by axis as scipy does; the first axis (the slowest to filter in place: the longest
    stride) is filtered after moving it last, which changes the memory order, not the sums.
    """
    sigmas = np.broadcast_to(np.asarray(sigma, np.float64), (a.ndim,))
    for axis, s in enumerate(sigmas):
        if s <= 1e-15:  # scipy's own skip
            continue
        if axis == 0:
            moved = ndimage.gaussian_filter1d(np.ascontiguousarray(np.moveaxis(a, 0, -1)), float(s), axis=-1)
            a = np.ascontiguousarray(np.moveaxis(moved, -1, 0))
        else:
            a = ndimage.gaussian_filter1d(a, float(s), axis=axis)
    return a


def _texture(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Smooth zero-mean unit-std random field ``shape`` (organ texture)."""
    f = _gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return f / (f.std() + 1e-6)


def _bias_field(rng: np.random.Generator, grid: Grid, amplitude: float) -> np.ndarray:
    """Smooth multiplicative bias field ``(X, Y, Z)``: exp of a random quadratic polynomial."""
    x, y, z = grid
    terms = [x, y, z * 0.5, x * y, x**2, y**2]
    log_b = sum(rng.normal(0, 1) * t for t in terms)
    log_b = log_b / (np.abs(log_b).max() + 1e-6) * amplitude
    return np.exp(log_b)


def _pelvis(a: _Anatomy, cv: _Canvas, zmax: float) -> None:
    """Paint the pelvis phantom (T2-like contrast, arbitrary units ~ [0, 1])."""
    rng = cv.rng
    level = lambda mean, sd=0.04: float(rng.normal(mean, sd))  # per-case class intensity
    body = a.ellipsoid_r((0, 0, 0), (1.25, 1.05, 8.0), size_jitter=0.05, rot_jitter=4, full=True)
    cv.paint(body > 1, None, level(0.02, 0.01))  # air outside the body (only at the corners)
    fat = level(0.75, 0.05)
    cv.paint(body <= 1, None, fat)
    # Distractors labelled background: gluteal muscles, a posterior muscle band.
    for sx in (-1, 1):
        cv.paint(a.ellipsoid_r((sx * 0.75, -0.7, 0), (0.35, 0.25, 4.0)) < 1, None, level(0.3))
    cv.paint(a.ellipsoid_r((0, -0.95, 0), (0.6, 0.12, 4.0)) < 1, None, level(0.35))
    # 2 bone: femoral heads / acetabulum as shells (dark cortex, fatty marrow).
    marrow, cortex = level(0.55, 0.06), level(0.1, 0.03)
    for sx in (-1, 1):
        r = a.ellipsoid_r((sx * 0.85, 0.15, 0.05), (0.2, 0.28, 3.0), rot_deg=(0, 0, sx * 15))
        cv.paint(r < 1, 2, cortex)
        cv.paint(r < 0.7, 2, marrow)
    # Pubic symphysis anteriorly (present only in the lower slices).
    r = a.ellipsoid_r((0, 0.82, -0.45), (0.3, 0.1, 0.4))
    cv.paint(r < 1, 2, cortex)
    cv.paint(r < 0.6, 2, marrow)
    # 3 obturator internus: muscle sheets medial to the bone.
    muscle = level(0.3, 0.04)
    for sx in (-1, 1):
        cv.paint(
            a.ellipsoid_r((sx * 0.56, 0.05, 0), (0.09, 0.38, 2.0), rot_deg=(0, 0, sx * 10)) < 1, 3, muscle
        )
    # 1 bladder: bright fluid, superior-anterior, with a thin dark wall.
    r = a.ellipsoid_r((0, 0.42, zmax * 0.6), (0.33, 0.28, 0.45))
    cv.paint(r < 1, 1, level(0.3))
    cv.paint(r < 0.88, 1, level(0.95, 0.05))
    # 6 rectum: posterior tube with muscular wall and dark (air/stool) lumen.
    d = a.tube_d((0, -0.5), 0.17, (-9, 9))
    cv.paint(d < 1, 6, level(0.32))
    cv.paint(d < 0.55, 6, level(0.12, 0.05))
    # 5 central gland as an outer shell of the prostate, 4 transition zone inside it.
    pz = a.ellipsoid_r((0, 0.02, -0.1), (0.3, 0.25, 0.55), size_jitter=0.08)
    cv.paint(pz < 1, 5, level(0.55, 0.06))
    cv.paint(
        a.ellipsoid_r((0, 0.07, -0.12), (0.18, 0.14, 0.42), size_jitter=0.1, pos_jitter=0.02) < 1,
        4,
        level(0.42, 0.05),
    )
    # 7 seminal vesicles: small bright paired bodies posterior-superior to the gland.
    sv = level(0.8, 0.06)
    for sx in (-1, 1):
        r = a.ellipsoid_r(
            (sx * 0.15, -0.24, 0.45),
            (0.15, 0.07, 0.22),
            rot_deg=(0, 0, sx * 25),
            pos_jitter=0.02,
            size_jitter=0.08,
        )
        cv.paint(r < 1, 7, sv)
    # 8 neurovascular bundles: thin dark tubes posterolateral to the prostate.
    nvb = level(0.22, 0.04)
    for sx in (-1, 1):
        cv.paint(a.tube_d((sx * 0.27, -0.17), 0.055, (-0.6, 0.5), wiggle=0.02, pos_jitter=0.015) < 1, 8, nvb)


def _abdomen(a: _Anatomy, cv: _Canvas, zmax: float) -> None:
    """Paint the abdomen phantom (CT-like Hounsfield units, contrast-enhanced)."""
    rng = cv.rng
    hu = lambda mean, sd=8.0: float(rng.normal(mean, sd))  # per-case class HU
    body = a.ellipsoid_r((0, 0.02, 0), (1.25, 0.92, 8.0), size_jitter=0.04, rot_jitter=3, full=True)
    cv.paint(body > 1, None, -1000.0)
    cv.paint(body <= 1, None, hu(45))  # abdominal wall muscle
    cv.paint(body <= 0.92, None, hu(-100, 10))  # subcutaneous fat
    cv.paint(body <= 0.84, None, hu(-85, 10))  # visceral fat
    # Background distractors: bowel loops (soft tissue, some with gas), paraspinal muscles, spine.
    for _ in range(10):
        c = (rng.uniform(-0.7, 0.8), rng.uniform(-0.2, 0.75), rng.uniform(-zmax, zmax))
        r = a.ellipsoid_r(c, (0.14, 0.11, 0.3), rot_jitter=60)
        cv.paint(r < 1, None, hu(30, 10))
        if rng.random() < 0.4:
            cv.paint(r < 0.5, None, hu(-750, 80))
    for sx in (-1, 1):
        cv.paint(a.ellipsoid_r((sx * 0.3, -0.72, 0), (0.17, 0.12, 8.0), rot_jitter=4) < 1, None, hu(50))
    vert = a.ellipsoid_r((0, -0.66, 0), (0.15, 0.14, 8.0), rot_jitter=2)
    cv.paint(vert < 1, None, hu(700, 60))
    cv.paint(vert < 0.72, None, hu(250, 40))
    # 6 liver (right, large) and 1 spleen (left, posterior).
    cv.paint(a.ellipsoid_r((-0.55, 0.05, zmax * 0.45), (0.55, 0.55, 0.8)) < 1, 6, hu(60))
    cv.paint(a.ellipsoid_r((0.8, -0.3, zmax * 0.45), (0.2, 0.32, 0.45), rot_deg=(0, 0, -30)) < 1, 1, hu(52))
    # 4 gallbladder: water density under the liver.
    cv.paint(a.ellipsoid_r((-0.45, 0.35, 0.0), (0.13, 0.12, 0.28)) < 1, 4, hu(8, 5))
    # 7 stomach: wall, fluid content and an air cap.
    r = a.ellipsoid_r((0.42, 0.2, zmax * 0.5), (0.3, 0.22, 0.45), rot_deg=(0, 0, 20))
    cv.paint(r < 1, 7, hu(45))
    cv.paint(r < 0.8, 7, hu(15, 6))
    cv.paint((r < 0.8) & _Mask(r.box, r.y > 0.32), 7, hu(-800, 50))
    # 2/3 kidneys: enhancing cortex, darker medulla.
    for cls, sx in ((2, -1), (3, 1)):
        r = a.ellipsoid_r((sx * 0.58, -0.42, sx * 0.05 - 0.1), (0.18, 0.22, 0.5), rot_deg=(0, 0, sx * 20))
        cv.paint(r < 1, cls, hu(170, 15))
        cv.paint(r < 0.6, cls, hu(90, 12))
    # 13 duodenum: a C-shaped tube around the pancreatic head.
    cv.paint(a.arc_d((-0.05, -0.05, -0.15), 0.28, (60, 300), 0.08) < 1, 13, hu(35))
    # 10 pancreas: an elongated, tilted body.
    cv.paint(a.ellipsoid_r((0.18, -0.12, -0.05), (0.4, 0.08, 0.16), rot_deg=(0, 0, 18)) < 1, 10, hu(45))
    # 8 aorta / 9 inferior vena cava: vertical vessels, bright arterial contrast.
    cv.paint(a.tube_d((0.1, -0.44), 0.09, (-9, 9), wiggle=0.02) < 1, 8, hu(220, 20))
    cv.paint(a.tube_d((-0.2, -0.38), 0.09, (-9, 9), wiggle=0.02) < 1, 9, hu(150, 15))
    # 14 bladder and 15 prostate/uterus in the lowest slices.
    cv.paint(a.ellipsoid_r((0, 0.3, -zmax * 0.95), (0.3, 0.22, 0.35)) < 1, 14, hu(10, 5))
    cv.paint(a.ellipsoid_r((0, -0.08, -zmax * 0.95), (0.15, 0.12, 0.3), size_jitter=0.08) < 1, 15, hu(40))
    # Small structures last: 5 esophagus (upper slices), 11/12 adrenals.
    cv.paint(a.tube_d((0.04, -0.32), 0.075, (zmax * 0.25, 9), wiggle=0.02, pos_jitter=0.015) < 1, 5, hu(40))
    for cls, sx in ((11, -1), (12, 1)):
        r = a.ellipsoid_r(
            (sx * 0.32, -0.3, zmax * 0.5),
            (0.06, 0.15, 0.3),
            rot_deg=(0, 0, sx * 30),
            pos_jitter=0.015,
            size_jitter=0.06,
        )
        cv.paint(r < 1, cls, hu(35))


_PAINTERS: dict[str, Callable[[_Anatomy, _Canvas, float], None]] = {"pelvis": _pelvis, "abdomen": _abdomen}


def generate_phantom(
    anatomy: str,
    shape: Sequence[int] = (64, 64, 16),
    spacing: Sequence[float] = (0.75, 0.75, 2.5),
    seed: int = 0,
    index: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom case.

    Args:
        anatomy: ``"pelvis"`` (MR-like, arbitrary units) or ``"abdomen"`` (CT-like HU).
        shape: grid size ``(X, Y, Z)``.
        spacing: voxel size in mm ``(sx, sy, sz)``.
        seed, index: the case is a pure function of ``(anatomy, seed, index)``.

    Returns:
        image float32 ``(X, Y, Z)`` and label uint8 ``(X, Y, Z)`` with values ``0..len(CLASSES)-1``,
        in LPS array order (X towards the patient's left, Y posterior, Z superior), as the files'
        default affine says (``diffseg.io.write_nifti``).
    """
    if anatomy not in _PAINTERS:
        raise ValueError(f"unknown phantom anatomy {anatomy!r}: expected one of {sorted(_PAINTERS)}")
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    ss = np.random.SeedSequence([int(seed), int(index), zlib.crc32(anatomy.encode())])
    rng = np.random.default_rng(ss)
    # Sub-sample along the thick axis so that thick slices average tissue (partial volume).
    sub = int(min(3, max(1, round(spacing[2] / min(spacing[:2])))))
    half = [(n * s) / 2 for n, s in zip(shape, spacing, strict=True)]
    scale = min(half[0], half[1])  # mm per canonical unit
    ax = [(np.arange(n) + 0.5) * s - h for n, s, h in zip(shape, spacing, half, strict=True)]
    az_fine = (np.arange(shape[2] * sub) + 0.5) * (spacing[2] / sub) - half[2]
    # Global pose of the patient: rotation about Z and translation, in canonical units.
    theta = np.deg2rad(rng.uniform(-12, 12))
    tx, ty, tz = rng.normal(0, 0.06, 3)
    pose = _Pose((ax[0] / scale, ax[1] / scale, az_fine / scale), theta, (tx, ty, tz))
    zmax = half[2] / scale
    fine = (*shape[:2], shape[2] * sub)
    canvas = _Canvas(np.zeros(fine, np.uint8), np.zeros(fine, np.float32), rng)
    _PAINTERS[anatomy](_Anatomy(pose, rng), canvas, zmax)

    # Labels at voxel centres; intensities averaged over each thick slice (partial volume).
    label = canvas.label[..., sub // 2 :: sub]
    image = canvas.image.reshape(*shape[:2], shape[2], sub).mean(-1)
    xr, yr, zr = pose.coords(pose.full())
    coarse: Grid = (xr, yr, zr[..., sub // 2 :: sub])
    if anatomy == "pelvis":
        image = image * (1 + 0.08 * _texture(rng, shape, 2.0))  # tissue heterogeneity
        image = _gaussian_filter(image, (0.7, 0.7, 0.3))  # point-spread function
        image = image * _bias_field(rng, coarse, amplitude=0.3)
        noise = 0.045
        re = image + rng.normal(0, noise, shape)
        im = rng.normal(0, noise, shape)
        image = np.sqrt(re**2 + im**2)  # Rician magnitude noise
        image = image * rng.uniform(200, 1500)  # arbitrary MR scanner units
    else:
        image = image + 12 * _texture(rng, shape, 1.5)
        image = _gaussian_filter(image, (0.6, 0.6, 0.3))
        image = image + rng.normal(0, rng.uniform(15, 25), shape)
        image = np.clip(image, -1024, 3071)
    # The painters put anterior at +y; LPS has Y run posterior (the spine at high Y).
    image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label, dtype=np.uint8)
