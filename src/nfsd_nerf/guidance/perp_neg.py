r"""Perp-Neg (Armandpour et al. 2023) as threestudio applies it: Janus mitigation for every rule.

Per sample, the positive text embedding interpolates the two view prompts nearest to the camera,
and the other views' directions push the prediction away, only in their component perpendicular
to the positive direction (so they cannot cancel it). With ``e_pos = e(y_interp) - e(0)`` and
``e_i = e(view_i) - e(0)``:

.. math::
    d = e_{pos} + \sum_i w_i \, \mathrm{perp}(e_i, e_{pos}), \qquad
    \mathrm{perp}(a, b) = a - \frac{\langle a, b \rangle}{\lVert b \rVert^2} b

``d`` replaces the conditional direction ``e(y) - e(0)``: for SDS inside the CFG prediction, for
NFSD as ``dC`` (``dD`` unchanged). With ``r`` the position between two views and
``f(a, b, c; r) = a exp(-b r) + c`` (``prompts.f_*``):

* ``|azimuth| < 90``: ``r = 1 - |az| / 90`` (1 = front, 0 = side); positive ``r E_front + (1 - r) E_side``;
  negatives front with ``-f_fs(r)`` and side with ``-f_sf(1 - r)``.
* otherwise: ``r = 2 - |az| / 90`` (1 = side, 0 = back); positive ``r E_side + (1 - r) E_back``;
  negatives side with ``-f_sb(r)`` and front with ``-f_fsb(r)``.
* overhead (elevation above ``prompts.overhead_min_elevation``): positive ``E_overhead``, no negatives.

Pure functions of tensors; :class:`~nfsd_nerf.guidance.distill.ScoreDistillation` batches the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import PromptsConfig
from .prompts import VIEWS, shift_azimuth

FRONT, SIDE, BACK, OVERHEAD = (VIEWS.index(v) for v in ("front", "side", "back", "overhead"))


def shifted_exponential_decay(abc: tuple[float, float, float], r: Tensor) -> Tensor:
    """``a * exp(-b * r) + c`` for ``(a, b, c)``, elementwise on r [B]."""
    a, b, c = abc
    return a * torch.exp(-b * r) + c


def perpendicular_component(a: Tensor, b: Tensor) -> Tensor:
    """The part of a [B, ...] perpendicular to b [B, ...], per sample (inner products over all but dim 0).

    Where ``b`` is zero the whole of ``a`` is perpendicular to it (no division by zero).
    """
    dims = tuple(range(1, a.dim()))
    dot = (a * b).sum(dims, keepdim=True)
    norm2 = (b * b).sum(dims, keepdim=True)
    return a - torch.where(norm2 > 0, dot / norm2.clamp_min(torch.finfo(norm2.dtype).tiny), 0.0) * b


@dataclass
class PerpNegWeights:
    """Per-sample view weights; views are indexed as in :data:`~nfsd_nerf.guidance.prompts.VIEWS`."""

    positive: Tensor
    """[B, 4] float64: the positive embedding is ``positive @ E_views`` (two non-zero entries, or overhead alone)."""
    negative_views: Tensor
    """[B, 2] long: the view of each negative slot."""
    negative: Tensor
    """[B, 2] float64: ``w_i`` of each slot (0 for overhead samples, whose slots are unused)."""


def perp_neg_weights(azimuth_deg: Tensor, elevation_deg: Tensor, cfg: PromptsConfig) -> PerpNegWeights:
    """Interpolation and negative weights for cameras at azimuth/elevation [B] (degrees); CPU, float64."""
    az = shift_azimuth(azimuth_deg).abs()
    el = elevation_deg.detach().double().cpu().expand_as(az)
    n = az.shape[0]
    positive = torch.zeros(n, len(VIEWS), dtype=torch.float64)
    negative_views = torch.zeros(n, 2, dtype=torch.long)
    negative = torch.zeros(n, 2, dtype=torch.float64)
    overhead = el > cfg.overhead_min_elevation
    front_side = ~overhead & (az < 90)
    side_back = ~overhead & ~(az < 90)

    r = 1 - az / 90  # 1 = front, 0 = side
    positive[front_side, FRONT] = r[front_side]
    positive[front_side, SIDE] = 1 - r[front_side]
    negative_views[front_side] = torch.tensor([FRONT, SIDE])
    negative[front_side, 0] = -shifted_exponential_decay(cfg.f_fs, r[front_side])
    negative[front_side, 1] = -shifted_exponential_decay(cfg.f_sf, 1 - r[front_side])

    r = 2 - az / 90  # 1 = side, 0 = back
    positive[side_back, SIDE] = r[side_back]
    positive[side_back, BACK] = 1 - r[side_back]
    negative_views[side_back] = torch.tensor([SIDE, FRONT])
    negative[side_back, 0] = -shifted_exponential_decay(cfg.f_sb, r[side_back])
    negative[side_back, 1] = -shifted_exponential_decay(cfg.f_fsb, r[side_back])

    positive[overhead, OVERHEAD] = 1.0
    return PerpNegWeights(positive, negative_views, negative)


def perp_neg_direction(e_pos: Tensor, e_neg: Tensor, weights: Tensor) -> Tensor:
    """``e_pos + sum_i w_i perp(e_i, e_pos)``: e_pos [B, ...], e_neg [B, K, ...] (rows with weight 0
    are never read), weights [B, K] -> [B, ...]."""
    out = e_pos.clone()
    for i in range(e_neg.shape[1]):
        used = weights[:, i] != 0
        if bool(used.any()):
            w = weights[used, i].to(e_pos.dtype).reshape(-1, *([1] * (e_pos.dim() - 1)))
            out[used] += w * perpendicular_component(e_neg[used, i], e_pos[used])
    return out
