"""Perp-Neg's pure functions against hand-computed values."""

import math

import pytest
import torch

from nfsd_nerf.config import PromptsConfig
from nfsd_nerf.guidance.perp_neg import perp_neg_direction, perp_neg_weights, perpendicular_component
from nfsd_nerf.guidance.prompts import VIEWS

F, S, B, O = (VIEWS.index(v) for v in ("front", "side", "back", "overhead"))


def f(abc, r):
    a, b, c = abc
    return a * math.exp(-b * r) + c


def test_perpendicular_component_per_sample():
    a = torch.tensor([[3.0, 4.0], [1.0, 1.0], [2.0, -1.0]]).reshape(3, 2, 1, 1)
    b = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 0.0]]).reshape(3, 2, 1, 1)
    out = perpendicular_component(a, b).reshape(3, 2)
    assert out[0].tolist() == [0.0, 4.0]  # remove the x part
    assert out[1].tolist() == [0.0, 0.0]  # parallel: nothing left
    assert out[2].tolist() == [2.0, -1.0]  # b = 0: all of a, finite
    assert torch.isfinite(out).all()
    # inner products run over C, H, W together, per sample
    a4, b4 = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5, dtype=torch.float64)
    p = perpendicular_component(a4, b4)
    assert torch.allclose((p * b4).sum(dim=(1, 2, 3)), torch.zeros(2, dtype=torch.float64), atol=1e-12)


CFG = PromptsConfig()
CASES = [
    # azimuth, elevation, positive {view: weight}, negative [(view, weight), (view, weight)]
    (0.0, 10.0, {F: 1.0}, [(F, -f(CFG.f_fs, 1.0)), (S, -f(CFG.f_sf, 0.0))]),
    (45.0, 10.0, {F: 0.5, S: 0.5}, [(F, -f(CFG.f_fs, 0.5)), (S, -f(CFG.f_sf, 0.5))]),
    (90.0, 10.0, {S: 1.0}, [(S, -f(CFG.f_sb, 1.0)), (F, -f(CFG.f_fsb, 1.0))]),
    (135.0, 10.0, {S: 0.5, B: 0.5}, [(S, -f(CFG.f_sb, 0.5)), (F, -f(CFG.f_fsb, 0.5))]),
    (180.0, 10.0, {B: 1.0}, [(S, -f(CFG.f_sb, 0.0)), (F, -f(CFG.f_fsb, 0.0))]),
    (-90.0, 10.0, {S: 1.0}, [(S, -f(CFG.f_sb, 1.0)), (F, -f(CFG.f_fsb, 1.0))]),
    (-179.0, 10.0, {S: 1 / 90, B: 89 / 90}, [(S, -f(CFG.f_sb, 1 / 90)), (F, -f(CFG.f_fsb, 1 / 90))]),
    (30.0, 75.0, {O: 1.0}, [(F, 0.0), (F, 0.0)]),  # overhead: no negatives
]


@pytest.mark.parametrize("azimuth, elevation, positive, negative", CASES)
def test_weights_by_view(azimuth, elevation, positive, negative):
    w = perp_neg_weights(torch.tensor([azimuth]), torch.tensor([elevation]), CFG)
    expected = [positive.get(i, 0.0) for i in range(4)]
    assert w.positive[0].tolist() == pytest.approx(expected, abs=1e-12)
    if elevation > CFG.overhead_min_elevation:
        assert w.negative[0].tolist() == [0.0, 0.0]
        return
    assert w.negative_views[0].tolist() == [v for v, _ in negative]
    assert w.negative[0].tolist() == pytest.approx([x for _, x in negative], abs=1e-12)


def test_hand_values_of_threestudios_defaults():
    w = perp_neg_weights(torch.tensor([0.0, 180.0]), torch.tensor([0.0, 0.0]), CFG)
    assert w.negative[0, 1].item() == pytest.approx(-(4 - 2.426))  # side seen from the front: -1.574
    assert w.negative[1].tolist() == pytest.approx([-(1 - 0.606), -(1 + 0.967)])  # from the back
    moved = PromptsConfig(overhead_min_elevation=5.0)
    assert perp_neg_weights(torch.tensor([0.0]), torch.tensor([10.0]), moved).positive[0, O] == 1.0


def test_direction_adds_weighted_perpendicular_parts_and_skips_zero_weights():
    e_pos = torch.tensor([[1.0, 0.0]]).reshape(1, 2, 1, 1)
    e_neg = torch.tensor([[[2.0, 3.0], [float("nan"), float("nan")]]]).reshape(1, 2, 2, 1, 1)
    d = perp_neg_direction(e_pos, e_neg, torch.tensor([[-0.5, 0.0]], dtype=torch.float64))
    assert d.reshape(2).tolist() == [1.0, -1.5]  # 1 * e_pos + (-0.5) * (0, 3); the NaN slot is not read
