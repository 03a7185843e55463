"""Training: losses, the jitted train step, the loop with checkpoints and resume."""

from diffseg.train.loop import load_trained, train_run

__all__ = ["load_trained", "train_run"]
