"""Ray marching through an occupancy grid, volume rendering and shading.

One batch of rays flows through five stages, one module each::

    rays_o, rays_d [N, 3]
      |  marching.py   march: lattice samples in the box and in occupied cells   (occupancy.py)
      v                -> ray_indices, t_starts, t_ends [S]  (packed, sorted by ray)
      |  rays.py       field: sigma [S], albedo [S, 3] at the survivors (+ CPU early stop)
      v
      |  volume.py     weights: w_i = T_i (1 - exp(-sigma_i delta_i))  [S]
      v
      |  shading.py    shading: colour [S, 3] from albedo, normals and light
      v
      |  volume.py     accumulation: per-ray sums of w * colour, w, w * t, w * n
      v
    RenderOutput: rgb (over the background), opacity, depth, normal, orientation  [N, ...]

:func:`render_rays` (in ``rays.py``) runs the stages; :func:`render_image` splits whole images into
batches of rays. The CPU marcher is pure PyTorch; on CUDA nerfacc's marcher and weight kernel
replace their PyTorch counterparts on the same lattice and the same occupancy buffers.
"""

from .marching import (
    march_rays_cpu,
    march_rays_nerfacc,
    near_far_from_aabb,
    near_far_from_box,
    nerfacc_kernels_available,
    ray_offsets,
    step_size_from_samples,
)
from .occupancy import OccupancyGrid, cells_from_points
from .rays import EARLY_STOP_EPS, NO_GRAD_NORMAL_WEIGHT_EPS, RenderOutput, render_image, render_rays
from .shading import SHADINGS, Shading, shade
from .volume import (
    accumulate_along_rays_packed,
    exclusive_sum_packed,
    ray_starts_from_indices,
    render_weight_from_density_packed,
    visible_before_early_stop,
)

__all__ = [
    "EARLY_STOP_EPS",
    "NO_GRAD_NORMAL_WEIGHT_EPS",
    "SHADINGS",
    "OccupancyGrid",
    "RenderOutput",
    "Shading",
    "accumulate_along_rays_packed",
    "cells_from_points",
    "exclusive_sum_packed",
    "march_rays_cpu",
    "march_rays_nerfacc",
    "near_far_from_aabb",
    "near_far_from_box",
    "nerfacc_kernels_available",
    "ray_offsets",
    "ray_starts_from_indices",
    "render_image",
    "render_rays",
    "render_weight_from_density_packed",
    "shade",
    "step_size_from_samples",
    "visible_before_early_stop",
]
