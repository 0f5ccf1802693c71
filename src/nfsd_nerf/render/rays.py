"""Render rays and images: march, evaluate the field, weight, shade, accumulate, composite.

:func:`render_rays` runs the stages of :mod:`.marching`, :mod:`.volume` and :mod:`.shading` on one
batch of rays; :func:`render_image` cuts whole images into batches of rays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..cameras import Cameras, generate_rays
from ..field import resolve_normal_method
from ..profiling import stage
from .marching import (
    march_rays_cpu,
    march_rays_nerfacc,
    nerfacc_kernels_available,
    ray_offsets,
    sampling_alpha_threshold,
    step_size_from_samples,
    visible_after_density_pass,
)
from .occupancy import OccupancyGrid
from .shading import SHADINGS, Shading, shade
from .volume import accumulate_along_rays_packed, render_weight_from_density_packed

EARLY_STOP_EPS = 1e-4
"""Transmittance below which the rest of a ray is skipped (nerfacc's default)."""
NO_GRAD_NORMAL_WEIGHT_EPS = 1e-5
"""Without autograd (eval, export), normals are only computed for samples whose weight reaches this:
each skipped sample changes a pixel by less than it. Training always computes them all (a sample's
colour drives its density gradient even where its weight is tiny)."""
_NO_GRAD_FIELD_BLOCK = 1 << 17
"""Points per field call when autograd is off (bounds the hash grid's temporaries)."""


@dataclass
class RenderOutput:
    """Per-ray results of :func:`render_rays`."""

    rgb: Tensor
    """[N, 3] composited over the background."""
    opacity: Tensor
    """[N] sum of weights."""
    depth: Tensor
    """[N] expected distance along the ray, ``sum w t / opacity`` (0 where opacity is 0)."""
    normal: Tensor
    """[N, 3] ``sum w n`` (not renormalised); zeros unless normals were computed."""
    orientation: Tensor
    """[N] ``sum stopgrad(w) * relu(n . d)^2`` (DreamFusion); zeros unless need_normals."""
    n_field_samples: int
    """Points at which the field was evaluated (normals and, on CUDA, nerfacc's density pre-pass included)."""


class _CountingField:
    """Wraps the field's three entry points: counts the points evaluated and, when autograd is off
    (eval, export), evaluates in blocks so a 16k-ray chunk's normals (6 x samples points through
    a 16-level hash grid) stay within a few hundred MB."""

    def __init__(self, field, block: int = _NO_GRAD_FIELD_BLOCK):
        self.field, self.count, self.block = field, 0, block

    def _normal_cost(self, x: Tensor) -> int:
        """Density evaluations per normal at x's device: 6 for finite differences, else 1."""
        method = resolve_normal_method(getattr(self.field, "normal_method", "analytic"), x.device)
        return 6 if method == "finite_difference" else 1

    def _blocked(self, fn, x: Tensor, block: int):
        if torch.is_grad_enabled() or x.shape[0] <= block:
            return fn(x)
        parts = [fn(part) for part in x.split(block)]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(p) for p in zip(*parts))
        return torch.cat(parts)

    def density(self, x: Tensor) -> Tensor:
        self.count += x.shape[0]
        return self._blocked(self.field.density, x, self.block)

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.count += x.shape[0]
        return self._blocked(self.field, x, self.block)

    def normals(self, x: Tensor) -> Tensor:
        cost = self._normal_cost(x)
        self.count += cost * x.shape[0]
        return self._blocked(self.field.normals, x, max(1, self.block // cost))


class _Samples(NamedTuple):
    """Packed samples after the field pass: ray_indices, t_starts, t_ends, t_mid, sigmas [S]; x, albedo [S, 3]."""

    ray_indices: Tensor
    t_starts: Tensor
    t_ends: Tensor
    t_mid: Tensor
    x: Tensor
    sigmas: Tensor
    albedo: Tensor

    def select(self, keep: Tensor) -> "_Samples":
        """The samples where ``keep`` [S] (bool) is True."""
        return _Samples(*(value[keep] for value in self))


def _check_inputs(rays_o, rays_d, n_samples, shading, light_positions, background_rgb, occupancy, bound):
    if rays_o.ndim != 2 or rays_o.shape[-1] != 3 or rays_d.shape != rays_o.shape:
        raise ValueError(f"rays_o and rays_d must be [N, 3], got {tuple(rays_o.shape)} and {tuple(rays_d.shape)}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if shading not in SHADINGS:
        raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")
    if shading != "albedo" and (light_positions is None or light_positions.shape != rays_o.shape):
        got = None if light_positions is None else tuple(light_positions.shape)
        raise ValueError(f"{shading} shading needs light_positions [N, 3], got {got}")
    if background_rgb is not None and background_rgb.shape != rays_o.shape:
        raise ValueError(f"background_rgb must be [N, 3], got {tuple(background_rgb.shape)}")
    if occupancy is not None and abs(occupancy.bound - bound) > 1e-6:
        raise ValueError(f"occupancy grid bound {occupancy.bound} differs from the field's {bound}")


def _march(use_nerfacc, counted, rays_o, rays_d, occupancy, step, offsets, bound, early_stop_eps, alpha_threshold):
    """-> ray_indices [S] (long), t_starts, t_ends [S]: nerfacc's marcher (with its counted density
    pre-pass) or the PyTorch one (early stop and alpha threshold come later, in :func:`_field_on_samples`)."""
    if use_nerfacc:
        return march_rays_nerfacc(counted.density, rays_o, rays_d, occupancy, step, offsets, bound, early_stop_eps,
                                  alpha_threshold)
    return march_rays_cpu(rays_o, rays_d, bound=bound, step=step, offsets=offsets, occupancy=occupancy)


def _field_on_samples(counted, rays_o, rays_d, ray_indices, t_starts, t_ends, n_rays, cpu_early_stop_eps,
                      cpu_alpha_threshold) -> _Samples:
    """Density and albedo at the sample midpoints; then the samples nerfacc's pre-pass would have
    dropped (behind transmittance < ``cpu_early_stop_eps``, alpha < ``cpu_alpha_threshold``) go,
    by :func:`~.marching.visible_after_density_pass`; both 0 on CUDA, where nerfacc did it.

    CPU filtering without a second pass: the density pass already paid for every sample (a no-grad
    pre-pass + a re-evaluation was measured slower on CPU), but the normals (6 more density
    evaluations each) are only needed for the samples kept.
    """
    t_mid = 0.5 * (t_starts + t_ends)
    x = rays_o[ray_indices] + t_mid[:, None] * rays_d[ray_indices]  # [S, 3]
    if x.shape[0] > 0:
        sigmas, albedo = counted(x)
    else:
        sigmas, albedo = x.new_zeros(0), x.new_zeros(0, 3)
    samples = _Samples(ray_indices, t_starts, t_ends, t_mid, x, sigmas, albedo)
    if (cpu_early_stop_eps > 0 or cpu_alpha_threshold > 0) and x.shape[0] > 0:
        keep = visible_after_density_pass(t_starts, t_ends, sigmas, ray_indices, n_rays, cpu_early_stop_eps,
                                          cpu_alpha_threshold)
        if not bool(keep.all()):
            samples = samples.select(keep)
    return samples


def _weights(samples: _Samples, n_rays: int, use_nerfacc: bool) -> Tensor:
    """[S] volume-rendering weights: nerfacc's kernel when it marched, else the PyTorch one (same maths)."""
    if use_nerfacc and samples.t_starts.numel() > 0:
        from nerfacc import render_weight_from_density

        weights, _, _ = render_weight_from_density(
            samples.t_starts, samples.t_ends, samples.sigmas, ray_indices=samples.ray_indices, n_rays=n_rays
        )
        return weights
    weights, _, _ = render_weight_from_density_packed(
        samples.t_starts, samples.t_ends, samples.sigmas, samples.ray_indices, n_rays
    )
    return weights


def _normals(counted, x: Tensor, weights: Tensor, want_normals: bool) -> Tensor:
    """[S, 3] field normals at x [S, 3] (zeros unless wanted).

    With autograd on (training) at every sample; off (eval, export) only where the weight reaches
    :data:`NO_GRAD_NORMAL_WEIGHT_EPS`, so each skipped sample moves a pixel by less than that.
    """
    normals = x.new_zeros(x.shape[0], 3)
    if want_normals and x.shape[0] > 0:
        if torch.is_grad_enabled():
            normals = counted.normals(x)
        else:
            shows = weights >= NO_GRAD_NORMAL_WEIGHT_EPS
            normals[shows] = counted.normals(x[shows])
    return normals


def _accumulate(weights, samples, colors, normals, rays_o, rays_d, want_normals, need_normals):
    """Per-ray sums of the weighted samples -> (rgb [N, 3] before the background, opacity [N],
    depth [N], normal [N, 3], orientation [N]); see :class:`RenderOutput`."""
    n_rays, ray_indices = rays_o.shape[0], samples.ray_indices
    opacity = accumulate_along_rays_packed(weights, None, ray_indices, n_rays)
    rgb = accumulate_along_rays_packed(weights, colors, ray_indices, n_rays)
    depth = accumulate_along_rays_packed(weights, samples.t_mid[:, None], ray_indices, n_rays)[:, 0]
    depth = depth / opacity.clamp_min(torch.finfo(opacity.dtype).eps)
    if want_normals:
        normal = accumulate_along_rays_packed(weights, normals, ray_indices, n_rays)
    else:
        normal = rays_o.new_zeros(n_rays, 3)
    if need_normals:
        facing_away = (normals * rays_d[ray_indices]).sum(-1).clamp_min(0.0) ** 2
        orientation = accumulate_along_rays_packed(weights.detach(), facing_away[:, None], ray_indices, n_rays)[:, 0]
    else:
        orientation = rays_o.new_zeros(n_rays)
    return rgb, opacity, depth, normal, orientation


def render_rays(
    field,
    background,
    rays_o: Tensor,
    rays_d: Tensor,
    *,
    occupancy: OccupancyGrid | None,
    n_samples: int = 512,
    shading: Shading = "albedo",
    light_positions: Tensor | None = None,
    ambient: float = 0.1,
    need_normals: bool = False,
    stratified: bool = False,
    background_rgb: Tensor | None = None,
    generator: torch.Generator | None = None,
    early_stop_eps: float = EARLY_STOP_EPS,
    alpha_threshold: float | None = None,
) -> RenderOutput:
    """Render N rays through ``field`` (differentiable w.r.t. the field and the background).

    rays_o, rays_d [N, 3] (unit directions); light_positions [N, 3] (needed for lambertian and
    textureless shading); background_rgb [N, 3] replaces ``background(rays_d)`` when given.
    ``n_samples`` steps cross the box diagonal; ``stratified`` jitters each ray's lattice with
    ``generator`` (a CPU generator; global RNG if None). ``early_stop_eps`` > 0 drops samples
    behind transmittance < eps: on CUDA before the field is evaluated (nerfacc's no-grad density
    pass), on CPU after the density pass, so only normals and shading are saved there; 0 disables it.
    ``alpha_threshold`` drops samples with alpha below ``min(alpha_threshold, mean(occupancy.occs))``
    the same way (nerfacc's ``alpha_thre``); None: the grid's own ``alpha_threshold`` (its config's
    ``render.alpha_threshold``), 0 without a grid.
    """
    # 1. Check inputs
    bound = float(field.bound)
    _check_inputs(rays_o, rays_d, n_samples, shading, light_positions, background_rgb, occupancy, bound)
    n_rays = rays_o.shape[0]
    counted = _CountingField(field)
    step = step_size_from_samples(bound, n_samples)
    offsets = ray_offsets(n_rays, step, stratified, generator, rays_o.device)
    if alpha_threshold is None:
        alpha_threshold = getattr(occupancy, "alpha_threshold", 0.0)

    # 2. March: packed samples in occupied cells (no field evaluation in empty space)
    with stage("march"):
        use_nerfacc = rays_o.is_cuda and nerfacc_kernels_available()
        ray_indices, t_starts, t_ends = _march(
            use_nerfacc, counted, rays_o, rays_d, occupancy, step, offsets, bound, early_stop_eps, alpha_threshold
        )

    # 3. Field on the survivors (then early stop and alpha threshold on CPU; nerfacc did both while marching)
    with stage("field"):
        cpu_early_stop_eps = 0.0 if use_nerfacc else early_stop_eps
        cpu_alpha = 0.0 if use_nerfacc else sampling_alpha_threshold(alpha_threshold, getattr(occupancy, "occs", None))
        samples = _field_on_samples(counted, rays_o, rays_d, ray_indices, t_starts, t_ends, n_rays, cpu_early_stop_eps,
                                    cpu_alpha)

    # 4. Weights (they do not depend on the normals)
    weights = _weights(samples, n_rays, use_nerfacc)

    # 5. Normals and shading
    with stage("shading"):
        want_normals = need_normals or shading != "albedo"
        normals = _normals(counted, samples.x, weights, want_normals)
        lights = light_positions[samples.ray_indices] if light_positions is not None else None
        colors = shade(samples.albedo, normals, samples.x, lights, shading, ambient)

    # 6. Accumulation along the rays
    rgb, opacity, depth, normal, orientation = _accumulate(
        weights, samples, colors, normals, rays_o, rays_d, want_normals, need_normals
    )

    # 7. Background
    bg = background(rays_d) if background_rgb is None else background_rgb
    rgb = rgb + (1.0 - opacity)[:, None] * bg
    return RenderOutput(rgb, opacity, depth, normal, orientation, counted.count)


def render_image(
    field,
    background,
    cameras: Cameras,
    height: int,
    width: int,
    *,
    chunk_rays: int = 16384,
    background_rgb: Tensor | None = None,
    light_positions: Tensor | None = None,
    **kw,
) -> dict[str, Tensor]:
    """Render whole images, ``chunk_rays`` rays at a time (a 512x512 image fits in CPU memory).

    -> {"rgb" [B,H,W,3], "opacity" [B,H,W], "depth" [B,H,W], "normal" [B,H,W,3]}.
    ``background_rgb`` may be [3] or [B, 3] (one colour per image); ``light_positions`` [B, 3]
    defaults to ``cameras.light_positions``. Other keywords go to :func:`render_rays`.
    Does not switch off autograd itself: wrap it in ``torch.no_grad()`` for eval/export.
    """
    b = len(cameras)
    rays_o, rays_d = generate_rays(cameras, height, width)  # [B, H, W, 3]
    per_image = height * width
    rays_o, rays_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
    lights = cameras.light_positions if light_positions is None else light_positions
    lights = lights.to(rays_o).repeat_interleave(per_image, dim=0)
    bg = None
    if background_rgb is not None:
        bg = torch.as_tensor(background_rgb, dtype=rays_o.dtype, device=rays_o.device).reshape(-1, 3)
        bg = bg.expand(b, 3).repeat_interleave(per_image, dim=0)
    parts: dict[str, list[Tensor]] = {"rgb": [], "opacity": [], "depth": [], "normal": []}
    for start in range(0, rays_o.shape[0], chunk_rays):
        sl = slice(start, start + chunk_rays)
        out = render_rays(
            field,
            background,
            rays_o[sl],
            rays_d[sl],
            light_positions=lights[sl],
            background_rgb=None if bg is None else bg[sl],
            **kw,
        )
        for name in parts:
            parts[name].append(getattr(out, name))
    return {
        name: torch.cat(chunks).reshape(b, height, width, *chunks[0].shape[1:]) for name, chunks in parts.items()
    }
