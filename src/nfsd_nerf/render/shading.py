"""Per-sample colour: DreamFusion's three shading modes.

``albedo`` shows the colour alone; ``lambertian`` lights it with a point light plus ambient;
``textureless`` lights plain white, so the guidance judges the geometry without the texture.
"""

from __future__ import annotations

from typing import Literal

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
    light_dir = F.normalize(light_positions - x, dim=-1)
    diffuse = (normals * light_dir).sum(-1, keepdim=True).clamp_min(0.0)
    brightness = ambient + (1.0 - ambient) * diffuse  # [S, 1]
    if shading == "lambertian":
        return albedo * brightness
    return brightness.expand(-1, 3)
