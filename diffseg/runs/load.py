"""Load a trained run (``results/runs/{dataset}/{run}``): the shared loader of evaluation and predict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax

from diffseg.config import complete_run_config, load_yaml
from diffseg.errors import DataError
from diffseg.runconfig import RunConfig
from diffseg.runs.checkpoint import restore_best
from diffseg.runs.model import build_model, init_params


def load_trained(run_dir: str | Path) -> tuple[Any, Any, RunConfig, dict[str, Any]]:
    """A trained run's ``(model, best params, run config, dataset info)``.

    The parameters are replicated on this process's local devices, whatever devices the run
    was trained on (``restore_best``).
    """
    run_dir = Path(run_dir)
    for name in ("config.yaml", "dataset.json"):
        if not (run_dir / name).is_file():
            raise DataError(f"{run_dir / name}: missing; is {run_dir} a trained run directory?")
    config_path = run_dir / "config.yaml"
    run_cfg = RunConfig.from_dict(complete_run_config(load_yaml(config_path)), where=str(config_path))
    info = json.loads((run_dir / "dataset.json").read_text())
    model = build_model(run_cfg, int(info["num_classes"]))
    channels = int(info.get("channels", 1))
    shapes = jax.eval_shape(lambda: init_params(model, tuple(info["shape"]), jax.random.key(0), channels))
    params, _ = restore_best(run_dir, shapes)
    return model, params, run_cfg, info
