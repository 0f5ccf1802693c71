"""View-dependent prompts: tell the 2D prior which side of the object a render shows.

Published DreamFusion ranges (docs/design.md, section 1.3), applied in order so later rules win:
side by default; front if ``|azimuth| < 45``; back if ``|azimuth| > 135``; overhead if
``elevation > 60`` (degrees; azimuth 0 sees the object's front, see :mod:`nfsd_nerf.cameras`).
All comparisons are strict, so 45 and 135 degrees are side views and 60 degrees is not overhead.
"""

from __future__ import annotations

import torch
from torch import Tensor

FRONT_MAX_AZIMUTH = 45.0
BACK_MIN_AZIMUTH = 135.0
OVERHEAD_MIN_ELEVATION = 60.0


def view_names_from_angles(azimuth_deg: Tensor, elevation_deg: Tensor) -> list[str]:
    """[B] azimuth and elevation (degrees) -> B names among "front", "side", "back", "overhead"."""
    azimuth = torch.remainder(azimuth_deg.detach().double().cpu() + 180.0, 360.0) - 180.0  # [-180, 180)
    elevation = elevation_deg.detach().double().cpu().expand_as(azimuth)
    names = []
    for az, el in zip(azimuth.abs().tolist(), elevation.tolist()):
        name = "side"
        if az < FRONT_MAX_AZIMUTH:
            name = "front"
        if az > BACK_MIN_AZIMUTH:
            name = "back"
        if el > OVERHEAD_MIN_ELEVATION:
            name = "overhead"
        names.append(name)
    return names


def view_dependent_prompts(prompt: str, azimuth_deg: Tensor, elevation_deg: Tensor) -> list[str]:
    """One prompt per camera: ``"<prompt>, front view"`` etc.; azimuth/elevation [B] in degrees."""
    return [f"{prompt}, {name} view" for name in view_names_from_angles(azimuth_deg, elevation_deg)]
