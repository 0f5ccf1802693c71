"""Ray marching and volume rendering against closed forms and brute-force references.

The fields here are analytic (no hash grid), so every expected value is independent of field.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nfsd_nerf.cameras import orbit_cameras
from nfsd_nerf.render import (
    OccupancyGrid,
    cells_from_points,
    exclusive_sum_packed,
    march_rays_cpu,
    near_far_from_box,
    render_image,
    render_rays,
    render_weight_from_density_packed,
    shade,
    step_size_from_samples,
)


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


def _rays_along_x(offsets_y, start=-3.0):
    n = len(offsets_y)
    o = torch.stack([torch.full((n,), start), torch.tensor(offsets_y, dtype=torch.float32), torch.zeros(n)], -1)
    d = torch.tensor([[1.0, 0.0, 0.0]]).expand(n, 3).contiguous()
    return o, d


def _random_rays(n, generator):
    """Rays from points on a sphere of radius 2.5 towards jittered points near the origin."""
    o = F.normalize(torch.randn(n, 3, generator=generator), dim=-1) * 2.5
    target = torch.randn(n, 3, generator=generator) * 0.4
    return o, F.normalize(target - o, dim=-1)


def _cells_touching_ball(grid: OccupancyGrid, radius: float) -> torch.Tensor:
    """[R, R, R] bool: cells whose box intersects the ball (the exact support of BallField)."""
    r, b = grid.resolution, grid.bound
    edges = torch.linspace(-b, b, r + 1)
    lo, hi = edges[:-1], edges[1:]
    nearest = torch.where(lo > 0, lo, torch.where(hi < 0, hi, torch.zeros_like(lo)))  # per axis
    d2 = nearest[:, None, None] ** 2 + nearest[None, :, None] ** 2 + nearest[None, None, :] ** 2
    return d2 <= radius**2


def brute_force_render(field, rays_o, rays_d, background_rgb, n=8192):
    """Dense midpoint samples between box entry and exit, plain cumprod compositing."""
    t_near, t_far = near_far_from_box(rays_o, rays_d, field.bound)
    t_far = torch.maximum(t_far, t_near)
    u = (torch.arange(n) + 0.5) / n
    t = t_near[:, None] + (t_far - t_near)[:, None] * u  # [N, n]
    delta = ((t_far - t_near) / n)[:, None].expand_as(t)
    x = rays_o[:, None] + t[..., None] * rays_d[:, None]
    sigma, rgb = field(x.reshape(-1, 3))
    sigma, rgb = sigma.reshape(t.shape), rgb.reshape(*t.shape, 3)
    alpha = 1 - torch.exp(-sigma * delta)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1), 1)
    w = trans * alpha
    opacity = w.sum(1)
    color = (w[..., None] * rgb).sum(1) + (1 - opacity)[:, None] * background_rgb
    depth = (w * t).sum(1) / opacity.clamp_min(1e-10)
    return color, opacity, depth


# --------------------------------------------------------------------------- geometry


def test_near_far_from_box_hand_values():
    o = torch.tensor([[-3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-3.0, 5.0, 0.0], [-3.0, -3.0, 0.0]])
    d = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]), dim=-1)
    near, far = near_far_from_box(o, d, 1.0)
    assert torch.allclose(near[:2], torch.tensor([2.0, 0.0]))
    assert torch.allclose(far[:2], torch.tensor([4.0, 1.0]))
    assert far[2] <= near[2]  # misses
    assert torch.allclose(near[3], torch.tensor(2 * math.sqrt(2))) and torch.allclose(far[3], torch.tensor(4 * math.sqrt(2)))


def test_cells_from_points_layout_is_nerfacc():
    # (ix * R + iy) * R + iz over [-b, b]
    x = torch.tensor([[-1.0, -1.0, -1.0], [0.99, -1.0, -1.0], [-1.0, 0.99, -1.0], [-1.0, -1.0, 0.99], [0.1, 0.1, 0.1]])
    idx = cells_from_points(x, 1.0, 4)
    assert idx.tolist() == [0, 3 * 16, 3 * 4, 3, (2 * 4 + 2) * 4 + 2]


def test_march_lattice_positions_and_bounds():
    o, d = _rays_along_x([0.0, 0.5, 2.0])
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
    o, d = _random_rays(300, g)
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


# --------------------------------------------------------------------------- compositing maths


def test_weights_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    ray_indices = torch.tensor([0, 0, 0, 1, 1, 3, 3, 3, 3])
    t_starts = torch.rand(9, generator=g, dtype=torch.float64)
    t_ends = t_starts + 0.1 + torch.rand(9, generator=g, dtype=torch.float64)
    sigmas = (torch.rand(9, generator=g, dtype=torch.float64) * 3).requires_grad_()

    def weights(s):
        return render_weight_from_density_packed(t_starts, t_ends, s, ray_indices, 4)[0]

    assert torch.autograd.gradcheck(weights, (sigmas,))
    # values vs a per-ray cumprod of (1 - alpha)
    w = weights(sigmas).detach()
    for ray in range(4):
        m = ray_indices == ray
        alpha = 1 - torch.exp(-sigmas.detach()[m] * (t_ends - t_starts)[m])
        trans = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.float64), 1 - alpha[:-1]]), 0)
        assert torch.allclose(w[m], trans * alpha, atol=1e-12)


def test_exclusive_sum_packed_is_precise_on_long_arrays():
    # 2M samples of 1.0 in float32: a float32 global cumsum would lose ~0.1 per ray
    n_rays, per_ray = 4000, 500
    values = torch.ones(n_rays * per_ray)
    ray_indices = torch.arange(n_rays).repeat_interleave(per_ray)
    out = exclusive_sum_packed(values, ray_indices, n_rays)
    expected = torch.arange(per_ray, dtype=torch.float32).repeat(n_rays)
    assert torch.equal(out, expected)


def test_shade_hand_values():
    albedo = torch.tensor([[0.5, 0.2, 1.0], [0.5, 0.2, 1.0]])
    normals = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    x = torch.zeros(2, 3)
    lights = torch.tensor([[0.0, 0.0, 2.0], [0.0, 3.0, 3.0]])  # cos = 1 and cos = 1/sqrt(2)
    lam = shade(albedo, normals, x, lights, "lambertian", 0.1)
    bright = torch.tensor([1.0, 0.1 + 0.9 / math.sqrt(2)])
    assert torch.allclose(lam, albedo * bright[:, None])
    tl = shade(albedo, normals, x, lights, "textureless", 0.1)
    assert torch.allclose(tl, bright[:, None].expand(2, 3))
    behind = shade(albedo, -normals, x, lights, "lambertian", 0.1)  # light behind the surface
    assert torch.allclose(behind, albedo * 0.1)
    assert torch.equal(shade(albedo, None, x, None, "albedo", 0.1), albedo)


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("stratified", [False, True])
def test_ball_opacity_matches_closed_form(stratified):
    field = BallField(sigma=1.5, radius=0.8)
    offsets = [0.0, 0.3, 0.55, 0.75, 0.9]
    o, d = _rays_along_x(offsets)
    out = render_rays(
        field, SolidBackground(), o, d, occupancy=None, n_samples=1024, stratified=stratified,
        generator=torch.Generator().manual_seed(1),
    )
    chord = 2 * torch.sqrt((0.8**2 - torch.tensor(offsets) ** 2).clamp_min(0))
    expected = 1 - torch.exp(-1.5 * chord)
    assert torch.allclose(out.opacity, expected, atol=1e-2)
    assert out.opacity[-1] == 0  # the last ray passes beside the ball
    # depth of the first ray: by symmetry the expected distance for a constant-density chord
    # [a, a + L] is a + 1/s - L e^{-sL} / (1 - e^{-sL})
    s, L, a = 1.5, 1.6, 2.2
    depth = a + 1 / s - L * math.exp(-s * L) / (1 - math.exp(-s * L))
    assert abs(out.depth[0].item() - depth) < 1e-2


def test_occupancy_marcher_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    field = BallField(sigma=6.0, radius=0.7, smooth=True)
    grid = OccupancyGrid(bound=1.0, resolution=16)
    grid.binaries.copy_(_cells_touching_ball(grid, 0.7))
    assert 0.05 < grid.occupied_fraction() < 0.5  # the grid really skips space
    o, d = _random_rays(300, g)
    bg = torch.rand(300, 3, generator=g)
    out = render_rays(field, SolidBackground(), o, d, occupancy=grid, n_samples=2048, background_rgb=bg)
    ref_rgb, ref_opacity, ref_depth = brute_force_render(field, o, d, bg)
    assert ref_opacity.max() > 0.9 and ref_opacity.min() < 0.01  # opaque and empty rays both present
    assert torch.allclose(out.opacity, ref_opacity, atol=5e-3)
    assert torch.allclose(out.rgb, ref_rgb, atol=5e-3)
    hit = ref_opacity > 0.05
    assert torch.allclose(out.depth[hit], ref_depth[hit], atol=1e-2)


def test_empty_cells_are_not_evaluated():
    field = BallField(sigma=2.0, radius=0.9)
    grid = OccupancyGrid(bound=1.0, resolution=8)
    grid.binaries.zero_()
    grid.binaries[4:, :, 2:6] = True  # a slab in x > 0
    g = torch.Generator().manual_seed(3)
    o, d = _random_rays(200, g)
    n_samples = 128
    out = render_rays(field, SolidBackground(), o, d, occupancy=grid, n_samples=n_samples, early_stop_eps=0.0)
    evaluated = torch.cat(field.points)
    assert evaluated.shape[0] == out.n_field_samples > 0
    assert grid.is_occupied(evaluated).all()
    # brute force: every lattice point of every ray, tested one by one against the grid
    step = step_size_from_samples(1.0, n_samples)
    t = (torch.arange(4 * n_samples) + 0.5) * step  # far beyond the box
    x = o[:, None] + t[None, :, None] * d[:, None]
    near, far = near_far_from_box(o, d, 1.0)
    in_box = (t[None] >= near[:, None]) & (t[None] <= far[:, None])
    expected = (in_box & grid.is_occupied(x)).sum().item()
    assert out.n_field_samples == expected


def test_early_termination_keeps_result_and_saves_normal_evaluations():
    field = BallField(sigma=50.0, radius=0.6)
    g = torch.Generator().manual_seed(4)
    o, d = _random_rays(200, g)
    lights = o + 1.0
    calls = []
    field.normals = lambda x: (calls.append(x.shape[0]), F.normalize(x, dim=-1))[1]
    kw = dict(occupancy=None, n_samples=256, shading="lambertian", light_positions=lights, need_normals=True)
    full = render_rays(field, SolidBackground(), o, d, early_stop_eps=0.0, **kw)
    early = render_rays(field, SolidBackground(), o, d, **kw)
    assert calls[1] < 0.6 * calls[0]
    assert early.n_field_samples < full.n_field_samples
    for key in ("rgb", "opacity", "depth", "normal", "orientation"):
        assert torch.allclose(getattr(early, key), getattr(full, key), atol=1e-3), key


def test_no_grad_render_skips_invisible_normals_within_tolerance():
    field = BallField(sigma=8.0, radius=0.7, smooth=True)
    o, d = _random_rays(200, torch.Generator().manual_seed(6))
    kw = dict(occupancy=None, n_samples=256, shading="textureless", light_positions=o * 1.2, need_normals=True)
    calls = []
    field.normals = lambda x: (calls.append(x.shape[0]), F.normalize(x, dim=-1))[1]
    with_grad = render_rays(field, SolidBackground(), o, d, **kw)
    with torch.no_grad():
        without = render_rays(field, SolidBackground(), o, d, **kw)
    assert calls[1] < 0.9 * calls[0]
    for key in ("rgb", "opacity", "normal", "orientation"):
        assert torch.allclose(getattr(without, key), getattr(with_grad, key).detach(), atol=2e-3), key


def test_background_compositing_and_override():
    field = BallField(sigma=0.0)
    o, d = _rays_along_x([0.0, 0.2])
    out = render_rays(field, SolidBackground((0.3, 0.6, 0.1)), o, d, occupancy=None, n_samples=64)
    assert torch.allclose(out.rgb, torch.tensor([[0.3, 0.6, 0.1]] * 2))
    bg = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = render_rays(field, SolidBackground(), o, d, occupancy=None, n_samples=64, background_rgb=bg)
    assert torch.allclose(out.rgb, bg)
    assert torch.equal(out.opacity, torch.zeros(2))


def test_rays_that_miss_everything_see_the_background():
    field = BallField()
    o, d = _rays_along_x([3.0, -5.0])  # beside the box
    grid = OccupancyGrid(1.0, 8)
    grid.binaries.zero_()  # and an empty grid
    for occ in (None, grid):
        out = render_rays(field, SolidBackground(), o, d, occupancy=occ, n_samples=64, shading="lambertian",
                          light_positions=o, need_normals=True)
        assert out.n_field_samples == 0
        assert torch.allclose(out.rgb, torch.tensor([[0.3, 0.6, 0.1]] * 2))
        assert torch.equal(out.opacity, torch.zeros(2)) and torch.equal(out.depth, torch.zeros(2))


def test_lambertian_and_orientation_on_opaque_ball():
    field = BallField(sigma=500.0, radius=0.5)
    o, d = _rays_along_x([0.0, 0.0, 0.3])
    lights = torch.tensor([[-3.0, 0.0, 0.0], [0.0, 0.0, -3.0], [-3.0, 0.3, 0.0]])
    out = render_rays(
        field, SolidBackground(), o, d, occupancy=None, n_samples=1024, shading="textureless",
        light_positions=lights, ambient=0.1, need_normals=True,
    )
    hit = torch.tensor([[-0.5, 0.0, 0.0], [-0.5, 0.0, 0.0], [-0.4, 0.3, 0.0]])  # surface points
    n = F.normalize(hit, dim=-1)
    cos = (n * F.normalize(lights - hit, dim=-1)).sum(-1).clamp_min(0)
    assert torch.allclose(out.rgb[:, 0], 0.1 + 0.9 * cos, atol=2e-2)
    assert torch.allclose(F.normalize(out.normal, dim=-1), n, atol=2e-2)
    # an opaque ball seen from outside: only front-facing normals get weight
    assert out.orientation.max() < 1e-3
    # normals that face away from the camera everywhere: orientation = opacity
    class AwayField(BallField):
        def normals(self, x):
            return torch.tensor([1.0, 0.0, 0.0]).expand_as(x)

    out = render_rays(AwayField(sigma=1.0), SolidBackground(), o, d, occupancy=None, n_samples=256, need_normals=True)
    assert torch.allclose(out.orientation, out.opacity)


def test_gradients_flow_to_field_and_background():
    sigma = torch.tensor(2.0, requires_grad=True)
    bg_color = torch.tensor([0.2, 0.2, 0.2], requires_grad=True)

    class ParamField(BallField):
        def density(self, x):
            return sigma * ((x * x).sum(-1) < 0.5).float()

    class ParamBackground:
        def __call__(self, dirs):
            return bg_color.expand(dirs.shape[0], 3)

    o, d = _rays_along_x([0.0, 0.4])
    out = render_rays(ParamField(), ParamBackground(), o, d, occupancy=None, n_samples=128)
    out.rgb.sum().backward()
    assert sigma.grad is not None and sigma.grad.abs() > 0
    assert torch.allclose(bg_color.grad, (1 - out.opacity.detach()).sum().expand(3))


# --------------------------------------------------------------------------- occupancy grid


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


# --------------------------------------------------------------------------- images


def test_render_image_chunked_equals_unchunked():
    field = BallField(sigma=3.0, radius=0.6)
    cams = orbit_cameras(2, distance=2.5, fovy_deg=50)
    grid = OccupancyGrid(1.0, 16)
    grid.binaries.copy_(_cells_touching_ball(grid, 0.6))
    kw = dict(occupancy=grid, n_samples=128, shading="lambertian", need_normals=True)
    a = render_image(field, SolidBackground(), cams, 12, 10, chunk_rays=37, **kw)
    b = render_image(field, SolidBackground(), cams, 12, 10, chunk_rays=10**6, **kw)
    assert a["rgb"].shape == (2, 12, 10, 3) and a["opacity"].shape == (2, 12, 10)
    for key in ("rgb", "opacity", "depth", "normal"):
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    # the ball sits in the middle of the image, the corners see background
    assert a["opacity"][:, 6, 5].min() > 0.9 and a["opacity"][:, 0, 0].max() == 0


def test_bad_inputs_are_refused():
    field = BallField()
    o, d = _rays_along_x([0.0])
    with pytest.raises(ValueError, match="light_positions"):
        render_rays(field, SolidBackground(), o, d, occupancy=None, shading="lambertian")
    with pytest.raises(ValueError, match="shading"):
        render_rays(field, SolidBackground(), o, d, occupancy=None, shading="phong")
    with pytest.raises(ValueError, match="bound"):
        render_rays(field, SolidBackground(), o, d, occupancy=OccupancyGrid(2.0))


# --------------------------------------------------------------------------- CUDA (nerfacc)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nerfacc kernels)")
def test_cuda_marcher_matches_cpu():
    field = BallField(sigma=6.0, radius=0.7, smooth=True)
    grid = OccupancyGrid(bound=1.0, resolution=16)
    grid.binaries.copy_(_cells_touching_ball(grid, 0.7))
    o, d = _random_rays(300, torch.Generator().manual_seed(0))
    cpu = render_rays(field, SolidBackground(), o, d, occupancy=grid, n_samples=512)
    field.albedo = field.albedo.cuda()
    bg = SolidBackground()
    bg.color = bg.color.cuda()
    gpu = render_rays(field, bg, o.cuda(), d.cuda(), occupancy=grid.cuda(), n_samples=512)
    assert torch.allclose(gpu.opacity.cpu(), cpu.opacity, atol=2e-3)
    assert torch.allclose(gpu.rgb.cpu(), cpu.rgb, atol=2e-3)
