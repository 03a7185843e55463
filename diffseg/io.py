"""File helpers shared by every stage: atomic writes, so nothing partial is left behind, and NIfTI files.

NIfTI arrays are in NIfTI order ``(X, Y, Z)`` or ``(X, Y, Z, C)``, spacing in mm; affines are
``(4, 4)`` RAS.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffseg.errors import DataError, DiskFullError, disk_full_cause, fmt_bytes


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place, else delete it.

    The temporary name keeps the suffix (``x.nii.gz`` -> ``.x.tmp123.nii.gz``) so that writers
    which pick a format from the extension (nibabel, SimpleITK, matplotlib) still work; the
    ``.tmp`` in it lets :func:`remove_temporaries` find what a killed process left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name.removesuffix(suffix)}.tmp", suffix=suffix, dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the result the mode any new file would get (0666 & ~umask).
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except Exception as err:
        if disk_full_cause(err) is not None:
            raise disk_full(path.parent, f"writing {path.name}") from err
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def free_bytes(folder: str | Path) -> int:
    """Free space for an unprivileged writer on ``folder``'s device (its nearest existing parent's)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def disk_full(folder: str | Path, what: str, needed: int | None = None, kept: str = "") -> DiskFullError:
    """The one-line error for a full device: the folder, what was being written, the space."""
    need = f"; it needs about {fmt_bytes(needed)}" if needed else ""
    keep = f"; {kept}" if kept else ""
    return DiskFullError(
        f"{folder}: no space left on the device {what} ({fmt_bytes(free_bytes(folder))} free{need});"
        f" nothing half-written was kept{keep}; free some space there and run the same command again"
    )


def check_free_space(folder: str | Path, needed: int, what: str, kept: str = "", margin: float = 1.1) -> None:
    """``DiskFullError`` before writing ``needed`` bytes into ``folder`` when its device lacks them."""
    if free_bytes(folder) < needed * margin:
        raise disk_full(folder, what, needed, kept)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` whole.

    A failure leaves ``path`` as it was (an older complete folder stays); the old folder is
    moved aside before the swap and removed after, so ``path`` is never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp creates 0700
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as err:
        if disk_full_cause(err) is not None:
            raise disk_full(path.parent, f"writing {path.name}/") from err
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


TEMPORARY_PATTERNS = (".*.tmp*", ".*.old[0-9]*", "*.orbax-checkpoint-tmp*")


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete what killed writers left directly in ``folder`` (atomic writers' and orbax's temporaries).

    Only for folders no other live process writes to (a run's folder while its job runs).
    Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = sorted({p for pattern in TEMPORARY_PATTERNS for p in folder.glob(pattern)})
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


# --- NIfTI ---------------------------------------------------------------------------------------


def write_nifti(
    path: str | Path, array: np.ndarray, spacing: Sequence[float], affine: np.ndarray | None = None
) -> None:
    """Write ``array`` ``(X, Y, Z)`` or ``(X, Y, Z, C)`` atomically as NIfTI, voxel size ``spacing`` (mm).

    ``affine`` is the grid's NIfTI (RAS) affine (``Preprocessed.affine`` and ``grid_affine`` of
    ``diffseg.data.preprocess``, :func:`read_affine`). Without it the array is taken as LPS-ordered
    at the origin (phantoms, and data of the legacy pipeline): ``diag(-sx, -sy, sz)``, so that
    SimpleITK (``predict``) and viewers read the file in the orientation of the arrays.
    """
    import nibabel as nib  # here, not at the top: the atomic writers stay light to import

    sx, sy, sz = (float(s) for s in spacing)
    if affine is None:
        affine = np.diag([-sx, -sy, sz, 1.0])
    affine = np.asarray(affine, float)
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    # After set_qform, which sets them from the affine's columns; a channel axis has no size.
    img.header.set_zooms((sx, sy, sz, *([1.0] * (array.ndim - 3))))
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def read_affine(path: str | Path) -> np.ndarray:
    """The NIfTI (RAS) affine ``(4, 4)`` of a file, to write another array on the same grid."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return np.asarray(nib.load(str(path)).affine, float)
    except Exception as err:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: cannot read the NIfTI header: {type(err).__name__}: {err}") from None


def load_nifti(path: str | Path) -> tuple[Any, np.ndarray]:
    """``(nibabel image, its voxels)`` of a NIfTI file; a ``DataError`` naming it if missing or unreadable."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        return img, np.asarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for corrupt files
        raise DataError(
            f"{path}: cannot read image (unreadable or truncated file): {type(err).__name__}: {err}"
        ) from None


def read_nifti(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a NIfTI written by :func:`write_nifti`: ``(X, Y, Z)`` or ``(X, Y, Z, C)``, spacing (mm)."""
    img, arr = load_nifti(path)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return arr, zooms  # type: ignore[return-value]
