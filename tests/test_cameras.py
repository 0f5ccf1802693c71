"""Pins the camera convention: +Z up, azimuth 0 on +X looking at the origin, OpenGL axes."""

import math

import torch

from nfsd_nerf.cameras import (
    generate_rays,
    look_at,
    orbit_cameras,
    position_from_spherical,
    sample_training_cameras,
)


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
