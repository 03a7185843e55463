"""A run's network, checkpoints and files, shared by training, evaluation, planning and status.

Public API::

    build_model(run_cfg, num_classes) -> ReferenceUNet | UNet
    init_params(model, volume_shape, key) -> params
    load_trained(run_dir) -> (model, params, run_cfg, dataset_info)
    RunCheckpoints(run_dir)                      # latest state + best parameters (orbax)
    diffseg.runs.heartbeat                       # status.json: what a training process is doing

Names are imported on first use, so that ``diffseg.runs.heartbeat`` (read by ``diffseg status``,
which must answer in well under 2 s) does not load jax and orbax.
"""

from diffseg.lazy import exports

_WHERE = {
    "RunCheckpoints": "checkpoint",
    "abstract": "checkpoint",
    "restore_best": "checkpoint",
    "load_trained": "load",
    "build_model": "model",
    "compute_dtype": "model",
    "count_parameters": "model",
    "init_params": "model",
    "input_multiple": "model",
}

__getattr__, __all__ = exports(__name__, _WHERE)
