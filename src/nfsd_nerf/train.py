"""Text-to-NeRF optimization: the loop, run folders, previews, checkpoints and resume.

One step, in the order of the data flow (DESIGN.md section 2):
cameras -> rays -> render with a shading mode -> guidance loss from the prior -> regularizers ->
backward -> Adam -> occupancy refresh. Every random draw comes from one CPU ``torch.Generator``
(plus the global RNG, both saved in checkpoints), so a resumed run is bit-identical on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__
from .cameras import generate_rays, orbit_cameras, sample_training_cameras
from .checkpoint import (
    FINAL,
    LATEST,
    Checkpoint,
    atomic_copy,
    atomic_write_bytes,
    restore_optimizer,
    restore_scene,
    save_checkpoint,
)
from .config import BUILTIN_MODEL, Config, check_ranges, dump_yaml
from .errors import UserError
from .guidance.prompts import view_dependent_prompts
from .profiling import stage
from .scene import Scene, build_scene

MAX_CONSECUTIVE_SKIPS = 20


class TrainingDiverged(UserError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class Interrupted(Exception):
    """Ctrl-C during training; a checkpoint has been written."""

    def __init__(self, checkpoint: Path):
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint


# --------------------------------------------------------------------------- run folders


def slugify(prompt: str, max_len: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "run"


def new_run_dir(out: Path, prompt: str, now: datetime | None = None) -> Path:
    """``OUT/<slug>-<YYYYmmdd-HHMMSS>``; never an existing folder (a suffix is added instead)."""
    out = Path(out)
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = out / f"{slugify(prompt)}-{stamp}"
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")
        except OSError as exc:
            raise UserError(f"cannot create the run folder in {out}: {exc.strerror or exc}") from None


def check_writable(out: Path) -> None:
    """Fail before any expensive work if the output folder cannot be written."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".nfsd-nerf-write-test-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output folder {out} is not writable: {exc.strerror or exc}") from None


def resolve_device(name: str) -> torch.device:
    """auto -> CUDA when available, else the CPU. MPS is refused: the hash grid, the packed
    transmittance and the built-in prior compute in float64, which MPS does not support."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if name == "mps":
        raise UserError("--device mps is not supported yet (parts of the renderer need float64); use --device cpu")
    return torch.device(name)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"nfsd-nerf": __version__}
    for name in ("torch", "diffusers", "transformers", "huggingface-hub", "nerfacc", "tinycudann"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


# --------------------------------------------------------------------------- pure helpers


def drop_metrics_after(path: Path, step: int) -> None:
    """Keep only the metrics lines up to ``step`` (a resumed run logs the later steps again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_bytes(path, "".join(kept).encode())


def choose_shading(step: int, cfg: Config, generator: torch.Generator) -> str:
    """Albedo during the warm-up, then albedo / Lambertian / textureless with the set probabilities."""
    r = cfg.render
    if step < r.ambient_only_steps:
        return "albedo"
    u = float(torch.rand((), generator=generator)) * (r.albedo_prob + r.lambertian_prob + r.textureless_prob)
    if u < r.albedo_prob:
        return "albedo"
    return "lambertian" if u < r.albedo_prob + r.lambertian_prob else "textureless"


def prompt_variants(cfg: Config) -> list[str]:
    """The prompts a run can ask the prior for: the prompt (or its view variants), uncond, negative."""
    if cfg.guidance.view_dependent_prompts:
        angles = torch.tensor([0.0, 90.0, 180.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 90.0])
        prompts = view_dependent_prompts(cfg.prompt, *angles)  # front, side, back, overhead
    else:
        prompts = [cfg.prompt]
    return prompts + [""] + ([cfg.guidance.negative_prompt] if cfg.guidance.negative_prompt else [])


def active_levels(step: int, cfg: Config) -> int:
    """Coarse-to-fine hash grid: ``start_levels`` until ``level_growth_start``, then one more level
    every ``level_growth_every`` steps (threestudio's schedule: 8, +1 every 500 after step 2000)."""
    t = cfg.train
    if t.start_levels is None:
        return cfg.field.n_levels
    grown = 0 if step < t.level_growth_start else 1 + (step - t.level_growth_start) // t.level_growth_every
    return min(cfg.field.n_levels, t.start_levels + grown)


def orientation_weight(step: int, cfg: Config) -> float:
    lo, hi, ramp = cfg.loss.orientation_start, cfg.loss.orientation_end, cfg.loss.orientation_ramp_steps
    return hi if ramp <= 0 else lo + (hi - lo) * min(1.0, step / ramp)


def sparsity_loss(opacity: torch.Tensor) -> torch.Tensor:
    """Smooth L1-like penalty on per-ray opacity [N] (threestudio's form), keeps empty space empty."""
    return torch.sqrt(opacity**2 + 0.01).mean()


def marching_step_size(cfg: Config) -> float:
    return 2.0 * math.sqrt(3.0) * cfg.field.bound / cfg.render.n_samples


def preview_panel(images: dict[str, torch.Tensor]) -> np.ndarray:
    """rgb | normal | opacity side by side, uint8 [H, 3W, 3], from one view of ``render_image``."""

    rgb = images["rgb"][0].clamp(0, 1)
    opacity = images["opacity"][0].clamp(0, 1)[..., None]
    normal = (images["normal"][0] * 0.5 + 0.5) * opacity + (1 - opacity)
    panel = torch.cat([rgb, normal.clamp(0, 1), opacity.expand_as(rgb)], dim=1)
    return (panel.cpu().numpy() * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- the trainer


@dataclass
class StepResult:
    loss: float
    terms: dict[str, float]
    t: list[int]
    grad_norm: float
    param_grad_norm: float
    skipped: bool
    shading: str


class Trainer:
    """Owns the state of one run: scene, prior, optimizer, RNG and step counter."""

    def __init__(self, cfg: Config, run_dir: Path, device: torch.device, prior, distill):
        self.cfg, self.run_dir, self.device = cfg, Path(run_dir), device
        self.prior, self.distill = prior, distill
        torch.manual_seed(cfg.train.seed)  # before building: the field's initialisation draws from it
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.scene: Scene = build_scene(cfg, device)
        field_params = list(self.scene.field.parameters())
        groups = [{"params": field_params, "lr": cfg.optim.lr}]
        background_params = list(self.scene.background.parameters())
        if background_params:
            groups.append({"params": background_params, "lr": cfg.optim.background_lr})
        self.optimizer = torch.optim.Adam(groups, betas=cfg.optim.betas, eps=cfg.optim.eps)
        self.step = 0
        self.skipped_total = 0
        self.consecutive_skips = 0

    # ----- state

    def rng_state(self) -> dict[str, torch.Tensor]:
        state = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore(self, ckpt: Checkpoint) -> None:
        restore_scene(self.scene, ckpt)
        restore_optimizer(self.optimizer, ckpt)
        rng = ckpt.section("rng")
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step = ckpt.step
        self.skipped_total = int(ckpt.meta.get("skipped_steps", 0))

    def save(self, name: str) -> Path:
        path = self.run_dir / "checkpoints" / name
        return save_checkpoint(
            path,
            config=self.cfg,
            scene=self.scene,
            step=self.step,
            optimizer=self.optimizer,
            rng=self.rng_state(),
            extra_meta={"skipped_steps": str(self.skipped_total)},
        )

    # ----- one step

    def train_step(self) -> StepResult:
        from .render import render_rays

        cfg, scene, gen, step = self.cfg, self.scene, self.generator, self.step
        b, size = cfg.render.batch_size, cfg.render.size
        scene.field.train()
        scene.field.encoding.active_levels = active_levels(step, cfg)

        # 1. Random cameras (with each view's azimuth/elevation for the prompts) and a shading mode
        with stage("cameras"):
            c = cfg.cameras
            cameras = sample_training_cameras(
                b,
                generator=gen,
                distance_range=c.distance_range,
                fovy_range_deg=c.fovy_range,
                elevation_range_deg=c.elevation_range,
                position_perturb=c.position_perturb,
                center_perturb=c.center_perturb,
                up_perturb=c.up_perturb,
                light_distance_range=c.light_distance_range,
                device=self.device,
            )
            shading = choose_shading(step, cfg, gen)
            background_rgb = None
            if cfg.background.random_solid_prob > 0 and float(torch.rand((), generator=gen)) < cfg.background.random_solid_prob:
                background_rgb = torch.rand(1, 3, generator=gen).to(self.device).expand(b * size * size, 3)
            rays_o, rays_d = generate_rays(cameras, size, size)
            lights = cameras.light_positions[:, None, :].expand(b, size * size, 3).reshape(-1, 3)

        # 2. Occupancy-skipping marcher -> field -> shading -> volume rendering
        w_orient = orientation_weight(step, cfg)
        need_normals = w_orient > 0 or shading != "albedo"
        with stage("render"):
            out = render_rays(
                scene.field,
                scene.background,
                rays_o.reshape(-1, 3),
                rays_d.reshape(-1, 3),
                occupancy=scene.occupancy,
                n_samples=cfg.render.n_samples,
                shading=shading,
                light_positions=lights,
                ambient=cfg.render.ambient,
                need_normals=need_normals,
                stratified=True,
                background_rgb=background_rgb,
                generator=gen,
            )
            image = out.rgb.reshape(b, size, size, 3).permute(0, 3, 1, 2)  # [B, 3, H, W]

        # 3. Guidance: view-dependent prompts, one batched prior call, NFSD/SDS surrogate loss
        if cfg.guidance.view_dependent_prompts:
            prompts = view_dependent_prompts(cfg.prompt, cameras.azimuth, cameras.elevation)
        else:
            prompts = [cfg.prompt] * b
        progress = step / max(1, cfg.train.steps)
        loss_guidance, info = self.distill.loss(image, prompts, cameras, progress, gen)

        # 4. Regularizers
        terms = {"guidance": loss_guidance}
        if need_normals and w_orient > 0:
            terms["orientation"] = w_orient * out.orientation.mean()
        if cfg.loss.sparsity > 0:
            terms["sparsity"] = cfg.loss.sparsity * sparsity_loss(out.opacity)
        loss = sum(terms.values())

        # 5. Backward and Adam, skipping steps whose loss or gradient is not finite
        with stage("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with stage("optimizer"):
            grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            param_grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else loss.new_zeros(())
            # every scalar the step reports, read back from the device in one synchronisation
            scalars = torch.stack([loss.detach(), param_grad_norm, info["grad_norm"].to(loss.device),
                                   *(v.detach() for v in terms.values())]).tolist()
            skipped = not (math.isfinite(scalars[0]) and math.isfinite(scalars[1]))
            if skipped:
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_total += 1
                self.consecutive_skips += 1
            else:
                self.optimizer.step()
                self.consecutive_skips = 0

        # 6. Occupancy refresh
        if (step + 1) % cfg.render.occupancy_update_every == 0:
            with stage("occupancy"):
                scene.occupancy.update(step + 1, scene.field.density, step_size=marching_step_size(cfg), generator=gen)

        self.step += 1
        return StepResult(
            loss=scalars[0],
            terms=dict(zip(terms, scalars[3:])),
            t=[int(x) for x in info["t"]],
            grad_norm=scalars[2],
            param_grad_norm=scalars[1],
            skipped=skipped,
            shading=shading,
        )

    # ----- previews

    @torch.no_grad()
    def write_preview(self) -> Path:
        import imageio.v3 as iio

        from .render import render_image

        self.scene.field.eval()
        cams = orbit_cameras(1, distance=float(sum(self.cfg.cameras.distance_range) / 2),
                             fovy_deg=float(sum(self.cfg.cameras.fovy_range) / 2), elevation_deg=15.0,
                             start_azimuth_deg=30.0, device=self.device)
        size = max(64, self.cfg.render.size)
        images = render_image(self.scene.field, self.scene.background, cams, size, size,
                              occupancy=self.scene.occupancy, n_samples=self.cfg.render.n_samples, need_normals=True)
        path = self.run_dir / "previews" / f"step{self.step:06d}.png"
        path.parent.mkdir(exist_ok=True)
        iio.imwrite(path, preview_panel(images))
        return path


# --------------------------------------------------------------------------- the command


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


def _install_sigint_flag() -> tuple[dict, Callable[[], None]]:
    """First Ctrl-C sets a flag the loop checks between steps; a second one interrupts at once."""
    flag = {"stop": False}

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (e.g. some test runners): keep the default
        return flag, lambda: None
    return flag, lambda: signal.signal(signal.SIGINT, previous)


def run_training(
    cfg: Config,
    *,
    out: Path | None = None,
    resume: Checkpoint | None = None,
    run_dir: Path | None = None,
    console=None,
    progress: bool = True,
) -> RunResult:
    """Train a new run in ``OUT/<slug>-<time>/`` or continue ``run_dir`` from ``resume``."""
    from rich.console import Console

    from .guidance import load_prior
    from .guidance.distill import ScoreDistillation, check_settings, settings_from_config
    from .render import nerfacc_kernels_available

    console = console or Console()
    started = time.perf_counter()

    # 1. Check inputs and the output folder before any expensive work
    if not cfg.prompt.strip():
        raise UserError("the prompt is empty: give a text prompt, e.g. nfsd-nerf train \"a red cube\" --model builtin")
    check_ranges(cfg)
    check_settings(**settings_from_config(cfg.guidance))
    if resume is None:
        check_writable(out)
    device = resolve_device(cfg.train.device)
    if device.type == "cpu":
        console.print("[yellow]note:[/] no GPU in use: training on the CPU")

    # 2. Diffusion prior and guidance rule (the scale resolves to the rule's default when unset)
    g = cfg.guidance
    prior = load_prior(g.model, revision=g.revision, device=device, half_precision=g.half_precision,
                       offline=g.offline, image_size=cfg.render.size)
    distill = ScoreDistillation.from_config(prior, g)
    cfg = dataclasses.replace(cfg, guidance=dataclasses.replace(g, scale=float(distill.scale),
                                                               negative_prompt=distill.negative_prompt))
    prior.embed(prompt_variants(cfg))  # every prompt the run will use, once: refuses unknown ones up front


    # 3. Run folder, trainer, and resumed state
    run_dir = Path(run_dir) if resume is not None else new_run_dir(out, cfg.prompt)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir, device, prior, distill)
    if resume is not None:
        trainer.restore(resume)
        if trainer.step >= cfg.train.steps:
            raise UserError(f"{run_dir} already ran {trainer.step} steps; pass --steps N with N > {trainer.step} to extend it")
    atomic_write_bytes(run_dir / "config.yaml", dump_yaml(cfg).encode())
    console.print(f"run folder: [bold]{run_dir}[/]")

    # 4. The loop
    metrics_path = run_dir / "metrics.jsonl"
    if resume is not None:
        drop_metrics_after(metrics_path, trainer.step)  # lines logged after the checkpoint are redone
    stop_flag, restore_sigint = _install_sigint_flag()
    step_times: list[float] = []
    warned_slow = False
    last_logged_step = trainer.step
    try:
        with _progress_bar(console, enabled=progress) as bar:
            task = bar.add_task("train", total=cfg.train.steps, completed=trainer.step, loss=float("nan"))
            with metrics_path.open("a") as metrics:
                while trainer.step < cfg.train.steps:
                    if stop_flag["stop"]:
                        raise Interrupted(trainer.save(LATEST))
                    t0 = time.perf_counter()
                    result = trainer.train_step()
                    step_times.append(time.perf_counter() - t0)
                    bar.update(task, completed=trainer.step, loss=result.loss)
                    if trainer.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                        trainer.save(LATEST)
                        raise TrainingDiverged(
                            f"training stopped at step {trainer.step}: {MAX_CONSECUTIVE_SKIPS} consecutive steps had a "
                            f"non-finite loss or gradient; the last good state is in {run_dir / 'checkpoints' / LATEST}"
                        )
                    if trainer.step % cfg.train.log_every == 0 or trainer.step == cfg.train.steps:
                        recent = step_times[-(trainer.step - last_logged_step):]
                        line = {"step": trainer.step, "loss": result.loss, **{f"loss_{k}": v for k, v in result.terms.items()},
                                "t": result.t, "grad_norm": result.grad_norm, "param_grad_norm": result.param_grad_norm, "shading": result.shading,
                                "skipped_steps": trainer.skipped_total,
                                "seconds_per_step": sum(recent) / len(recent)}
                        metrics.write(json.dumps(line) + "\n")
                        metrics.flush()
                        last_logged_step = trainer.step
                    if not warned_slow and len(step_times) == 3 and device.type == "cpu" and g.model != BUILTIN_MODEL:
                        warned_slow = True
                        per_step = sum(step_times[1:]) / 2
                        remaining = (cfg.train.steps - trainer.step) * per_step
                        if per_step > 0.5:
                            console.print(f"[yellow]warning:[/] {per_step:.1f} s per step on the CPU; "
                                          f"{cfg.train.steps} steps will take about {remaining / 3600:.1f} h. "
                                          "Use a CUDA GPU, fewer --steps, or --model builtin to try the tool.")
                    if cfg.train.preview_every and trainer.step % cfg.train.preview_every == 0:
                        trainer.write_preview()
                    if cfg.train.checkpoint_every and trainer.step % cfg.train.checkpoint_every == 0:
                        trainer.save(LATEST)
    except OSError as exc:  # a full disk or a vanished folder between steps: the state in memory is intact
        try:
            saved = f"saved {trainer.save(LATEST)}"
        except OSError:
            saved = "no checkpoint could be saved"
        raise UserError(f"cannot write to {run_dir}: {exc.strerror or exc} ({saved})") from None
    except KeyboardInterrupt:  # a second Ctrl-C mid-step: the state may be half-updated, keep the last checkpoint
        latest = run_dir / "checkpoints" / LATEST
        if latest.exists():
            raise Interrupted(latest) from None
        raise
    finally:
        restore_sigint()

    # 5. Final checkpoint, preview, evaluation and summary
    atomic_copy(trainer.save(FINAL), run_dir / "checkpoints" / LATEST)
    trainer.write_preview()
    evaluation = None
    if g.model == BUILTIN_MODEL:
        from .evaluate import evaluate_against_truth

        evaluation = evaluate_against_truth(trainer.scene.field, trainer.scene.background, cfg.prompt,
                                            size=cfg.render.size, device=device, occupancy=trainer.scene.occupancy,
                                            n_samples=cfg.render.n_samples)
    wall = time.perf_counter() - started
    summary = {
        "prompt": cfg.prompt,
        "guidance": g.method,
        "scale": float(distill.scale),
        "negative_prompt": distill.negative_prompt,
        "steps": trainer.step,
        "skipped_steps": trainer.skipped_total,
        "wall_time_s": round(wall, 2),
        "seconds_per_step": round(sum(step_times) / max(1, len(step_times)), 4),
        "device": _describe_device(device),
        "hash_grid_backend": trainer.scene.field.encoding.backend,
        "ray_marcher": "nerfacc" if device.type == "cuda" and nerfacc_kernels_available() else "pytorch",
        "model": {"id": prior.model_id, "revision": prior.revision},
        "versions": package_versions(),
        "eval": evaluation,
    }
    atomic_write_bytes(run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return RunResult(run_dir=run_dir, summary=summary)


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def _progress_bar(console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.2f} it/s" if task.speed else "-- it/s")

    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]:.4g}"),
        console=console,
        disable=not enabled,
        transient=False,
    )
