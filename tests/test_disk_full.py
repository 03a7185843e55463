"""A full disk: one plain error naming the folder and the space, nothing half-written kept, resumable."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import diffseg.io
from diffseg.cli import main
from diffseg.errors import DiskFullError, disk_full_cause
from diffseg.io import atomic_dir, atomic_write_text
from diffseg.runs import RunCheckpoints

ROOT = Path(__file__).resolve().parents[1]
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_an_atomic_write_on_a_full_device_names_the_folder_and_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "table.csv").write_text("old\n")

    def full(self, *args, **kwargs):
        raise ENOSPC

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DiskFullError, match=rf"{tmp_path}: no space left on the device writing table.csv"):
        atomic_write_text(tmp_path / "table.csv", "new\n")
    monkeypatch.undo()
    assert _left(tmp_path) == ["table.csv"] and (tmp_path / "table.csv").read_text() == "old\n"


def test_an_atomic_folder_on_a_full_device_keeps_the_old_one(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.nii.gz").write_text("old")
    with pytest.raises(DiskFullError, match="writing data/"), atomic_dir(tmp_path / "data") as tmp:
        (tmp / "a.nii.gz").write_text("partial")
        raise RuntimeError("writer failed") from ENOSPC  # a library wrapping the OSError
    assert _left(tmp_path) == ["data"] and (tmp_path / "data" / "a.nii.gz").read_text() == "old"


def test_a_checkpoint_that_does_not_fit_is_refused_before_writing(tmp_path, monkeypatch):
    import jax.numpy as jnp

    ckpt = RunCheckpoints(tmp_path / "run")
    state = {"w": jnp.zeros((1000,), jnp.float32)}
    ckpt.save(1, state, {"step": 1})
    monkeypatch.setattr(diffseg.io, "free_bytes", lambda folder: 100)  # 4 kB needed
    with pytest.raises(DiskFullError) as err:
        ckpt.save(2, state, {"step": 2})
    message = str(err.value)
    assert f"{tmp_path / 'run' / 'checkpoints'}: no space left" in message
    assert "saving the latest checkpoint of step 2" in message and "100 B free" in message
    assert "it needs about 1.0 MiB" in message and "the checkpoint of step 1 is kept" in message
    monkeypatch.undo()
    assert ckpt.latest.all_steps() == [1] and _left(tmp_path / "run" / "checkpoints") == ["1"]
    ckpt.close()


def test_an_orbax_failure_from_a_full_device_removes_its_temporaries(tmp_path, monkeypatch):
    import jax.numpy as jnp

    ckpt = RunCheckpoints(tmp_path / "run")
    state = {"w": jnp.zeros((10,), jnp.float32)}

    def failing_save(step, args):
        (tmp_path / "run" / "checkpoints" / f"{step}.orbax-checkpoint-tmp-1").mkdir(parents=True)
        raise RuntimeError("Event loop is closed") from ENOSPC

    monkeypatch.setattr(ckpt.latest, "save", failing_save)
    with pytest.raises(DiskFullError, match="saving the latest checkpoint of step 3"):
        ckpt.save(3, state, {"step": 3})
    assert not list((tmp_path / "run" / "checkpoints").glob("*tmp*"))


def test_the_cli_says_one_line_for_a_full_disk_from_anywhere(capsys, monkeypatch):
    import diffseg.report.cli as report_cli

    def boom(args):
        raise RuntimeError("thread failed") from OSError(errno.ENOSPC, "No space left on device", "/x/y.png")

    monkeypatch.setattr(report_cli, "_figure", boom)
    monkeypatch.setattr(report_cli, "_readme_table", boom)
    code = main(["readme-table", "--table", "t.csv"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "no space left on the device writing /x/y.png" in err and "Traceback" not in err
    assert disk_full_cause(RuntimeError("x")) is None


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0  # fmt: skip


@pytest.mark.slow
def test_training_onto_a_small_tmpfs_stops_with_one_line_and_resumes_after_space_is_freed(tmp_path):
    """A real full device (a 64 KiB tmpfs): the job ends with one message, exit 2, nothing half-written;
    run again with space (the same folder, remounted larger) and it trains to the end."""
    sys.path.insert(0, str(ROOT / "tests"))
    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, "64k"):
        pytest.skip("needs root and tmpfs to mount a small device")
    try:
        data = tmp_path / "data"
        _write_toy(data)
        cfg = {"datasets": {"toy": {"source": "phantom"}},
               "training": {"model": {"channels": [4, 8]},
                            "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 1, "log_every": 1,
                                      "augment": {"enabled": False}}}}  # fmt: skip
        from diffseg.config import resolve_run_config

        run_cfg = resolve_run_config(cfg, "toy", "3d-diff")
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(run_cfg))
        cmd = [sys.executable, "-m", "diffseg.cli", "train", "--run-config", str(tmp_path / "config.yaml"),
               "--data", str(data), "--out", str(mount / "run")]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 2, res.stderr[-3000:]
        last = [line for line in res.stderr.splitlines() if line.startswith("diffseg train: error:")]
        assert len(last) == 1 and "no space left on the device" in last[0], res.stderr[-3000:]
        assert "Traceback" not in res.stderr
        left = [p for p in (mount / "run").rglob("*") if ".tmp" in p.name or "checkpoint-tmp" in p.name]
        assert not left, left
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert (mount / "run" / "best.json").is_file()
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def _write_toy(root: Path) -> None:
    """The training tests' toy dataset (6 cases 16×16×8, 3 classes) in ``root``."""
    import json

    import pandas as pd
    from test_train import toy_volumes

    from diffseg.io import write_nifti

    images, labels = toy_volumes(6)
    rows = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        uid = f"case{i}"
        write_nifti(root / "images" / f"{uid}.nii.gz", image, (1.0, 1.0, 2.0))
        write_nifti(root / "labels" / f"{uid}.nii.gz", label.astype(np.uint8), (1.0, 1.0, 2.0))
        rows.append((uid, "train" if i < 4 else "valid" if i == 4 else "test"))
    pd.DataFrame(rows, columns=["uid", "split"]).to_csv(root / "split.csv", index=False)
    info = {"name": "toy", "source": "phantom", "modality": "MR", "classes": ["background", "box", "ball"],
            "num_classes": 3, "spacing": [1.0, 1.0, 2.0], "shape": [16, 16, 8], "num_cases": 6,
            "splits": {"train": 4, "valid": 1, "test": 1}}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(info))
