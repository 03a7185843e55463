"""Run-config resolution: base, dims, variants, YAML overrides, run names, errors."""

import pytest

from diffseg.config import (
    BASE,
    deep_merge,
    load_yaml,
    parse_overrides,
    parse_run_name,
    resolve_run_config,
)
from diffseg.errors import ConfigError

CONFIG = {
    "datasets": {"toy": {"source": "phantom", "training": {"train": {"steps": 7}}}},
    "training": {"model": {"channels": [4, 8]}, "train": {"steps": 50, "batch_size": 2}},
    "dims": {"2d": {"train": {"batch_size": 16}}},
    "variants": {"diff-k10": {"diffusion": {"train_steps": 10, "sample_steps": 10}}},
}


def test_run_names():
    assert parse_run_name("3d-diff") == ("3d", "diff", None)
    assert parse_run_name("2d-diff-nodice") == ("2d", "diff-nodice", None)
    assert parse_run_name("3d-diff-t1000-seed2") == ("3d", "diff-t1000", 2)
    for bad in ("4d-diff", "3d", "diff", "3d-"):
        with pytest.raises(ConfigError):
            parse_run_name(bad)


@pytest.mark.parametrize(
    ("run", "path", "value"),
    [
        ("3d-seg", ("diffusion", "enabled"), False),
        ("3d-diff", ("diffusion", "prediction"), "x0"),
        ("2d-diff-noise", ("diffusion", "prediction"), "epsilon"),
        ("3d-diff-nodice", ("loss", "dice"), False),
        ("3d-diff-norecycle", ("diffusion", "recycle"), False),
        ("3d-diff-t1000", ("diffusion", "train_steps"), 1000),
        ("3d-diff-t1000", ("diffusion", "sample_steps"), 5),
        ("2d-diff", ("model", "spatial_dims"), 2),
        ("3d-diff", ("model", "spatial_dims"), 3),
        ("3d-diff", ("model", "arch"), "reference"),
        ("3d-diff", ("model", "time_conditioning"), "reference"),
        ("3d-diff-time", ("model", "time_conditioning"), "after_norm"),
        ("3d-diff", ("diffusion", "variance"), "fixed_large"),
        ("2d-diff-betatilde", ("diffusion", "variance"), "beta_tilde"),
        ("3d-diff", ("diffusion", "num_timesteps"), 1001),
        ("3d-diff", ("optim", "decay_steps"), 10000),
    ],
)
def test_variants_and_dims(run, path, value):
    cfg = resolve_run_config(CONFIG, "toy", run)
    section, key = path
    assert cfg[section][key] == value


def test_override_order():
    cfg = resolve_run_config(CONFIG, "toy", "2d-diff")
    assert cfg["model"]["channels"] == [4, 8]  # config.training
    assert cfg["train"]["batch_size"] == 16  # config.dims beats config.training
    assert cfg["train"]["steps"] == 7  # per-dataset beats global
    assert cfg["optim"] == BASE["optim"]  # untouched sections keep the paper's defaults
    cfg = resolve_run_config(CONFIG, "toy", "3d-diff", {"train.steps": 3})
    assert cfg["train"]["steps"] == 3 and cfg["train"]["batch_size"] == 2
    assert (cfg["dataset"], cfg["run"], cfg["dim"], cfg["variant"]) == ("toy", "3d-diff", "3d", "diff")


def test_new_variant_from_config_and_seed_suffix():
    cfg = resolve_run_config(CONFIG, "toy", "3d-diff-k10-seed3")
    assert cfg["diffusion"]["train_steps"] == 10 and cfg["seed"] == 3 == cfg["train"]["seed"]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        resolve_run_config(CONFIG, "toy", "3d-nope")
    with pytest.raises(ConfigError, match="unknown dataset 'other'"):
        resolve_run_config(CONFIG, "other", "3d-diff")
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        resolve_run_config(CONFIG, "toy", "3d-diff", {"train.stepz": 3})
    with pytest.raises(ConfigError, match="prediction"):
        resolve_run_config(CONFIG, "toy", "3d-diff", {"diffusion.prediction": "v"})
    with pytest.raises(ConfigError, match="sample_steps"):
        resolve_run_config(CONFIG, "toy", "3d-diff", {"diffusion.sample_steps": 0})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_helpers():
    assert parse_overrides(["train.steps=10", "model.channels=[8, 16]"]) == {
        "train.steps": 10,
        "model.channels": [8, 16],
    }
    with pytest.raises(ConfigError):
        parse_overrides(["nonsense"])
    base = {"a": {"b": 1, "c": [1]}, "d": 2}
    merged = deep_merge(base, {"a": {"c": [2]}})
    assert merged == {"a": {"b": 1, "c": [2]}, "d": 2} and base["a"]["c"] == [1]


def test_shipped_configs_resolve():
    config = load_yaml("config/config.yaml")
    for dataset in config["datasets"]:
        for run in ("2d-seg", "3d-diff", "3d-diff-t1000"):
            resolve_run_config(config, dataset, run)


@pytest.mark.parametrize(
    ("key", "value"),
    [("model.arch", "resnet"), ("model.time_conditioning", "film"), ("diffusion.variance", "learned")],
)
def test_bad_choices_name_the_key_and_the_allowed_values(key, value):
    with pytest.raises(ConfigError, match=rf"{key} must be one of .*got '{value}'"):
        resolve_run_config(CONFIG, "toy", "3d-diff", {key: value})
