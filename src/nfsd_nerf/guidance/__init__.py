"""Guidance: diffusion priors, score-distillation rules, view-dependent prompts, the 2D experiment.

``load_prior`` is the one entry point for priors; heavy libraries (diffusers, transformers,
huggingface_hub) load only when a Stable Diffusion model is actually requested.
"""

from __future__ import annotations

import torch

from .distill import ScoreDistillation
from .prior import DiffusionPrior
from .prompts import view_dependent_prompts
from .rules import PAPER_NEGATIVE_PROMPT, RULES

__all__ = [
    "DiffusionPrior",
    "PAPER_NEGATIVE_PROMPT",
    "RULES",
    "ScoreDistillation",
    "load_prior",
    "view_dependent_prompts",
]

BUILTIN = "builtin"


def load_prior(
    model: str,
    *,
    revision: str | None = None,
    device: torch.device | str = "cpu",
    half_precision: bool = True,
    offline: bool = False,
    image_size: int = 64,
) -> DiffusionPrior:
    """``"builtin"`` -> the offline built-in prior at ``image_size``; anything else -> Stable Diffusion.

    For Stable Diffusion ``model`` is a hub id or a local diffusers folder, found without waiting on
    the network (see :mod:`.stable_diffusion`); its resolution comes from its own config, so
    ``image_size`` is unused. Failures raise :class:`~nfsd_nerf.errors.UserError`.
    """
    if model == BUILTIN:
        from .builtin import BuiltinPrior

        return BuiltinPrior(device=device, image_size=image_size)
    from .stable_diffusion import load_stable_diffusion

    return load_stable_diffusion(model, revision=revision, device=device, half_precision=half_precision,
                                 offline=offline)
