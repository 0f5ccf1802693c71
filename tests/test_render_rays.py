"""render_rays and render_image against closed forms and brute-force references.

The fields here are analytic (no hash grid, see render_helpers.py), so every expected value is
independent of field.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nfsd_nerf.cameras import orbit_cameras
from nfsd_nerf.render.marching import near_far_from_box, step_size_from_samples
from nfsd_nerf.render.occupancy import OccupancyGrid
from nfsd_nerf.render.rays import render_image, render_rays

from render_helpers import BallField, SolidBackground, cells_touching_ball, random_rays, rays_along_x


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


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("stratified", [False, True])
def test_ball_opacity_matches_closed_form(stratified):
    field = BallField(sigma=1.5, radius=0.8)
    offsets = [0.0, 0.3, 0.55, 0.75, 0.9]
    o, d = rays_along_x(offsets)
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
    grid.binaries.copy_(cells_touching_ball(grid, 0.7))
    assert 0.05 < grid.occupied_fraction() < 0.5  # the grid really skips space
    o, d = random_rays(300, g)
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
    o, d = random_rays(200, g)
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
    o, d = random_rays(200, g)
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


class _ShellField(BallField):
    """Density ``sigma`` inside radius 0.5 plus a faint shell ``shell`` out to 0.8 (0 beyond)."""

    def __init__(self, shell: float):
        super().__init__(sigma=3.0, radius=0.5)
        self.shell = shell

    def density(self, x):
        r = x.norm(dim=-1)
        return torch.where(r < 0.5, 3.0, torch.where(r < 0.8, self.shell, 0.0))


def test_alpha_threshold_drops_faint_samples_as_if_their_density_were_zero():
    """Step 2 sqrt(3) / 256 = 0.0135: the shell's alpha 1 - exp(-0.004 * 0.0135) = 5e-5 < 0.01 goes, the
    core's 1 - exp(-3 * 0.0135) = 0.040 stays; with the early stop off, a dropped sample changes
    nothing but itself, so the render equals that of the core alone."""
    o, d = random_rays(200, torch.Generator().manual_seed(8))
    grid = OccupancyGrid(1.0, 8, alpha_threshold=0.01)
    grid.occs.fill_(0.5)  # mean 0.5: the threshold stays 0.01
    kw = dict(n_samples=256, shading="lambertian", light_positions=o * 1.2, need_normals=True, early_stop_eps=0.0)
    faint = render_rays(_ShellField(0.004), SolidBackground(), o, d, occupancy=grid, **kw)
    core = render_rays(_ShellField(0.0), SolidBackground(), o, d, occupancy=grid, alpha_threshold=0.0, **kw)
    kept = render_rays(_ShellField(0.004), SolidBackground(), o, d, occupancy=grid, alpha_threshold=0.0, **kw)
    for key in ("rgb", "opacity", "depth", "orientation"):
        torch.testing.assert_close(getattr(faint, key), getattr(core, key), msg=key)
    assert not torch.allclose(kept.opacity, core.opacity)  # without the threshold the shell shows
    assert faint.n_field_samples < kept.n_field_samples  # its normals were never computed
    grid.occs.zero_()  # mean occupancy 0 caps the threshold at 0: nothing dropped
    torch.testing.assert_close(render_rays(_ShellField(0.004), SolidBackground(), o, d, occupancy=grid, **kw).opacity,
                               kept.opacity)


def test_auto_normals_count_six_density_evaluations_on_the_cpu():
    field = BallField(sigma=3.0, radius=0.5)
    o, d = random_rays(50, torch.Generator().manual_seed(9))
    kw = dict(occupancy=None, n_samples=64, shading="lambertian", light_positions=o * 1.2, early_stop_eps=0.0)
    analytic = render_rays(field, SolidBackground(), o, d, **kw)  # 1 density + 1 normal per sample
    field.normal_method = "auto"
    auto = render_rays(field, SolidBackground(), o, d, **kw)  # 1 density + 6 for finite differences
    assert analytic.n_field_samples % 2 == 0 and auto.n_field_samples == 7 * analytic.n_field_samples // 2


def test_no_grad_render_skips_invisible_normals_within_tolerance():
    field = BallField(sigma=8.0, radius=0.7, smooth=True)
    o, d = random_rays(200, torch.Generator().manual_seed(6))
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
    o, d = rays_along_x([0.0, 0.2])
    out = render_rays(field, SolidBackground((0.3, 0.6, 0.1)), o, d, occupancy=None, n_samples=64)
    assert torch.allclose(out.rgb, torch.tensor([[0.3, 0.6, 0.1]] * 2))
    bg = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = render_rays(field, SolidBackground(), o, d, occupancy=None, n_samples=64, background_rgb=bg)
    assert torch.allclose(out.rgb, bg)
    assert torch.equal(out.opacity, torch.zeros(2))


def test_rays_that_miss_everything_see_the_background():
    field = BallField()
    o, d = rays_along_x([3.0, -5.0])  # beside the box
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
    o, d = rays_along_x([0.0, 0.0, 0.3])
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

    o, d = rays_along_x([0.0, 0.4])
    out = render_rays(ParamField(), ParamBackground(), o, d, occupancy=None, n_samples=128)
    out.rgb.sum().backward()
    assert sigma.grad is not None and sigma.grad.abs() > 0
    assert torch.allclose(bg_color.grad, (1 - out.opacity.detach()).sum().expand(3))


# --------------------------------------------------------------------------- images and inputs


def test_render_image_chunked_equals_unchunked():
    field = BallField(sigma=3.0, radius=0.6)
    cams = orbit_cameras(2, distance=2.5, fovy_deg=50)
    grid = OccupancyGrid(1.0, 16)
    grid.binaries.copy_(cells_touching_ball(grid, 0.6))
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
    o, d = rays_along_x([0.0])
    with pytest.raises(ValueError, match="light_positions"):
        render_rays(field, SolidBackground(), o, d, occupancy=None, shading="lambertian")
    with pytest.raises(ValueError, match="shading"):
        render_rays(field, SolidBackground(), o, d, occupancy=None, shading="phong")
    with pytest.raises(ValueError, match="bound"):
        render_rays(field, SolidBackground(), o, d, occupancy=OccupancyGrid(2.0))
