"""``nfsd-nerf train`` as a library call: :func:`run_training`, a sequence of named stages.

1. check the inputs (before anything expensive or any folder is made), 2. load the prior and the
rule, 3. prepare the run folder (new, or the resumed one), 4. the loop (metrics, previews,
checkpoints, Ctrl-C, divergence), 5. finish (final checkpoint, evaluation, summary).

A process trains in a run folder only while it holds the folder's lock (``.lock``, see
:func:`~nfsd_nerf.files.exclusive_lock`); on taking it, it removes the temporary files a killed
writer left there. A new run saves a step-0 checkpoint before its first step, so ``--resume`` works
from then on, and a resume of a run whose steps are done but whose ``summary.json`` is missing (killed
in the final save or evaluation) only finishes it. Stages 3-5 share one handler: a full disk anywhere
is one line naming the checkpoint the run can resume from, and Ctrl-C anywhere names it too.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import FINAL, LATEST, Checkpoint, saved_step
from ..config import BUILTIN_MODEL, Config, check_config
from ..errors import UserError
from ..files import RUN_LOCK, atomic_copy, check_writable, exclusive_lock, new_run_dir, remove_temporaries
from ..guidance.prompts import view_texts
from ..runtime import cpu_threads, describe_device, package_versions, resolve_device
from .run_folder import MetricsLog, write_config, write_preview, write_summary
from .step import StepResult, Trainer

MAX_CONSECUTIVE_SKIPS = 20
"""Training stops (checkpoint kept) after this many steps in a row with a non-finite loss or gradient."""
SLOW_CPU_SECONDS_PER_STEP = 0.5
"""Above this on the CPU with a real diffusion model, the user is told how long the run will take."""
WRITTEN_FOLDERS = ("", "checkpoints", "previews")
"""The parts of a run folder only its training process writes (so only it may clear temporaries there);
``export/`` and ``video/`` are written by other commands, which run while a run trains and lock and clear
those folders themselves (:func:`~nfsd_nerf.files.writing_folder`)."""


class TrainingDiverged(UserError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class Interrupted(Exception):
    """Ctrl-C during training; ``checkpoint`` (holding ``step``) is where ``--resume`` continues."""

    def __init__(self, checkpoint: Path, step: int | None = None):
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint
        self.step = step


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

    with ExitStack() as hold:
        hold.enter_context(cpu_threads(cfg.train.cpu_threads))
        if run_dir is not None:  # a known folder (resumed, or a batch's) is locked before the prior loads
            run_dir = Path(run_dir)
            hold.enter_context(_locked_run_folder(run_dir, resume))

        # 2. Diffusion prior and guidance rule (rule defaults resolved into the recorded config)
        cfg, prior, distill = _load_guidance(cfg, device, prior)
        prepare_nerfacc_kernels(console, device)  # CUDA only: built here, never inside the progress bar

        # 3.-5. Run folder and trainer, the loop, the final checkpoint, evaluation and summary
        if run_dir is None:
            run_dir = new_run_dir(out, cfg.prompt)
            hold.enter_context(_locked_run_folder(run_dir, None))
        trainer = Trainer(cfg, run_dir, device, prior, distill)
        summary = _train_and_finish(trainer, resume, console, progress, started)
    return RunResult(run_dir=run_dir, summary=summary)


@contextmanager
def _locked_run_folder(run_dir: Path, resume: Checkpoint | None):
    """Hold ``run_dir``'s lock for the block (a second trainer gets one line), clear the temporary files
    a killed process left, and refuse a checkpoint another process replaced since it was read."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the run folder {run_dir}: {exc.strerror or exc}") from None
    with exclusive_lock(run_dir / RUN_LOCK, f"another nfsd-nerf process is training in {run_dir}; wait for it to "
                        "end (export and render-video can read the run meanwhile)"):
        for folder in WRITTEN_FOLDERS:
            remove_temporaries(run_dir / folder)
        if resume is not None and resume.changed_on_disk():
            raise UserError(f"{resume.path} changed since it was read (another process saved the run); "
                            "run the command again")
        yield


def _train_and_finish(trainer: Trainer, resume: Checkpoint | None, console, progress: bool, started: float) -> dict:
    """Stages 3-5 under one handler: any OSError (a full disk, a vanished folder) becomes one line
    naming the checkpoint the run can resume from, after saving the state if it is newer; Ctrl-C
    anywhere (the first one in the loop stops between steps itself) names that checkpoint too."""
    ready = False  # the trainer holds the run's state (new, or restored)
    try:
        steps_left = _prepare_run(trainer, resume)
        ready = True
        console.print(f"run folder: [bold]{trainer.run_dir}[/]")
        step_times = []
        if steps_left:
            step_times = _train_loop(trainer, console, show_progress=progress, resumed=resume is not None)
        return _finish(trainer, step_times, wall_start=started)
    except OSError as exc:
        raise UserError(_write_failure(trainer, exc, may_save=ready)) from None
    except KeyboardInterrupt:  # a second Ctrl-C mid-step, or one outside the loop: keep the last checkpoint
        latest = trainer.run_dir / "checkpoints" / LATEST
        step = saved_step(latest)
        if step is None:
            raise
        raise Interrupted(latest, step) from None


def _write_failure(trainer: Trainer, exc: OSError, *, may_save: bool) -> str:
    """The one-line message of a failed write; first saves ``latest`` if the state in memory is newer
    (the loop's writes all happen between steps, so the state is whole)."""
    latest = trainer.run_dir / "checkpoints" / LATEST
    step = saved_step(latest)
    if may_save and step != trainer.step:
        try:
            trainer.save(LATEST)
            step = trainer.step
        except OSError:
            pass  # the full disk again: the earlier checkpoint, if any, is intact (atomic writes)
    message = f"cannot write to {trainer.run_dir}: {exc.strerror or exc}"
    if step is None:
        return f"{message} (no checkpoint could be saved)"
    return f"{message}; {latest} holds step {step}: make room, then nfsd-nerf train --resume {trainer.run_dir}"


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


def _prepare_run(trainer: Trainer, resume: Checkpoint | None) -> bool:
    """``config.yaml`` and the trainer's starting state: a new run saves it as a step-0 checkpoint (so
    ``--resume`` works from the start), a resumed one restores it. Returns whether steps remain: a
    resumed run whose steps are done but whose summary is missing (killed while finishing) is only
    finished."""
    cfg, run_dir = trainer.cfg, trainer.run_dir
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    if resume is None:
        write_config(run_dir, cfg)
        trainer.refresh_occupancy(0)
        trainer.save(LATEST)
        return True
    trainer.restore(resume)
    step = trainer.step
    if step > cfg.train.steps or (step == cfg.train.steps and _summary_steps(run_dir) == step):
        raise UserError(f"{run_dir} already ran {step} steps; pass --steps N with N > {step} to extend it")
    write_config(run_dir, cfg)
    return step < cfg.train.steps


def _summary_steps(run_dir: Path) -> int | None:
    """The steps ``summary.json`` reports (a run's last act), or None where there is none readable."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary.get("steps") if isinstance(summary, dict) else None


def _train_loop(trainer: Trainer, console, *, show_progress: bool, resumed: bool) -> list[float]:
    """Step until ``train.steps``; log, preview and checkpoint on schedule. Returns seconds per step.

    The first Ctrl-C stops between steps with a checkpoint (:class:`Interrupted`); a second one
    interrupts the step (the caller keeps the last checkpoint). Write errors go to the caller's handler.
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
                    raise Interrupted(trainer.save(LATEST), trainer.step)
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
        "seconds_per_step": round(_seconds_per_step(step_times, run_dir), 4),
        "device": describe_device(device),
        "cpu_threads": torch.get_num_threads(),
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


def _seconds_per_step(step_times: list[float], run_dir: Path) -> float:
    """Mean over the steps this process ran; a resume that only finished a run ran none, and takes
    the mean ``metrics.jsonl`` logged (each line averages the steps since the one before)."""
    if step_times:
        return sum(step_times) / len(step_times)
    total, steps, previous = 0.0, 0, 0
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0.0
    for line in lines:
        try:
            entry = json.loads(line)
            step, seconds = int(entry["step"]), float(entry["seconds_per_step"])
        except (ValueError, KeyError, TypeError):
            continue
        total, steps, previous = total + seconds * max(0, step - previous), steps + max(0, step - previous), step
    return total / steps if steps else 0.0


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
