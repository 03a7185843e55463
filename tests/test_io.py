"""diffseg.io: atomic writes land whole, with ordinary permissions, or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from diffseg.io import atomic_dir, atomic_path, atomic_write_json


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_path_renames_into_place_with_the_umask_mode(tmp_path):
    target = tmp_path / "sub" / "scan.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == target.parent
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    # Not mkstemp's 0600: with the usual umask 022 others on a cluster can read the results.
    assert _mode(target) == 0o666 & ~_umask()
    assert os.listdir(target.parent) == ["scan.nii.gz"]


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "best.json"
    atomic_write_json(target, {"step": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == '{\n  "step": 1\n}\n'
    assert os.listdir(tmp_path) == ["best.json"]


def test_atomic_dir_replaces_the_folder_whole(tmp_path):
    target = tmp_path / "predictions"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("interrupted")
    assert os.listdir(target) == ["a.txt"]
    assert _mode(target) == 0o777 & ~_umask()
    assert os.listdir(tmp_path) == ["predictions"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
