"""One run's state and one training step (:class:`Trainer`).

The step follows the data flow (docs/design.md, section 1): cameras -> rays -> render with a
shading mode -> guidance loss from the prior -> regularisers -> backward -> Adam -> occupancy
refresh. Every random draw comes from one CPU ``torch.Generator`` (plus the global RNG, both saved
in checkpoints), in a fixed order, so a resumed run is bit-identical on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..cameras import Cameras, generate_rays, sample_cameras_from_config
from ..checkpoint import Checkpoint, restore_optimizer, restore_rng, restore_scene, save_checkpoint
from ..config import Config
from ..errors import UserError
from ..guidance.prompts import view_dependent_prompts
from ..profiling import stage
from ..render import RenderOutput, Shading, render_rays, step_size_from_samples
from ..render.shading import camera_light_positions
from ..scene import Scene, build_scene
from .losses import regularizer_terms
from .schedules import active_levels, choose_shading, occupancy_refresh_due, orientation_weight, training_progress


@dataclass
class StepResult:
    """What one step reports (plain Python numbers, read from the device in one synchronisation)."""

    loss: float
    """The total loss."""
    terms: dict[str, float]
    """Named weighted terms of the total: ``guidance`` and the regularisers in use; also, reported
    only, the rule state's own training losses (VSD: ``lora``)."""
    t: list[int]
    """Diffusion timestep of each view."""
    grad_norm: float
    """L2 norm of the guidance gradient on the prior's latents."""
    param_grad_norm: float
    """L2 norm of the gradient on all trained parameters."""
    skipped: bool
    """True when the loss or the gradient was not finite and the update was skipped."""
    encoder_overflow: bool
    """True when the prior's loss-scaled encoder gradient overflowed (also ``skipped``; counted apart)."""
    shading: str
    """The shading mode of this step."""


@dataclass
class TrainingViews:
    """One step's random views: cameras, their rays and what they are rendered with."""

    cameras: Cameras
    rays_o: Tensor
    """[B * H * W, 3]"""
    rays_d: Tensor
    """[B * H * W, 3] unit"""
    lights: Tensor
    """[B * H * W, 3] point-light position per ray"""
    shading: Shading
    background_rgb: Tensor | None
    """[B * H * W, 3] a random solid background, or None for the scene's own."""


def build_optimizer(scene: Scene, cfg: Config) -> torch.optim.Adam:
    """Adam over the field (``optim.lr``) and the background MLP (``optim.background_lr``), if it has one."""
    groups = [{"params": list(scene.field.parameters()), "lr": cfg.optim.lr}]
    background_params = list(scene.background.parameters())
    if background_params:
        groups.append({"params": background_params, "lr": cfg.optim.background_lr})
    return torch.optim.Adam(groups, betas=cfg.optim.betas, eps=cfg.optim.eps)


def sample_views(step: int, cfg: Config, generator: torch.Generator, device: torch.device) -> TrainingViews:
    """Random cameras, a shading mode and (sometimes) a random background, in the fixed draw order."""
    b, size = cfg.render.batch_size, cfg.render.size
    cameras = sample_cameras_from_config(b, cfg.cameras, generator=generator, device=device)
    shading = choose_shading(step, cfg.render, generator)
    background_rgb = None
    p = cfg.background.random_solid_prob
    if p > 0 and float(torch.rand((), generator=generator)) < p:
        background_rgb = torch.rand(1, 3, generator=generator).to(device).expand(b * size * size, 3)
    rays_o, rays_d = generate_rays(cameras, size, size)
    camera_light = cfg.render.light == "camera"  # the built-in prior's references are lit so
    light_positions = camera_light_positions(cameras.c2w[:, :3, 3]) if camera_light else cameras.light_positions
    lights = light_positions[:, None, :].expand(b, size * size, 3).reshape(-1, 3)
    return TrainingViews(cameras, rays_o.reshape(-1, 3), rays_d.reshape(-1, 3), lights, shading, background_rgb)


def render_views(scene: Scene, views: TrainingViews, cfg: Config, need_normals: bool,
                 generator: torch.Generator) -> RenderOutput:
    """Render the views for training: stratified samples through the occupancy grid."""
    return render_rays(
        scene.field,
        scene.background,
        views.rays_o,
        views.rays_d,
        occupancy=scene.occupancy,
        n_samples=cfg.render.n_samples,
        shading=views.shading,
        light_positions=views.lights,
        ambient=cfg.render.ambient,
        need_normals=need_normals,
        stratified=True,
        background_rgb=views.background_rgb,
        generator=generator,
    )


def views_prompts(cfg: Config, cameras: Cameras) -> list[str]:
    """One prompt per view: the prompt with ", front view" etc., or the prompt as is."""
    if cfg.guidance.view_dependent_prompts:
        return view_dependent_prompts(cfg.prompt, cameras.azimuth, cameras.elevation, cfg.prompts)
    return [cfg.prompt] * len(cameras)


def _grad_norm(optimizer: torch.optim.Optimizer, like: Tensor) -> Tensor:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return like.new_zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class Trainer:
    """Owns the state of one run: scene, prior, optimizer, RNG and step counter."""

    def __init__(self, cfg: Config, run_dir: Path, device: torch.device, prior, distill):
        self.cfg, self.run_dir, self.device = cfg, Path(run_dir), device
        self.prior, self.distill = prior, distill
        torch.manual_seed(cfg.train.seed)  # before building: the field's initialisation draws from it
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.scene: Scene = build_scene(cfg, device)
        self.optimizer = build_optimizer(self.scene, cfg)
        self.step = 0
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.overflow_total = 0
        self.grad_scaler = getattr(prior, "grad_scaler", None)

    # ----- state

    def rng_state(self) -> dict[str, Tensor]:
        state = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from a checkpoint: scene, optimizer, every RNG and the counters."""
        restore_scene(self.scene, ckpt)
        restore_optimizer(self.optimizer, ckpt)
        restore_rng(ckpt, self.generator, self.device)
        rule_state = getattr(self.distill, "state", None)
        if rule_state is not None:
            saved = ckpt.section("rule")
            if not saved:
                raise UserError(f"checkpoint {ckpt.path} has no state for --guidance {self.cfg.guidance.method} "
                                "(no rule.* tensors)")
            rule_state.load_state_dict(saved)
        self.step = ckpt.step
        self.skipped_total = ckpt.skipped_steps
        self.overflow_total = ckpt.encoder_overflow_steps
        if self.grad_scaler is not None:
            self.grad_scaler.load_state(ckpt.loss_scale_state())

    def save(self, name: str) -> Path:
        """Write ``checkpoints/<name>`` atomically; returns its path."""
        return save_checkpoint(
            self.run_dir / "checkpoints" / name,
            config=self.cfg,
            scene=self.scene,
            step=self.step,
            optimizer=self.optimizer,
            rng=self.rng_state(),
            extra_meta={"skipped_steps": str(self.skipped_total), **self._scaler_meta()},
            extra_tensors=self._rule_state_tensors(),
        )

    def _rule_state_tensors(self) -> dict[str, Tensor]:
        """The rule's state (VSD's LoRA model and its optimiser) under ``rule.``; none for pure rules."""
        rule_state = getattr(self.distill, "state", None)
        return {} if rule_state is None else {f"rule.{k}": v for k, v in rule_state.state_dict().items()}

    def refresh_occupancy(self, step: int) -> None:
        """Re-read the occupancy grid from the field's density (before ``step``). A new run calls it once
        before step 0, as nerfacc's schedule does: the grid starts all occupied, and the first render
        through it would otherwise sample all of the box (the full-size check's peak memory came from
        that one step)."""
        step_size = step_size_from_samples(self.cfg.field.bound, self.cfg.render.n_samples)
        self.scene.occupancy.update(step, self.scene.field.density, step_size=step_size, generator=self.generator)

    # ----- one step

    def train_step(self) -> StepResult:
        """One optimisation step; a step whose loss or gradient is not finite changes nothing but
        the RNG and the skip counters (the loop stops after too many in a row)."""
        cfg, scene, gen, step = self.cfg, self.scene, self.generator, self.step
        scene.field.train()
        scene.field.encoding.active_levels = active_levels(step, cfg.train, cfg.field.n_levels)

        # 1. Random views and how they are shaded
        with stage("cameras"):
            views = sample_views(step, cfg, gen, self.device)

        # 2. Occupancy-skipping marcher -> field -> shading -> volume rendering
        w_orient = orientation_weight(step, cfg.loss)
        with stage("render"):
            out = render_views(scene, views, cfg, need_normals=w_orient > 0 or views.shading != "albedo", generator=gen)
            b, size = cfg.render.batch_size, cfg.render.size
            image = out.rgb.reshape(b, size, size, 3).permute(0, 3, 1, 2)  # [B, 3, H, W]

        # 3. Guidance: one batched prior call for every view, the rule's surrogate loss
        progress = training_progress(step, cfg.train.steps)
        loss_guidance, info = self.distill.loss(image, views_prompts(cfg, views.cameras), views.cameras, progress, gen,
                                                step=step)

        # 4. Regularisers
        terms = {"guidance": loss_guidance, **regularizer_terms(out, cfg.loss, w_orient)}
        loss = sum(terms.values())
        terms.update(info.get("state_losses", {}))  # reported, not optimised here

        # 5. Backward and Adam, skipping steps whose loss or gradient is not finite
        with stage("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with stage("optimizer"):
            scalars = self._read_scalars(loss, info["grad_norm"], terms)
            overflow = scalars.get("encoder_overflow", 0.0) > 0
            skipped = overflow or not (math.isfinite(scalars["loss"]) and math.isfinite(scalars["param_grad_norm"]))
            self._apply_update(skipped, overflow)

        # 6. Occupancy refresh
        if occupancy_refresh_due(step, cfg.render):
            with stage("occupancy"):
                self.refresh_occupancy(step + 1)

        self.step += 1
        return StepResult(
            loss=scalars["loss"],
            terms={name: scalars[f"loss_{name}"] for name in terms},
            t=[int(x) for x in info["t"]],
            grad_norm=scalars["grad_norm"],
            param_grad_norm=scalars["param_grad_norm"],
            skipped=skipped,
            encoder_overflow=overflow,
            shading=views.shading,
        )

    def _read_scalars(self, loss: Tensor, guidance_grad_norm: Tensor, terms: dict[str, Tensor]) -> dict[str, float]:
        """Every scalar the step reports, read back from the device in one synchronisation."""
        named = {
            "loss": loss.detach(),
            "param_grad_norm": _grad_norm(self.optimizer, loss),
            "grad_norm": guidance_grad_norm.to(loss.device),
            **{f"loss_{name}": value.detach() for name, value in terms.items()},
        }
        if self.grad_scaler is not None:
            named["encoder_overflow"] = self.grad_scaler.found_inf.to(loss.device, loss.dtype)
        return dict(zip(named, torch.stack(list(named.values())).tolist()))

    def _apply_update(self, skipped: bool, overflow: bool) -> None:
        """Adam, or a skipped step: an encoder overflow only lowers the loss scale (it never counts
        towards stopping the run); any other non-finite step counts."""
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            if overflow:
                self.overflow_total += 1
            else:
                self.skipped_total += 1
                self.consecutive_skips += 1
        else:
            self.optimizer.step()
            self.consecutive_skips = 0
        if self.grad_scaler is not None:
            if overflow or not skipped:
                self.grad_scaler.update(overflow)

    def _scaler_meta(self) -> dict[str, str]:
        if self.grad_scaler is None:
            return {}
        return {"encoder_overflow_steps": str(self.overflow_total), **self.grad_scaler.state()}
