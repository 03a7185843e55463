"""A run's network and checkpoints, shared by training, evaluation and planning.

Public API::

    build_model(run_cfg, num_classes) -> ReferenceUNet | UNet
    init_params(model, volume_shape, key) -> params
    load_trained(run_dir) -> (model, params, run_cfg, dataset_info)
    RunCheckpoints(run_dir)                      # latest state + best parameters (orbax)
"""

from diffseg.runs.checkpoint import RunCheckpoints, abstract, restore_best
from diffseg.runs.load import load_trained
from diffseg.runs.model import build_model, compute_dtype, count_parameters, init_params, input_multiple

__all__ = [
    "RunCheckpoints",
    "abstract",
    "build_model",
    "compute_dtype",
    "count_parameters",
    "init_params",
    "input_multiple",
    "load_trained",
    "restore_best",
]
