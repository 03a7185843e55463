"""The segmentation networks (the reference U-Net and the legacy one, 2D/3D) and their convolutions."""

from diffseg.model.conv import Conv, conv_nd
from diffseg.model.patch import PatchConv, PatchConvTranspose, patch_conv, patch_conv_transpose
from diffseg.model.reference import TIME_CONDITIONINGS, ReferenceUNet
from diffseg.model.slices import fold_depth, repeat_per_slice, unfold_depth
from diffseg.model.unet import UNet

__all__ = [
    "TIME_CONDITIONINGS",
    "Conv",
    "PatchConv",
    "PatchConvTranspose",
    "ReferenceUNet",
    "UNet",
    "conv_nd",
    "fold_depth",
    "patch_conv",
    "patch_conv_transpose",
    "repeat_per_slice",
    "unfold_depth",
]
