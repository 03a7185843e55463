"""Segment a new scan with a trained run: any size, spacing and orientation.

The scan is preprocessed as the run's training data were (orientation, spacing, clip,
normalisation), padded to what the U-Net can take, segmented in sliding windows of the
training shape (``diffseg.evaluate.inference.Segmenter``), and the mask is resampled
back onto the input's own voxel grid (nearest neighbour), so it overlays the input.
With several samples (diffusion runs draw a different noise each time) the mask is their
majority vote and a voxel-wise entropy map shows where the samples disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import nibabel as nib
import numpy as np
import SimpleITK as sitk

from diffseg.data.preprocess import preprocess_scan, read_image, to_array
from diffseg.errors import DataError
from diffseg.evaluate.inference import Segmenter, vote_and_entropy
from diffseg.io import atomic_path
from diffseg.progress import Progress
from diffseg.runs import input_multiple


def check_scan(path: Path) -> None:
    """A readable single-modality 3D NIfTI, else a ``DataError`` naming the file and the problem."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if not path.name.endswith((".nii", ".nii.gz")):
        raise DataError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    try:
        shape = nib.load(str(path)).shape
    except Exception as err:  # nibabel raises several types for non-NIfTI content
        raise DataError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from None
    if len(shape) == 4 and shape[3] > 1:
        raise DataError(f"{path}: {shape[3]} volumes/modalities in a 4D image; the run takes one modality")
    if len(shape) not in (3, 4):
        raise DataError(f"{path}: expected a 3D image, got shape {shape}")


def _to_sitk(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Numpy ``(X, Y, Z)`` on ``reference``'s grid as a SimpleITK image."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.CopyInformation(reference)
    return image


def _write(image: sitk.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)


def predict_scan(
    model: Any,
    params: Any,
    run_cfg: dict[str, Any],
    info: dict[str, Any],
    image_path: str | Path,
    out_path: str | Path,
    samples: int = 1,
    uncertainty_path: str | Path | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Segment ``image_path`` and write the mask (and optionally the entropy map) on its grid.

    Returns:
        The mask ``(X, Y, Z)`` uint8 on the input's grid.
    """
    image_path, out_path = Path(image_path), Path(out_path)
    if samples < 1:
        raise DataError(f"--samples must be >= 1, got {samples}")
    check_scan(image_path)
    original = read_image(image_path)
    volume, oriented = preprocess_scan(original, info)

    # The U-Net halves each axis once per level: pad up to a multiple of that (2D: X and Y only).
    factor = input_multiple(run_cfg)
    axes = 3 if int(run_cfg["model"]["spatial_dims"]) == 3 else 2
    pads = [(0, (-n) % factor if a < axes else 0) for a, n in enumerate(volume.shape)]
    padded = np.pad(volume, pads, constant_values=float(volume.min()))

    segmenter = Segmenter(model, params, run_cfg, window=info["shape"])  # windows of the training shape
    key = jax.random.key(seed)
    crop = tuple(slice(0, n) for n in volume.shape)
    progress = Progress(samples, f"predict {image_path.name}", unit="sample")
    draws = []
    for s in range(samples):
        draws.append(segmenter.segment(padded, jax.random.fold_in(key, s))[crop])
        progress.update(1)
        progress.log()
    progress.close()
    draws = np.stack(draws)
    mask, entropy = vote_and_entropy(draws, int(info["num_classes"]))

    # Back onto the input's grid through physical space (handles orientation and spacing).
    back = sitk.Resample(
        _to_sitk(mask, oriented), original, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )
    _write(back, out_path)
    if uncertainty_path is not None:
        ent = sitk.Resample(
            _to_sitk(entropy, oriented), original, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32
        )
        _write(ent, Path(uncertainty_path))
    return to_array(back)
