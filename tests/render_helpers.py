"""Analytic fields, backgrounds and rays shared by the renderer's tests (tests/test_render_*.py).

The fields here are analytic (no hash grid), so every expected value is independent of field.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nfsd_nerf.render.occupancy import OccupancyGrid


class BallField:
    """Constant density ``sigma`` inside a ball of radius ``radius``; normals point outward."""

    normal_method = "analytic"

    def __init__(self, sigma=1.5, radius=0.8, bound=1.0, albedo=(0.2, 0.5, 0.9), smooth=False):
        self.sigma, self.radius, self.bound, self.smooth = sigma, radius, bound, smooth
        self.albedo = torch.tensor(albedo)
        self.points: list[torch.Tensor] = []

    def density(self, x):
        self.points.append(x.detach().clone())
        r2 = (x * x).sum(-1)
        if self.smooth:  # compactly supported bump: sigma * (1 - r^2/R^2)^2 inside R
            return self.sigma * (1 - r2 / self.radius**2).clamp_min(0) ** 2
        return torch.where(r2 <= self.radius**2, torch.full_like(r2, self.sigma), torch.zeros_like(r2))

    def __call__(self, x):
        # colour varies in space so compositing order matters
        albedo = torch.sigmoid(3 * x + self.albedo)
        return self.density(x), albedo

    def normals(self, x):
        return F.normalize(x, dim=-1)


class SolidBackground:
    def __init__(self, color=(0.3, 0.6, 0.1)):
        self.color = torch.tensor(color)

    def __call__(self, dirs):
        return self.color.expand(dirs.shape[0], 3)


def rays_along_x(offsets_y, start=-3.0):
    n = len(offsets_y)
    o = torch.stack([torch.full((n,), start), torch.tensor(offsets_y, dtype=torch.float32), torch.zeros(n)], -1)
    d = torch.tensor([[1.0, 0.0, 0.0]]).expand(n, 3).contiguous()
    return o, d


def random_rays(n, generator):
    """Rays from points on a sphere of radius 2.5 towards jittered points near the origin."""
    o = F.normalize(torch.randn(n, 3, generator=generator), dim=-1) * 2.5
    target = torch.randn(n, 3, generator=generator) * 0.4
    return o, F.normalize(target - o, dim=-1)


def cells_touching_ball(grid: OccupancyGrid, radius: float) -> torch.Tensor:
    """[R, R, R] bool: cells whose box intersects the ball (the exact support of BallField)."""
    r, b = grid.resolution, grid.bound
    edges = torch.linspace(-b, b, r + 1)
    lo, hi = edges[:-1], edges[1:]
    nearest = torch.where(lo > 0, lo, torch.where(hi < 0, hi, torch.zeros_like(lo)))  # per axis
    d2 = nearest[:, None, None] ** 2 + nearest[None, :, None] ** 2 + nearest[None, None, :] ** 2
    return d2 <= radius**2
