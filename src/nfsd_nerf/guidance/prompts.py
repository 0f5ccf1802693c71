"""View-dependent prompts: tell the 2D prior which side of the object a render shows.

Published DreamFusion ranges (docs/design.md, section 1.3), applied in order so later rules win:
side by default; front if ``|azimuth| < 45``; back if ``|azimuth| > 135``; overhead if
``elevation > 60`` (degrees; azimuth 0 sees the object's front, see :mod:`nfsd_nerf.cameras`).
All comparisons are strict, so 45 and 135 degrees are side views and 60 degrees is not overhead.
The thresholds and each view's text are settings of the ``prompts`` config section; a view's
text defaults to ``"<prompt>, <view> view"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import PromptsConfig

VIEWS = ("front", "side", "back", "overhead")
"""The views, in the order every per-view tensor uses."""


def shift_azimuth(azimuth_deg: Tensor) -> Tensor:
    """Azimuth [B] in degrees -> the same angles in [-180, 180), float64 on the CPU."""
    return torch.remainder(azimuth_deg.detach().double().cpu() + 180.0, 360.0) - 180.0


def view_names_from_angles(azimuth_deg: Tensor, elevation_deg: Tensor, cfg: PromptsConfig | None = None) -> list[str]:
    """[B] azimuth and elevation (degrees) -> B names among :data:`VIEWS`."""
    cfg = cfg or PromptsConfig()
    azimuth = shift_azimuth(azimuth_deg)
    elevation = elevation_deg.detach().double().cpu().expand_as(azimuth)
    names = []
    for az, el in zip(azimuth.abs().tolist(), elevation.tolist()):
        name = "side"
        if az < cfg.front_max_azimuth:
            name = "front"
        if az > cfg.back_min_azimuth:
            name = "back"
        if el > cfg.overhead_min_elevation:
            name = "overhead"
        names.append(name)
    return names


def view_texts(prompt: str, cfg: PromptsConfig | None = None) -> dict[str, str]:
    """The prompt of every view: the ``prompts`` section's text where set, else ``"<prompt>, <view> view"``."""
    cfg = cfg or PromptsConfig()
    return {view: getattr(cfg, view) or f"{prompt}, {view} view" for view in VIEWS}


def view_dependent_prompts(prompt: str, azimuth_deg: Tensor, elevation_deg: Tensor,
                           cfg: PromptsConfig | None = None) -> list[str]:
    """One prompt per camera (azimuth/elevation [B] in degrees): its view's text."""
    texts = view_texts(prompt, cfg)
    return [texts[name] for name in view_names_from_angles(azimuth_deg, elevation_deg, cfg)]
