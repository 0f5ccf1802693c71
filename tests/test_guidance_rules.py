"""The score-distillation rules as pure functions, against hand-written values, and the rules table."""

from __future__ import annotations

import math

import torch

from nfsd_nerf.guidance import rules as rules_module
from nfsd_nerf.guidance.distill import surrogate_loss
from nfsd_nerf.guidance.rules import (
    PAPER_NEGATIVE_PROMPT, RULES, nfsd_grad, rules_help, sds_grad, threshold_for_schedule, weight_from_timesteps,
)
from guidance_helpers import sd_alphas_cumprod_float64

# --------------------------------------------------------------------------- pure rules


def test_nfsd_grad_matches_hand_values_and_ignores_unused_negative_rows():
    eps_cond = torch.tensor([3.0, 3.0]).reshape(2, 1, 1, 1)
    eps_uncond = torch.tensor([1.0, 1.0]).reshape(2, 1, 1, 1)
    eps_neg = torch.tensor([float("nan"), 0.5]).reshape(2, 1, 1, 1)  # row 0 (t < 200) must not be read
    grad = nfsd_grad(eps_cond, eps_uncond, eps_neg, torch.tensor([199, 200]), torch.tensor([0.5, 0.25]),
                     scale=2.0, threshold=200)
    # t=199: dD = e(0) = 1, dC = 2 -> 0.5 * (1 + 2*2) = 2.5;  t=200: dD = 1 - 0.5, dC = 2 -> 0.25 * 4.5 = 1.125
    assert grad.flatten().tolist() == [2.5, 1.125]


def test_sds_grad_matches_hand_values():
    grad = sds_grad(torch.tensor([3.0]).reshape(1, 1), torch.tensor([1.0]).reshape(1, 1),
                    torch.tensor([0.5]).reshape(1, 1), torch.tensor([0.5]), scale=2.0)
    assert grad.item() == 0.5 * (1.0 + 2.0 * (3.0 - 1.0) - 0.5)


def test_weights_threshold_and_surrogate():
    ab = sd_alphas_cumprod_float64()
    t = torch.tensor([0, 199, 500, 999])
    assert torch.allclose(weight_from_timesteps(ab.float(), t, "sds").double(), 1 - ab[t], atol=1e-6)
    assert weight_from_timesteps(ab.float(), t, "uniform").tolist() == [1.0] * 4
    assert threshold_for_schedule(1000) == 200 and threshold_for_schedule(500) == 100
    assert threshold_for_schedule(4000) == 800

    z = torch.randn(3, 2, 2, requires_grad=True)
    grad = torch.randn(3, 2, 2)
    loss = surrogate_loss(z, grad)
    loss.backward()
    assert torch.allclose(z.grad, grad / 3)
    assert math.isclose(loss.item(), 0.5 * grad.pow(2).sum().item() / 3, rel_tol=1e-6)


def test_rules_table_defaults():
    assert set(rules_module.RULES) >= {"nfsd", "sds"}
    assert RULES["nfsd"].default_scale == 7.5 and RULES["sds"].default_scale == 100.0
    assert PAPER_NEGATIVE_PROMPT == ("unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, "
                                     "dark, low-resolution, gloomy")


def test_help_lists_every_rule_with_its_default_scale():
    text = rules_help()
    for name, rule in RULES.items():
        assert f"{name}: {rule.description} (scale {rule.default_scale:g})" in text


def test_rules_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; import nfsd_nerf.guidance.rules; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
