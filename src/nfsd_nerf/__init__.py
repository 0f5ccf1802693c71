"""nfsd-nerf: text-to-3D with Noise-Free Score Distillation."""

__version__ = "0.1.0"
