"""Run-config resolution: base, dims, variants, YAML overrides, run names, errors; strict config."""

import ast
from pathlib import Path

import pytest

from diffseg.config import (
    BASE,
    DIMS,
    SCHEMA_PATH,
    deep_merge,
    load_yaml,
    parse_overrides,
    parse_run_name,
    resolve_run_config,
    validate_config,
)
from diffseg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

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


# --- Strict config: every unknown key is an error naming its path and the nearest valid key ---

STRICT = {
    "datasets": {
        "ph": {"source": "phantom", "num_cases": 6, "split": {"train": 3, "valid": 1, "test": 2}},
        "pr": {"source": "prostate_mr", "zenodo_record": 7013610, "split": "reference"},
        "ct": {"source": "abdominal_ct", "clip": [-991, 362]},
        "own": {"source": "msd", "path": "/data/Task05", "crop": "centre"},
    },
    "training": {"model": {"channels": [4, 8]}},
    "dims": {"2d": {"train": {"batch_size": 4}}},
    "variants": {"mine": {"diffusion": {"recycle": False}}},
    "tables": {"table1": {"datasets": ["ph"], "dims": ["3d"], "cells": {"N": "seg", "Y": "diff"}}},
}


def _patched(path: str, value):
    """STRICT with ``value`` set at the dotted ``path`` (sections created as needed)."""
    cfg = deep_merge(STRICT, {})
    *parents, last = path.split(".")
    node = cfg
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return cfg


@pytest.mark.parametrize(
    ("path", "value", "suggestion"),
    [
        ("tabels", {}, "tables"),  # the top level
        ("training.optim.warmup_stpes", 3, "warmup_steps"),
        ("training.trian", {}, "train"),
        ("dims.2d.train.batch_sise", 4, "batch_size"),
        ("dims.3D", {}, "3d"),
        ("variants.mine.diffusion.recylce", False, "recycle"),
        ("variants.mine.train.augment.max_rotaton", 0.1, "max_rotation"),
        ("datasets.ph.num_case", 4, "num_cases"),  # a dataset entry, per source
        ("datasets.pr.zenodo_recrod", 1, "zenodo_record"),
        ("datasets.ct.spacng", [1, 1, 1], "spacing"),
        ("datasets.own.paht", "/x", "path"),
        ("datasets.ph.split.vaild", 1, "valid"),
        ("datasets.ct.training.train.augment.max_translaton", [1, 1, 1], "max_translation"),
        ("stats.alpah", 0.05, "alpha"),
        ("compute.train.mem_gb", 4, "mem_mb"),
        ("tables.table1.cell", {}, "cells"),
    ],
)
def test_misspelled_key_anywhere_names_its_path_and_the_nearest_key(path, value, suggestion):
    cfg = _patched(path, value)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, "my.yaml")
    key = path.rsplit(".", 1)[-1]
    assert str(err.value).startswith(f"my.yaml: {path}: unknown key {key!r}")
    assert f"did you mean {suggestion!r}?" in str(err.value)
    # A run's resolution checks the whole config the same way (the CLI's and the workflow's path).
    with pytest.raises(ConfigError, match=f"{path}: unknown key"):
        resolve_run_config(cfg, "ph", "3d-diff")


def test_misspelled_override_and_a_source_s_foreign_key():
    with pytest.raises(
        ConfigError, match=r"override train\.stepz: unknown key 'stepz'; did you mean 'steps'\?"
    ):
        resolve_run_config(STRICT, "ph", "3d-diff", parse_overrides(["train.stepz=3"]))
    with pytest.raises(ConfigError, match=r"override modle\.remat: .*did you mean 'model'\?"):
        resolve_run_config(STRICT, "ph", "3d-diff", {"modle.remat": True})
    # Keys of another source's entries: a phantom is generated on its grid (no crop); MR has no clip.
    with pytest.raises(ConfigError, match=r"datasets\.ph\.crop: unknown key 'crop' for source 'phantom'"):
        validate_config(_patched("datasets.ph.crop", "centre"))
    with pytest.raises(ConfigError, match=r"datasets\.pr\.clip: unknown key 'clip' for source 'prostate_mr'"):
        validate_config(_patched("datasets.pr.clip", [0, 1]))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("training.train.steps", "ten", "training.train.steps must be an integer, got str 'ten'"),
        ("training.train.steps", True, "training.train.steps must be an integer, got bool True"),
        ("training.train.steps", 10.0, "training.train.steps must be an integer, got float 10.0"),
        ("variants.mine.loss.dice", 1, "variants.mine.loss.dice must be true or false, got int 1"),
        ("training.model.channels", [8, "a"], "training.model.channels must be a list of integers"),
        ("training.model.channels", 8, "training.model.channels must be a list of integers, got int 8"),
        ("dims.3d.model.arch", 3, "dims.3d.model.arch must be a string, got int 3"),
        ("training.optim.decay_steps", "x", "training.optim.decay_steps must be an integer or null"),
        (
            "training.optim.learning_rate",
            "1e-4",
            "got str '1e-4' (YAML reads 1e-4 as a string: write 1.0e-4)",
        ),
        ("datasets.ph.training.train", None, "datasets.ph.training.train must be a mapping of train keys"),
        ("variants.mine.model.arch", "resnet", "variants.mine.model.arch must be one of reference, legacy"),
        ("datasets.ph.num_cases", "six", "datasets.ph.num_cases: 'six' is not of type 'integer'"),
        ("datasets.ph.source", "nifti", "datasets.ph.source: 'nifti' is not one of"),
    ],
)
def test_wrong_types_name_the_key_and_the_expected_type(path, value, message):
    with pytest.raises(ConfigError) as err:
        validate_config(_patched(path, value))
    assert message in str(err.value)
    assert "np." not in str(err.value) and "array(" not in str(err.value)


def test_values_of_the_right_type_pass():
    for path, value in [
        ("training.optim.decay_steps", None),  # nullable
        ("training.optim.learning_rate", 3),  # an integer is a number
        ("training.train.augment.max_translation", 4),  # one number for every axis
        ("training.train.augment.max_scaling", [0.1, 0.1, 0.0]),
        ("variants.empty", None),  # an empty variant
        ("datasets.ph.training", None),
    ]:
        validate_config(_patched(path, value))
    cfg = resolve_run_config(STRICT, "ph", "3d-diff", parse_overrides(["model={remat: true}"]))
    assert cfg["model"]["remat"] is True and cfg["model"]["channels"] == [4, 8]  # merged, not replaced
    message = r"override model\.remat must be true or false or auto, got str 'yes'"
    with pytest.raises(ConfigError, match=message):
        resolve_run_config(STRICT, "ph", "3d-diff", {"model.remat": "yes"})


def test_every_run_config_key_is_checked_by_its_one_declaration():
    """BASE, the config check and RunConfig read one declaration (diffseg.runconfig): each key's
    default passes the check, and a value of another type, or a name not in its Literal, is refused
    with what the annotation allows."""
    from diffseg.runconfig import DESCRIBE, KEY_TYPES

    assert {k for k in KEY_TYPES} == set(_leaf_paths(BASE))
    for key, (kinds, names) in KEY_TYPES.items():
        default = BASE
        for part in key.split("."):
            default = default[part]
        validate_config(_patched(f"training.{key}", default))
        wrong = 3 if "string" in kinds or "auto" in kinds and "integer" not in kinds else "all"
        if "integer" in kinds and "auto" in kinds:
            wrong = 2.5
        expected = " or ".join(DESCRIBE[k] for k in kinds)
        with pytest.raises(ConfigError, match=f"training.{key} must be {expected}, got"):
            validate_config(_patched(f"training.{key}", wrong))
        if names:
            with pytest.raises(ConfigError, match=f"training.{key} must be one of {', '.join(names)}"):
                validate_config(_patched(f"training.{key}", "not-a-name"))
    validate_config(_patched("training.train.micro_batch", "auto"))
    with pytest.raises(ConfigError, match="training.train.micro_batch must be an integer or null or auto"):
        validate_config(_patched("training.train.micro_batch", "all"))
    with pytest.raises(ConfigError, match="unknown key 'prefetch'"):
        validate_config(_patched("training.train.prefetch", 2))


def _leaf_paths(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += _leaf_paths(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return out


def test_run_config_is_typed_frozen_and_round_trips():
    """The resolved mapping builds a frozen RunConfig whose to_dict() is that mapping, key for key
    (so the saved config.yaml and the parameters' fingerprint do not depend on the class)."""
    import dataclasses

    import yaml

    from diffseg.runconfig import RunConfig

    cfg = resolve_run_config(CONFIG, "toy", "3d-diff-k10-seed2")
    typed = RunConfig.from_dict(cfg)
    assert typed.to_dict() == cfg
    assert yaml.safe_dump(typed.to_dict(), sort_keys=False) == yaml.safe_dump(cfg, sort_keys=False)
    assert typed.train.steps == 7 and typed.diffusion.sample_steps == 10 and typed.model.channels == (4, 8)
    assert (typed.run, typed.seed, typed.train.seed) == ("3d-diff-k10-seed2", 2, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        typed.train.steps = 8  # type: ignore[misc]
    assert typed.replace("diffusion.sample_steps", 1).diffusion.sample_steps == 1
    assert typed.diffusion.sample_steps == 10  # the original is unchanged
    with pytest.raises(ConfigError, match=r"diffusion.sample_steps=2000 must lie in \[1, num_timesteps\]"):
        typed.replace("diffusion.sample_steps", 2000)
    # A hand-edited config.yaml: the file, the key and the problem.
    bad = {**cfg, "train": {**cfg["train"], "batch_size": "8"}}
    with pytest.raises(ConfigError, match=r"x.yaml: train.batch_size must be an integer, got str '8'"):
        RunConfig.from_dict(bad, where="x.yaml")
    missing = {**cfg, "loss": {k: v for k, v in cfg["loss"].items() if k != "dice"}}
    with pytest.raises(ConfigError, match="loss.dice: missing"):
        RunConfig.from_dict(missing)
    with pytest.raises(ConfigError, match="model.depth: unknown key"):
        RunConfig.from_dict({**cfg, "model": {**cfg["model"], "depth": 3}})


def test_shipped_and_test_configs_validate_here_and_in_snakemake():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    # The end-to-end workflow test's config, read without importing that module (it imports jax).
    tree = ast.parse((ROOT / "tests" / "test_workflow.py").read_text())
    tiny = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "TINY")
    WORKFLOW_TINY = ast.literal_eval(tiny)  # noqa: N806
    for cfg, where in [
        (load_yaml(ROOT / "config/config.yaml"), "config/config.yaml"),
        (load_yaml(ROOT / "config/paper.yaml"), "config/paper.yaml"),
        (WORKFLOW_TINY, "tests/test_workflow.py"),
        (STRICT, "STRICT"),
    ]:
        validate_config(cfg, where)
        validate(deep_merge(cfg, {}), str(SCHEMA_PATH.resolve()))
    # Snakemake's own validation rejects unknown workflow-level and dataset keys too.
    for path in ("datasets.ph.spacng", "datasets.ph.crop", "stats.alpah", "tabels"):
        with pytest.raises(WorkflowError):
            validate(_patched(path, 1), str(SCHEMA_PATH.resolve()))


def test_schema_run_config_sections_are_base_s():
    schema = load_yaml(SCHEMA_PATH)
    assert schema["definitions"]["overrides"]["propertyNames"]["enum"] == list(BASE)


def test_data_cli_names_the_file_and_the_key(tmp_path):
    from diffseg.data.cli import _dataset_entry  # what `diffseg data` and `diffseg download` read

    bad = tmp_path / "cfg.yaml"
    bad.write_text("datasets:\n  ph: {source: phantom, num_cases: 4, spacing: [1, 1, 1], shpae: [8, 8, 8]}\n")
    with pytest.raises(ConfigError) as err:
        _dataset_entry(str(bad), "ph")
    assert (
        str(err.value)
        == f"{bad}: datasets.ph.shpae: unknown key 'shpae' for source 'phantom'; did you mean 'shape'?"
    )


SHAPED = {
    "datasets": {"mine": {"source": "phantom", "shape": [32, 32, 8]}},
    "training": {"model": {"channels": [4, 8, 8, 8]}, "train": {"batch_size": 8}},
}


@pytest.mark.parametrize(
    ("run", "patch", "message"),
    [
        ("3d-diff", {}, "datasets.mine.shape [32, 32, 8]: every axis must be divisible by 16 for the 4"
         " halvings of the 3D network of run '3d-diff' (model.channels has 4 levels); nearest: [32, 32, 16]"),
        ("2d-diff", {"datasets.mine.shape": [40, 24, 5]}, "X and Y must be divisible by 16 for the 4 halvings"
         " of the 2D network of run '2d-diff' (model.channels has 4 levels); nearest: [48, 32, 5]"),
        ("3d-diff", {"model.arch": "legacy", "datasets.mine.shape": [20, 16, 8]},
         "divisible by 8 for the 3 halvings"),
        ("3d-seg", {"train.micro_batch": 3, "datasets.mine.shape": [32, 32, 16]},
         "train.micro_batch 3 (run '3d-seg' of dataset 'mine'): must be a positive divisor of"
         " train.batch_size 8 (volumes per pass, gradients accumulated over the passes); nearest: 2 or 4"),
        ("3d-seg", {"train.steps": 0, "datasets.mine.shape": [32, 32, 16]}, "train.steps 0 (run '3d-seg'"),
        ("3d-seg", {"evaluate.window_overlap": 1.0, "datasets.mine.shape": [32, 32, 16]},
         "evaluate.window_overlap 1.0 (run '3d-seg' of dataset 'mine'): must lie in [0, 1)"),
    ],
)  # fmt: skip
def test_what_jobs_would_assert_is_checked_when_the_run_is_resolved(run, patch, message):
    config = deep_merge(SHAPED, {})
    overrides = {k: v for k, v in patch.items() if not k.startswith("datasets.")}
    if "datasets.mine.shape" in patch:
        config["datasets"]["mine"]["shape"] = patch["datasets.mine.shape"]
    with pytest.raises(ConfigError) as err:
        resolve_run_config(config, "mine", run, overrides)
    assert message in str(err.value)


def test_valid_shapes_pass_and_2d_never_halves_depth():
    config = deep_merge(SHAPED, {"datasets": {"mine": {"shape": [32, 48, 5]}}})
    resolve_run_config(config, "mine", "2d-diff")
    config["datasets"]["mine"]["shape"] = [32, 48, 16]
    resolve_run_config(config, "mine", "3d-diff", {"train.micro_batch": 4})


def _enums(node, path=""):
    """Every ``enum`` of the schema that lists a value's names: ``{path: [names]}`` (not propertyNames)."""
    found = {}
    if isinstance(node, dict):
        for key, sub in node.items():
            if key == "enum" and "propertyNames" not in path.split("."):
                found[path] = sub
            else:
                found.update(_enums(sub, f"{path}.{key}" if path else str(key)))
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            found.update(_enums(sub, f"{path}[{i}]"))
    return found


def test_schema_enums_are_the_one_list_of_choices():
    """The schema's enums of names are diffseg.choices' (same values, same order), and nothing else
    in the schema lists names a check or the code must know."""
    import yaml

    from diffseg.choices import DATASET_CHOICES, PREPROCESS_CHOICES
    from diffseg.data.phantom import CLASSES
    from diffseg.data.preprocess import PreprocessOptions
    from diffseg.data.sources import SOURCES
    from diffseg.model import TIME_CONDITIONINGS
    from diffseg.runconfig import RUN_CHOICES

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    dataset = {f"definitions.dataset.properties.{k}": list(v) for k, v in DATASET_CHOICES.items()}
    dims = {"definitions.dim": ["2d", "3d"]}  # RUN_NAME's dims, and DIMS' keys (below)
    assert _enums(schema) == {**dataset, **dims}
    assert list(DIMS) == dims["definitions.dim"]
    # The code that acts on the names reads them from the same list.
    assert SOURCES == DATASET_CHOICES["source"] and tuple(CLASSES) == DATASET_CHOICES["anatomy"]
    assert PreprocessOptions() == PreprocessOptions(**{k: v[0] for k, v in PREPROCESS_CHOICES.items()})
    assert TIME_CONDITIONINGS == RUN_CHOICES[("model", "time_conditioning")]
    # Every run-config choice names a BASE key, whose default is one of its choices.
    for (section, key), allowed in RUN_CHOICES.items():
        assert BASE[section][key] in allowed, (section, key)


def test_library_callers_may_pass_a_partial_mapping():
    """``RunConfig.of`` and the sections' ``as_section`` read a mapping as overrides of the defaults,
    checked: what ``build_model({...})`` or ``GaussianDiffusion.from_config({...})`` receive."""
    from diffseg.runconfig import DiffusionConfig, RunConfig, as_section

    cfg = RunConfig.of({"model": {"channels": [8, 16]}, "train": {"bf16": True}})
    assert cfg.model.channels == (8, 16) and cfg.train.bf16
    assert cfg.train.batch_size == BASE["train"]["batch_size"]
    assert RunConfig.of(cfg) is cfg  # built once: a RunConfig passes through
    with pytest.raises(ConfigError, match="model.channels must be a list of integers"):
        RunConfig.of({"model": {"channels": 8}})
    diff = as_section(DiffusionConfig, {"num_timesteps": 1000, "prediction": "epsilon"})
    assert (diff.num_timesteps, diff.prediction, diff.train_steps) == (1000, "epsilon", 5)
    with pytest.raises(ConfigError, match="diffusion.variance must be one of fixed_large, beta_tilde"):
        as_section(DiffusionConfig, {"variance": "large"})
    with pytest.raises(ConfigError, match="train.nope: not a key"):
        cfg.replace("train.nope", 1)
