"""diffseg: diffusion-model 2D/3D multiclass medical image segmentation in JAX/Flax."""

__version__ = "0.1.0"
