"""Ray marching through an occupancy grid, volume rendering and shading.

Two marchers produce the same packed samples (DESIGN.md section 6):

* CPU: pure PyTorch. Samples lie on a lattice ``t = offset + (k + 1/2) * step`` along each ray
  (``offset`` = 0, or one uniform jitter per ray when stratified), restricted to the scene box;
  a vectorised traversal of the occupancy cells drops samples in empty cells *before* the field
  is evaluated.
* CUDA: nerfacc's ``OccGridEstimator.sampling`` on the same occupancy buffers and the same lattice.

Both paths then evaluate the field only on the packed survivors and composite with

.. math::
    \\alpha_i = 1 - e^{-\\sigma_i \\delta_i}, \\quad
    T_i = \\exp\\big(-\\textstyle\\sum_{j<i} \\sigma_j \\delta_j\\big), \\quad w_i = T_i \\alpha_i.

Packed tensors: ``ray_indices [S]`` (long, sorted, non-decreasing) say which ray each of the S
samples belongs to; within a ray the samples are ordered front to back.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cameras import Cameras, generate_rays
from .profiling import stage

Shading = Literal["albedo", "lambertian", "textureless"]
SHADINGS = ("albedo", "lambertian", "textureless")

EARLY_STOP_EPS = 1e-4
"""Transmittance below which the rest of a ray is skipped (nerfacc's default)."""
NO_GRAD_NORMAL_WEIGHT_EPS = 1e-5
"""Without autograd (eval, export), normals are only computed for samples whose weight reaches this:
each skipped sample changes a pixel by less than it. Training always computes them all (a sample's
colour drives its density gradient even where its weight is tiny)."""
_MAX_OPTICAL_DEPTH = 1e4
"""sigma * delta is clamped here before the cumulative sum: alpha is already 1, and inf - inf = nan."""
_NO_GRAD_FIELD_BLOCK = 1 << 17
"""Points per field call when autograd is off (bounds the hash grid's temporaries)."""
_CPU_MARCH_BLOCK = 1 << 21
"""Ray pieces (ray x grid-plane crossings) handled at once by the CPU marcher (bounds memory)."""


# --------------------------------------------------------------------------- geometry


def step_size_from_samples(bound: float, n_samples: int) -> float:
    """Marching step so that ``n_samples`` steps cross the diagonal of [-bound, bound]^3."""
    return 2.0 * math.sqrt(3.0) * bound / n_samples


def near_far_from_box(rays_o: Tensor, rays_d: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """Slab test against [-bound, bound]^3.

    rays_o, rays_d [N, 3] -> t_near, t_far [N]; ``t_near`` is clamped to >= 0 (rays may start
    inside the box). A ray that misses the box has ``t_far <= t_near``.
    """
    corner = torch.full((3,), float(bound), dtype=rays_o.dtype, device=rays_o.device)
    return near_far_from_aabb(rays_o, rays_d, -corner, corner)


def near_far_from_aabb(rays_o: Tensor, rays_d: Tensor, box_min: Tensor, box_max: Tensor) -> tuple[Tensor, Tensor]:
    """Slab test against the box [box_min, box_max] ([3] each); as :func:`near_far_from_box`."""
    inv_d = 1.0 / torch.where(rays_d.abs() < 1e-12, torch.full_like(rays_d, 1e-12), rays_d)
    t0 = (box_min - rays_o) * inv_d
    t1 = (box_max - rays_o) * inv_d
    t_near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(0.0)
    t_far = torch.maximum(t0, t1).amin(dim=-1)
    return t_near, t_far


def cells_from_points(x: Tensor, bound: float, resolution: int) -> Tensor:
    """x [..., 3] world -> flat cell index [...] (long) of an R^3 grid over the box.

    Layout matches nerfacc's ``OccGridEstimator.binaries[0]``: index = (ix * R + iy) * R + iz.
    Points outside the box are clamped onto its border cells (callers only ask about points inside).
    """
    ijk = ((x + bound) * (resolution / (2.0 * bound))).floor().long().clamp_(0, resolution - 1)
    return (ijk[..., 0] * resolution + ijk[..., 1]) * resolution + ijk[..., 2]


# --------------------------------------------------------------------------- occupancy grid


class OccupancyGrid(nn.Module):
    """Which cells of the scene box may hold density, so the marcher can skip empty space.

    State (both buffers, saved in checkpoints, identical on CPU and CUDA):

    * ``occs [R, R, R]`` float: EMA of the alpha ``1 - exp(-sigma * step_size)`` seen in each cell.
    * ``binaries [R, R, R]`` bool: cells the marcher visits. Starts all True so the first
      renders are not empty.

    The layout is nerfacc's (``OccGridEstimator`` with ``levels=1``): on CUDA the estimator reads
    these very tensors, so a checkpoint moves freely between devices.
    """

    def __init__(self, bound: float, resolution: int = 32, threshold: float = 0.01, ema_decay: float = 0.95):
        super().__init__()
        if resolution < 1:
            raise ValueError(f"occupancy resolution must be >= 1, got {resolution}")
        self.bound = float(bound)
        self.resolution = int(resolution)
        self.threshold = float(threshold)
        self.ema_decay = float(ema_decay)
        r = self.resolution
        self.register_buffer("occs", torch.zeros(r, r, r))
        self.register_buffer("binaries", torch.ones(r, r, r, dtype=torch.bool))
        self._estimators: dict = {}  # device -> nerfacc.OccGridEstimator (CUDA only; not state)

    @property
    def n_cells(self) -> int:
        return self.resolution**3

    def occupied_fraction(self) -> float:
        return self.binaries.float().mean().item()

    def is_occupied(self, x: Tensor) -> Tensor:
        """x [..., 3] world -> bool [...]: inside the box and in an occupied cell."""
        inside = (x.abs() <= self.bound).all(dim=-1)
        return inside & self.binaries.view(-1)[cells_from_points(x, self.bound, self.resolution)]

    def _cells_to_update(self, step: int, warmup_steps: int, generator: torch.Generator | None) -> Tensor:
        """Flat indices of the cells to refresh: all of them during warm-up or for grids up to 32^3;
        afterwards (large grids) a quarter sampled uniformly plus up to a quarter of the occupied
        ones, as nerfacc does."""
        n = self.n_cells
        if step < warmup_steps or n <= 32**3:
            return torch.arange(n)
        quarter = n // 4
        uniform = torch.randint(n, (quarter,), generator=generator)
        occupied = torch.nonzero(self.binaries.view(-1).cpu())[:, 0]
        if len(occupied) > quarter:
            occupied = occupied[torch.randint(len(occupied), (quarter,), generator=generator)]
        return torch.cat([uniform, occupied])

    @torch.no_grad()
    def update(
        self,
        step: int,
        density_fn: Callable[[Tensor], Tensor],
        *,
        step_size: float,
        warmup_steps: int = 256,
        generator: torch.Generator | None = None,
        chunk: int = 1 << 16,
    ) -> None:
        """Refresh the grid from the field's density (call it every ``occupancy_update_every`` steps).

        density_fn: x [M, 3] world -> sigma [M]. One jittered point per selected cell;
        ``occs = max(occs * decay, alpha)``; ``binaries = occs > min(threshold, mean(occs))``.
        Random draws come from ``generator`` (a CPU generator; the global RNG if None), so runs
        are reproducible and resume bit for bit.
        """
        r, b, device = self.resolution, self.bound, self.occs.device
        cells = self._cells_to_update(step, warmup_steps, generator)
        jitter = torch.rand(len(cells), 3, generator=generator)
        ijk = torch.stack([cells // (r * r), (cells // r) % r, cells % r], dim=-1).float()
        x = ((ijk + jitter) * (2.0 * b / r) - b).to(device)
        sigma = torch.cat([density_fn(part).reshape(-1) for part in x.split(chunk)])
        alpha = 1.0 - torch.exp(-sigma.float() * step_size)
        flat = self.occs.view(-1)
        cells = cells.to(device)
        flat[cells] = torch.maximum(flat[cells] * self.ema_decay, alpha)
        threshold = min(self.threshold, flat.mean().item())
        self.binaries.copy_(self.occs > threshold)

    def _nerfacc_estimator(self):
        """nerfacc's estimator on this grid's device, reading this grid's buffers (CUDA only)."""
        from nerfacc import OccGridEstimator

        key = str(self.occs.device)
        est = self._estimators.get(key)
        if est is None:
            b = self.bound
            est = OccGridEstimator(roi_aabb=[-b, -b, -b, b, b, b], resolution=self.resolution, levels=1)
            est = est.to(self.occs.device)
            self._estimators[key] = est
        # The buffers may have been replaced (load_state_dict, .to()): point at the current ones.
        est.occs = self.occs.view(-1)
        est.binaries = self.binaries.view(1, *self.binaries.shape)
        return est


# --------------------------------------------------------------------------- marching


def _ray_offsets(n_rays: int, step: float, stratified: bool, generator, device) -> Tensor:
    """[N] start of each ray's sample lattice: 0, or one U[0, step) jitter per ray."""
    if not stratified:
        return torch.zeros(n_rays, device=device)
    return (torch.rand(n_rays, generator=generator) * step).to(device)


def _occupied_cell_box(occupancy: OccupancyGrid | None, bound: float) -> tuple[Tensor, Tensor, Tensor, int] | None:
    """Integer cell range [lo, hi) per axis holding every occupied cell, its world box, and R.

    None when no cell is occupied. Without a grid: the whole box as one cell.
    """
    if occupancy is None:
        lo, hi, r = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long), 1
    else:
        r = occupancy.resolution
        cells = torch.nonzero(occupancy.binaries.cpu())
        if cells.numel() == 0:
            return None
        lo, hi = cells.amin(0), cells.amax(0) + 1
    size = 2.0 * bound / r
    return lo, hi, torch.stack([lo * size - bound, hi * size - bound]).float(), r


def march_rays_cpu(
    rays_o: Tensor,
    rays_d: Tensor,
    *,
    bound: float,
    step: float,
    offsets: Tensor,
    occupancy: OccupancyGrid | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Lattice samples inside the box and in occupied cells, packed.

    rays_o, rays_d [N, 3]; offsets [N] -> ray_indices [S] (long), t_starts [S], t_ends [S] with
    sample k of a ray at ``t_mid = offset + (k + 1/2) * step`` kept iff it lies in the box and its
    cell is occupied (nerfacc's traverse_grids convention). Not differentiable.

    Vectorised cell traversal: each ray is cut at every grid plane it crosses inside the box that
    bounds the occupied cells; each piece lies in one cell, is kept iff that cell is occupied, and
    contributes the lattice points whose midpoints fall in it. The work is O(rays x R), not
    O(rays x samples), and memory scales with the samples kept.
    """
    device, dtype = rays_o.device, rays_o.dtype
    empty = (torch.empty(0, dtype=torch.long, device=device), torch.empty(0, device=device), torch.empty(0, device=device))
    box = _occupied_cell_box(occupancy, bound)
    if box is None or rays_o.shape[0] == 0:
        return empty
    lo, hi, world_box, r = box
    world_box = world_box.to(device=device, dtype=dtype)
    t_near, t_far = near_far_from_aabb(rays_o, rays_d, world_box[0], world_box[1])
    has_lattice = torch.ceil((t_near - offsets) / step - 0.5).clamp_min(0) <= torch.floor((t_far - offsets) / step - 0.5)
    hit = torch.nonzero((t_far > t_near) & has_lattice)[:, 0]
    if hit.numel() == 0:
        return empty

    cell_size = 2.0 * bound / r
    planes = [torch.arange(int(lo[a]), int(hi[a]) + 1, device=device, dtype=dtype) * cell_size - bound for a in range(3)]
    n_cuts = 2 + sum(len(p) for p in planes)
    binaries = occupancy.binaries.view(-1) if occupancy is not None else None
    out_idx, out_t = [], []
    for block in hit.split(max(1, _CPU_MARCH_BLOCK // n_cuts)):
        o, d, off = rays_o[block], rays_d[block], offsets[block, None]
        near, far = t_near[block, None], t_far[block, None]
        cuts = [near, far]
        for a in range(3):
            da = d[:, a : a + 1]
            t = (planes[a][None, :] - o[:, a : a + 1]) / da
            cuts.append(torch.where(da.abs() < 1e-12, far, t).clamp(near, far))
        cuts = torch.sort(torch.cat(cuts, dim=1), dim=1).values  # [n, C]
        start, end = cuts[:, :-1], cuts[:, 1:]  # pieces, each inside one cell
        # lattice points with midpoint in [start, end): k in [k_lo, k_end), k >= 0 (the lattice
        # starts at the ray's offset, as nerfacc's starts at its near plane)
        k_lo = torch.ceil((start - off) / step - 0.5).clamp_min(0)
        count = (torch.ceil((end - off) / step - 0.5) - k_lo).clamp_min(0)
        if binaries is not None:
            mid = 0.5 * (start + end)
            x = o[:, None, :] + mid[..., None] * d[:, None, :]
            count = count * binaries[cells_from_points(x, bound, r)]
        count, k_lo = count.long().flatten(), k_lo.flatten()
        piece = torch.repeat_interleave(torch.arange(count.numel(), device=device), count)
        first = torch.cumsum(count, 0) - count
        k = k_lo[piece] + (torch.arange(piece.numel(), device=device) - first[piece]).to(dtype)
        rays = block[piece // start.shape[1]]
        out_idx.append(rays)
        out_t.append(offsets[rays] + (k + 0.5) * step)
    ray_indices = torch.cat(out_idx)
    t_mid = torch.cat(out_t)
    return ray_indices, t_mid - 0.5 * step, t_mid + 0.5 * step


# --------------------------------------------------------------------------- volume rendering


def ray_starts_from_indices(ray_indices: Tensor, n_rays: int) -> Tensor:
    """Sorted ray_indices [S] -> [S] position in the packed array of each sample's ray's first sample."""
    counts = torch.bincount(ray_indices, minlength=n_rays)
    first = torch.cumsum(counts, 0) - counts  # [n_rays]
    return first[ray_indices]


def exclusive_sum_packed(values: Tensor, ray_indices: Tensor, n_rays: int) -> Tensor:
    """Per-ray exclusive cumulative sum of packed values [S] (differentiable).

    One global cumsum minus each ray's starting value, accumulated in float64 so long packed
    arrays keep their precision (DESIGN.md section 6).
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


def accumulate_along_rays_packed(weights: Tensor, values: Tensor | None, ray_indices: Tensor, n_rays: int) -> Tensor:
    """sum_i w_i v_i per ray: weights [S], values [S, C] or None (sum of weights) -> [n_rays, C] or [n_rays]."""
    if values is None:
        return torch.zeros(n_rays, dtype=weights.dtype, device=weights.device).index_add(0, ray_indices, weights)
    out = torch.zeros(n_rays, values.shape[-1], dtype=values.dtype, device=values.device)
    return out.index_add(0, ray_indices, weights[:, None] * values)


def shade(
    albedo: Tensor, normals: Tensor | None, x: Tensor, light_positions: Tensor | None, shading: Shading, ambient: float
) -> Tensor:
    """Per-sample colour [S, 3].

    albedo: the albedo itself. lambertian: ``albedo * (ambient + (1 - ambient) * max(0, n . l))``
    with ``l = normalize(light - x)``. textureless: the same with white albedo.
    albedo, normals, x, light_positions [S, 3].
    """
    if shading == "albedo":
        return albedo
    light_dir = F.normalize(light_positions - x, dim=-1)
    diffuse = (normals * light_dir).sum(-1, keepdim=True).clamp_min(0.0)
    brightness = ambient + (1.0 - ambient) * diffuse  # [S, 1]
    if shading == "lambertian":
        return albedo * brightness
    return brightness.expand(-1, 3)


# --------------------------------------------------------------------------- render_rays


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
        fd = getattr(field, "normal_method", "analytic") == "finite_difference"
        self.normal_cost = 6 if fd else 1

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
        self.count += self.normal_cost * x.shape[0]
        return self._blocked(self.field.normals, x, max(1, self.block // self.normal_cost))


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


def _visible_after_density(t_starts, t_ends, sigmas, ray_indices, n_rays, eps: float) -> Tensor:
    """[S] bool: samples in front of the point where a ray's transmittance drops below ``eps``."""
    with torch.no_grad():
        _, trans, _ = render_weight_from_density_packed(t_starts, t_ends, sigmas.detach(), ray_indices, n_rays)
    return trans >= eps


@functools.lru_cache(maxsize=1)
def nerfacc_kernels_available() -> bool:
    """Whether nerfacc's CUDA kernels load (they JIT-build on first use and need nvcc + ninja).

    Without them the PyTorch marcher runs on the GPU too (same lattice, same results), with a
    one-time warning instead of a crash at the first training step.
    """
    try:
        from nerfacc.cuda import _backend

        if getattr(_backend, "_C", None) is not None:
            return True
        reason = "the extension did not build"
    except Exception as exc:  # OSError (no CUDA_HOME), RuntimeError (no ninja), ImportError...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    warnings.warn(f"nerfacc's CUDA kernels are unavailable ({reason}); using the PyTorch ray marcher on the GPU",
                  stacklevel=2)
    return False


def _march_cuda(field: _CountingField, rays_o, rays_d, occupancy, step, offsets, bound, early_stop_eps):
    """nerfacc's marcher (CUDA only): same lattice, same occupancy buffers, density pre-pass inside."""
    def sigma_fn(t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor) -> Tensor:
        t_mid = 0.5 * (t_starts + t_ends)[:, None]
        return field.density(rays_o[ray_indices] + t_mid * rays_d[ray_indices])

    if occupancy is None:  # a transient all-occupied grid on this device
        occupancy = OccupancyGrid(bound, resolution=1).to(rays_o.device)
    estimator = occupancy._nerfacc_estimator()
    ray_indices, t_starts, t_ends = estimator.sampling(
        rays_o.contiguous(),
        rays_d.contiguous(),
        sigma_fn=sigma_fn if early_stop_eps > 0 else None,
        near_plane=0.0,
        # nerfacc marches from the per-ray near plane in whole steps and keeps the samples whose
        # midpoints fall in the box: starting at `offsets` gives the CPU path's lattice exactly.
        t_min=offsets,
        render_step_size=step,
        early_stop_eps=early_stop_eps,
        alpha_thre=0.0,
        stratified=False,  # our own jitter (offsets) comes from the caller's generator
    )
    return ray_indices.long(), t_starts, t_ends


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
) -> RenderOutput:
    """Render N rays through ``field`` (differentiable w.r.t. the field and the background).

    rays_o, rays_d [N, 3] (unit directions); light_positions [N, 3] (needed for lambertian and
    textureless shading); background_rgb [N, 3] replaces ``background(rays_d)`` when given.
    ``n_samples`` steps cross the box diagonal; ``stratified`` jitters each ray's lattice with
    ``generator`` (a CPU generator; global RNG if None). ``early_stop_eps`` > 0 drops samples
    behind transmittance < eps: on CUDA before the field is evaluated (nerfacc's no-grad density
    pass), on CPU after the density pass, so only normals and shading are saved there; 0 disables it.
    """
    # 1. Check inputs
    bound = float(field.bound)
    _check_inputs(rays_o, rays_d, n_samples, shading, light_positions, background_rgb, occupancy, bound)
    n_rays, device = rays_o.shape[0], rays_o.device
    counted = _CountingField(field)
    step = step_size_from_samples(bound, n_samples)
    offsets = _ray_offsets(n_rays, step, stratified, generator, device)

    # 2. March: packed samples in occupied cells (no field evaluation in empty space)
    with stage("march"):
        use_nerfacc = rays_o.is_cuda and nerfacc_kernels_available()
        if use_nerfacc:
            ray_indices, t_starts, t_ends = _march_cuda(counted, rays_o, rays_d, occupancy, step, offsets, bound, early_stop_eps)
        else:
            ray_indices, t_starts, t_ends = march_rays_cpu(
                rays_o, rays_d, bound=bound, step=step, offsets=offsets, occupancy=occupancy
            )

    # 3. Field on the survivors
    with stage("field"):
        t_mid = 0.5 * (t_starts + t_ends)
        x = rays_o[ray_indices] + t_mid[:, None] * rays_d[ray_indices]  # [S, 3]
        if x.shape[0] > 0:
            sigmas, albedo = counted(x)
        else:
            sigmas, albedo = x.new_zeros(0), x.new_zeros(0, 3)
        if not use_nerfacc and early_stop_eps > 0 and x.shape[0] > 0:
            # CPU early termination, without a second pass: the density pass above already paid for
            # every sample (a no-grad pre-pass + a re-evaluation was measured slower on CPU), but the
            # normals (6 more density evaluations each) are only needed in front of T < eps.
            keep = _visible_after_density(t_starts, t_ends, sigmas, ray_indices, n_rays, early_stop_eps)
            if not bool(keep.all()):
                ray_indices, t_starts, t_ends, t_mid = ray_indices[keep], t_starts[keep], t_ends[keep], t_mid[keep]
                x, sigmas, albedo = x[keep], sigmas[keep], albedo[keep]
        dirs = rays_d[ray_indices]

    # 4. Weights (they do not depend on the normals)
    if use_nerfacc and t_starts.numel() > 0:
        from nerfacc import render_weight_from_density

        weights, _, _ = render_weight_from_density(t_starts, t_ends, sigmas, ray_indices=ray_indices, n_rays=n_rays)
    else:
        weights, _, _ = render_weight_from_density_packed(t_starts, t_ends, sigmas, ray_indices, n_rays)

    # 5. Normals and shading
    with stage("shading"):
        want_normals = need_normals or shading != "albedo"
        normals = x.new_zeros(x.shape[0], 3)
        if want_normals and x.shape[0] > 0:
            if torch.is_grad_enabled():
                normals = counted.normals(x)
            else:  # eval/export: skip normals where they cannot show (error <= NO_GRAD_NORMAL_WEIGHT_EPS each)
                shows = weights >= NO_GRAD_NORMAL_WEIGHT_EPS
                normals[shows] = counted.normals(x[shows])
        lights = light_positions[ray_indices] if light_positions is not None else None
        colors = shade(albedo, normals, x, lights, shading, ambient)

    # 6. Accumulation along the rays
    opacity = accumulate_along_rays_packed(weights, None, ray_indices, n_rays)
    rgb = accumulate_along_rays_packed(weights, colors, ray_indices, n_rays)
    depth = accumulate_along_rays_packed(weights, t_mid[:, None], ray_indices, n_rays)[:, 0]
    depth = depth / opacity.clamp_min(torch.finfo(opacity.dtype).eps)
    if want_normals:
        normal = accumulate_along_rays_packed(weights, normals, ray_indices, n_rays)
    else:
        normal = rays_o.new_zeros(n_rays, 3)
    if need_normals:
        facing_away = (normals * dirs).sum(-1).clamp_min(0.0) ** 2
        orientation = accumulate_along_rays_packed(weights.detach(), facing_away[:, None], ray_indices, n_rays)[:, 0]
    else:
        orientation = rays_o.new_zeros(n_rays)

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
