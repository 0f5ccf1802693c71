"""Regularisers: hand-computed values and which terms appear."""

import math

import pytest
import torch

from nfsd_nerf.config import LossConfig
from nfsd_nerf.render import RenderOutput
from nfsd_nerf.train.losses import orientation_loss, regularizer_terms, sparsity_loss


def _output(opacity, orientation):
    n = len(opacity)
    zeros = torch.zeros(n)
    return RenderOutput(torch.zeros(n, 3), torch.tensor(opacity), zeros, torch.zeros(n, 3), torch.tensor(orientation), 0)


def test_sparsity_is_a_smooth_l1_of_opacity():
    opacity = torch.tensor([0.0, 0.5, 1.0])
    expected = (math.sqrt(0.01) + math.sqrt(0.26) + math.sqrt(1.01)) / 3
    assert sparsity_loss(opacity).item() == pytest.approx(expected)


def test_terms_are_named_weighted_and_only_present_when_used():
    out = _output([0.0, 1.0], [0.5, 1.5])
    terms = regularizer_terms(out, LossConfig(sparsity=2.0), orientation_weight=10.0)
    assert set(terms) == {"orientation", "sparsity"}
    assert terms["orientation"].item() == pytest.approx(10.0 * 2.0)  # (0.5 + 1.5) / 1 ray with opacity > 0
    assert terms["sparsity"].item() == pytest.approx(2.0 * (math.sqrt(0.01) + math.sqrt(1.01)) / 2)
    assert regularizer_terms(out, LossConfig(sparsity=0.0), orientation_weight=0.0) == {}


def test_orientation_is_summed_and_divided_by_the_rays_with_opacity():
    """threestudio: sum over rays / #(opacity > 0); by hand: (0.25 + 0 + 0.5 + 0.25) / 3 rays."""
    opacity = torch.tensor([0.2, 0.0, 1.0, 1e-6])
    orientation = torch.tensor([0.25, 0.0, 0.5, 0.25], requires_grad=True)
    value = orientation_loss(orientation, opacity)
    assert value.item() == pytest.approx(1.0 / 3.0)
    value.backward()
    torch.testing.assert_close(orientation.grad, torch.full((4,), 1.0 / 3.0))
    # no ray hits anything: the sum (zero) over one ray, never a division by zero
    assert orientation_loss(torch.zeros(3), torch.zeros(3)).item() == 0.0
