"""Shading modes against hand-computed Lambertian values."""

from __future__ import annotations

import math

import torch

from nfsd_nerf.render.shading import shade


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


def test_camera_light_sits_above_right_of_each_camera():
    """Hand values: a camera at (0, -2, 0) looking at the origin (Z up) has right = (1, 0, 0) and up
    (0, 0, 1), so the light is at (0, -2, 0) + 2 (0.35, 0, 0.5); straight above, +X is the up axis."""
    from nfsd_nerf.cameras import look_at
    from nfsd_nerf.render.shading import CAMERA_LIGHT_OFFSET, camera_light_positions

    assert CAMERA_LIGHT_OFFSET == (0.35, 0.5)
    eyes = torch.tensor([[0.0, -2.0, 0.0], [0.0, 0.0, 1.5], [1.2, 0.9, 0.7]])
    lights = camera_light_positions(eyes)
    torch.testing.assert_close(lights[0], torch.tensor([0.7, -2.0, 1.0]))
    assert lights[1, 2] == 1.5 and lights[1, 0] > 0  # above the camera, offset along +X (its up)
    # the same offset in the frame of look_at (the references' canonical cameras) for a generic eye
    c2w = look_at(eyes[2:], torch.zeros(1, 3), torch.tensor([[0.0, 0.0, 1.0]]))[0]
    expected = eyes[2] + eyes[2].norm() * (0.35 * c2w[:3, 0] + 0.5 * c2w[:3, 1])
    torch.testing.assert_close(lights[2], expected)


def test_lambert_is_the_brightness_of_lambertian_shading():
    from nfsd_nerf.render.shading import lambert

    normals = torch.nn.functional.normalize(torch.randn(20, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    x, lights = torch.zeros(20, 3), torch.tensor([[0.0, 0.0, 2.0]]).expand(20, 3)
    expected = 0.3 + 0.7 * normals[:, 2].clamp_min(0)
    torch.testing.assert_close(lambert(normals, x, lights, 0.3), expected)
    torch.testing.assert_close(shade(torch.ones(20, 3), normals, x, lights, "lambertian", 0.3), expected[:, None].expand(20, 3))
