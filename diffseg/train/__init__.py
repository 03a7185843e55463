"""Training: losses, the jitted train step, the loop with checkpoints and resume."""

from diffseg.runs import load_trained  # kept importable from here; it lives in diffseg.runs
from diffseg.train.loop import train_run

__all__ = ["load_trained", "train_run"]
