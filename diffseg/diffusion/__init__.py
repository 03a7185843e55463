"""Diffusion math for segmentation masks (one module owns it: :mod:`diffseg.diffusion.gaussian`)."""

from diffseg.diffusion.gaussian import (
    GaussianDiffusion,
    Prediction,
    Variance,
    logits_to_x0,
    mask_to_x0,
    x0_to_logits,
    x0_to_mask_logits,
)

__all__ = [
    "GaussianDiffusion",
    "Prediction",
    "Variance",
    "logits_to_x0",
    "mask_to_x0",
    "x0_to_logits",
    "x0_to_mask_logits",
]
