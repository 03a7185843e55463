"""Segment a new scan with a trained run: any size, spacing and orientation.

The scan is preprocessed as the run's training data were (orientation, spacing, clip,
normalisation), padded to what the U-Net can take, segmented in sliding windows of the
training shape (``diffseg.evaluate.inference.Segmenter``), and the mask is resampled
back onto the input's own voxel grid (nearest neighbour), so it overlays the input, with the
label values of the training data's files (``dataset.json`` ``label_values``). A run trained on
several channels takes them as the training data came: one 4D NIfTI ``(X, Y, Z, C)``, or one file
per channel in channel order.
With several samples (diffusion runs draw a different noise each time) the mask is their
majority vote and a voxel-wise entropy map shows where the samples disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import nibabel as nib
import numpy as np
import SimpleITK as sitk

from diffseg.data.preprocess import preprocess_scan, read_channels, to_array
from diffseg.errors import DataError
from diffseg.evaluate.inference import Segmenter, vote_and_entropy
from diffseg.io import atomic_path
from diffseg.progress import Progress
from diffseg.runconfig import RunConfig, RunConfigLike
from diffseg.runs import input_multiple


def _channels_text(info: dict[str, Any]) -> str:
    channels = int(info.get("channels", 1))
    names = info.get("channel_names")
    return f"{channels} channel(s)" + (f" ({', '.join(str(n) for n in names)})" if names else "")


def check_scan(path: Path, channels: int = 1) -> None:
    """A readable 3D NIfTI, or 4D with ``channels`` volumes, else a ``DataError`` naming the file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if not path.name.endswith((".nii", ".nii.gz")):
        raise DataError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    try:
        shape = nib.load(str(path)).shape
    except Exception as err:  # nibabel raises several types for non-NIfTI content
        raise DataError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from None
    found = shape[3] if len(shape) == 4 else 1
    if len(shape) in (3, 4) and found != channels:
        raise DataError(
            f"{path}: {found} {'volume' if found == 1 else 'volumes/modalities'}, but the run takes "
            f"{channels} channel(s): give one "
            f"4D NIfTI with {channels} volumes or {channels} 3D files in channel order"
        )
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
    run_cfg: RunConfigLike,
    info: dict[str, Any],
    image_path: str | Path | Sequence[str | Path],
    out_path: str | Path,
    samples: int = 1,
    uncertainty_path: str | Path | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Segment ``image_path`` and write the mask (and optionally the entropy map) on its grid.

    Args:
        image_path: the scan; for a run on C channels one 4D NIfTI or C files in channel order.

    Returns:
        The mask ``(X, Y, Z)`` on the input's (first file's) grid, in the training files' label
        values (uint8, or uint16 for values above 255).
    """
    run_cfg = RunConfig.of(run_cfg)
    paths = [Path(image_path)] if isinstance(image_path, str | Path) else [Path(p) for p in image_path]
    out_path = Path(out_path)
    if samples < 1:
        raise DataError(f"--samples must be >= 1, got {samples}")
    channels = int(info.get("channels", 1))
    if len(paths) not in (1, channels):
        raise DataError(
            f"{paths[0]}: {len(paths)} files given, but the run takes {_channels_text(info)}: give one "
            f"4D NIfTI or {channels} files in channel order"
        )
    for path in paths:
        check_scan(path, channels if len(paths) == 1 else 1)
    scans = read_channels(paths, channels)
    original = scans[0]
    volume, oriented = preprocess_scan(scans, info)

    # The U-Net halves each axis once per level: pad up to a multiple of that (2D: X and Y only).
    factor = input_multiple(run_cfg)
    axes = 3 if run_cfg.model.spatial_dims == 3 else 2
    pads = [(0, (-n) % factor if a < axes else 0) for a, n in enumerate(volume.shape[:3])]
    channel_volumes = [volume] if volume.ndim == 3 else [volume[..., c] for c in range(volume.shape[3])]
    padded = [np.pad(v, pads, constant_values=float(v.min())) for v in channel_volumes]
    padded = padded[0] if volume.ndim == 3 else np.stack(padded, axis=-1)

    segmenter = Segmenter(model, params, run_cfg, window=info["shape"])  # windows of the training shape
    key = jax.random.key(seed)
    crop = tuple(slice(0, n) for n in volume.shape[:3])
    progress = Progress(samples, f"predict {paths[0].name}", unit="sample")
    draws = []
    for s in range(samples):
        draws.append(segmenter.segment(padded, jax.random.fold_in(key, s))[crop])
        progress.update(1)
        progress.log()
    progress.close()
    draws = np.stack(draws)
    mask, entropy = vote_and_entropy(draws, int(info["num_classes"]))
    values = info.get("label_values")  # class i is label value values[i] in the training files
    if values is not None:
        table = np.asarray(values, np.uint8 if max(values) <= 255 else np.uint16)
        mask = table[mask]
    pixel = sitk.sitkUInt8 if mask.dtype == np.uint8 else sitk.sitkUInt16

    # Back onto the input's grid through physical space (handles orientation and spacing).
    back = sitk.Resample(
        _to_sitk(mask, oriented), original, sitk.Transform(), sitk.sitkNearestNeighbor, 0, pixel
    )
    _write(back, out_path)
    if uncertainty_path is not None:
        ent = sitk.Resample(
            _to_sitk(entropy, oriented), original, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32
        )
        _write(ent, Path(uncertainty_path))
    return to_array(back)
