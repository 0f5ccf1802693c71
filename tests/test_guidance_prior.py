"""The prior interface's shared maths: converting v- and sample-predictions to epsilon."""

import torch

from nfsd_nerf.guidance.prior import eps_from_sample_prediction, eps_from_v_prediction


def _noised(seed=0):
    g = torch.Generator().manual_seed(seed)
    z0, eps = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64), torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.999, 0.5, 0.01], dtype=torch.float64)
    a = ab.reshape(-1, 1, 1, 1)
    return z0, eps, ab, a.sqrt() * z0 + (1 - a).sqrt() * eps


def test_v_prediction_gives_back_the_noise():
    z0, eps, ab, z_t = _noised()
    a = ab.reshape(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * z0  # the definition of the v target
    assert torch.allclose(eps_from_v_prediction(v, z_t, ab), eps, atol=1e-12)


def test_sample_prediction_gives_back_the_noise():
    z0, eps, ab, z_t = _noised(1)
    assert torch.allclose(eps_from_sample_prediction(z0, z_t, ab), eps, atol=1e-9)
