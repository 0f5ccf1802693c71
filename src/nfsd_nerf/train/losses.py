"""Regularisers added to the guidance loss, as named terms."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..config import LossConfig
    from ..render import RenderOutput


def sparsity_loss(opacity: Tensor) -> Tensor:
    """Smooth L1-like penalty on per-ray opacity [N] (threestudio's form): keeps empty space empty."""
    return torch.sqrt(opacity**2 + 0.01).mean()


def orientation_loss(orientation: Tensor, opacity: Tensor) -> Tensor:
    """DreamFusion's orientation penalty, threestudio's normalisation: per-ray ``orientation`` [N]
    summed, divided by the number of rays with ``opacity`` [N] > 0 (at least 1), so rays that miss
    the object do not dilute it. -> scalar."""
    hits = (opacity.detach() > 0).sum().clamp_min(1)
    return orientation.sum() / hits


def regularizer_terms(out: "RenderOutput", loss: "LossConfig", orientation_weight: float) -> dict[str, Tensor]:
    """Named weighted terms: ``orientation`` (DreamFusion's, when the render computed normals and the
    weight is positive) and ``sparsity`` (when its weight is positive)."""
    terms = {}
    if orientation_weight > 0:
        terms["orientation"] = orientation_weight * orientation_loss(out.orientation, out.opacity)
    if loss.sparsity > 0:
        terms["sparsity"] = loss.sparsity * sparsity_loss(out.opacity)
    return terms
