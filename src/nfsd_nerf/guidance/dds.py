"""Delta Denoising Score (DDS, Hertz et al. 2023): text-driven editing of one image in the 2D command.

DDS optimises a latent ``z``, initialised from a source image's latent ``zs``, with the SDS gradient of
``z`` for the edit prompt ``y`` minus the SDS gradient of the fixed ``zs`` for the source prompt ``ys``,
both at the same ``t`` and with the same noise ``eps``. With CFG ``e_s(x; y) = e(x; 0) + s (e(x; y) - e(x; 0))``
the two ``- eps`` terms cancel:

    g = w(t) (e_s(z_t; y) - e_s(zs_t; ys))
      = w(t) ((e(z_t; 0) - e(zs_t; 0)) + s (dC - dCs)),   dC = e(z_t; y) - e(z_t; 0), dCs = e(zs_t; ys) - e(zs_t; 0)

In NFSD's terms ``e(x; 0) = dD(x) + dN(x)``: under shared noise the two ``dN`` agree while both latents are
in-domain, so the first bracket is the difference of their domain terms, small while the edit stays
in-domain, and DDS is then close to ``w s (dC - dCs)``, NFSD's condition term measured against the
source's. That bracket is kept here: it is what DDS computes, and it is what pulls ``z`` back into the
domain when an edit drifts out of it.

**Why a table of its own and not an entry of** :data:`~nfsd_nerf.guidance.rules.RULES`: a rule there is a
function of the ``Predictions`` of ONE latent (the render of the current NeRF). DDS needs a second, fixed
latent and its prompt, noised with the same ``t`` and noise, which the 3D training loop does not have. The
2D command (``nfsd-nerf image``) owns it instead: ``--guidance`` there accepts the names of
:data:`RULES` and of :data:`EDIT_RULES`; an edit rule needs ``--edit SOURCE.png --source-prompt``.

Like :mod:`.rules`, this module does not import torch (the functions call tensor methods only), so the
command line reads the table for its help text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .rules import _per_sample

if TYPE_CHECKING:
    from torch import Tensor

DDS_DEFAULT_SCALE = 7.5
"""CFG scale of DDS: 7.5, the ``guidance_scale`` default of the DDS authors' zero-shot editing notebook
(google/prompt-to-prompt, ``DDS_zeroshot.ipynb``, as carried over by implementations derived from it)."""


def dds_grad(
    eps_cond: Tensor, eps_uncond: Tensor, eps_source_cond: Tensor, eps_source_uncond: Tensor, weight: Tensor,
    scale: float,
) -> Tensor:
    """Delta Denoising Score: ``w(t) * ((e(z_t; 0) - e(zs_t; 0)) + s * (dC - dCs))``, [B, C, H, W].

    ``eps_cond`` = e(z_t; y), ``eps_uncond`` = e(z_t; 0) for the edited latent; ``eps_source_cond`` =
    e(zs_t; ys), ``eps_source_uncond`` = e(zs_t; 0) for the source, all [B, C, H, W]; ``weight`` [B].
    Equal to ``w * (e_s(z_t; y) - e_s(zs_t; ys))`` with CFG at scale ``s``: no ``- eps`` term survives.
    """
    delta_c = (eps_cond - eps_uncond) - (eps_source_cond - eps_source_uncond)
    return _per_sample(weight, delta_c).to(delta_c.dtype) * ((eps_uncond - eps_source_uncond) + scale * delta_c)


@dataclass
class EditPredictions:
    """Everything an edit rule may read at one step; tensors [B, C, H, W] unless noted."""

    cond: Tensor
    """e(z_t; y): the edited latent with the edit prompt."""
    uncond: Tensor
    """e(z_t; 0): the edited latent, empty prompt."""
    source_cond: Tensor
    """e(zs_t; ys): the source latent (same t, same noise) with the source prompt."""
    source_uncond: Tensor
    """e(zs_t; 0): the source latent, empty prompt."""
    noise: Tensor
    """The noise added to both latents."""
    t: Tensor
    """[B] integer timesteps."""
    weight: Tensor
    """[B] w(t)."""
    scale: float
    """Guidance scale s."""


@dataclass(frozen=True)
class EditRule:
    """A 2D editing rule: a gradient from the predictions of the edited and the source latent."""

    grad: Callable[[EditPredictions], Tensor]
    """EditPredictions -> gradient on the edited latent [B, C, H, W]."""
    default_scale: float
    """Guidance scale when the user sets none."""
    description: str = ""
    """One line for the command line's help."""


EDIT_RULES: dict[str, EditRule] = {
    "dds": EditRule(
        grad=lambda p: dds_grad(p.cond, p.uncond, p.source_cond, p.source_uncond, p.weight, p.scale),
        default_scale=DDS_DEFAULT_SCALE,
        description="Delta Denoising Score, edits --edit from --source-prompt to the prompt (image only)",
    ),
}
"""Edit rule name -> rule; ``nfsd-nerf image --guidance`` accepts these besides the keys of ``RULES``."""


def edit_rules_help() -> str:
    """``"dds: ... (scale 7.5)"`` for the command line."""
    return "; ".join(f"{name}: {rule.description} (scale {rule.default_scale:g})" for name, rule in EDIT_RULES.items())
