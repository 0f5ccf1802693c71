"""Ray marching: packed lattice samples inside the scene box and in occupied cells.

Two marchers produce the same packed samples (docs/design.md, section 5):

* CPU (:func:`march_rays_cpu`): pure PyTorch. Samples lie on a lattice
  ``t = offset + (k + 1/2) * step`` along each ray (``offset`` = 0, or one uniform jitter per ray
  when stratified), restricted to the scene box; a vectorised traversal of the occupancy cells
  drops samples in empty cells *before* the field is evaluated.
* CUDA (:func:`march_rays_nerfacc`): nerfacc's ``OccGridEstimator.sampling`` on the same occupancy
  buffers and the same lattice, with a no-grad density pre-pass for early termination and the
  alpha threshold; the CPU path drops the same samples after its density pass
  (:func:`visible_after_density_pass`).
  Its kernels are JIT-built on a machine's first use: :func:`prepare_nerfacc_kernels` does that
  before training, under a status line, and says in one line why when they cannot be built.

Output: ``ray_indices [S]`` (long, sorted), ``t_starts [S]``, ``t_ends [S]``; within a ray the
samples are ordered front to back.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import shutil
import time
import warnings
from typing import Callable

import torch
from torch import Tensor

from .occupancy import OccupancyGrid, cells_from_points
from .volume import visible_before_early_stop

_CPU_MARCH_BLOCK = 1 << 21
"""Ray pieces (ray x grid-plane crossings) handled at once by the CPU marcher (bounds memory)."""


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


def ray_offsets(n_rays: int, step: float, stratified: bool, generator, device) -> Tensor:
    """[N] start of each ray's sample lattice: 0, or one U[0, step) jitter per ray.

    The jitter is drawn on the CPU from ``generator`` (global RNG if None) on every device, so a
    stratified render is reproducible and both marchers see the same lattice.
    """
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


def _cell_pieces(o: Tensor, d: Tensor, near: Tensor, far: Tensor, planes: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Cut each ray at every grid plane it crosses between ``near`` and ``far``.

    o, d [n, 3]; near, far [n, 1]; planes: per axis [P_a] plane positions -> start, end [n, C - 1]
    with C = 2 + sum(P_a): consecutive pieces, each inside one cell (empty pieces have start = end).
    """
    cuts = [near, far]
    for a in range(3):
        da = d[:, a : a + 1]
        t = (planes[a][None, :] - o[:, a : a + 1]) / da
        cuts.append(torch.where(da.abs() < 1e-12, far, t).clamp(near, far))
    cuts = torch.sort(torch.cat(cuts, dim=1), dim=1).values  # [n, C]
    return cuts[:, :-1], cuts[:, 1:]


def _lattice_in_pieces(
    start: Tensor,
    end: Tensor,
    o: Tensor,
    d: Tensor,
    off: Tensor,
    step: float,
    binaries: Tensor | None,
    bound: float,
    r: int,
) -> tuple[Tensor, Tensor]:
    """Lattice points whose midpoints fall in the occupied pieces.

    start, end [n, P] (from :func:`_cell_pieces`); o, d [n, 3]; off [n, 1] -> piece [s] (flat
    index into [n, P]) and k [s] (lattice index along the ray) of every kept sample, in order.
    A piece contributes k in [k_lo, k_end), k >= 0 (the lattice starts at the ray's offset, as
    nerfacc's starts at its near plane), and nothing when its cell is empty.
    """
    device, dtype = o.device, o.dtype
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
    return piece, k


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
        start, end = _cell_pieces(o, d, t_near[block, None], t_far[block, None], planes)
        piece, k = _lattice_in_pieces(start, end, o, d, off, step, binaries, bound, r)
        rays = block[piece // start.shape[1]]
        out_idx.append(rays)
        out_t.append(offsets[rays] + (k + 0.5) * step)
    ray_indices = torch.cat(out_idx)
    t_mid = torch.cat(out_t)
    return ray_indices, t_mid - 0.5 * step, t_mid + 0.5 * step


def sampling_alpha_threshold(alpha_threshold: float, occs: Tensor | None) -> float:
    """nerfacc's rule in ``OccGridEstimator.sampling``: the alpha threshold is capped at the grid's
    mean occupancy ``occs`` [R, R, R] (a faint field keeps its samples); 0 without a grid (nerfacc's
    transient grid has zero occupancy)."""
    if alpha_threshold <= 0 or occs is None:
        return 0.0
    return min(float(alpha_threshold), float(occs.mean()))


def visible_after_density_pass(
    t_starts: Tensor, t_ends: Tensor, sigmas: Tensor, ray_indices: Tensor, n_rays: int,
    early_stop_eps: float, alpha_threshold: float,
) -> Tensor:
    """[S] bool: what nerfacc's ``sampling`` keeps after its density pre-pass, for the CPU marcher.

    t_starts, t_ends, sigmas, ray_indices [S]. Kept: transmittance (over *all* samples) >= eps when
    ``early_stop_eps`` > 0, and ``alpha = 1 - exp(-sigma (t_end - t_start)) >= alpha_threshold`` when
    that (already capped by :func:`sampling_alpha_threshold`) is > 0. No gradient.
    """
    keep = torch.ones_like(ray_indices, dtype=torch.bool)
    if early_stop_eps > 0:
        keep = visible_before_early_stop(t_starts, t_ends, sigmas, ray_indices, n_rays, early_stop_eps)
    if alpha_threshold > 0:
        with torch.no_grad():
            alphas = 1.0 - torch.exp(-sigmas.detach() * (t_ends - t_starts))
        keep = keep & (alphas >= alpha_threshold)
    return keep


KERNELS_STATUS = "building nerfacc's CUDA kernels (first run only, can take a few minutes)..."
"""Shown while :func:`prepare_nerfacc_kernels` loads the kernels (nerfacc JIT-builds them once per machine)."""

_kernels_explained = False
"""Whether the user has been told why nerfacc's kernels are missing (said once per process)."""


@functools.lru_cache(maxsize=1)
def _load_nerfacc_kernels() -> str | None:
    """Load nerfacc's CUDA kernels once per process, JIT-building them the first time: None when
    they loaded, else why not (one line). Only call it with a CUDA build of torch and a GPU: on a
    CPU torch with nvcc present, nerfacc tries a build that fails on CUDA_HOME."""
    if shutil.which("nvcc") is None and not _nerfacc_prebuilt():
        # nerfacc would print its own "no CUDA toolkit" line: say it once, in ours
        home = os.environ.get("CUDA_HOME")
        return f"nvcc is not on PATH (CUDA_HOME={home})" if home else "nvcc is not on PATH and CUDA_HOME is unset"
    try:
        with _quiet_nerfacc_console():
            backend = _import_nerfacc_backend()
    except Exception as exc:  # OSError (no CUDA_HOME), RuntimeError (no ninja, compiler error), ImportError...
        text = str(exc).strip()
        return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    return None if getattr(backend, "_C", None) is not None else "the extension did not build"


def _import_nerfacc_backend():
    """nerfacc's kernel module: importing it loads the compiled kernels or JIT-builds them (nvcc + ninja)."""
    from nerfacc.cuda import _backend

    return _backend


def _nerfacc_prebuilt() -> bool:
    """Whether nerfacc was installed with its kernels compiled (``nerfacc.csrc``), needing no nvcc."""
    try:
        return importlib.util.find_spec("nerfacc.csrc") is not None
    except ImportError:  # nerfacc itself is missing
        return False


@contextlib.contextmanager
def _quiet_nerfacc_console():
    """nerfacc draws its own spinner while building; consoles created in this block are not interactive,
    so ours (:data:`KERNELS_STATUS`) is the only one on screen."""
    previous = os.environ.get("TTY_INTERACTIVE")
    os.environ["TTY_INTERACTIVE"] = "0"  # read by rich.Console() when it is created
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TTY_INTERACTIVE", None)
        else:
            os.environ["TTY_INTERACTIVE"] = previous


def kernels_unavailable_message(reason: str) -> str:
    """One line: why nerfacc's kernels are missing, what it costs, and how to fix it."""
    cuda = torch.version.cuda or "matching torch's"
    return (f"nerfacc's CUDA kernels are unavailable ({reason}): the PyTorch ray marcher runs on the GPU instead "
            f"(same samples; its speed cost on a GPU is not measured yet). To fix: install the CUDA {cuda} "
            f"toolkit (torch's CUDA), `pip install ninja`, put nvcc on PATH and set CUDA_HOME")


def prepare_nerfacc_kernels(console, device: torch.device) -> bool:
    """Load (on a first run, build) nerfacc's kernels before training, under a status line, so the
    build never happens inside the progress bar. Returns whether the CUDA marcher will run.

    A no-op on any device but CUDA (prints nothing, imports nothing). On failure prints one line:
    :func:`kernels_unavailable_message`.
    """
    global _kernels_explained
    if device.type != "cuda":
        return False
    if _load_nerfacc_kernels.cache_info().currsize:  # already tried in this process
        return nerfacc_kernels_available()
    started = time.perf_counter()
    with console.status(KERNELS_STATUS):
        reason = _load_nerfacc_kernels()
    _kernels_explained = True
    if reason is None:
        console.print(f"nerfacc's CUDA kernels: ready ({time.perf_counter() - started:.1f} s)")
    else:
        from rich.markup import escape  # the reason may hold brackets (compiler output)

        console.print(f"[yellow]warning:[/] {escape(kernels_unavailable_message(reason))}", highlight=False)
    return reason is None


def nerfacc_kernels_available() -> bool:
    """Whether nerfacc's CUDA kernels load; call only with CUDA tensors (see :func:`_load_nerfacc_kernels`).

    Without them the PyTorch marcher runs on the GPU too (same lattice, same results), with a
    one-time warning (unless :func:`prepare_nerfacc_kernels` already said why) instead of a crash.
    """
    global _kernels_explained
    reason = _load_nerfacc_kernels()
    if reason is not None and not _kernels_explained:
        _kernels_explained = True
        warnings.warn(kernels_unavailable_message(reason), stacklevel=2)
    return reason is None


def march_rays_nerfacc(
    density: Callable[[Tensor], Tensor],
    rays_o: Tensor,
    rays_d: Tensor,
    occupancy: OccupancyGrid | None,
    step: float,
    offsets: Tensor,
    bound: float,
    early_stop_eps: float,
    alpha_threshold: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """nerfacc's marcher (CUDA only): same lattice, same occupancy buffers, density pre-pass inside.

    density: x [M, 3] -> sigma [M], called (no grad) on the candidates when ``early_stop_eps`` > 0
    or ``alpha_threshold`` > 0, to drop samples behind transmittance < eps and samples whose alpha
    is below ``min(alpha_threshold, mean(occs))`` (CPU: :func:`visible_after_density_pass`).
    Otherwise as :func:`march_rays_cpu`:
    rays_o, rays_d [N, 3]; offsets [N] -> ray_indices [S] (long), t_starts [S], t_ends [S].
    """
    def sigma_fn(t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor) -> Tensor:
        t_mid = 0.5 * (t_starts + t_ends)[:, None]
        return density(rays_o[ray_indices] + t_mid * rays_d[ray_indices])

    if occupancy is None:  # a transient all-occupied grid on this device
        occupancy = OccupancyGrid(bound, resolution=1).to(rays_o.device)
    estimator = occupancy.nerfacc_estimator()
    ray_indices, t_starts, t_ends = estimator.sampling(
        rays_o.contiguous(),
        rays_d.contiguous(),
        sigma_fn=sigma_fn if early_stop_eps > 0 or alpha_threshold > 0 else None,
        near_plane=0.0,
        # nerfacc marches from the per-ray near plane in whole steps and keeps the samples whose
        # midpoints fall in the box: starting at `offsets` gives the CPU path's lattice exactly.
        t_min=offsets,
        render_step_size=step,
        early_stop_eps=early_stop_eps,
        alpha_thre=alpha_threshold,  # nerfacc caps it at occs.mean() itself
        stratified=False,  # our own jitter (offsets) comes from the caller's generator
    )
    return ray_indices.long(), t_starts, t_ends
