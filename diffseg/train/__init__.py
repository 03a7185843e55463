"""Training: losses, the jitted train step, the loop with checkpoints and resume, TensorBoard."""

from diffseg.lazy import exports

__getattr__, __all__ = exports(__name__, {"train_run": "loop"})
