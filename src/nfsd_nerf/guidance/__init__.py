"""Guidance: diffusion priors, score-distillation rules, view-dependent prompts, the 2D experiment.

In the order of the data flow: a prior (:mod:`.prior`: :mod:`.stable_diffusion` or :mod:`.builtin`)
predicts noise; a rule (:mod:`.rules`, the ``RULES`` table) turns predictions into a gradient;
:mod:`.distill` (``ScoreDistillation``) does the shared sampling, batching and surrogate loss.

``load_prior`` is the one entry point for priors. Importing this package loads neither torch nor
the heavy libraries (diffusers, transformers, huggingface_hub): they load when a prior is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .prior import DiffusionPrior

def load_prior(
    model: str,
    *,
    revision: str | None = None,
    device: "torch.device | str" = "cpu",
    half_precision: bool = True,
    offline: bool = False,
    image_size: int = 64,
) -> "DiffusionPrior":
    """``"builtin"`` -> the offline built-in prior at ``image_size``; anything else -> Stable Diffusion.

    For Stable Diffusion ``model`` is a hub id or a local diffusers folder, found without waiting on
    the network (see :mod:`.hub`); its resolution comes from its own config, so ``image_size`` is
    unused. Failures raise :class:`~nfsd_nerf.errors.UserError`.
    """
    from ..config import BUILTIN_MODEL

    if model == BUILTIN_MODEL:
        from .builtin import BuiltinPrior

        return BuiltinPrior(device=device, image_size=image_size)
    from .stable_diffusion import load_stable_diffusion

    return load_stable_diffusion(model, revision=revision, device=device, half_precision=half_precision,
                                 offline=offline)
