"""What changes with the step: small pure functions of the step and a config section.

Each answers one question the training step asks (how many hash-grid levels, which shading, how
much orientation loss, whether to refresh the occupancy grid, how far training has come), so the
step itself reads as data flow and each schedule is tested alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..config import LossConfig, RenderConfig, TrainConfig
    from ..render import Shading


def active_levels(step: int, train: "TrainConfig", n_levels: int) -> int:
    """Coarse-to-fine hash grid, threestudio's ``ProgressiveBandHashGrid``:
    ``min(start_levels + max(step - level_growth_start, 0) // level_growth_every, n_levels)``
    (8 until step 2499, 9 from 2500, 16 from 6000 in the default preset); all ``n_levels`` from
    step 0 when ``start_levels`` is unset."""
    if train.start_levels is None:
        return n_levels
    grown = max(step - train.level_growth_start, 0) // train.level_growth_every
    return min(n_levels, train.start_levels + grown)


def choose_shading(step: int, render: "RenderConfig", generator: torch.Generator) -> "Shading":
    """Albedo during the warm-up, then albedo / Lambertian / textureless with the set probabilities.

    Draws one number from ``generator`` after the warm-up only (resume depends on the draw order).
    """
    if step < render.ambient_only_steps:
        return "albedo"
    u = float(torch.rand((), generator=generator)) * (render.albedo_prob + render.lambertian_prob + render.textureless_prob)
    if u < render.albedo_prob:
        return "albedo"
    return "lambertian" if u < render.albedo_prob + render.lambertian_prob else "textureless"


def orientation_weight(step: int, loss: "LossConfig") -> float:
    """Orientation-loss weight, ramped linearly from ``orientation_start`` to ``orientation_end``."""
    lo, hi, ramp = loss.orientation_start, loss.orientation_end, loss.orientation_ramp_steps
    return hi if ramp <= 0 else lo + (hi - lo) * min(1.0, step / ramp)


def occupancy_refresh_due(step: int, render: "RenderConfig") -> bool:
    """Whether the occupancy grid is refreshed after ``step`` (every ``occupancy_update_every`` steps)."""
    return (step + 1) % render.occupancy_update_every == 0


def training_progress(step: int, total_steps: int) -> float:
    """Fraction of training done, in [0, 1): anneals the guidance's ``t_max``."""
    return step / max(1, total_steps)
