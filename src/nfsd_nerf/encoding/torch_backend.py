"""The PyTorch backend: tcnn's HashGrid forward and backward as pure functions on tensors.

Layout (level-major, structure of arrays): cell, frac [L, 3, N]; corner indices [L, 8, N];
corner weights and values [L, 8, N, F]. Corner ``k = i + 2 j + 4 k'`` means the offset
``(i, j, k')`` along (x, y, z), like tcnn's bit order. Each op then runs over long contiguous
rows (vectorised), and level ``l``'s gathers and scatters touch only table ``l``, so levels can
run on different threads.

CPU speed: a custom autograd Function (gather with ``index_select``, scatter the table gradient
with ``scatter_add_``), vectorised over all levels at once, with each level's gathers and
scatters on its own thread (they are single-threaded in PyTorch). Call
:func:`nfsd_nerf.runtime.tune_cpu_allocator` once at program start: freed memory then stays in
the process and large temporaries stop paying page faults (2-4x on a VM).
``benchmarks/bench_encoding.py`` measures it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .layout import HASH_PRIMES

_PARALLEL_MIN_CORNERS = 1 << 18  # below this, thread start-up costs more than it saves


class Grid(NamedTuple):
    """Per-level constants for one forward call (tensors on the input's device)."""

    scales: Tensor  # [L] float64 holding the float32 scales
    resolutions: Tensor  # [L] int64
    table_sizes: Tensor  # [L] int64
    offsets: tuple  # L + 1 Python ints: entry offset of each level's table
    runs: tuple  # ((start, stop, dense), ...) maximal runs of levels indexed the same way
    hash_mask: int  # 2^log2_hashmap_size - 1 (every hashed level has exactly that many entries)
    n_features: int


def run_levels(dense: tuple[bool, ...]) -> tuple:
    """Maximal runs ``(start, stop, dense)`` of consecutive levels indexed the same way."""
    runs, start = [], 0
    for level in range(1, len(dense) + 1):
        if level == len(dense) or dense[level] != dense[start]:
            runs.append((start, level, dense[start]))
            start = level
    return tuple(runs)


def _cell_and_frac(x: Tensor, scales: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """x [N, 3] in [0, 1] -> (cell [L, 3, N] int32, frac [L, 3, N] ``dtype``).

    ``pos = scale * x + 0.5`` is formed in float64 (the product of two float32 is exact) and
    rounded once to float32: tcnn's ``fmaf``. ``pos >= 0.5``, so truncation is ``floor``.
    Differentiable w.r.t. x through ``frac``.
    """
    half = torch.tensor(0.5, dtype=torch.float64, device=x.device)
    xt = x.to(torch.float64).t().contiguous()  # [3, N]: makes every later op run along N
    if torch.is_grad_enabled() and x.requires_grad:
        pos = torch.addcmul(half, xt[None], scales[:, None, None]).to(dtype)
    else:  # same values; the kernel rounds to ``dtype`` as it writes (no float64 temporary)
        pos = torch.empty(scales.shape[0], 3, x.shape[0], dtype=dtype, device=x.device)
        torch.addcmul(half, xt[None], scales[:, None, None], out=pos)
    return pos.to(torch.int32), torch.frac(pos)


def _corner_indices(cell: Tensor, grid: Grid) -> Tensor:
    """cell [L, 3, N] int32 -> index of each corner in its level's table [L, 8, N] int32.

    Hash arithmetic in int32 wraps like uint32 in the low bits, which is all ``& mask`` keeps.
    """
    n_levels, _, n = cell.shape
    out = torch.empty(n_levels, 2, 2, 2, n, dtype=torch.int32, device=cell.device)  # [L, z, y, x, N]
    p1, p2 = HASH_PRIMES[1] - 2**32, HASH_PRIMES[2]  # uint32 factors as int32
    for start, stop, dense in grid.runs:
        if start >= n_levels:
            break
        stop = min(stop, n_levels)
        cx, cy, cz = cell[start:stop].unbind(1)  # [Lr, N] each
        block = out[start:stop]
        if dense:  # x + y r + z r^2, then % T (a corner at coordinate r wraps into the next row)
            res = grid.resolutions[start:stop].to(torch.int32)
            base = cx + cy * res[:, None] + cz * (res * res)[:, None]  # [Lr, N]
            corner = torch.tensor([[i, j, k] for k in (0, 1) for j in (0, 1) for i in (0, 1)], dtype=torch.int32, device=cell.device)
            steps = (corner[None] * torch.stack([torch.ones_like(res), res, res * res], 1)[:, None]).sum(-1, dtype=torch.int32)  # [Lr, 8]
            flat = block.view(stop - start, 8, n)
            torch.add(base[:, None, :], steps[:, :, None], out=flat)
            torch.remainder(flat, grid.table_sizes[start:stop, None, None].to(torch.int32), out=flat)
        else:  # (x * 1 ^ y * p1 ^ z * p2) % 2^log2_hashmap_size
            mask = grid.hash_mask
            xs = torch.stack([cx, cx + 1], 1).bitwise_and_(mask)
            y0 = cy * p1
            ys = torch.stack([y0, y0 + p1], 1).bitwise_and_(mask)
            z0 = cz * p2
            zs = torch.stack([z0, z0 + p2], 1).bitwise_and_(mask)
            torch.bitwise_xor(zs[:, :, None, None], (ys[:, :, None] ^ xs[:, None, :])[:, None], out=block)
    return out.view(n_levels, 8, n)


def _repeat_features(frac: Tensor, n_features: int) -> Tensor:
    """frac [L, 3, N] -> [L, 3, N, F], each value repeated F times (contiguous)."""
    if n_features == 1:
        return frac[..., None]
    if n_features == 2:  # interleaving through a complex tensor is a fast vectorised kernel
        return torch.view_as_real(torch.complex(frac, frac))
    return frac[..., None].expand(*frac.shape, n_features).contiguous()


def _split(t: Tensor, f: Tensor, dim: int) -> Tensor:
    """Stack ``(t - t f, t f)`` along a new axis ``dim``: t's share at the two ends of a cell edge."""
    if torch.is_grad_enabled() and (t.requires_grad or f.requires_grad):
        tf = t * f
        return torch.stack([t - tf, tf], dim)
    out = torch.empty(t.shape[:dim] + (2,) + t.shape[dim:], dtype=t.dtype, device=t.device)
    far = out.select(dim, 1)
    torch.mul(t, f, out=far)
    torch.sub(t, far, out=out.select(dim, 0))
    return out


def _corner_contributions(grad: Tensor, fr: Tensor) -> Tensor:
    """dL/dy per level [L, N, F] -> dL/d(corner value) = w_corner * dL/dy, [L, 8, N, F].

    The trilinear weight ``w = w_x w_y w_z`` is built by splitting along x, y, then z, so no
    weight tensor is stored between forward and backward (fr [L, 3, N, F] is).
    """
    fx, fy, fz = fr.unbind(1)  # [L, N, F]
    a = _split(grad, fx, 1)  # [L, x, N, F]
    b = _split(a, fy[:, None], 1)  # [L, y, x, N, F]
    c = _split(b, fz[:, None, None], 1)  # [L, z, y, x, N, F]
    n_levels, n, n_features = grad.shape
    return c.view(n_levels, 8, n, n_features)


def _param_units(params: Tensor, n_features: int) -> tuple[Tensor, int]:
    """View params as gather units: complex pairs of features when F is even (one 8-byte load
    per corner for F = 2), plain floats otherwise. Returns (units [n_units], units per entry)."""
    if n_features % 2 == 0:
        return torch.view_as_complex(params.view(-1, 2)), n_features // 2
    return params, n_features


def _level_units(units: Tensor, grid: Grid, level: int, units_per_entry: int) -> Tensor:
    """The slice of ``units`` holding level ``level``'s table."""
    return units[grid.offsets[level] * units_per_entry : grid.offsets[level + 1] * units_per_entry]


def _unit_indices(idx: Tensor, units_per_entry: int) -> Tensor:
    """Entry indices [...] -> unit indices, flat [... * U]."""
    if units_per_entry == 1:
        return idx.reshape(-1)
    lanes = torch.arange(units_per_entry, dtype=idx.dtype, device=idx.device)
    return (idx[..., None] * units_per_entry + lanes).reshape(-1)


def _scatter_accepts_int32() -> bool:
    """Whether ``scatter_add_`` takes int32 indices: PyTorch 2.8 and later do; 2.4-2.7 raise
    "Expected dtype int64 for index" (``index_select``, used forward, took int32 much earlier)."""
    try:
        torch.zeros(1).scatter_add_(0, torch.zeros(1, dtype=torch.int32), torch.ones(1))
        return True
    except RuntimeError:
        return False


SCATTER_INDEX_DTYPE = torch.int32 if _scatter_accepts_int32() else torch.int64
"""Index dtype handed to ``scatter_add_``: int32 (half the memory traffic) where this torch accepts
it, else int64, so every torch the package admits (``torch>=2.4``) runs the backward."""


_pool: ThreadPoolExecutor | None = None
_pool_key = (0, 0)  # (process id, workers): a forked child must not reuse its parent's pool


def _for_each_level(n_levels: int, n_corners: int, device: torch.device, fn: Callable[[int], object]) -> None:
    """Run ``fn(level)`` for every level, levels spread over ``torch.get_num_threads()`` threads.

    ``index_select`` and ``scatter_add_`` on 1-D tensors run on one core in PyTorch; levels touch
    disjoint tables, so they can run concurrently (PyTorch releases the GIL inside ops).
    Serial on GPUs, for small inputs, and when autograd records (grad mode is per thread).
    """
    global _pool, _pool_key
    n_threads = min(torch.get_num_threads(), n_levels)
    if device.type != "cpu" or n_threads < 2 or n_corners < _PARALLEL_MIN_CORNERS or torch.is_grad_enabled():
        for level in range(n_levels):
            fn(level)
        return
    if _pool is None or _pool_key != (os.getpid(), n_threads - 1):
        if _pool is not None and _pool_key[0] == os.getpid():
            _pool.shutdown(wait=False)
        _pool, _pool_key = ThreadPoolExecutor(n_threads - 1, thread_name_prefix="hashgrid"), (os.getpid(), n_threads - 1)

    @torch.no_grad()
    def run(first: int) -> None:  # interleaved levels balance cheap coarse and costly fine levels
        for level in range(first, n_levels, n_threads):
            fn(level)

    futures = [_pool.submit(run, first) for first in range(1, n_threads)]
    run(0)
    for future in futures:
        future.result()


def _gather_corners(params: Tensor, idx: Tensor, grid: Grid) -> Tensor:
    """Table values at every corner: idx [L, 8, N] -> [L, 8, N, F].

    Differentiable w.r.t. params only while autograd records (then single-threaded).
    """
    n_levels, _, n = idx.shape
    n_features = grid.n_features
    units, units_per_entry = _param_units(params, n_features)
    if torch.is_grad_enabled() and units.requires_grad:
        vals = torch.stack(
            [_level_units(units, grid, level, units_per_entry).index_select(0, _unit_indices(idx[level], units_per_entry)) for level in range(n_levels)]
        )
    else:
        vals = torch.empty(n_levels, idx[0].numel() * units_per_entry, dtype=units.dtype, device=units.device)

        def gather(level: int) -> None:
            table = _level_units(units.detach(), grid, level, units_per_entry)
            torch.index_select(table, 0, _unit_indices(idx[level], units_per_entry), out=vals[level])

        _for_each_level(n_levels, idx.numel(), units.device, gather)
    if vals.is_complex():
        vals = torch.view_as_real(vals)
    return vals.view(n_levels, 8, n, n_features)


def _scatter_corners(src: Tensor, idx: Tensor, grid: Grid, n_params: int) -> Tensor:
    """Sum corner contributions src [L, 8, N, F] at idx [L, 8, N] into a table gradient [n_params]."""
    n_levels = src.shape[0]
    src_units, units_per_entry = _param_units(src.reshape(-1), grid.n_features)
    src_units = src_units.view(n_levels, -1)
    grad = torch.zeros(n_params // 2 if src_units.is_complex() else n_params, dtype=src_units.dtype, device=src.device)

    def scatter(level: int) -> None:
        table = _level_units(grad, grid, level, units_per_entry)
        table.scatter_add_(0, _unit_indices(idx[level], units_per_entry).to(SCATTER_INDEX_DTYPE), src_units[level])

    _for_each_level(n_levels, idx.numel(), src.device, scatter)
    return torch.view_as_real(grad).view(-1) if grad.is_complex() else grad


def _interpolate(vals: Tensor, fr: Tensor) -> Tensor:
    """Blend the 8 corners: vals [L, 8, N, F], fr [L, 3, N, F] -> encoding [N, L * F].

    Three rounds of ``lerp`` (x, then y, then z): the trilinear interpolation without forming
    the 8 weights (equal to tcnn's weighted sum up to float rounding).
    """
    n_levels, _, n, n_features = vals.shape
    v = vals.view(n_levels, 2, 2, 2, n, n_features)  # [L, z, y, x, N, F]
    fx, fy, fz = fr.unbind(1)
    vx = torch.lerp(v[:, :, :, 0], v[:, :, :, 1], fx[:, None, None])  # [L, z, y, N, F]
    vy = torch.lerp(vx[:, :, 0], vx[:, :, 1], fy[:, None])  # [L, z, N, F]
    vz = torch.lerp(vy[:, 0], vy[:, 1], fz)  # [L, N, F]
    return _swap_first_axes(vz).view(n, n_levels * n_features)


def _swap_first_axes(t: Tensor) -> Tensor:
    """[A, B, F] -> [B, A, F] contiguous; for F = 2 as a transpose of 8-byte complex numbers,
    which takes PyTorch's blocked 2-D transpose (2-3x faster than moving pairs of floats)."""
    if t.shape[-1] == 2 and not t.requires_grad:
        return torch.view_as_real(torch.view_as_complex(t.contiguous()).t().contiguous())
    return t.transpose(0, 1).contiguous()


def _levels_first(grad_out: Tensor, n_levels: int, n_features: int) -> Tensor:
    """grad_out [N, L * F] -> [L, N, F] contiguous."""
    return _swap_first_axes(grad_out.reshape(-1, n_levels, n_features))


def _input_grad(fr: Tensor, vals: Tensor, grad: Tensor, scales: Tensor) -> Tensor:
    """dL/dx [N, 3] = sum over levels of s_l * (dL/dy_l . dy_l/dfrac), from fr [L, 3, N, F],
    corner values [L, 8, N, F] and dL/dy [L, N, F]. Plain differentiable ops: autograd can
    differentiate it again (analytic normals inside a loss, ``create_graph=True``)."""
    n_levels, _, n, n_features = vals.shape
    v = vals.view(n_levels, 2, 2, 2, n, n_features)  # [L, z, y, x, N, F]
    fx, fy, fz = fr.unbind(1)  # [L, N, F]
    vx = torch.lerp(v[:, :, :, 0], v[:, :, :, 1], fx[:, None, None])  # [L, z, y, N, F]
    vy = torch.lerp(vx[:, :, 0], vx[:, :, 1], fy[:, None])  # [L, z, N, F]
    ex = v[:, :, :, 1] - v[:, :, :, 0]  # x-edge differences [L, z, y, N, F]
    ex = torch.lerp(ex[:, :, 0], ex[:, :, 1], fy[:, None])  # [L, z, N, F]
    ey = vx[:, :, 1] - vx[:, :, 0]  # [L, z, N, F]
    d_x = torch.lerp(ex[:, 0], ex[:, 1], fz)  # [L, N, F]
    d_y = torch.lerp(ey[:, 0], ey[:, 1], fz)
    d_z = vy[:, 1] - vy[:, 0]
    gs = grad * scales[:, None, None].to(grad.dtype)  # dpos/dx = s_l
    return torch.stack([(d * gs).sum((0, 2)) for d in (d_x, d_y, d_z)], -1)


def _engine_will_use(t: Tensor) -> bool:
    """Whether the running backward pass needs a gradient for ``t`` (False for
    ``autograd.grad(sigma, x)``, which only wants dL/dx: skips the table scatter)."""
    try:
        with torch.enable_grad():
            node = t.grad_fn if t.grad_fn is not None else t.view_as(t).grad_fn.next_functions[0][0]
        return bool(torch._C._will_engine_execute_node(node))
    except Exception:  # private API: when in doubt, compute the gradient
        return True


class HashGridFunction(torch.autograd.Function):
    """Forward gathers with ``index_select``; backward scatters with ``scatter_add_`` into a dense
    gradient (much faster on CPU than autograd through ``F.embedding``; ``index_add_`` is ~30%
    slower on 1-D tensors, and far slower on [entries, F] rows). Saved for backward:
    corner indices [L, 8, N] int32 and fractions [L, 3, N, F]."""

    @staticmethod
    def forward(ctx, x: Tensor, params: Tensor, grid: Grid, n_levels: int) -> Tensor:
        cell, frac = _cell_and_frac(x, grid.scales[:n_levels], params.dtype)  # [L, 3, N]
        idx = _corner_indices(cell, grid)  # [L, 8, N]
        fr = _repeat_features(frac, grid.n_features)  # [L, 3, N, F]
        vals = _gather_corners(params, idx, grid)  # [L, 8, N, F]
        ctx.save_for_backward(x, params, idx, fr)
        ctx.grid = grid
        return _interpolate(vals, fr)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, params, idx, fr = ctx.saved_tensors
        grid = ctx.grid
        n_levels = idx.shape[0]
        scales = grid.scales[:n_levels]
        if torch.is_grad_enabled() and x.requires_grad:  # double backward: differentiable in x
            fr = _repeat_features(_cell_and_frac(x, scales, params.dtype)[1], grid.n_features)
        grad = _levels_first(grad_out, n_levels, grid.n_features)  # [L, N, F]
        grad_x = grad_params = None
        if ctx.needs_input_grad[1] and _engine_will_use(params):
            grad_params = _scatter_corners(_corner_contributions(grad, fr), idx, grid, params.numel())
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(fr, _gather_corners(params, idx, grid), grad, scales).to(x.dtype)
        return grad_x, grad_params, None, None
