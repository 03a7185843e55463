"""Evaluation: sampling/inference, the paper's metrics, test-split evaluation and ``predict``."""

from diffseg.evaluate.inference import Segmenter, segment
from diffseg.evaluate.metrics import segmentation_metrics

__all__ = ["Segmenter", "segment", "segmentation_metrics"]
