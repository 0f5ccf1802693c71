"""Score distillation: turn a prior's noise predictions into a loss on rendered images.

Everything but the rule itself is shared (docs/design.md, sections 1.1 and 2): sample ``t`` and the noise,
noise the latents, ask the prior for every prediction the rule needs in ONE batched call without
an autograd graph, apply the rule (:mod:`.rules`), and hand the gradient to autograd through the
surrogate ``0.5 * ||z - stopgrad(z - grad)||^2 / B``, whose derivative in ``z`` is ``grad / B``. A rule
with state (VSD) adds its own prediction before the rule and its own training step after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import UserError
from ..profiling import stage
from .perp_neg import perp_neg_direction, perp_neg_weights
from .prior import DiffusionPrior, noised_from_clean
from .prompts import view_texts
from .rules import RULES, Predictions, threshold_for_schedule, weight_from_timesteps

if TYPE_CHECKING:
    from ..cameras import Cameras
    from ..config import GuidanceConfig, PromptsConfig


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, t_min: float, t_max: float, generator: torch.Generator
) -> Tensor:
    """Integer t [B] uniform in ``[round(t_min * T), round(t_max * T)]`` (clamped to ``T - 1``), on the generator's device."""
    low = int(round(t_min * num_train_timesteps))
    high = min(int(round(t_max * num_train_timesteps)), num_train_timesteps - 1)
    low = min(low, high)
    return torch.randint(low, high + 1, (batch_size,), generator=generator, device=generator.device)


def annealed_t_max(t_min: float, t_max: float, t_max_end: float | None, progress: float) -> float:
    """``t_max`` moved linearly towards ``t_max_end`` as ``progress`` goes 0 -> 1 (never below ``t_min``)."""
    if t_max_end is None:
        return t_max
    progress = min(max(progress, 0.0), 1.0)
    return max(t_min, t_max + (t_max_end - t_max) * progress)


def stepped_t_max(t_max: float, t_min: float, t_max_after: float | None, after_step: int, step: int | None) -> float:
    """``t_max_after`` (never below ``t_min``) once ``step > after_step``, else ``t_max`` (threestudio's
    VSD anneal: ``max_step_percent_annealed`` after ``anneal_start_step``); no step, no change."""
    if t_max_after is None or step is None or step <= after_step:
        return t_max
    return max(t_min, t_max_after)


def draw_timesteps_and_noise(z: Tensor, num_train_timesteps: int, t_min: float, t_max: float,
                             generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One step's draws from the caller's generator, in a fixed order (t, then the noise): integer
    t [B] on the CPU and noise float32 shaped like z [B, ...] on z's device."""
    t = sample_timesteps(z.shape[0], num_train_timesteps, t_min, t_max, generator).cpu()
    noise = torch.randn(z.shape, generator=generator, device=generator.device).to(z.device, torch.float32)
    return t, noise


def surrogate_loss(z: Tensor, grad: Tensor) -> Tensor:
    """Scalar ``0.5 * ||z - stopgrad(z - grad)||^2 / B``: its gradient in ``z`` [B, ...] is ``grad / B``."""
    target = (z - grad).detach()
    return 0.5 * (z - target).pow(2).sum() / z.shape[0]


class ScoreDistillation:
    """Shared by every rule in :data:`~nfsd_nerf.guidance.rules.RULES`: built from a ``guidance``
    config section, with the rule's default scale and negative prompt where the section sets none."""

    def __init__(self, prior: DiffusionPrior, cfg: "GuidanceConfig", prompts: "PromptsConfig | None" = None,
                 prompt: str | None = None):
        """``prompts`` and ``prompt`` (the run's ``prompts`` section and text prompt) are needed for
        Perp-Neg: its rows use every view's prompt; a rule's state (VSD) gets ``prompt`` without view
        suffixes, or the given prompts where it is None. Builds the rule's state, if it has one."""
        from ..config import check_guidance, with_rule_defaults

        check_guidance(cfg)
        self.cfg = with_rule_defaults(cfg)
        self.prior = prior
        self.rule = RULES[cfg.method]
        self.prompt = prompt
        self.state = self.rule.state(prior, self.cfg) if self.rule.state is not None else None
        self.scale: float = self.cfg.scale
        self.negative_prompt: str = self.cfg.negative_prompt
        self.uncond_prompt = self.negative_prompt if self.rule.negative_replaces_uncond else ""
        self.threshold = threshold_for_schedule(prior.num_train_timesteps)
        self.perp_neg = None
        if cfg.perp_neg:
            if prompts is None or prompt is None:
                raise UserError("--perp-neg needs view-dependent prompts from 3D cameras (nfsd-nerf train)")
            if prior.conditions_on_camera:
                raise UserError(f"--perp-neg needs a prior conditioned on view prompts; {prior.model_id} "
                                "conditions on the camera itself")
            self.perp_neg = (prompts, list(view_texts(prompt, prompts).values()))

    def loss(
        self,
        rgb: Tensor,
        prompts: list[str],
        cameras: "Cameras | None",
        progress: float,
        generator: torch.Generator,
        step: int | None = None,
    ) -> tuple[Tensor, dict]:
        """rgb [B, 3, H, W] in [0, 1], one prompt and camera per view -> (scalar loss, info).

        ``progress`` in [0, 1] anneals ``t_max``, ``step`` (training steps done) drops it after
        ``t_max_after_step``; every random draw comes from ``generator``.
        info: ``t`` (list of B ints), ``grad_norm`` (0-dim tensor on the latents' device, L2 norm of
        the whole gradient; left on the device so the caller decides when to synchronise), and for
        rules with state ``state_losses`` ({name: 0-dim tensor}, e.g. VSD's ``lora``).
        """
        with stage("encode"):
            z = self.prior.encode(rgb)
        return self.loss_from_latents(z, prompts, cameras, progress, generator, step)

    def loss_from_latents(
        self,
        z: Tensor,
        prompts: list[str],
        cameras: "Cameras | None",
        progress: float,
        generator: torch.Generator,
        step: int | None = None,
    ) -> tuple[Tensor, dict]:
        """Like :meth:`loss` for latents z [B, C, h, w] already in the prior's space (the 2D experiment)."""
        prior, batch = self.prior, z.shape[0]
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for a batch of {batch}")

        # 1. Timesteps and noise, drawn from the caller's generator, then moved to the latents.
        g = self.cfg
        t_max = annealed_t_max(g.t_min, g.t_max, g.t_max_end, progress)
        t_max = stepped_t_max(t_max, g.t_min, g.t_max_after, g.t_max_after_step, step)
        t_cpu, noise = draw_timesteps_and_noise(z, prior.num_train_timesteps, g.t_min, t_max, generator)
        t = t_cpu.to(z.device)

        with torch.no_grad():
            # 2. Noised latents.
            z_t = noised_from_clean(z.detach().float(), noise, prior.alphas_cumprod[t])

            # 3. One batched prediction: cond (B) + uncond (B) + negative rows only where needed;
            #    a rule's state adds its own (VSD: the LoRA model's, B rows).
            with stage("noise_prediction"):
                cond, uncond, negative = self._predict(z_t, t, t_cpu, prompts, cameras)
                # The state's model sees the prompt without view suffixes (threestudio's VSD).
                state_prompts = prompts if self.prompt is None else [self.prompt] * batch
                estimate = None if self.state is None else self.state.predict(z_t, t, state_prompts, cameras)

        # 4. The rule.
        with stage("rule"), torch.no_grad():
            predictions = Predictions(
                cond=cond,
                uncond=uncond,
                negative=negative,
                noise=noise,
                t=t,
                weight=weight_from_timesteps(prior.alphas_cumprod, t, g.weighting),
                scale=self.scale,
                threshold=self.threshold,
                estimate=estimate,
            )
            grad = self.rule.grad(predictions)
            if g.grad_clip is not None:
                grad = grad.clamp(-g.grad_clip, g.grad_clip)
        info = {"t": t_cpu.tolist(), "grad_norm": grad.norm()}

        # 5. The rule's state learns from this step's latents (after its prediction was used).
        if self.state is not None:
            with stage("rule_state"):
                info["state_losses"] = self.state.train(z.detach(), state_prompts, cameras, generator)

        # 6. The surrogate loss carries ``grad`` back into whatever produced z.
        loss = surrogate_loss(z.float(), grad)
        return loss, info


    def _predict(self, z_t: Tensor, t: Tensor, t_cpu: Tensor, prompts: list[str], cameras: "Cameras | None"):
        """ONE prior call for every row the rule needs: z_t, t [B] -> (e(y), e(0), e(neg) or None), each [B, ...].

        Rows: ``B`` conditional, ``B`` unconditional, negative-prompt rows only for the samples the
        rule's ``negative_mask`` selects (``e(neg)`` is zero elsewhere: the rule never reads it), and
        with Perp-Neg the other views' rows whose weight is not zero. With Perp-Neg the conditional
        rows use the interpolated view embedding, and the returned ``e(y)`` is ``e(0) + d`` with ``d``
        the Perp-Neg direction, so every rule's ``e(y) - e(0)`` becomes ``d``.
        """
        prior, batch = self.prior, z_t.shape[0]
        mask = self.rule.negative_mask
        neg_index = (mask(t_cpu, self.threshold) if mask is not None else torch.zeros(batch, dtype=torch.bool)).nonzero().flatten()
        rows = [torch.arange(batch), torch.arange(batch), neg_index]
        embeddings = [prior.embed(prompts), _repeat(prior.embed([self.uncond_prompt]), batch)]
        if len(neg_index):
            embeddings.append(_repeat(prior.embed([self.negative_prompt]), len(neg_index)))
        if self.perp_neg is not None:
            views = self._perp_neg_rows(cameras, rows, embeddings)
        rows = torch.cat(rows)  # [2B + K (+ M)]
        rows_dev = rows.to(z_t.device)
        eps = prior.predict_noise(
            z_t[rows_dev], t[rows_dev], torch.cat(embeddings), None if cameras is None else cameras[rows.to(cameras.device)]
        ).float()
        cond, uncond = eps[:batch], eps[batch : 2 * batch]
        negative = None
        if mask is not None:
            negative = torch.zeros_like(z_t)
            negative[neg_index.to(z_t.device)] = eps[2 * batch : 2 * batch + len(neg_index)]
        if self.perp_neg is not None:
            cond = uncond + self._perp_neg_direction(eps[2 * batch + len(neg_index) :], cond, uncond, views)
        return cond, uncond, negative

    def _perp_neg_rows(self, cameras: "Cameras | None", rows: list[Tensor], embeddings: list[Tensor]):
        """Replace the conditional embeddings by the interpolated view embeddings and append the
        negative-view rows whose weight is not zero; returns the weights and where those rows are."""
        if cameras is None:
            raise ValueError("Perp-Neg needs the cameras of the views")
        settings, texts = self.perp_neg
        batch = len(rows[0])
        weights = perp_neg_weights(cameras.azimuth, cameras.elevation, settings)
        view_embeddings = self.prior.embed(texts)  # [4, ...]
        flat = view_embeddings.reshape(len(texts), -1)
        embeddings[0] = (weights.positive.to(flat) @ flat).reshape(batch, *view_embeddings.shape[1:])
        used = weights.negative != 0  # [B, 2]
        sample, slot = used.nonzero(as_tuple=True)
        rows.append(sample)
        embeddings.append(view_embeddings[weights.negative_views[sample, slot].to(view_embeddings.device)])
        return weights, sample, slot

    @staticmethod
    def _perp_neg_direction(eps_views: Tensor, cond: Tensor, uncond: Tensor, views) -> Tensor:
        """The Perp-Neg direction [B, ...] from the predictions of the negative-view rows."""
        weights, sample, slot = views
        e_neg = torch.zeros(cond.shape[0], 2, *cond.shape[1:], dtype=cond.dtype, device=cond.device)
        sample_dev, slot_dev = sample.to(cond.device), slot.to(cond.device)
        e_neg[sample_dev, slot_dev] = eps_views - uncond[sample_dev]
        return perp_neg_direction(cond - uncond, e_neg, weights.negative.to(cond.device))


def _repeat(embedding: Tensor, n: int) -> Tensor:
    """[1, ...] -> [n, ...] without copying."""
    return embedding.expand(n, *embedding.shape[1:])
