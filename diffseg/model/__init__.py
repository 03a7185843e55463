"""The segmentation network: a 2D/3D U-Net and its backend-dependent convolution."""

from diffseg.model.conv import Conv, conv_nd
from diffseg.model.unet import UNet

__all__ = ["Conv", "UNet", "conv_nd"]
