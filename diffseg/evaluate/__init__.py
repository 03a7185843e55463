"""Evaluation: sampling/inference, the paper's metrics, test-split evaluation and ``predict``."""

from diffseg.lazy import exports

__getattr__, __all__ = exports(
    __name__, {"Segmenter": "inference", "segment": "inference", "segmentation_metrics": "metrics"}
)
