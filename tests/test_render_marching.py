"""Ray marching: box slab test by hand, the CPU marcher against a per-point lattice test, CUDA vs CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nfsd_nerf.render.marching import march_rays_cpu, near_far_from_box, step_size_from_samples
from nfsd_nerf.render.occupancy import OccupancyGrid, cells_from_points
from nfsd_nerf.render.rays import render_rays

from render_helpers import BallField, SolidBackground, cells_touching_ball, random_rays, rays_along_x


# --------------------------------------------------------------------------- geometry


def test_near_far_from_box_hand_values():
    o = torch.tensor([[-3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-3.0, 5.0, 0.0], [-3.0, -3.0, 0.0]])
    d = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]), dim=-1)
    near, far = near_far_from_box(o, d, 1.0)
    assert torch.allclose(near[:2], torch.tensor([2.0, 0.0]))
    assert torch.allclose(far[:2], torch.tensor([4.0, 1.0]))
    assert far[2] <= near[2]  # misses
    assert torch.allclose(near[3], torch.tensor(2 * math.sqrt(2))) and torch.allclose(far[3], torch.tensor(4 * math.sqrt(2)))


# --------------------------------------------------------------------------- CPU marcher


def test_march_lattice_positions_and_bounds():
    o, d = rays_along_x([0.0, 0.5, 2.0])
    step = 0.25
    ri, ts, te = march_rays_cpu(o, d, bound=1.0, step=step, offsets=torch.zeros(3), occupancy=None)
    mid = 0.5 * (ts + te)
    # box [2, 4] along the ray, lattice midpoints at (k + 0.5) * 0.25 -> 2.125 ... 3.875
    expected = torch.arange(2.125, 3.9, 0.25)
    assert ri.tolist() == [0] * 8 + [1] * 8  # third ray misses
    assert torch.allclose(mid[:8], expected) and torch.allclose(mid[8:], expected)
    assert torch.allclose(te - ts, torch.full_like(ts, step))


def _lattice_reference(o, d, bound, step, offsets, grid):
    """Brute force: every lattice midpoint up to far beyond the box, tested one by one."""
    k = torch.arange(int(4 * bound * 3**0.5 / step) + 8, dtype=torch.float64)
    t = offsets.double()[:, None] + (k[None] + 0.5) * step  # [N, K]
    x = o.double()[:, None] + t[..., None] * d.double()[:, None]
    keep = (x.abs() <= bound).all(-1)
    if grid is not None:
        keep &= grid.binaries.view(-1)[cells_from_points(x, bound, grid.resolution)]
    row, col = torch.nonzero(keep, as_tuple=True)
    return row, t[row, col]


@pytest.mark.parametrize("with_grid", [True, False])
def test_cell_traversal_marcher_matches_per_point_lattice_test(with_grid):
    g = torch.Generator().manual_seed(5)
    o, d = random_rays(300, g)
    o[:50] *= 0.3  # rays starting inside the box
    d[50:60] = torch.tensor([0.0, 0.0, -1.0])  # axis-aligned rays
    o[50:60, 2] = 2.0
    d[60:70] = F.normalize(torch.tensor([1.0, 1.0, 0.0]), dim=0)
    o[60:70] = torch.tensor([-1.5, -1.4, 0.1])
    grid = None
    if with_grid:
        grid = OccupancyGrid(1.0, 12)
        grid.binaries.copy_(torch.rand(12, 12, 12, generator=g) < 0.3)
    step = step_size_from_samples(1.0, 200)
    offsets = torch.rand(300, generator=g) * step
    ri, ts, te = march_rays_cpu(o, d, bound=1.0, step=step, offsets=offsets, occupancy=grid)
    ref_ri, ref_t = _lattice_reference(o, d, 1.0, step, offsets, grid)
    assert len(ref_ri) > 5000
    assert torch.equal(ri, ref_ri)
    assert torch.allclose(0.5 * (ts + te).double(), ref_t, atol=1e-5)
    assert bool((torch.diff(ri) >= 0).all())


# --------------------------------------------------------------------------- CUDA (nerfacc)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nerfacc kernels)")
def test_cuda_marcher_matches_cpu():
    field = BallField(sigma=6.0, radius=0.7, smooth=True)
    grid = OccupancyGrid(bound=1.0, resolution=16)
    grid.binaries.copy_(cells_touching_ball(grid, 0.7))
    o, d = random_rays(300, torch.Generator().manual_seed(0))
    cpu = render_rays(field, SolidBackground(), o, d, occupancy=grid, n_samples=512)
    field.albedo = field.albedo.cuda()
    bg = SolidBackground()
    bg.color = bg.color.cuda()
    gpu = render_rays(field, bg, o.cuda(), d.cuda(), occupancy=grid.cuda(), n_samples=512)
    assert torch.allclose(gpu.opacity.cpu(), cpu.opacity, atol=2e-3)
    assert torch.allclose(gpu.rgb.cpu(), cpu.rgb, atol=2e-3)
