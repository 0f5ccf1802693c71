"""The trainable scene: field + background + occupancy grid, built from a config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Config


@dataclass
class Scene:
    """The trainable parts of a run; checkpoints save each under its name in :meth:`modules`."""

    field: "torch.nn.Module"
    background: "torch.nn.Module"
    occupancy: "torch.nn.Module"

    def modules(self) -> dict[str, torch.nn.Module]:
        """Named parts, in the order their state is saved."""
        return {"field": self.field, "background": self.background, "occupancy": self.occupancy}


def build_scene(cfg: Config, device: torch.device | str = "cpu") -> Scene:
    """Fresh field, background and occupancy grid for ``cfg`` on ``device``.

    Parameters are drawn in this order (field hash table, field MLP, background MLP), so the same
    torch seed gives the same scene.
    """
    from .field import Background, NeRFField
    from .render import OccupancyGrid

    field = NeRFField(cfg.field).to(device)
    background = Background(cfg.background).to(device)
    occupancy = OccupancyGrid(
        bound=cfg.field.bound,
        resolution=cfg.render.occupancy_resolution,
        threshold=cfg.render.occupancy_threshold,
        ema_decay=cfg.render.occupancy_ema_decay,
        alpha_threshold=cfg.render.alpha_threshold,
    ).to(device)
    return Scene(field, background, occupancy)
