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
