"""Volume rendering of packed samples: weights from densities, then sums along each ray.

.. math::
    \\alpha_i = 1 - e^{-\\sigma_i \\delta_i}, \\quad
    T_i = \\exp\\big(-\\textstyle\\sum_{j<i} \\sigma_j \\delta_j\\big), \\quad w_i = T_i \\alpha_i.

Packed tensors: ``ray_indices [S]`` (long, sorted, non-decreasing) say which ray each of the S
samples belongs to; within a ray the samples are ordered front to back. Pure PyTorch, any device;
the same formulas as nerfacc's CUDA kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MAX_OPTICAL_DEPTH = 1e4
"""sigma * delta is clamped here before the cumulative sum: alpha is already 1, and inf - inf = nan."""


def ray_starts_from_indices(ray_indices: Tensor, n_rays: int) -> Tensor:
    """Sorted ray_indices [S] -> [S] position in the packed array of each sample's ray's first sample."""
    counts = torch.bincount(ray_indices, minlength=n_rays)
    first = torch.cumsum(counts, 0) - counts  # [n_rays]
    return first[ray_indices]


def exclusive_sum_packed(values: Tensor, ray_indices: Tensor, n_rays: int) -> Tensor:
    """Per-ray exclusive cumulative sum of packed values [S] (differentiable).

    One global cumsum minus each ray's starting value, accumulated in float64 so long packed
    arrays keep their precision (docs/design.md, section 5).
    """
    v64 = values.double()
    exclusive = torch.cumsum(v64, 0) - v64  # global, exclusive
    start = ray_starts_from_indices(ray_indices, n_rays)
    return (exclusive - exclusive[start]).to(values.dtype)


def render_weight_from_density_packed(
    t_starts: Tensor, t_ends: Tensor, sigmas: Tensor, ray_indices: Tensor, n_rays: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Volume-rendering weights of packed samples.

    t_starts, t_ends, sigmas, ray_indices [S] -> (weights, transmittance, alphas), each [S]:
    ``alpha_i = 1 - exp(-sigma_i delta_i)``, ``T_i = exp(-sum_{j<i} sigma_j delta_j)``,
    ``w_i = T_i alpha_i``. Differentiable w.r.t. sigmas.
    """
    tau = (sigmas * (t_ends - t_starts)).clamp(max=_MAX_OPTICAL_DEPTH)
    trans = torch.exp(-exclusive_sum_packed(tau, ray_indices, n_rays))
    alphas = 1.0 - torch.exp(-tau)
    return trans * alphas, trans, alphas


def visible_before_early_stop(
    t_starts: Tensor, t_ends: Tensor, sigmas: Tensor, ray_indices: Tensor, n_rays: int, eps: float
) -> Tensor:
    """[S] bool: samples in front of the point where a ray's transmittance drops below ``eps``.

    t_starts, t_ends, sigmas, ray_indices [S]. No gradient: it only selects samples.
    """
    with torch.no_grad():
        _, trans, _ = render_weight_from_density_packed(t_starts, t_ends, sigmas.detach(), ray_indices, n_rays)
    return trans >= eps


def accumulate_along_rays_packed(weights: Tensor, values: Tensor | None, ray_indices: Tensor, n_rays: int) -> Tensor:
    """sum_i w_i v_i per ray: weights [S], values [S, C] or None (sum of weights) -> [n_rays, C] or [n_rays]."""
    if values is None:
        return torch.zeros(n_rays, dtype=weights.dtype, device=weights.device).index_add(0, ray_indices, weights)
    out = torch.zeros(n_rays, values.shape[-1], dtype=values.dtype, device=values.device)
    return out.index_add(0, ray_indices, weights[:, None] * values)
