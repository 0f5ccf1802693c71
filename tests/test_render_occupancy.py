"""Occupancy grid: nerfacc's cell layout, the EMA update against a hand replay, reproducibility."""

from __future__ import annotations

import torch

from nfsd_nerf.render.occupancy import OccupancyGrid, cells_from_points

from render_helpers import BallField


def test_cells_from_points_layout_is_nerfacc():
    # (ix * R + iy) * R + iz over [-b, b]
    x = torch.tensor([[-1.0, -1.0, -1.0], [0.99, -1.0, -1.0], [-1.0, 0.99, -1.0], [-1.0, -1.0, 0.99], [0.1, 0.1, 0.1]])
    idx = cells_from_points(x, 1.0, 4)
    assert idx.tolist() == [0, 3 * 16, 3 * 4, 3, (2 * 4 + 2) * 4 + 2]


def test_occupancy_update_ema_and_threshold():
    field = BallField(sigma=5.0, radius=0.5)
    grid = OccupancyGrid(bound=1.0, resolution=8, threshold=0.01, ema_decay=0.9)
    assert grid.binaries.all()  # starts fully occupied
    step_size = 0.05
    gen = torch.Generator().manual_seed(7)
    grid.update(0, field.density, step_size=step_size, generator=gen)
    # replay the same draws by hand
    jitter = torch.rand(512, 3, generator=torch.Generator().manual_seed(7))
    ijk = torch.stack(torch.meshgrid(*[torch.arange(8)] * 3, indexing="ij"), -1).reshape(-1, 3)
    x = (ijk + jitter) * 0.25 - 1.0
    alpha = (1 - torch.exp(-field.density(x) * step_size)).reshape(8, 8, 8)
    assert torch.allclose(grid.occs, alpha)
    assert torch.equal(grid.binaries, alpha > min(0.01, alpha.mean().item()))
    # second update: EMA max
    before = grid.occs.clone()
    grid.update(1, lambda x: torch.zeros(x.shape[0]), step_size=step_size, generator=gen)
    assert torch.allclose(grid.occs, before * 0.9)
    # cells far from the ball are empty, the centre cells occupied
    assert not grid.binaries[0, 0, 0] and grid.binaries[3:5, 3:5, 3:5].all()


def test_occupancy_update_is_reproducible_and_state_dict_round_trips():
    field = BallField(sigma=5.0, radius=0.5, smooth=True)
    a, b = OccupancyGrid(1.0, 16), OccupancyGrid(1.0, 16)
    for grid in (a, b):
        gen = torch.Generator().manual_seed(11)
        for step in range(3):
            grid.update(step, field.density, step_size=0.01, generator=gen)
    assert torch.equal(a.occs, b.occs) and torch.equal(a.binaries, b.binaries)
    c = OccupancyGrid(1.0, 16)
    c.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"occs", "binaries"}
    assert torch.equal(c.binaries, a.binaries)


def test_large_grid_after_warmup_updates_a_subset():
    grid = OccupancyGrid(1.0, 40)
    calls = []

    def density(x):
        calls.append(x.shape[0])
        return torch.zeros(x.shape[0])

    grid.update(0, density, step_size=0.01, warmup_steps=1)
    assert sum(calls) == 40**3
    calls.clear()
    grid.update(5, density, step_size=0.01, warmup_steps=1)
    assert sum(calls) <= 40**3 // 2
