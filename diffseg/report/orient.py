"""Axial slices for display in the radiological convention, from a NIfTI file's orientation.

Every figure shows a slice the same way, whatever the array order of its file: the patient's
right on the image's left, anterior at the top, seen from the feet (the radiological
convention), with the in-plane aspect from the voxel size. The orientation comes from the
affine (``nibabel.orientations``), not from the array order: a volume stored RAS and the same
volume stored LPS look the same.

``DisplayVolume.slice(k)`` is a 2-D array ``(rows, cols)``: row 0 is the most anterior, rows run
towards posterior; column 0 is the patient's rightmost, columns run towards the patient's left.
Draw it with ``imshow(..., origin="upper", aspect=display.aspect)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from diffseg.errors import DataError
from diffseg.io import load_nifti

# Array axes of the displayed volume: rows (A -> P), columns (R -> L), slices (I -> S).
DISPLAY_AXES = ("P", "L", "S")


@dataclass(frozen=True)
class DisplayVolume:
    """A volume reoriented for radiological display (see the module's docstring).

    Attributes:
        data: ``(rows, cols, slices)``: rows anterior to posterior, columns patient's right to
            left, slices inferior to superior.
        spacing: mm per row, per column, per slice.
        source_axis: the array axis of the file that the slices run along.
        source_flipped: whether slice ``k`` is the file's index ``n - 1 - k`` along that axis.
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    source_axis: int
    source_flipped: bool

    @property
    def aspect(self) -> float:
        """``imshow`` aspect: displayed height of a row over the width of a column (mm / mm)."""
        return self.spacing[0] / self.spacing[1]

    @property
    def num_slices(self) -> int:
        return int(self.data.shape[2])

    def slice(self, k: int) -> np.ndarray:
        """The ``k``-th axial slice (inferior to superior), ``(rows, cols)``."""
        return self.data[:, :, k]

    def source_index(self, k: int) -> int:
        """The file's array index along :attr:`source_axis` of displayed slice ``k``."""
        return self.num_slices - 1 - k if self.source_flipped else k


def radiological(volume: np.ndarray, affine: np.ndarray) -> DisplayVolume:
    """Reorient a 3-D ``volume`` with NIfTI (RAS) ``affine`` for radiological display.

    Oblique affines are taken to the nearest axes (``nibabel.orientations.io_orientation``).
    """
    volume = np.asarray(volume)
    affine = np.asarray(affine, float)
    if volume.ndim != 3 or affine.shape != (4, 4):
        raise DataError(
            f"radiological display needs a 3-D volume and a 4×4 affine, got {volume.ndim}-D "
            f"and {'×'.join(str(n) for n in affine.shape)}"
        )
    ornt = orientations.io_orientation(affine)
    if np.isnan(ornt).any():
        raise DataError("radiological display: the affine is singular (no orientation)")
    to_display = orientations.ornt_transform(ornt, orientations.axcodes2ornt(DISPLAY_AXES))
    data = orientations.apply_orientation(volume, to_display)
    sizes = nib.affines.voxel_sizes(affine)
    # to_display[i] = (display axis of array axis i, flip): invert it for the display's spacing.
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(to_display):
        spacing[int(target)] = float(sizes[axis])
    source_axis = int(np.flatnonzero(to_display[:, 0] == 2)[0])
    return DisplayVolume(
        data=data,
        spacing=(spacing[0], spacing[1], spacing[2]),
        source_axis=source_axis,
        source_flipped=bool(to_display[source_axis, 1] < 0),
    )


def load_radiological(path: str | Path) -> DisplayVolume:
    """Read a NIfTI file and reorient it with its own affine (:func:`radiological`)."""
    path = Path(path)
    img, volume = load_nifti(path)
    if volume.ndim == 4:  # a channel axis (several image channels: the first is shown)
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise DataError(f"{path}: expected a 3-D image, got shape {'×'.join(str(n) for n in volume.shape)}")
    return radiological(volume, img.affine)


def mark_sides(ax, fontsize: float = 6) -> None:
    """Write the patient's sides on a displayed slice's axes: R (left edge), L (right), A (top)."""
    style = dict(transform=ax.transAxes, fontsize=fontsize, color="yellow", va="center", ha="center")
    ax.text(0.04, 0.5, "R", **style)
    ax.text(0.96, 0.5, "L", **style)
    ax.text(0.5, 0.95, "A", **style)
