"""Any device count: ``train.devices`` picks the devices, and runs load on whatever devices a process has."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from diffseg.cli import main
from diffseg.config import complete_run_config, resolve_run_config, save_run_config
from diffseg.errors import ConfigError
from diffseg.io import read_nifti
from diffseg.parallel import training_devices
from diffseg.runconfig import RunConfig, TrainConfig, config_hash

ROOT = Path(__file__).resolve().parent.parent
TINY = {"datasets": {"toy": {"source": "phantom"}}, "training": {"model": {"channels": [4, 8]}}}


def _gpus(n: int) -> list[SimpleNamespace]:
    """Stand-ins for ``n`` local devices (what ``training_devices`` reads: platform, id)."""
    return [SimpleNamespace(platform="gpu", id=i) for i in range(n)]


def _cfg(batch_size: int = 8, devices="auto", micro_batch=None) -> RunConfig:
    """A run config with these train keys, built unchecked (the constructor) so that
    ``training_devices``' own checks are reached."""
    return RunConfig(train=TrainConfig(batch_size=batch_size, devices=devices, micro_batch=micro_batch))


# -- the choice ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("available", "batch_size", "micro_batch", "expected"),
    [
        (3, 8, None, 2),  # 8 % 3 != 0
        (5, 8, None, 4),
        (6, 8, "auto", 4),
        (7, 8, None, 4),
        (8, 8, None, 8),
        (8, 8, 2, 4),  # 8 devices would leave 1 volume each, not a whole micro-batch of 2
        (3, 6, 2, 3),
        (1, 8, None, 1),
        (4, 3, None, 3),
    ],
)
def test_auto_takes_the_most_devices_that_split_the_batch(available, batch_size, micro_batch, expected):
    chosen, note = training_devices(_cfg(batch_size, "auto", micro_batch), _gpus(available))
    assert [d.id for d in chosen] == list(range(expected))
    assert note.startswith(f"using {expected} of {available} devices (gpu:0")
    if expected < available:  # says why not all
        assert f"train.batch_size={batch_size} must divide evenly" in note
        assert ("train.micro_batch=2" in note) == (micro_batch == 2)
    else:
        assert "must" not in note


def test_auto_says_which_devices_and_why_not_all():
    chosen, note = training_devices(_cfg(8), _gpus(3))
    assert note == "using 2 of 3 devices (gpu:0, gpu:1): train.batch_size=8 must divide evenly"
    assert len(chosen) == 2


def test_a_missing_key_is_auto():
    old = complete_run_config({"train": {"batch_size": 8}})  # an older run's config, as loaded
    chosen, _ = training_devices(old, _gpus(6))
    assert len(chosen) == 4


def test_an_integer_takes_exactly_that_many():
    chosen, note = training_devices(_cfg(8, 2), _gpus(3))
    assert [d.id for d in chosen] == [0, 1] and "train.devices=2" in note


@pytest.mark.parametrize(
    ("available", "wanted", "micro_batch", "problem", "nearest"),
    [
        (3, 3, None, "train.batch_size=8 must divide evenly", "2"),
        (8, 3, None, "train.batch_size=8 must divide evenly", "2 or 4"),
        (8, 7, None, "train.batch_size=8 must divide evenly", "8"),
        (8, 8, 2, "whole micro-batches of train.micro_batch=2", "4"),
        (2, 4, None, "more devices than the 2 device(s) here (gpu:0, gpu:1)", "2"),
        (1, 3, None, "more devices than the 1 device(s) here (gpu:0)", "1"),
    ],
)
def test_an_integer_that_does_not_fit_names_the_key_the_rule_and_the_nearest(
    available, wanted, micro_batch, problem, nearest
):
    with pytest.raises(ConfigError) as err:
        training_devices(_cfg(8, wanted, micro_batch), _gpus(available))
    text = str(err.value)
    assert text.startswith(f"train.devices={wanted}: ") and problem in text
    assert text.endswith(f"nearest valid value: {nearest} (or train.devices: auto)"), text


@pytest.mark.parametrize("bad", [0, -2, True, "all", 1.5])
def test_devices_must_be_auto_or_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="train.devices must be auto or a positive integer"):
        training_devices(_cfg(8, bad), _gpus(2))
    cfg = resolve_run_config(TINY, "toy", "3d-diff")
    cfg["train"]["devices"] = bad  # a config.yaml edited by hand: refused when the run builds its config
    match = "must be an integer or auto" if not isinstance(bad, int) or isinstance(bad, bool) else "positive"
    with pytest.raises(ConfigError, match=match):
        training_devices(cfg, _gpus(2))


def test_a_micro_batch_that_fits_no_count_is_named():
    with pytest.raises(ConfigError, match=r"train.micro_batch=3: .* choose a divisor of train.batch_size=8"):
        training_devices(_cfg(8, "auto", 3), _gpus(4))


def test_the_config_takes_auto_or_an_integer_and_the_hash_ignores_it():
    runs = [resolve_run_config(TINY, "toy", "3d-diff", {"train.devices": v}) for v in ("auto", 1, 4)]
    assert resolve_run_config(TINY, "toy", "3d-diff")["train"]["devices"] == "auto"
    assert len({config_hash(cfg) for cfg in runs}) == 1  # a changed count continues the run
    with pytest.raises(ConfigError, match="train.devices must be an integer or auto"):
        resolve_run_config(TINY, "toy", "3d-diff", {"train.devices": "all"})


def test_train_refuses_a_count_this_machine_lacks_in_one_line(tmp_path, capsys):
    cfg = resolve_run_config(TINY, "toy", "3d-diff", {"train.devices": 64})
    save_run_config(cfg, tmp_path / "config.yaml")
    args = ["train", "--run-config", str(tmp_path / "config.yaml"), "--data", str(tmp_path / "no-data")]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2  # before the data are read
    lines = capsys.readouterr().err.strip().splitlines()  # the backend line, then the error alone
    assert len(lines) == 2 and lines[0].startswith("diffseg: backend cpu") and "Traceback" not in lines[1]
    assert lines[1].startswith("diffseg train: error: train.devices=64: asks for more devices than the")


# -- fake devices, in subprocesses ------------------------------------------------------------


def _python(script: str, devices: int, *args: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh process with ``devices`` fake CPU devices; fails the test on error."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    command = [sys.executable, "-c", textwrap.dedent(script), *args]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


TRAIN = """
    import json, sys
    from pathlib import Path
    import jax, numpy as np
    from diffseg.cli import main
    from diffseg.config import complete_run_config, resolve_run_config, save_run_config
    from tests.test_train import TINY, write_toy_data  # a tiny network, 6 cases of 16 x 16 x 8

    root, devices, overrides = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    assert len(jax.devices()) == devices, jax.devices()
    data = write_toy_data(root / "data")
    cfg = resolve_run_config(TINY, "toy", "3d-seg", overrides)  # seg: the cheapest to compile
    save_run_config(cfg, root / "run.yaml")
    args = ["--run-config", str(root / "run.yaml"), "--data", str(data), "--out", str(root / "run")]
    assert main(["train", *args]) == 0
    if "--save-params" in sys.argv:  # the best parameters as this process restores them
        from diffseg.runs import load_trained

        params = jax.tree.leaves(load_trained(root / "run")[1])
        np.savez(root / "params.npz", *[np.asarray(x) for x in params])
"""


def test_batch_of_8_trains_on_2_of_3_devices(tmp_path):
    over = {"train.batch_size": 8, "train.steps": 1, "train.checkpoint_every": 1}
    result = _python(TRAIN, 3, str(tmp_path), "3", json.dumps(over))
    note = "using 2 of 3 devices (cpu:0, cpu:1): train.batch_size=8 must divide evenly"
    assert note in result.stderr
    log = pd.read_csv(tmp_path / "run" / "train_log.csv")
    assert list(log["step"]) == [1] and np.isfinite(log["loss"]).all()


LOAD = """
    import sys
    from pathlib import Path
    import jax, numpy as np
    from diffseg.cli import main
    from diffseg.io import write_nifti
    from diffseg.runs import load_trained
    from tests.test_train import toy_volumes

    root = Path(sys.argv[1])
    run, data = root / "run", root / "data"
    assert len(jax.devices()) == 1, jax.devices()
    # The best parameters, restored here, are those the 2-device process restored there.
    leaves = jax.tree.leaves(load_trained(run)[1])
    saved = np.load(root / "params.npz")
    assert len(leaves) == len(saved.files)
    for i, leaf in enumerate(leaves):
        np.testing.assert_array_equal(np.asarray(leaf), saved[f"arr_{i}"])
    assert main(["test", "--run-dir", str(run), "--data", str(data)]) == 0
    scan, _ = toy_volumes(1, shape=(20, 17, 9), seed=5)
    write_nifti(root / "scan.nii.gz", scan[0], (1.0, 1.0, 2.0))
    out = ["--run", str(run), "-o", str(root / "mask.nii.gz")]
    assert main(["predict", str(root / "scan.nii.gz"), *out]) == 0
    # Resume the 2-device run's latest state on this one device, to step 4.
    args = ["--run-config", str(root / "run.yaml"), "--data", str(data), "--out", str(run)]
    assert main(["train", *args, "--set", "train.steps=4"]) == 0
"""


def test_a_run_trained_on_2_devices_tests_predicts_and_resumes_on_1(tmp_path):
    over = {"train.steps": 2, "train.checkpoint_every": 2}
    trained = _python(TRAIN, 2, str(tmp_path), "2", json.dumps(over), "--save-params")
    assert "using 2 of 2 devices (cpu:0, cpu:1)" in trained.stderr

    loaded = _python(LOAD, 1, str(tmp_path))
    assert "using 1 of 1 devices (cpu:0)" in loaded.stderr
    assert "resuming" in loaded.stderr and "from step 2 of 4" in loaded.stderr
    log = pd.read_csv(tmp_path / "run" / "train_log.csv")
    assert list(log["step"]) == [1, 2, 3, 4] and list(log["session"]) == [0, 0, 1, 1]
    assert np.isfinite(log["loss"]).all()
    metrics = pd.read_csv(tmp_path / "run" / "test" / "metrics.csv")
    assert list(metrics["uid"].unique()) == ["case5"] and metrics["dice"].dropna().between(0, 1).all()
    pred, _ = read_nifti(tmp_path / "run" / "test" / "predictions" / "case5.nii.gz")
    assert pred.shape == (16, 16, 8) and set(np.unique(pred).tolist()) <= {0, 1, 2}
    mask, _ = read_nifti(tmp_path / "mask.nii.gz")
    assert mask.shape == (20, 17, 9) and set(np.unique(mask).tolist()) <= {0, 1, 2}
