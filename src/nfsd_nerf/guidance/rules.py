"""Score-distillation rules as pure functions of noise predictions (docs/design.md, section 2).

Notation: ``e(y)`` is the prior's noise prediction for ``z_t`` with the prompt, ``e(0)`` with the
unconditional prompt, ``e(neg)`` with the negative prompt; ``eps`` is the noise that was added;
``w(t)`` a per-sample weight. Every tensor of predictions is ``[B, C, H, W]``; ``t`` and ``weight``
are ``[B]``. Nothing here touches a model, so the formulas are tested against hand-written values.

A rule is registered in :data:`RULES` with its default scale, its default negative prompt and which
samples need the negative-prompt prediction; :class:`~nfsd_nerf.guidance.distill.ScoreDistillation`
does everything else (sampling, batching, the surrogate loss) identically for every rule. Adding a
rule means one function here and one entry in :data:`RULES`: ``guidance.method`` accepts any key
of the table, the command line's ``--guidance`` help lists it, and the contract tests run over every
entry (docs/design.md, "Adding a score-distillation rule"). A rule that learns during the run (VSD's
LoRA model) also names a factory of its :class:`RuleState`; the gradient stays a pure function.

This module does not import torch (the functions only call tensor methods), so the command line can
read the table for its help text without paying for torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Protocol

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from ..cameras import Cameras
    from ..config import GuidanceConfig
    from .prior import DiffusionPrior

PAPER_NEGATIVE_PROMPT = (
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
)
"""``p_neg`` of the NFSD paper: its prediction approximates minus the in-domain direction."""

NFSD_THRESHOLD = 200
"""NFSD switches its domain direction at ``t = 200`` of a 1000-step training schedule."""


def _per_sample(x: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, ...] on ``like``'s device, broadcastable against ``like`` [B, ...]."""
    return x.to(like.device).reshape(-1, *([1] * (like.dim() - 1)))


def threshold_for_schedule(num_train_timesteps: int, threshold_1000: int = NFSD_THRESHOLD) -> int:
    """The NFSD switch time on a schedule of ``num_train_timesteps`` steps (200 when T = 1000)."""
    return int(round(threshold_1000 * num_train_timesteps / 1000))


def weight_from_timesteps(alphas_cumprod: Tensor, t: Tensor, kind: Literal["sds", "uniform"] = "sds") -> Tensor:
    """w(t) [B] from ``alphas_cumprod`` [T] and integer ``t`` [B].

    ``"sds"``: ``1 - ab_t`` (DreamFusion / threestudio); ``"uniform"``: 1.
    """
    if kind == "sds":
        return 1.0 - alphas_cumprod[t.to(alphas_cumprod.device)].float()
    if kind == "uniform":
        return alphas_cumprod.new_ones(t.shape).float()
    raise ValueError(f"unknown weighting {kind!r}")


def nfsd_negative_mask(t: Tensor, threshold: int) -> Tensor:
    """bool [B]: the samples whose NFSD domain direction needs ``e(neg)`` (``t >= threshold``)."""
    return t >= threshold


def nfsd_grad(
    eps_cond: Tensor, eps_uncond: Tensor, eps_neg: Tensor, t: Tensor, weight: Tensor, scale: float, threshold: int
) -> Tensor:
    """Noise-Free Score Distillation: ``w(t) * (dD + s * dC)``.

    ``dC = e(y) - e(0)``; ``dD = e(0)`` where ``t < threshold``, else ``e(0) - e(neg)``. Rows of
    ``eps_neg`` where ``t < threshold`` are never read (they may hold anything, even NaN).
    There is no ``- eps`` term: that is the point of the method.
    """
    delta_c = eps_cond - eps_uncond
    low_t = _per_sample(t < threshold, eps_uncond)
    delta_d = eps_uncond.where(low_t, eps_uncond - eps_neg)
    return _per_sample(weight, delta_c).to(delta_c.dtype) * (delta_d + scale * delta_c)


def sds_grad(eps_cond: Tensor, eps_uncond: Tensor, noise: Tensor, weight: Tensor, scale: float) -> Tensor:
    """Score Distillation Sampling with standard CFG: ``w(t) * (e(0) + s * (e(y) - e(0)) - eps)``.

    (threestudio's ``e(y) + s * (e(y) - e(0))`` is this with scale ``s + 1``.)
    """
    eps_cfg = eps_uncond + scale * (eps_cond - eps_uncond)
    return _per_sample(weight, noise).to(noise.dtype) * (eps_cfg - noise)


def vsd_grad(eps_cond: Tensor, eps_uncond: Tensor, eps_estimate: Tensor, weight: Tensor, scale: float) -> Tensor:
    """Variational Score Distillation (ProlificDreamer): ``w(t) * (e(0) + s * (e(y) - e(0)) - e_lora)``.

    ``e_lora`` is the LoRA model's prediction for the same ``z_t`` (the score of the distribution of
    renders, learnt during the run); it takes the place of SDS's ``eps``. CFG as in diffusers and SDS
    (threestudio's VSD uses the same convention: no ``+ 1`` on its scale).
    """
    eps_cfg = eps_uncond + scale * (eps_cond - eps_uncond)
    return _per_sample(weight, eps_estimate).to(eps_estimate.dtype) * (eps_cfg - eps_estimate)


@dataclass
class Predictions:
    """Everything a rule may read at one step; tensors [B, C, H, W] unless noted."""

    cond: Tensor
    """e(y): the prompt (one per view)."""
    uncond: Tensor
    """e(0): the unconditional prompt of the rule (empty, or the negative prompt for SDS and VSD)."""
    negative: Tensor | None
    """e(neg) where :attr:`Rule.negative_mask` is set, zeros elsewhere; None if the rule has no such branch."""
    noise: Tensor
    """The noise added to make ``z_t``."""
    t: Tensor
    """[B] integer timesteps."""
    weight: Tensor
    """[B] w(t)."""
    scale: float
    """Guidance scale s."""
    threshold: int
    """NFSD switch time on this prior's schedule."""
    estimate: Tensor | None = None
    """The rule state's own prediction for ``z_t`` (VSD: the LoRA model's ``e_lora(z_t; y, c)``); None
    for rules without state."""


class RuleState(Protocol):
    """What a rule that learns during the run keeps between steps (VSD: LoRA adapters on the prior's
    UNet, a camera embedding, their optimiser). :class:`~nfsd_nerf.guidance.distill.ScoreDistillation`
    calls the first two hooks each step; the trainer checkpoints the state with the last two, so a
    resumed run continues it exactly."""

    def predict(self, z_t: Tensor, t: Tensor, prompts: list[str], cameras: "Cameras | None") -> Tensor:
        """The state's noise prediction [B, C, h, w] float32 for z_t [B, C, h, w], t [B]; no graph."""

    def train(self, z: Tensor, prompts: list[str], cameras: "Cameras | None",
              generator: "torch.Generator") -> dict[str, Tensor]:
        """One optimisation step on the detached latents z [B, C, h, w] (draws from ``generator``);
        returns named 0-dim losses for the metrics."""

    def state_dict(self) -> dict[str, Tensor]:
        """Every tensor needed to continue bitwise (weights, optimiser state), CPU-movable, by name."""

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict`'s tensors; a missing or unexpected name is a UserError."""


@dataclass(frozen=True)
class Rule:
    """How one score-distillation rule uses the shared machinery."""

    grad: Callable[[Predictions], Tensor]
    """Predictions -> gradient on the latent [B, C, H, W]."""
    default_scale: float
    """Guidance scale when the user sets none."""
    default_negative_prompt: str
    """Negative prompt when the user sets none."""
    negative_replaces_uncond: bool
    """True: a user's negative prompt is the unconditional branch (CFG as in Stable Diffusion)."""
    negative_mask: Callable[[Tensor, int], Tensor] | None
    """(t [B], threshold) -> bool [B]: samples that need a separate negative-prompt prediction."""
    description: str = ""
    """One line for the command line's help."""
    state: Callable[["DiffusionPrior", "GuidanceConfig"], RuleState] | None = None
    """Builds the rule's :class:`RuleState` for a prior and settings; None for pure rules (NFSD, SDS)."""
    needs_unet: bool = False
    """True: the state trains on the prior's UNet, which only Stable Diffusion has (refused with the
    built-in prior before anything loads)."""


def vsd_state(prior: "DiffusionPrior", cfg: "GuidanceConfig") -> RuleState:
    """VSD's LoRA model on ``prior``'s UNet (:class:`.vsd.VSDState`, imported only when a run uses it)."""
    from .vsd import VSDState

    return VSDState(prior, cfg)


RULES: dict[str, Rule] = {
    "nfsd": Rule(
        grad=lambda p: nfsd_grad(p.cond, p.uncond, p.negative, p.t, p.weight, p.scale, p.threshold),
        default_scale=7.5,
        default_negative_prompt=PAPER_NEGATIVE_PROMPT,
        negative_replaces_uncond=False,
        negative_mask=nfsd_negative_mask,
        description="Noise-Free Score Distillation (the paper's rule)",
    ),
    "sds": Rule(
        grad=lambda p: sds_grad(p.cond, p.uncond, p.noise, p.weight, p.scale),
        default_scale=100.0,
        default_negative_prompt="",
        negative_replaces_uncond=True,
        negative_mask=None,
        description="Score Distillation Sampling (DreamFusion's baseline)",
    ),
    "vsd": Rule(
        grad=lambda p: vsd_grad(p.cond, p.uncond, p.estimate, p.weight, p.scale),
        default_scale=7.5,
        default_negative_prompt="",
        negative_replaces_uncond=True,
        negative_mask=None,
        description="Variational Score Distillation (ProlificDreamer's LoRA model; Stable Diffusion only)",
        state=vsd_state,
        needs_unet=True,
    ),
}
"""Rule name -> rule. ``GuidanceConfig.method`` names one of these."""


def rules_help() -> str:
    """``"nfsd: ... (scale 7.5); sds: ... (scale 100)"`` for the command line."""
    return "; ".join(f"{name}: {rule.description} (scale {rule.default_scale:g})" for name, rule in RULES.items())
