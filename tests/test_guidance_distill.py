"""Score distillation (the machinery shared by every rule), with a stub prior, against hand-written values.

A stub prior returns known noise predictions (one fixed tensor per prompt) and records every
call, so the expected gradients are written out here from the paper's formulas and the batch
layout (cond + uncond + negative rows only where t >= 200) is counted directly.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from guidance_helpers import C, H, W, StubPrior, sd_alphas_cumprod_float64

from nfsd_nerf.config import GuidanceConfig
from nfsd_nerf.errors import UserError
from nfsd_nerf.guidance.distill import ScoreDistillation, annealed_t_max, sample_timesteps
from nfsd_nerf.guidance.rules import PAPER_NEGATIVE_PROMPT, RULES, Predictions, Rule, weight_from_timesteps


def run_step(prior, batch, *, seed=0, **kwargs):
    """One loss on a leaf image z (= rgb, identity encode); returns (guidance, z, loss, info, call)."""
    guidance = ScoreDistillation(prior, GuidanceConfig(**kwargs))
    z = torch.randn(batch, C, H, W, generator=torch.Generator().manual_seed(99)).requires_grad_(True)
    prompts = [f"a hamburger, view {i}" for i in range(batch)]
    loss, info = guidance.loss(z, prompts, None, 0.0, torch.Generator().manual_seed(seed))
    loss.backward()
    assert len(prior.calls) == 1, "exactly one batched prediction per step"
    return guidance, z, prompts, loss, info, prior.calls[0]


def noise_from_call(call, z, ab):
    """eps recovered from the definition z_t = sqrt(ab_t) z + sqrt(1 - ab_t) eps (first B rows)."""
    batch = z.shape[0]
    t = call["t"][:batch]
    a = ab[t].reshape(-1, 1, 1, 1)
    return (call["z_t"][:batch].double() - a.sqrt() * z.detach().double()) / (1 - a).sqrt()


def test_timestep_sampling_bounds_and_annealing():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(4000, 1000, 0.02, 0.98, g)
    assert t.dtype == torch.long and t.min() >= 20 and t.max() <= 980
    assert t.min() < 40 and t.max() > 960  # covers the range
    assert sample_timesteps(50, 1000, 0.0, 1.0, g).max() <= 999
    assert annealed_t_max(0.02, 0.98, None, 0.7) == 0.98
    assert math.isclose(annealed_t_max(0.02, 0.98, 0.5, 0.5), 0.74)
    assert math.isclose(annealed_t_max(0.02, 0.98, 0.5, 1.0), 0.5)
    assert math.isclose(annealed_t_max(0.02, 0.98, 0.3, 2.0), 0.3)  # progress is clamped to [0, 1]
    assert annealed_t_max(0.5, 0.98, 0.1, 1.0) == 0.5  # never below t_min




# --------------------------------------------------------------------------- distillation with a stub prior


def test_nfsd_mixed_batch_gradient_and_row_count():
    prior = StubPrior()
    batch = 8
    guidance, z, prompts, loss, info, call = run_step(prior, batch, t_min=0.1, t_max=0.3)  # t in [100, 300]
    t = torch.tensor(info["t"])
    high = t >= 200
    assert 0 < int(high.sum()) < batch, "the fixed seed gives a mixed batch"
    assert guidance.scale == 7.5 and guidance.negative_prompt == PAPER_NEGATIVE_PROMPT

    # Batch layout: B cond rows, B unconditional (empty prompt) rows, then negatives for t >= 200 only.
    n_neg = int(high.sum())
    assert len(call["prompts"]) == 2 * batch + n_neg
    assert call["prompts"][:batch] == prompts
    assert call["prompts"][batch : 2 * batch] == [""] * batch
    assert call["prompts"][2 * batch :] == [PAPER_NEGATIVE_PROMPT] * n_neg
    assert call["t"].tolist() == t.tolist() + t.tolist() + t[high].tolist()
    assert torch.equal(call["z_t"][batch : 2 * batch], call["z_t"][:batch])
    assert torch.equal(call["z_t"][2 * batch :], call["z_t"][:batch][high])

    # Expected gradient, written out per sample: w(t) (dD + 7.5 dC), dD switching at t = 200.
    ab = sd_alphas_cumprod_float64()
    expected = torch.empty(batch, C, H, W, dtype=torch.float64)
    for i in range(batch):
        e_y, e_0, e_neg = prior.e(prompts[i]).double(), prior.e("").double(), prior.e(PAPER_NEGATIVE_PROMPT).double()
        d_c = e_y - e_0
        d_d = e_0 if t[i] < 200 else e_0 - e_neg
        expected[i] = (1 - ab[t[i]]) * (d_d + 7.5 * d_c)
    assert torch.allclose(z.grad.double(), expected / batch, atol=1e-5)
    assert math.isclose(info["grad_norm"], expected.norm().item(), rel_tol=1e-5)
    assert math.isclose(loss.item(), 0.5 * expected.pow(2).sum().item() / batch, rel_tol=1e-5)


def test_nfsd_all_low_t_needs_no_negative_rows():
    prior = StubPrior()
    _, z, prompts, _, info, call = run_step(prior, 3, t_min=0.02, t_max=0.19)
    assert max(info["t"]) < 200
    assert len(call["prompts"]) == 6 and PAPER_NEGATIVE_PROMPT not in call["prompts"]


def test_sds_gradient_default_and_with_negative_prompt():
    ab = sd_alphas_cumprod_float64()
    for negative in (None, "blurry"):
        prior = StubPrior()
        guidance, z, prompts, _, info, call = run_step(prior, 3, negative_prompt=negative, method="sds")
        uncond = "" if negative is None else "blurry"
        assert guidance.scale == 100.0 and guidance.negative_prompt == uncond
        assert call["prompts"] == prompts + [uncond] * 3  # no extra rows: the negative IS the uncond branch
        t = torch.tensor(info["t"])
        noise = noise_from_call(call, z, ab)
        expected = torch.stack([
            (1 - ab[t[i]]) * (prior.e(uncond).double() + 100.0 * (prior.e(prompts[i]).double()
                                                                  - prior.e(uncond).double()) - noise[i])
            for i in range(3)
        ])
        assert torch.allclose(z.grad.double(), expected / 3, atol=1e-4)


def test_nfsd_user_negative_prompt_scale_weighting_and_clipping():
    prior = StubPrior()
    guidance, z, prompts, _, info, call = run_step(
        prior, 2, negative_prompt="dull", scale=3.0, weighting="uniform", grad_clip=0.5, t_min=0.5, t_max=0.6)
    assert guidance.scale == 3.0 and guidance.negative_prompt == "dull"
    assert call["prompts"] == prompts + ["", ""] + ["dull", "dull"]  # e(0) stays the empty prompt
    expected = torch.stack([
        (prior.e("") - prior.e("dull") + 3.0 * (prior.e(p) - prior.e(""))).clamp(-0.5, 0.5) for p in prompts
    ])
    assert torch.allclose(z.grad, expected / 2, atol=1e-6)
    assert z.grad.abs().max() <= 0.5 / 2 + 1e-7


def test_threshold_scales_with_the_schedule_length():
    prior = StubPrior(num_train_timesteps=500)
    guidance, _, _, _, info, call = run_step(prior, 8, t_min=0.1, t_max=0.3)  # t in [50, 150]
    assert guidance.threshold == 100
    high = [t for t in info["t"] if t >= 100]
    assert 0 < len(high) < 8
    assert len(call["prompts"]) == 16 + len(high)


def test_cameras_follow_their_rows_and_draws_are_reproducible():
    from nfsd_nerf.cameras import orbit_cameras

    prior = StubPrior()
    guidance = ScoreDistillation(prior, GuidanceConfig(t_min=0.1, t_max=0.3))
    cams = orbit_cameras(8)
    z = torch.zeros(8, C, H, W)
    losses = []
    for _ in range(2):
        loss, info = guidance.loss(z, ["p"] * 8, cams, 0.0, torch.Generator().manual_seed(5))
        losses.append((loss.item(), info["t"]))
    assert losses[0] == losses[1]
    call = prior.calls[0]
    high = torch.tensor(info["t"]) >= 200
    expected_az = torch.cat([cams.azimuth, cams.azimuth, cams.azimuth[high]])
    assert torch.equal(call["cameras"].azimuth, expected_az)
    other, _ = guidance.loss(z, ["p"] * 8, cams, 0.0, torch.Generator().manual_seed(6))
    assert other.item() != losses[0][0]


def test_annealing_lowers_t_max_with_progress():
    prior = StubPrior()
    guidance = ScoreDistillation(prior, GuidanceConfig(t_min=0.02, t_max=0.98, t_max_end=0.3))
    z = torch.zeros(64, C, H, W)
    _, info = guidance.loss(z, ["p"] * 64, None, 1.0, torch.Generator().manual_seed(0))
    assert max(info["t"]) <= 300
    _, info = guidance.loss(z, ["p"] * 64, None, 0.0, torch.Generator().manual_seed(0))
    assert max(info["t"]) > 300


def test_t_max_drops_after_its_step():
    """threestudio's VSD anneal: t_max_after from the step after t_max_after_step on (given the step)."""
    guidance = ScoreDistillation(StubPrior(), GuidanceConfig(t_max_after=0.3, t_max_after_step=10))
    z = torch.zeros(64, C, H, W)
    for step, dropped in [(None, False), (10, False), (11, True)]:
        _, info = guidance.loss(z, ["p"] * 64, None, 0.0, torch.Generator().manual_seed(0), step=step)
        assert (max(info["t"]) <= 300) == dropped


def test_a_third_rule_is_one_table_entry(monkeypatch):
    """A rule registered in RULES is used with the shared sampling, batching and loss."""
    monkeypatch.setitem(RULES, "cfg-only", Rule(
        grad=lambda p: p.scale * (p.cond - p.uncond), default_scale=2.0, default_negative_prompt="",
        negative_replaces_uncond=False, negative_mask=None))
    prior = StubPrior()
    _, z, prompts, _, _, call = run_step(prior, 2, method="cfg-only")
    assert len(call["prompts"]) == 4
    expected = torch.stack([2.0 * (prior.e(p) - prior.e("")) for p in prompts])
    assert torch.allclose(z.grad, expected / 2, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "sjc"}, "sjc"),
    ({"t_min": 0.5, "t_max": 0.4}, "t_min=0.5"),
    ({"t_max_end": 1.5}, "t_max_end=1.5"),
    ({"grad_clip": 0.0}, "grad_clip"),
    ({"t_max_after": 0.01}, "t_max_after=0.01"),
    ({"lora_rank": 0}, "lora_rank >= 1"),
    ({"lora_lr": -1.0}, "lora_lr > 0"),
    ({"scale": float("nan")}, "nan"),
])
def test_bad_settings_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        ScoreDistillation(StubPrior(), GuidanceConfig(**kwargs))


# --------------------------------------------------------------------------- one contract over every rule


class StubState:
    """A rule state with a known prediction per sample that records its hooks' calls. The contract
    gives it to rules with state (VSD's real one needs a UNet: tests/test_guidance_vsd.py)."""

    def __init__(self, prior, cfg):
        self.table = torch.randn(8, C, H, W, generator=torch.Generator().manual_seed(7))
        self.calls = []

    def predict(self, z_t, t, prompts, cameras):
        self.calls.append(("predict", z_t.clone(), t.clone(), list(prompts)))
        return self.table[t % 8]

    def train(self, z, prompts, cameras, generator):
        self.calls.append(("train", z.clone(), z.requires_grad, list(prompts)))
        return {"stub": torch.rand((), generator=generator)}

    def state_dict(self):
        return {}

    def load_state_dict(self, tensors):
        pass


@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_meets_the_distillation_contract(name, monkeypatch):
    """Any entry of RULES: sane table fields, one batched prediction with exactly the negative rows
    its mask asks for, and a latent gradient equal to the rule applied to those predictions / B.
    A rule with state gets :class:`StubState`: its prediction (for the same z_t and t) reaches the
    rule, and it trains once per step on the detached latents, after predicting."""
    rule = RULES[name]
    assert rule.description and math.isfinite(rule.default_scale) and rule.default_scale > 0
    assert rule.state is not None or not rule.needs_unet, "only a rule's state can need a UNet"
    if rule.state is not None:
        monkeypatch.setitem(RULES, name, dataclasses.replace(rule, state=StubState))
    prior = StubPrior()
    batch = 6
    guidance, z, prompts, loss, info, call = run_step(prior, batch, method=name, t_min=0.1, t_max=0.3)
    t = torch.tensor(info["t"])
    mask = rule.negative_mask(t, guidance.threshold) if rule.negative_mask else torch.zeros(batch, dtype=torch.bool)
    assert mask.dtype == torch.bool and mask.shape == (batch,)
    assert len(call["prompts"]) == 2 * batch + int(mask.sum())
    assert call["prompts"][batch : 2 * batch] == [guidance.uncond_prompt] * batch

    eps = torch.stack([prior.e(p) for p in call["prompts"]])
    negative = None
    if rule.negative_mask is not None:
        negative = torch.zeros(batch, C, H, W)
        negative[mask] = eps[2 * batch :]
    ab = prior.alphas_cumprod
    noise = noise_from_call(call, z, ab.double()).float()
    estimate = None
    if rule.state is not None:
        (kind, z_t, t_state, state_prompts), (kind2, z_seen, needs_grad, train_prompts) = guidance.state.calls
        assert (kind, kind2) == ("predict", "train") and state_prompts == train_prompts == prompts
        assert torch.equal(z_t, call["z_t"][:batch]) and torch.equal(t_state, t)
        assert torch.equal(z_seen, z.detach()) and not needs_grad
        assert set(info["state_losses"]) == {"stub"}
        estimate = guidance.state.table[t % 8]
    else:
        assert "state_losses" not in info
    expected = rule.grad(Predictions(
        cond=eps[:batch], uncond=eps[batch : 2 * batch], negative=negative, noise=noise, t=t,
        weight=weight_from_timesteps(ab, t, "sds"), scale=guidance.scale, threshold=guidance.threshold,
        estimate=estimate))
    assert expected.shape == z.shape and torch.isfinite(expected).all()
    assert torch.allclose(z.grad, expected / batch, atol=1e-4)


# --------------------------------------------------------------------------- Perp-Neg


def _perp(a, b):
    """a - (<a, b> / ||b||^2) b for one sample, written out in float64."""
    a, b = a.double(), b.double()
    return a - (a * b).sum() / (b * b).sum() * b


@pytest.mark.parametrize("method", ["nfsd", "sds"])
def test_perp_neg_rows_and_gradient(method):
    from guidance_helpers import LinearStubPrior

    from nfsd_nerf.cameras import orbit_cameras
    from nfsd_nerf.config import PromptsConfig
    from nfsd_nerf.guidance.perp_neg import perp_neg_weights
    from nfsd_nerf.guidance.prompts import VIEWS, view_texts

    prior, batch, prompts_cfg = LinearStubPrior(), 5, PromptsConfig(back="the back of a hamburger bun")
    cams = orbit_cameras(batch, elevation_deg=15.0)  # azimuths 0, 72, 144, -144, -72
    cams.elevation[4] = 70.0  # one overhead view
    guidance = ScoreDistillation(prior, GuidanceConfig(method=method, perp_neg=True, t_min=0.1, t_max=0.3),
                                 prompts_cfg, "a hamburger")
    z = torch.randn(batch, C, H, W, generator=torch.Generator().manual_seed(99)).requires_grad_(True)
    loss, info = guidance.loss(z, ["ignored"] * batch, cams, 0.0, torch.Generator().manual_seed(0))
    loss.backward()
    assert len(prior.calls) == 1, "still one batched prediction per step"
    call, t = prior.calls[0], torch.tensor(info["t"])

    # rows: B interpolated positives, B uncond, NFSD's negative prompt where t >= 200, then the
    # negative views with a non-zero weight (none for the overhead sample)
    weights = perp_neg_weights(cams.azimuth, cams.elevation, prompts_cfg)
    n_views = int((weights.negative != 0).sum())
    n_neg = int((t >= 200).sum()) if method == "nfsd" else 0
    assert n_views == 2 * (batch - 1)
    assert len(call["prompts"]) == 2 * batch + n_neg + n_views
    assert call["prompts"][batch : 2 * batch] == [""] * batch

    texts = list(view_texts("a hamburger", prompts_cfg).values())
    assert texts[VIEWS.index("back")] == "the back of a hamburger bun"
    e = {p: prior.e(p).double() for p in texts + [""]}
    ab = sd_alphas_cumprod_float64()
    noise = (call["z_t"][:batch].double() - ab[t].sqrt().reshape(-1, 1, 1, 1) * z.detach().double()) / (
        1 - ab[t]).sqrt().reshape(-1, 1, 1, 1)
    expected = torch.empty(batch, C, H, W, dtype=torch.float64)
    for i in range(batch):
        e_pos = sum(weights.positive[i, v] * e[texts[v]] for v in range(4)) - e[""]
        d = e_pos.clone()
        for slot in range(2):
            w = weights.negative[i, slot].item()
            if w != 0:
                d += w * _perp(e[texts[int(weights.negative_views[i, slot])]] - e[""], e_pos)
        w_t = 1 - ab[t[i]]
        if method == "nfsd":
            d_d = e[""] if t[i] < 200 else e[""] - prior.e(PAPER_NEGATIVE_PROMPT).double()
            expected[i] = w_t * (d_d + 7.5 * d)
        else:
            expected[i] = w_t * (e[""] + 100.0 * d - noise[i])
    assert torch.allclose(z.grad.double(), expected / batch, atol=1e-4, rtol=1e-4)


def test_perp_neg_is_refused_without_views_or_with_a_camera_conditioned_prior(tmp_path):
    from nfsd_nerf.config import PromptsConfig
    from nfsd_nerf.guidance.builtin import BuiltinPrior

    with pytest.raises(UserError, match="view-dependent prompts"):
        ScoreDistillation(StubPrior(), GuidanceConfig(perp_neg=True))
    builtin = BuiltinPrior(image_size=8, n_references=4, cache_dir=tmp_path)
    with pytest.raises(UserError, match="conditions on the camera"):
        ScoreDistillation(builtin, GuidanceConfig(perp_neg=True), PromptsConfig(), "a red cube")
