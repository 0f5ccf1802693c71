"""Pins the camera convention: +Z up, azimuth 0 on +X looking at the origin, OpenGL axes."""

import math

import torch

import pytest

from nfsd_nerf.cameras import (
    generate_rays,
    look_at,
    orbit_cameras,
    position_from_spherical,
    position_jitter,
    sample_cameras_from_config,
    sample_training_cameras,
)
from nfsd_nerf.config import CameraConfig


def test_spherical_positions_follow_the_convention():
    pos = position_from_spherical(torch.tensor([0.0, 90.0, 0.0]), torch.tensor([0.0, 0.0, 90.0]), torch.tensor([2.0, 2.0, 2.0]))
    torch.testing.assert_close(pos, torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]), atol=1e-6, rtol=0)


def test_front_camera_looks_down_minus_x_with_z_up():
    cam = orbit_cameras(1, distance=2.0, elevation_deg=0.0)
    c2w = cam.c2w[0]
    torch.testing.assert_close(c2w[:3, 3], torch.tensor([2.0, 0.0, 0.0]))
    torch.testing.assert_close(c2w[:3, 2], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6, rtol=0)  # backward = +X
    torch.testing.assert_close(c2w[:3, 1], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6, rtol=0)  # up = +Z
    torch.testing.assert_close(c2w[:3, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)  # right = +Y


def test_rays_hit_the_right_pixels():
    cam = orbit_cameras(1, distance=2.0, elevation_deg=0.0, fovy_deg=90.0)
    rays_o, rays_d = generate_rays(cam, 4, 4)
    assert rays_o.shape == rays_d.shape == (1, 4, 4, 3)
    torch.testing.assert_close(rays_d.norm(dim=-1), torch.ones(1, 4, 4))
    # the four centre pixels look (almost) straight at the origin, i.e. along -X
    centre = rays_d[0, 1:3, 1:3].mean(dim=(0, 1))
    torch.testing.assert_close(torch.nn.functional.normalize(centre, dim=0), torch.tensor([-1.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    # row 0 is the top of the image (+Z), column 0 is the left (-Y when looking along -X)
    assert rays_d[0, 0, :, 2].min() > 0 and rays_d[0, -1, :, 2].max() < 0
    assert rays_d[0, :, 0, 1].max() < 0 and rays_d[0, :, -1, 1].min() > 0
    # fovy 90: the top pixel-centre ray of 4 rows sits at tan = (2 - 0.5) / 2
    top = rays_d[0, 0, 1:3].mean(dim=0)
    assert math.isclose(float(top[2] / -top[0]), 0.75, rel_tol=1e-5)


def test_look_at_is_orthonormal():
    eye = torch.randn(16, 3) * 3
    c2w = look_at(eye, torch.zeros(16, 3), torch.tensor([0.0, 0.0, 1.0]).expand(16, 3))
    rot = c2w[:, :3, :3]
    torch.testing.assert_close(rot.transpose(1, 2) @ rot, torch.eye(3).expand(16, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.det(rot), torch.ones(16), atol=1e-5, rtol=0)


def test_training_cameras_follow_the_published_ranges():
    gen = torch.Generator().manual_seed(0)
    cams = sample_training_cameras(4096, generator=gen, position_perturb=0.0, center_perturb=0.0, up_perturb=0.0)
    assert cams.distance.min() >= 1.5 and cams.distance.max() <= 2.0
    assert cams.elevation.min() >= -10 - 1e-4 and cams.elevation.max() <= 45 + 1e-4
    assert cams.azimuth.min() >= -180 and cams.azimuth.max() < 180
    fov = torch.rad2deg(cams.fovy)
    assert fov.min() >= 40 - 1e-4 and fov.max() <= 70 + 1e-4
    # without perturbation the nominal angles describe the actual position
    expected = position_from_spherical(cams.azimuth, cams.elevation, cams.distance)
    torch.testing.assert_close(cams.positions, expected, atol=1e-5, rtol=0)
    # half uniform-in-angle, half uniform-on-sphere: the mean of sin(el) lies between the two
    lights = cams.light_positions.norm(dim=-1)
    assert lights.min() >= 0.8 - 1e-5 and lights.max() <= 1.5 + 1e-5


def test_azimuth_is_stratified_within_a_batch():
    cams = sample_training_cameras(8, generator=torch.Generator().manual_seed(1))
    bins = ((cams.azimuth + 180) // 45).long()
    assert sorted(bins.tolist()) == list(range(8))


def test_sampling_is_reproducible_and_indexable():
    a = sample_training_cameras(4, generator=torch.Generator().manual_seed(3))
    b = sample_training_cameras(4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.c2w, b.c2w) and torch.equal(a.light_positions, b.light_positions)
    sub = a[torch.tensor([2, 0])]
    assert len(sub) == 2 and torch.equal(sub.c2w[1], a.c2w[0])
    assert len(a[1]) == 1


def test_orbit_goes_counter_clockwise_from_the_front():
    cams = orbit_cameras(4, elevation_deg=0.0)
    torch.testing.assert_close(cams.azimuth, torch.tensor([0.0, 90.0, -180.0, -90.0]))
    pos = cams.positions
    assert pos[1, 1] > 1.9 and pos[3, 1] < -1.9  # second frame on +Y, fourth on -Y


def test_position_jitter_is_uniform_in_plus_minus_p_or_normal():
    """Uniform in [-p, p]: variance p^2 / 3 (0.01 / 3 at p = 0.1); normal: variance p^2."""
    uniform = position_jitter(200_000, 0.1, "uniform", torch.Generator().manual_seed(0))
    assert uniform.shape == (200_000, 3)
    assert uniform.abs().max() <= 0.1 and uniform.abs().max() > 0.0999
    torch.testing.assert_close(uniform.var(0), torch.full((3,), 0.01 / 3), rtol=0.02, atol=0)
    normal = position_jitter(200_000, 0.1, "normal", torch.Generator().manual_seed(0))
    torch.testing.assert_close(normal.var(0), torch.full((3,), 0.01), rtol=0.02, atol=0)
    assert normal.abs().max() > 0.3  # tails beyond 3 p: no bound
    with pytest.raises(ValueError, match="uniform"):
        position_jitter(1, 0.1, "laplace", None)


def test_config_cameras_jitter_the_eye_uniformly_and_reach_overhead_views():
    """threestudio's: elevation in [-10, 90] (overhead prompt above 60), eye jitter in [-0.1, 0.1]."""
    cfg = CameraConfig(position_perturb_distribution="uniform", center_perturb=0.0, up_perturb=0.0)
    assert (cfg.elevation_range, cfg.position_perturb) == ((-10.0, 90.0), 0.1)
    cams = sample_cameras_from_config(4096, cfg, generator=torch.Generator().manual_seed(0))
    assert cams.elevation.min() >= -10 - 1e-4 and cams.elevation.max() <= 90 + 1e-4
    assert (cams.elevation > 60).float().mean() > 0.1
    offset = cams.positions - position_from_spherical(cams.azimuth, cams.elevation, cams.distance)
    assert offset.abs().max() <= 0.1 + 1e-5 and offset.abs().max() > 0.099
    normal = sample_cameras_from_config(4096, CameraConfig(center_perturb=0.0, up_perturb=0.0),  # 0.1.0's normal
                                        generator=torch.Generator().manual_seed(0))
    offset = normal.positions - position_from_spherical(normal.azimuth, normal.elevation, normal.distance)
    assert offset.abs().max() > 0.2
