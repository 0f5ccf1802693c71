"""``nfsd-nerf train`` as a library call: :func:`run_training`, a sequence of named stages.

1. check the inputs (before anything expensive or any folder is made), 2. load the prior and the
rule, 3. prepare the run folder (new, or the resumed one), 4. the loop (metrics, previews,
checkpoints, Ctrl-C, divergence), 5. finish (final checkpoint, evaluation, summary).
"""

from __future__ import annotations

import dataclasses
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import FINAL, LATEST, Checkpoint
from ..config import BUILTIN_MODEL, Config, check_config
from ..errors import UserError
from ..files import atomic_copy, check_writable, new_run_dir
from ..guidance.prompts import view_texts
from ..runtime import describe_device, package_versions, resolve_device
from .run_folder import MetricsLog, write_config, write_preview, write_summary
from .step import StepResult, Trainer

MAX_CONSECUTIVE_SKIPS = 20
"""Training stops (checkpoint kept) after this many steps in a row with a non-finite loss or gradient."""
SLOW_CPU_SECONDS_PER_STEP = 0.5
"""Above this on the CPU with a real diffusion model, the user is told how long the run will take."""


class TrainingDiverged(UserError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class Interrupted(Exception):
    """Ctrl-C during training; a checkpoint has been written."""

    def __init__(self, checkpoint: Path):
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


def prompt_variants(cfg: Config) -> list[str]:
    """The prompts a run can ask the prior for: the prompt (or its view variants), uncond, negative."""
    prompts = list(view_texts(cfg.prompt, cfg.prompts).values()) if cfg.guidance.view_dependent_prompts else [cfg.prompt]
    return prompts + [""] + ([cfg.guidance.negative_prompt] if cfg.guidance.negative_prompt else [])


def run_training(
    cfg: Config,
    *,
    out: Path | None = None,
    resume: Checkpoint | None = None,
    run_dir: Path | None = None,
    console=None,
    progress: bool = True,
    prior=None,
) -> RunResult:
    """Train a new run in ``OUT/<slug>-<time>/`` (or in ``run_dir`` when given) or continue ``run_dir``
    from ``resume``. ``prior``: an already loaded prior matching the config (a batch worker reuses one
    across runs, see :func:`load_run_prior`); None loads it."""
    from rich.console import Console

    from ..render.marching import prepare_nerfacc_kernels

    console = console or Console()
    started = time.perf_counter()

    # 1. Check inputs and the output folder before any expensive work
    check_config(cfg)
    if resume is None:
        check_writable(out)
    device = resolve_device(cfg.train.device)
    if device.type == "cpu":
        console.print("[yellow]note:[/] no GPU in use: training on the CPU")

    # 2. Diffusion prior and guidance rule (rule defaults resolved into the recorded config)
    cfg, prior, distill = _load_guidance(cfg, device, prior)
    prepare_nerfacc_kernels(console, device)  # CUDA only: built here, never inside the progress bar

    # 3. Run folder, trainer, and resumed state
    trainer = _prepare_run(cfg, out, resume, run_dir, device, prior, distill)
    console.print(f"run folder: [bold]{trainer.run_dir}[/]")

    # 4. The loop
    step_times = _train_loop(trainer, console, show_progress=progress, resumed=resume is not None)

    # 5. Final checkpoint, preview, evaluation and summary
    summary = _finish(trainer, step_times, wall_start=started)
    return RunResult(run_dir=trainer.run_dir, summary=summary)


def load_run_prior(cfg: Config, device: torch.device):
    """The prior a run of ``cfg`` trains against, loaded on ``device``."""
    from ..guidance import load_prior

    g = cfg.guidance
    return load_prior(g.model, revision=g.revision, device=device, half_precision=g.half_precision,
                      offline=g.offline, image_size=cfg.render.size)


def _load_guidance(cfg: Config, device: torch.device, prior=None):
    """Load the prior (unless given), build the rule, and embed every prompt once (unknown prompts
    fail here, before a run folder exists)."""
    from ..guidance.distill import ScoreDistillation

    g = cfg.guidance
    prior = prior if prior is not None else load_run_prior(cfg, device)
    distill = ScoreDistillation(prior, g, cfg.prompts, cfg.prompt)
    cfg = dataclasses.replace(cfg, guidance=distill.cfg)
    prior.embed(prompt_variants(cfg))
    return cfg, prior, distill


def _prepare_run(cfg: Config, out: Path | None, resume: Checkpoint | None, run_dir: Path | None,
                 device: torch.device, prior, distill) -> Trainer:
    """A new run folder (or the resumed one) with ``config.yaml``, and a trainer in the saved state."""
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(out, cfg.prompt)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir, device, prior, distill)
    if resume is not None:
        trainer.restore(resume)
        if trainer.step >= cfg.train.steps:
            raise UserError(f"{run_dir} already ran {trainer.step} steps; pass --steps N with N > {trainer.step} to extend it")
    write_config(run_dir, cfg)
    return trainer


def _train_loop(trainer: Trainer, console, *, show_progress: bool, resumed: bool) -> list[float]:
    """Step until ``train.steps``; log, preview and checkpoint on schedule. Returns seconds per step.

    Ctrl-C: the first one stops between steps with a checkpoint (:class:`Interrupted`); a second
    one mid-step keeps the last checkpoint. An OSError (full disk, vanished folder) between steps
    saves what it can and becomes a one-line :class:`UserError`.
    """
    cfg, run_dir = trainer.cfg, trainer.run_dir
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    if resumed:
        metrics.drop_after(trainer.step)  # lines logged after the checkpoint are redone
    stop_flag, restore_sigint = _install_sigint_flag()
    step_times: list[float] = []
    last_logged = trainer.step
    try:
        with _progress_bar(console, enabled=show_progress) as bar, metrics:
            task = bar.add_task("train", total=cfg.train.steps, completed=trainer.step, loss=float("nan"))
            while trainer.step < cfg.train.steps:
                if stop_flag["stop"]:
                    raise Interrupted(trainer.save(LATEST))
                t0 = time.perf_counter()
                result = trainer.train_step()
                step_times.append(time.perf_counter() - t0)
                bar.update(task, completed=trainer.step, loss=result.loss)
                _stop_if_diverged(trainer)
                if trainer.step % cfg.train.log_every == 0 or trainer.step == cfg.train.steps:
                    metrics.write(_metrics_line(trainer, result, step_times[-(trainer.step - last_logged):]))
                    last_logged = trainer.step
                if len(step_times) == 3:
                    _warn_if_slow(trainer, step_times, console)
                if cfg.train.preview_every and trainer.step % cfg.train.preview_every == 0:
                    write_preview(run_dir, trainer.scene, cfg, trainer.step)
                if cfg.train.checkpoint_every and trainer.step % cfg.train.checkpoint_every == 0:
                    trainer.save(LATEST)
    except OSError as exc:  # between steps: the state in memory is intact
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
    return step_times


def _stop_if_diverged(trainer: Trainer) -> None:
    if trainer.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
        trainer.save(LATEST)
        raise TrainingDiverged(
            f"training stopped at step {trainer.step}: {MAX_CONSECUTIVE_SKIPS} consecutive steps had a "
            f"non-finite loss or gradient; the last good state is in {trainer.run_dir / 'checkpoints' / LATEST}"
        )


def _metrics_line(trainer: Trainer, result: StepResult, recent_times: list[float]) -> dict:
    """One ``metrics.jsonl`` line; ``seconds_per_step`` averages the steps since the last line."""
    return {
        "step": trainer.step, "loss": result.loss, **{f"loss_{k}": v for k, v in result.terms.items()},
        "t": result.t, "grad_norm": result.grad_norm, "param_grad_norm": result.param_grad_norm,
        "shading": result.shading, "skipped_steps": trainer.skipped_total,
        "seconds_per_step": sum(recent_times) / len(recent_times),
        **_loss_scale_fields(trainer),
    }


def _loss_scale_fields(trainer: Trainer) -> dict:
    """Where the prior's encoder runs in half precision: overflow steps and the current loss scale."""
    if trainer.grad_scaler is None:
        return {}
    return {"encoder_overflow_steps": trainer.overflow_total, "loss_scale": trainer.grad_scaler.scale}


def _warn_if_slow(trainer: Trainer, step_times: list[float], console) -> None:
    """After 3 steps on the CPU with a real diffusion model: say how long the whole run will take."""
    cfg = trainer.cfg
    if trainer.device.type != "cpu" or cfg.guidance.model == BUILTIN_MODEL:
        return
    per_step = sum(step_times[1:]) / 2  # the first step pays for warm-up
    if per_step > SLOW_CPU_SECONDS_PER_STEP:
        remaining = (cfg.train.steps - trainer.step) * per_step
        console.print(f"[yellow]warning:[/] {per_step:.1f} s per step on the CPU; "
                      f"{cfg.train.steps} steps will take about {remaining / 3600:.1f} h. "
                      "Use a CUDA GPU, fewer --steps, or --model builtin to try the tool.")


def _finish(trainer: Trainer, step_times: list[float], *, wall_start: float) -> dict:
    """Final checkpoint (also as ``latest``), a last preview, the evaluation and ``summary.json``."""
    from ..render import nerfacc_kernels_available

    cfg, run_dir, device = trainer.cfg, trainer.run_dir, trainer.device
    atomic_copy(trainer.save(FINAL), run_dir / "checkpoints" / LATEST)
    write_preview(run_dir, trainer.scene, cfg, trainer.step)
    evaluation = None
    if cfg.guidance.model == BUILTIN_MODEL:
        from ..evaluate import evaluate_against_truth

        scene = trainer.scene
        evaluation = evaluate_against_truth(scene.field, scene.background, cfg.prompt, size=cfg.render.size,
                                            device=device, occupancy=scene.occupancy, n_samples=cfg.render.n_samples)
    summary = {
        "prompt": cfg.prompt,
        "guidance": cfg.guidance.method,
        "scale": float(cfg.guidance.scale),
        "negative_prompt": cfg.guidance.negative_prompt,
        "perp_neg": cfg.guidance.perp_neg,
        "steps": trainer.step,
        "skipped_steps": trainer.skipped_total,
        "wall_time_s": round(time.perf_counter() - wall_start, 2),
        "seconds_per_step": round(sum(step_times) / max(1, len(step_times)), 4),
        "device": describe_device(device),
        "hash_grid_backend": trainer.scene.field.encoding.backend,
        "ray_marcher": "nerfacc" if device.type == "cuda" and nerfacc_kernels_available() else "pytorch",
        "model": {"id": trainer.prior.model_id, "revision": trainer.prior.revision,
                  # what was read and in which precision (fp16 runs read *.fp16.safetensors where present)
                  "dtype": str(getattr(trainer.prior, "dtype", "")).removeprefix("torch.") or None,
                  "weight_files": list(getattr(trainer.prior, "weight_files", ()))},
        "versions": package_versions(),
        "eval": evaluation,
        **_loss_scale_fields(trainer),
    }
    write_summary(run_dir, summary)
    return summary


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
