"""Variational Score Distillation's state: a LoRA model of the NeRF's renders (docs/design.md, section 2).

VSD (ProlificDreamer) replaces SDS's added noise by ``e_lora(z_t; y, c)``, the noise prediction of a
model of the distribution the renders come from, learnt during the run (:func:`.rules.vsd_grad`).
That model is the prior's own UNet with LoRA adapters on its attention projections and a camera
embedding (the camera-to-world matrix, 16 values, through diffusers' ``TimestepEmbedding``) as its
class embedding; the pretrained side runs with both off. Each step it takes one AdamW step of the
diffusion loss on the step's detached latents. Defaults are threestudio's
``stable-diffusion-vsd-guidance`` with ``prolificdreamer.yaml`` (one model for both sides): rank 4,
lr 1e-4, t uniform over [0, T), camera condition zeroed 10% of the time, CFG 1 on the LoRA side
(its conditional row alone) with the view-independent prompt.

diffusers and peft are imported inside functions (:mod:`.rules` names this module's factory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .prior import noised_from_clean

if TYPE_CHECKING:
    from ..cameras import Cameras
    from ..config import GuidanceConfig
    from .prior import DiffusionPrior

CAMERA_DROPOUT = 0.1
"""Probability that a training step's camera condition is zeroed (threestudio's ``lora_cfg_training``):
the LoRA model also learns the camera-free score. One draw per step, for the whole batch."""
ADAMW = {"betas": (0.9, 0.99), "eps": 1e-15, "weight_decay": 0.01}
"""threestudio's optimiser for its guidance parameters: AdamW with prolificdreamer.yaml's betas and
eps, and torch's default weight decay."""
INIT_SEED = 0
"""LoRA's A matrices and the camera embedding start from this seed, leaving the run's RNG untouched
(B = 0, so the LoRA model starts as the pretrained UNet plus the camera term)."""
CAMERA_VALUES = 16
"""The camera condition: a camera-to-world matrix, row-major."""


def camera_condition(cameras: "Cameras | None", batch: int, drop: bool = False) -> Tensor:
    """[B, 16] float32 on the cameras' device: each view's ``c2w`` [4, 4] row-major; zeros when
    ``drop`` or without cameras (the 2D experiment's callers may pass none)."""
    if cameras is None:
        return torch.zeros(batch, CAMERA_VALUES)
    condition = cameras.c2w.reshape(batch, CAMERA_VALUES).float()
    return torch.zeros_like(condition) if drop else condition


def diffusion_target(prediction_type: str, z0: Tensor, noise: Tensor, alphas_cumprod_t: Tensor) -> Tensor:
    """What the UNet learns to output for ``z_t = sqrt(ab) z0 + sqrt(1 - ab) noise``: ``noise``
    (epsilon), ``sqrt(ab) noise - sqrt(1 - ab) z0`` (v_prediction) or ``z0`` (sample).

    ``z0``, ``noise`` [B, C, h, w]; ``alphas_cumprod_t`` [B].
    """
    if prediction_type == "epsilon":
        return noise
    ab = alphas_cumprod_t.reshape(-1, *([1] * (z0.dim() - 1))).to(z0)
    if prediction_type == "v_prediction":
        return ab.sqrt() * noise - (1.0 - ab).sqrt() * z0
    if prediction_type == "sample":
        return z0
    raise ValueError(f"unknown prediction type {prediction_type!r}")


class VSDState:
    """The LoRA model, its camera embedding and their AdamW (a :class:`.rules.RuleState`).

    One per prior at a time: building one replaces the adapters of an earlier one on the same UNet
    (a batch worker reuses its prior across runs), and the earlier one then refuses to run.
    """

    def __init__(self, prior: "DiffusionPrior", cfg: "GuidanceConfig"):
        from diffusers.models.embeddings import TimestepEmbedding

        unet = getattr(prior, "unet", None)
        if unet is None or not hasattr(prior, "add_lora"):
            raise UserError(f"--guidance {cfg.method} trains LoRA adapters on a Stable Diffusion UNet; "
                            f"{prior.model_id} has none: use a Stable Diffusion model (--model)")
        if unet.class_embedding is not None:
            raise UserError(f"--guidance {cfg.method}: model {prior.model_id!r} already has a class embedding, "
                            "where VSD puts its camera condition; use a text-to-image Stable Diffusion model")
        self.prior = prior
        with torch.random.fork_rng(devices=[prior.device] if prior.device.type == "cuda" else []):
            torch.manual_seed(INIT_SEED)
            self.lora = prior.add_lora(cfg.lora_rank)  # {name: parameter}, in a fixed order
            self.camera_embedding = TimestepEmbedding(CAMERA_VALUES, unet.time_embedding.linear_2.out_features)
        self.camera_embedding.to(prior.device)
        self.parameters = [*self.lora.values(), *self.camera_embedding.parameters()]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=cfg.lora_lr, **ADAMW)
        self._owner = object()
        unet._nfsd_lora_owner = self._owner

    def _lora(self):
        """The prior's UNet with this state's adapters and camera embedding on (a context manager)."""
        if getattr(self.prior.unet, "_nfsd_lora_owner", None) is not self._owner:
            raise RuntimeError("a newer VSD state replaced this one's adapters on the same prior")
        return self.prior.lora(self.camera_embedding)

    # ---- RuleState

    def predict(self, z_t: Tensor, t: Tensor, prompts: list[str], cameras: "Cameras | None") -> Tensor:
        """``e_lora(z_t; y, c)`` [B, C, h, w] float32 for z_t [B, C, h, w], t [B], the view-independent
        prompts and the views' cameras; no graph."""
        prior = self.prior
        condition = camera_condition(cameras, z_t.shape[0])
        with torch.no_grad(), self._lora():
            out = prior.model_output(z_t, t, prior.embed(prompts), condition)
        return prior.eps_from_output(out, z_t, t)

    def train(self, z: Tensor, prompts: list[str], cameras: "Cameras | None",
              generator: torch.Generator) -> dict[str, Tensor]:
        """One AdamW step of ``mse(unet_lora(z_t; y, c), target)`` on the detached latents z [B, C, h, w].

        Draws, in order, from ``generator``: t [B] uniform over [0, T), the noise, whether the camera
        condition is zeroed. A non-finite loss or gradient skips the update (one synchronisation).
        Returns ``{"lora": loss}`` (0-dim).
        """
        prior, batch = self.prior, z.shape[0]
        t = torch.randint(0, prior.num_train_timesteps, (batch,), generator=generator, device=generator.device)
        noise = torch.randn(z.shape, generator=generator, device=generator.device)
        drop = float(torch.rand((), generator=generator, device=generator.device)) < CAMERA_DROPOUT
        z0, t, noise = z.detach().float(), t.to(z.device), noise.to(z.device, torch.float32)
        ab = prior.alphas_cumprod[t].float()
        z_t = noised_from_clean(z0, noise, ab)
        target = diffusion_target(prior.prediction_type, z0, noise, ab)
        condition = camera_condition(cameras, batch, drop)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad(), self._lora():
            loss = F.mse_loss(prior.model_output(z_t, t, prior.embed(prompts), condition), target)
            loss.backward()
        grads = [p.grad for p in self.parameters if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if bool(torch.isfinite(loss) & torch.isfinite(norm)):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"lora": loss.detach()}

    def state_dict(self) -> dict[str, Tensor]:
        """``lora.<name>``, ``camera_embedding.<name>`` and ``optimizer.<index>.<name>`` (AdamW's
        ``step``, ``exp_avg``, ``exp_avg_sq`` per parameter index), detached."""
        tensors = {f"lora.{name}": p.detach() for name, p in self.lora.items()}
        tensors.update({f"camera_embedding.{k}": v.detach() for k, v in self.camera_embedding.state_dict().items()})
        for index, per_param in self.optimizer.state_dict()["state"].items():
            tensors.update({f"optimizer.{index}.{k}": torch.as_tensor(v).detach() for k, v in per_param.items()})
        return tensors

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict`'s tensors (any device); anything else is one UserError, so a damaged
        or foreign checkpoint never reaches a traceback."""
        weights = {f"lora.{name}": p for name, p in self.lora.items()}
        weights.update({f"camera_embedding.{k}": v for k, v in self.camera_embedding.state_dict().items()})
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
        for index, p in enumerate(self.parameters):
            shapes.update({f"optimizer.{index}.step": (), f"optimizer.{index}.exp_avg": tuple(p.shape),
                           f"optimizer.{index}.exp_avg_sq": tuple(p.shape)})
        wrong = [k for k, v in tensors.items() if shapes.get(k) != tuple(v.shape)]
        missing = weights.keys() - tensors.keys()
        if wrong or missing:
            raise UserError(f"the saved VSD state does not match this model and settings (lora_rank?): "
                            f"{len(missing)} tensors missing, {len(wrong)} unexpected or of another shape, "
                            f"e.g. {(sorted(missing) + sorted(wrong))[0]!r}")
        with torch.no_grad():
            for key, target in weights.items():
                target.copy_(tensors[key])
        state: dict[int, dict[str, Tensor]] = {}
        for key in tensors.keys() - weights.keys():
            index, name = key[len("optimizer."):].split(".", 1)
            state.setdefault(int(index), {})[name] = tensors[key]
        if any(len(per_param) != 3 for per_param in state.values()):
            raise UserError("the saved VSD state has an incomplete optimiser state (AdamW's step, exp_avg, exp_avg_sq)")
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})
