"""The interface every diffusion prior implements, and the maths priors share.

A prior maps rendered images to its own space (``encode``), predicts the noise in a noised sample
(``predict_noise``) and exposes its training schedule (``alphas_cumprod``). Guidance rules and the
training loop see nothing else, so Stable Diffusion and the built-in offline prior are
interchangeable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Sequence

from torch import Tensor

if TYPE_CHECKING:
    from ..cameras import Cameras
    from .loss_scale import GradientScaler


class DiffusionPrior(ABC):
    """A pretrained denoiser ``e(z_t, t, y)`` with a variance-preserving schedule.

    ``z_t = sqrt(ab_t) * z + sqrt(1 - ab_t) * eps`` with ``ab = alphas_cumprod``.
    """

    alphas_cumprod: Tensor
    """[T] float32 on the prior's device (T = 1000 for Stable Diffusion)."""
    model_id: str
    """What was loaded: a hub id, a local folder or "builtin"."""
    revision: str | None
    """Commit hash (or the requested revision when no hash is known); None for local folders."""
    grad_scaler: "GradientScaler | None" = None
    """Loss scaling of :meth:`encode`'s backward, for priors that encode in half precision."""
    conditions_on_camera: bool = False
    """True for priors that condition on the camera itself rather than on view prompts (the
    built-in prior): view-prompt techniques such as Perp-Neg do not apply to them."""

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @abstractmethod
    def encode(self, rgb: Tensor) -> Tensor:
        """rgb [B, 3, H, W] in [0, 1], any size -> z [B, C, h, w] float32; differentiable."""

    @abstractmethod
    def decode(self, z: Tensor) -> Tensor:
        """z [B, C, h, w] -> rgb [B, 3, H, W] float32 in [0, 1]."""

    @abstractmethod
    def embed(self, prompts: Sequence[str]) -> Tensor:
        """N prompts -> embeddings [N, ...] the prior's ``predict_noise`` takes; cached per prompt."""

    @abstractmethod
    def predict_noise(self, z_t: Tensor, t: Tensor, embeddings: Tensor, cameras: "Cameras | None" = None) -> Tensor:
        """Noise prediction eps [N, C, h, w] float32 for ``z_t`` [N, C, h, w], integer ``t`` [N].

        ``embeddings`` [N, ...] come from :meth:`embed`; ``cameras`` (N of them) are the views the
        rows were rendered from, used by camera-aware priors and ignored by Stable Diffusion.
        """


def eps_from_v_prediction(v: Tensor, z_t: Tensor, alphas_cumprod_t: Tensor) -> Tensor:
    """Epsilon from a v-prediction: ``eps = sqrt(ab_t) * v + sqrt(1 - ab_t) * z_t``.

    With ``v = sqrt(ab) * eps - sqrt(1 - ab) * z`` and ``z_t = sqrt(ab) * z + sqrt(1 - ab) * eps``.
    ``v``, ``z_t`` [N, C, h, w]; ``alphas_cumprod_t`` [N].
    """
    ab = alphas_cumprod_t.reshape(-1, *([1] * (v.dim() - 1))).to(v)
    return ab.sqrt() * v + (1.0 - ab).sqrt() * z_t


def eps_from_sample_prediction(z0: Tensor, z_t: Tensor, alphas_cumprod_t: Tensor) -> Tensor:
    """Epsilon from a clean-sample prediction: ``eps = (z_t - sqrt(ab_t) * z0) / sqrt(1 - ab_t)``."""
    ab = alphas_cumprod_t.reshape(-1, *([1] * (z0.dim() - 1))).to(z0)
    return (z_t - ab.sqrt() * z0) / (1.0 - ab).sqrt()


def noised_from_clean(z0: Tensor, noise: Tensor, alphas_cumprod_t: Tensor) -> Tensor:
    """The forward process ``z_t = sqrt(ab_t) * z0 + sqrt(1 - ab_t) * noise``: z0, noise [N, C, h, w]
    float32, ``alphas_cumprod_t`` [N] (one ``ab_t`` per sample)."""
    ab = alphas_cumprod_t.float().reshape(-1, *([1] * (z0.dim() - 1)))
    return ab.sqrt() * z0 + (1.0 - ab).sqrt() * noise
