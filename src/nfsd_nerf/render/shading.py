"""Per-sample colour: DreamFusion's three shading modes.

``albedo`` shows the colour alone; ``lambertian`` lights it with a point light plus ambient;
``textureless`` lights plain white, so the guidance judges the geometry without the texture.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Shading = Literal["albedo", "lambertian", "textureless"]
SHADINGS = ("albedo", "lambertian", "textureless")


def shade(
    albedo: Tensor, normals: Tensor | None, x: Tensor, light_positions: Tensor | None, shading: Shading, ambient: float
) -> Tensor:
    """Per-sample colour [S, 3].

    albedo: the albedo itself. lambertian: ``albedo * (ambient + (1 - ambient) * max(0, n . l))``
    with ``l = normalize(light - x)``. textureless: the same with white albedo.
    albedo, normals, x, light_positions [S, 3].
    """
    if shading == "albedo":
        return albedo
    brightness = lambert(normals, x, light_positions, ambient)[:, None]  # [S, 1]
    if shading == "lambertian":
        return albedo * brightness
    return brightness.expand(-1, 3)


# --------------------------------------------------------------------------- the camera-attached light

CAMERA_LIGHT_AMBIENT = 0.3
"""Ambient of the camera-attached light (``render.light: camera``): the built-in prior's references
and its evaluation truth are lit with it, so the built-in preset sets ``render.ambient`` to it."""
CAMERA_LIGHT_OFFSET = (0.35, 0.5)
"""Where the camera-attached light sits: the camera position plus these multiples of the camera's
distance along its canonical right and up axes (world up, no roll): above and to the right, so a
cube's faces differ in brightness and shading pins their orientation."""


def camera_light_positions(eyes: Tensor) -> Tensor:
    """Camera positions [B, 3] -> the camera-attached point light's positions [B, 3].

    Why: the light of a render must be a function of its camera's position alone, so that the
    built-in prior's references (each lit by its own camera's light) match a training render lit
    the same way from a nearby camera. The axes are those of a camera at ``eyes`` looking at the
    origin with +Z up (straight above or below: +X as up), whatever the camera's jitter.
    """
    distance = eyes.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    back = eyes / distance
    up = torch.tensor([0.0, 0.0, 1.0], dtype=eyes.dtype, device=eyes.device).expand_as(eyes)
    polar = back[:, 2:3].abs() > 0.999
    up = torch.where(polar, torch.tensor([1.0, 0.0, 0.0], dtype=eyes.dtype, device=eyes.device), up)
    right = F.normalize(torch.linalg.cross(up, back, dim=-1), dim=-1)
    cam_up = torch.linalg.cross(back, right, dim=-1)
    a, b = CAMERA_LIGHT_OFFSET
    return eyes + distance * (a * right + b * cam_up)


def lambert(normals: Tensor, x: Tensor, light_positions: Tensor, ambient: float) -> Tensor:
    """The Lambertian brightness [S] of :func:`shade`: ``ambient + (1 - ambient) * max(0, n . l)``,
    ``l = normalize(light - x)``; normals, x, light_positions [S, 3]."""
    light_dir = F.normalize(light_positions - x, dim=-1)
    return ambient + (1.0 - ambient) * (normals * light_dir).sum(-1).clamp_min(0.0)
