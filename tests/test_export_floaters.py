"""Speck floaters (small isolated pieces of the occupancy grid) are not rendered in videos."""

from __future__ import annotations

import torch

from nfsd_nerf.cameras import orbit_cameras
from nfsd_nerf.export.video import occupancy_without_specks
from nfsd_nerf.render import render_image
from nfsd_nerf.render.occupancy import OccupancyGrid


class BallAndSpeck(torch.nn.Module):
    """A dense ball of radius 0.4 at the centre and a tiny dense speck at (0.8, 0, 0)."""

    bound = 1.0

    def density(self, x):
        ball = x.norm(dim=-1) < 0.4
        speck = (x - torch.tensor([0.8, 0.0, 0.0])).norm(dim=-1) < 0.04
        return 100.0 * (ball | speck).float()

    def forward(self, x):
        return self.density(x), torch.full((x.shape[0], 3), 0.5)


def _grid(field) -> OccupancyGrid:
    grid = OccupancyGrid(1.0, resolution=32)
    centres = (torch.stack(torch.meshgrid(*[torch.arange(32)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) / 16 - 1
    near = torch.stack([field.density(centres + offset) for offset in torch.randn(16, 3) * 0.02]).amax(0) > 0
    grid.binaries.copy_(near.reshape(32, 32, 32))
    grid.occs.copy_(near.reshape(32, 32, 32).float())
    return grid


def test_specks_are_dropped_and_the_object_kept():
    field = BallAndSpeck()
    grid = _grid(field)
    cleaned = occupancy_without_specks(grid)
    assert cleaned is not grid and grid.binaries.sum() > cleaned.binaries.sum() > 0
    speck_cell = (torch.tensor([0.8, 0.0, 0.0]) + 1) * 16
    i, j, k = speck_cell.long().tolist()
    assert grid.binaries[i, j, k] and not cleaned.binaries[i, j, k]
    assert cleaned.binaries[16, 16, 16]  # the ball
    assert occupancy_without_specks(cleaned) is cleaned  # nothing left to drop

    background = lambda d: torch.ones_like(d)
    cam = orbit_cameras(1, distance=2.5, fovy_deg=60.0, elevation_deg=0.0, start_azimuth_deg=90.0)  # speck beside the ball
    with torch.no_grad():
        before = render_image(field, background, cam, 48, 48, occupancy=grid, n_samples=256)["opacity"][0]
        after = render_image(field, background, cam, 48, 48, occupancy=cleaned, n_samples=256)["opacity"][0]
    assert before.sum() - after.sum() > 1.0  # the speck's pixels are gone
    torch.testing.assert_close(after[20:28, 20:28], before[20:28, 20:28])  # the ball is untouched
