"""Compositing maths on packed samples: gradcheck, a per-ray cumprod reference, float64 sums."""

from __future__ import annotations

import torch

from nfsd_nerf.render.volume import (
    exclusive_sum_packed,
    render_weight_from_density_packed,
    visible_before_early_stop,
)


def test_weights_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    ray_indices = torch.tensor([0, 0, 0, 1, 1, 3, 3, 3, 3])
    t_starts = torch.rand(9, generator=g, dtype=torch.float64)
    t_ends = t_starts + 0.1 + torch.rand(9, generator=g, dtype=torch.float64)
    sigmas = (torch.rand(9, generator=g, dtype=torch.float64) * 3).requires_grad_()

    def weights(s):
        return render_weight_from_density_packed(t_starts, t_ends, s, ray_indices, 4)[0]

    assert torch.autograd.gradcheck(weights, (sigmas,))
    # values vs a per-ray cumprod of (1 - alpha)
    w = weights(sigmas).detach()
    for ray in range(4):
        m = ray_indices == ray
        alpha = 1 - torch.exp(-sigmas.detach()[m] * (t_ends - t_starts)[m])
        trans = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.float64), 1 - alpha[:-1]]), 0)
        assert torch.allclose(w[m], trans * alpha, atol=1e-12)


def test_exclusive_sum_packed_is_precise_on_long_arrays():
    # 2M samples of 1.0 in float32: a float32 global cumsum would lose ~0.1 per ray
    n_rays, per_ray = 4000, 500
    values = torch.ones(n_rays * per_ray)
    ray_indices = torch.arange(n_rays).repeat_interleave(per_ray)
    out = exclusive_sum_packed(values, ray_indices, n_rays)
    expected = torch.arange(per_ray, dtype=torch.float32).repeat(n_rays)
    assert torch.equal(out, expected)


def test_visible_before_early_stop_hand_values():
    # ray 0: T = 1, 1, e^-10 (behind an optical depth of 10); ray 1 (one sample) and ray 2 (empty sky) stay
    ray_indices = torch.tensor([0, 0, 0, 1, 2, 2])
    t_starts = torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0, 1.0])
    sigmas = torch.tensor([0.0, 10.0, 1.0, 50.0, 0.0, 0.0], requires_grad=True)
    keep = visible_before_early_stop(t_starts, t_starts + 1.0, sigmas, ray_indices, 3, 1e-4)
    assert keep.tolist() == [True, True, False, True, True, True]
    assert not keep.requires_grad
    # with eps below e^-10 ~ 4.5e-5 the third sample stays too
    assert visible_before_early_stop(t_starts, t_starts + 1.0, sigmas, ray_indices, 3, 1e-5).all()
