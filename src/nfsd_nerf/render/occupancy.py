"""Occupancy grid: which cells of the scene box may hold density, so the marcher skips empty space.

The layout is nerfacc's (``OccGridEstimator`` with ``levels=1``), so on CUDA the estimator reads
the grid's own buffers and a checkpoint moves freely between devices.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


def cells_from_points(x: Tensor, bound: float, resolution: int) -> Tensor:
    """x [..., 3] world -> flat cell index [...] (long) of an R^3 grid over the box.

    Layout matches nerfacc's ``OccGridEstimator.binaries[0]``: index = (ix * R + iy) * R + iz.
    Points outside the box are clamped onto its border cells (callers only ask about points inside).
    """
    ijk = ((x + bound) * (resolution / (2.0 * bound))).floor().long().clamp_(0, resolution - 1)
    return (ijk[..., 0] * resolution + ijk[..., 1]) * resolution + ijk[..., 2]


class OccupancyGrid(nn.Module):
    """Which cells of the scene box may hold density, so the marcher can skip empty space.

    State (both buffers, saved in checkpoints, identical on CPU and CUDA):

    * ``occs [R, R, R]`` float: EMA of the alpha ``1 - exp(-sigma * step_size)`` seen in each cell.
    * ``binaries [R, R, R]`` bool: cells the marcher visits. Starts all True so the first
      renders are not empty.

    The layout is nerfacc's (``OccGridEstimator`` with ``levels=1``): on CUDA the estimator reads
    these very tensors, so a checkpoint moves freely between devices.
    """

    def __init__(self, bound: float, resolution: int = 32, threshold: float = 0.01, ema_decay: float = 0.95,
                 alpha_threshold: float = 0.0):
        super().__init__()
        if resolution < 1:
            raise ValueError(f"occupancy resolution must be >= 1, got {resolution}")
        self.bound = float(bound)
        self.resolution = int(resolution)
        self.threshold = float(threshold)
        self.ema_decay = float(ema_decay)
        self.alpha_threshold = float(alpha_threshold)
        """Renders through this grid drop samples with alpha below ``min(alpha_threshold, mean(occs))``
        (nerfacc's ``alpha_thre``; ``render.alpha_threshold``; not state: it comes from the config)."""
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

    def nerfacc_estimator(self):
        """nerfacc's estimator on this grid's device, reading this grid's buffers (CUDA only).

        Public because the CUDA marcher (:func:`.marching.march_rays_nerfacc`) samples through it.
        """
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
