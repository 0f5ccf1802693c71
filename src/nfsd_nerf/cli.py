"""The ``nfsd-nerf`` command line (Typer). Commands are thin: parse, validate, call the library."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .config import DEFAULT_MODEL
from .cli_errors import OneLineErrors, run_command
from .errors import UserError
from .export.formats import formats_help, textured_formats
from .guidance.dds import edit_rules_help
from .guidance.rules import rules_help

DEVICE_HELP = "auto (CUDA when available), cuda or cpu."


app = typer.Typer(
    cls=OneLineErrors,
    name="nfsd-nerf",
    help="Text-to-3D with Noise-Free Score Distillation: train a hash-grid NeRF from a prompt, "
    "then export meshes and turntable videos.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"nfsd-nerf {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """nfsd-nerf: text-to-3D with Noise-Free Score Distillation."""


@app.command()
def train(
    prompt: Optional[str] = typer.Argument(None, help='Text prompt, e.g. "a DSLR photo of a hamburger".'),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (wins over the preset --model picks)."),
    overrides: list[str] = typer.Option([], "--set", help="Override any key: --set render.size=32 (repeatable)."),
    steps: Optional[int] = typer.Option(None, help="Optimization steps (with --resume: the new total)."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    model: Optional[str] = typer.Option(None, help='Hugging Face id, local diffusers folder, or "builtin" (offline prior).'),
    revision: Optional[str] = typer.Option(None, help="Hub revision of --model (branch, tag or commit)."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network (HF_HUB_OFFLINE=1 does the same)."),
    guidance: Optional[str] = typer.Option(None, help=f"Score-distillation rule (default nfsd). {rules_help()}."),
    scale: Optional[float] = typer.Option(None, help="Guidance scale; unset: the rule's default."),
    negative_prompt: Optional[str] = typer.Option(None, help="Negative prompt; unset: the rule's default (NFSD: the paper's)."),
    perp_neg: bool = typer.Option(False, "--perp-neg", help="Perp-Neg against the Janus problem (Stable Diffusion; "
                                  "view weights in the prompts section)."),
    size: Optional[int] = typer.Option(None, help="Training render resolution in pixels."),
    out: Path = typer.Option(Path("outputs"), help="Parent folder of the run folder."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this folder (no prompt needed)."),
) -> None:
    """Optimize a NeRF from a text prompt with NFSD (or SDS)."""

    def body():
        from rich.console import Console

        from .train import Interrupted, run_training

        flags = {
            "train.steps": steps, "train.seed": seed, "train.device": device, "guidance.model": model,
            "guidance.revision": revision, "guidance.method": guidance, "guidance.scale": scale,
            "guidance.negative_prompt": negative_prompt, "render.size": size,
            "guidance.offline": True if offline else None, "guidance.perp_neg": True if perp_neg else None,
        }
        cfg, ckpt = _train_config(prompt, config, overrides, flags, resume)
        console = Console(soft_wrap=True)
        try:
            result = run_training(cfg, out=out, resume=ckpt, run_dir=resume, console=console)
        except Interrupted as stop:  # raised only once a checkpoint exists, so the command below works
            run_dir = stop.checkpoint.parent.parent
            console.print(f"\n[yellow]interrupted[/]: {stop.checkpoint} holds step {stop.step}")
            console.print(f"resume with: [bold]nfsd-nerf train --resume {run_dir}[/]")
            raise typer.Exit(code=130)
        _print_summary(console, result.run_dir, result.summary)

    run_command(body)


def _train_config(prompt: str | None, config: Path | None, overrides: list[str], flags: dict, resume: Path | None):
    """The run's config and, with ``--resume``, its checkpoint: preset (or ``--config``) <- ``--set``
    <- flags for a new run; the saved config <- the flags a resume may change for a resumed one."""
    from .checkpoint import LATEST, read_checkpoint
    from .config import BUILTIN_MODEL, load_config, merge, preset_path

    ckpt = None
    if resume is not None:
        if prompt is not None or config is not None or overrides:
            raise UserError("--resume continues a run with its own prompt and config: drop the prompt, --config and --set")
        if not resume.is_dir():
            raise UserError(f"resume folder not found: {resume}")
        ckpt = read_checkpoint(resume / "checkpoints" / LATEST)
        cfg = ckpt.config
        allowed = {"train.steps", "train.device", "guidance.offline"}
        changed = [k for k, v in flags.items() if v is not None and k not in allowed]
        if changed:
            raise UserError(f"--resume can only change --steps, --device and --offline (got {', '.join(changed)})")
    else:
        if prompt is None or not prompt.strip():
            raise UserError('the prompt is empty: give a text prompt, e.g. nfsd-nerf train "a red cube" --model builtin')
        flags_model = flags["guidance.model"]
        config_path = config or preset_path("builtin" if flags_model == BUILTIN_MODEL else "default")
        cfg = merge(load_config(config_path, overrides), {"prompt": prompt})
    for key, value in flags.items():
        if value is not None:
            section, name = key.split(".")
            cfg = merge(cfg, {section: {name: value}})
    return cfg, ckpt


@app.command()
def batch(
    plan: Path = typer.Argument(..., help="Batch plan (YAML): prompts x variants x seeds, "
                                "e.g. configs/batches/builtin-nfsd-vs-sds.yaml."),
    out: Path = typer.Option(Path("outputs"), help="Parent of the plan's folder OUT/<plan name>/ (on a Ray cluster: "
                             "storage every node sees at the same path)."),
    address: Optional[str] = typer.Option(None, help='Join a Ray cluster: "auto" or "ray://HOST:10001" '
                                          "(default: a local Ray instance; without Ray, one run after another)."),
    restart_stale: bool = typer.Option(False, "--restart-stale", help="Delete and retrain runs whose folder holds "
                                       "another config than the plan now gives."),
) -> None:
    """Train many runs from a plan; rerunning skips finished runs and resumes interrupted ones."""

    def body():
        from rich.console import Console

        from .batch import BatchInterrupted, load_plan, print_result, run_batch

        checked = load_plan(plan, out)  # a bad plan: one line, exit 2, nothing written
        console = Console(soft_wrap=True)
        try:
            result = run_batch(checked, address=address, restart_stale=restart_stale, console=console)
        except BatchInterrupted as stop:
            print_result(console, checked, stop.result.records, interrupted=True)
            raise typer.Exit(code=130)
        code = print_result(console, checked, result.records)
        if code:
            raise typer.Exit(code=code)

    run_command(body)


def _print_summary(console, run_dir: Path, summary: dict) -> None:
    console.print(
        f"done: {summary['steps']} steps of {summary['guidance'].upper()}{' + Perp-Neg' if summary.get('perp_neg') else ''} "
        f"(scale {summary['scale']:g}) "
        f"in {summary['wall_time_s']:.1f} s ({summary['seconds_per_step']:.3f} s/step) on {summary['device']}"
    )
    if summary.get("eval"):
        e = summary["eval"]
        console.print(
            f"against the true object: PSNR {e['psnr']:.2f} dB, masked PSNR {e['psnr_masked']:.2f} dB, "
            f"silhouette IoU {e['silhouette_iou']:.3f}"
        )
    console.print(f"run folder: [bold]{run_dir}[/]")
    console.print("next:")
    console.print(f"  nfsd-nerf export {run_dir} --format glb")
    console.print(f"  nfsd-nerf render-video {run_dir} --size 256 --frames 60")


def _rich_progress(console, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run folder written by `nfsd-nerf train`."),
    format: str = typer.Option("glb", "--format", "-f", help=f"Mesh format. {formats_help()}."),
    resolution: int = typer.Option(256, help="Marching-cubes grid resolution per side."),
    threshold: str = typer.Option("auto", help='Density level of the surface: "auto" (from the field) or a number.'),
    texture_size: int = typer.Option(1024, help=f"Texture size in pixels ({', '.join(textured_formats())})."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint to export (default: the run's latest)."),
    keep_inner: bool = typer.Option(False, "--keep-inner", help="Raw surface: keep inner shells, cavities and "
                                    "pinholes (default: the outer surface only)."),
    up: str = typer.Option("y", "--up", help="Axes of every format: y (glTF: Y up, front +Z) or z (Blender: Z up, front -Y)."),
) -> None:
    """Extract a coloured mesh into RUN_DIR/export/."""

    def body():
        from rich.console import Console

        from .export.pipeline import export_run

        if threshold == "auto":
            level = "auto"
        else:
            try:
                level = float(threshold)
            except ValueError:
                raise UserError(f'--threshold {threshold!r}: expected "auto" or a number') from None
        console = Console(soft_wrap=True)
        with console.status("extracting the surface and baking colours..."):
            paths = export_run(run_dir, format=format.lower(), resolution=resolution, threshold=level,
                               texture_size=texture_size, checkpoint=checkpoint, keep_inner=keep_inner,
                               up=up.lower(), log=console.print)
        for path in paths:
            console.print(f"wrote {path}")

    run_command(body)


@app.command("render-video")
def render_video(
    run_dir: Path = typer.Argument(..., help="A run folder written by `nfsd-nerf train`."),
    frames: int = typer.Option(120, help="Frames in the full turn."),
    fps: float = typer.Option(30.0, help="Frames per second."),
    size: int = typer.Option(512, help="Frame width and height in pixels."),
    elevation: float = typer.Option(15.0, help="Camera elevation in degrees."),
    modes: str = typer.Option("rgb,normal,depth", help="Comma-separated: rgb, normal, depth."),
    gif: bool = typer.Option(False, "--gif", help="Also write a GIF of each mode."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint to render (default: the run's latest)."),
    distance: Optional[float] = typer.Option(None, help="Camera distance (default: frames the object)."),
    fovy: Optional[float] = typer.Option(None, help="Vertical field of view in degrees (default: 70)."),
) -> None:
    """Render a turntable video (H.264 MP4) into RUN_DIR/video/."""

    def body():
        from rich.console import Console

        from .batch.report import format_duration
        from .export.video import check_video_inputs, render_run_video

        console = Console(soft_wrap=True)
        mode_list = tuple(m.strip() for m in modes.split(",") if m.strip())
        check_video_inputs(frames, size, fps, elevation, mode_list, distance=distance, fovy=fovy)  # before the bar

        def announce(seconds: float) -> None:
            console.print(f"{frames} frames at {size}x{size} ({', '.join(mode_list)}): about {format_duration(seconds)} on this machine")

        with _rich_progress(console, "render") as bar:
            task = bar.add_task("render", total=frames)
            paths = render_run_video(
                run_dir, frames=frames, fps=fps, size=size, elevation=elevation, modes=mode_list, gif=gif,
                checkpoint=checkpoint, progress=lambda done, total: bar.update(task, completed=done, total=total),
                announce=announce, distance=distance, fovy=fovy,
            )
        for path in paths:
            console.print(f"wrote {path}")

    run_command(body)


@app.command()
def report(
    folders: list[Path] = typer.Argument(..., help="A run folder, several run folders (compared), or a batch folder."),
    out: Optional[Path] = typer.Option(None, help="Report folder (default: RUN/report or BATCH/report; needed for "
                                       "several runs). Replaced only once the new report is complete."),
    make_missing: bool = typer.Option(False, "--make-missing", help="First export mesh.glb and render the "
                                      "turntables of runs that lack them."),
    size: int = typer.Option(256, help="With --make-missing: turntable size in pixels."),
    frames: int = typer.Option(60, help="With --make-missing: turntable frames."),
    resolution: int = typer.Option(256, help="With --make-missing: the mesh's marching-cubes resolution."),
) -> None:
    """Write a self-contained HTML report (report/index.html): facts, 3D model, turntables, previews, curves."""

    def body():
        import time

        from rich.console import Console

        from .report import MakeMissing, build_report

        console = Console(soft_wrap=True)
        started = time.perf_counter()
        if not make_missing:
            page = build_report(folders, out=out, log=console.print)
        else:  # rendering turntables takes minutes: a bar per run
            with _rich_progress(console, "render") as bar:
                def frames_bar(label: str):
                    task = bar.add_task(label, total=None)
                    return lambda done, total: bar.update(task, completed=done, total=total)

                page = build_report(folders, out=out, log=console.print, progress=frames_bar,
                                    missing=MakeMissing(size=size, frames=frames, resolution=resolution))
        console.print(f"wrote {page} in {time.perf_counter() - started:.1f} s (open it in a browser; no network needed)")

    run_command(body)


@app.command()
def doctor(
    model: str = typer.Option(DEFAULT_MODEL, help='The --model train would use: hub id, local diffusers folder, or "builtin".'),
    revision: Optional[str] = typer.Option(None, help="Hub revision of --model."),
    out: Path = typer.Option(Path("outputs"), help="The output folder train would write to."),
    offline: bool = typer.Option(False, "--offline", help="Check as `train --offline` would run."),
    online: bool = typer.Option(False, "--online", help="Also ask the hub about --model (one request under the hub "
                                "deadline); without it doctor never touches the network."),
    build: bool = typer.Option(False, "--build", help="Build nerfacc's CUDA kernels now if needed (GPU only; minutes)."),
) -> None:
    """Check this machine before a long run or a bug report. Exit 0 if train would run, 1 if not."""

    def body():
        from rich.console import Console

        from .doctor import exit_code, render, run_checks

        console = Console(soft_wrap=True)
        rows = run_checks(model, revision=revision, out=out, offline=offline, online=online, build=build,
                          console=console)
        render(rows, console, model)
        if exit_code(rows):
            raise typer.Exit(code=1)

    run_command(body)


@app.command()
def image(
    prompt: str = typer.Argument(..., help="Text prompt."),
    guidance: str = typer.Option("nfsd", help=f"Score-distillation rule. {rules_help()}; {edit_rules_help()}."),
    scale: Optional[float] = typer.Option(None, help="Guidance scale; unset: the rule's default."),
    negative_prompt: Optional[str] = typer.Option(None, help="Negative prompt; unset: the rule's default."),
    perp_neg: bool = typer.Option(False, "--perp-neg", hidden=True),
    edit: Optional[Path] = typer.Option(None, "--edit", help="Image to edit (PNG/JPEG), with --guidance dds and --source-prompt."),
    source_prompt: Optional[str] = typer.Option(None, "--source-prompt", help="What the --edit image shows (DDS's source prompt)."),
    steps: int = typer.Option(500, help="Optimization steps."),
    lr: float = typer.Option(0.05, help="Adam learning rate on the latent."),
    seed: int = typer.Option(0, help="Random seed."),
    model: str = typer.Option(DEFAULT_MODEL, help='Hugging Face id, local diffusers folder, or "builtin".'),
    revision: Optional[str] = typer.Option(None, help="Hub revision of --model."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network."),
    out: Path = typer.Option(Path("outputs/images"), help="Folder for the PNGs."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """The paper's 2D experiment: optimize one image (a latent) directly with NFSD or SDS, or edit one with DDS."""

    def body():
        from rich.console import Console

        from .config import GuidanceConfig
        from .config.checks import check_drawn_prompt, check_image_options
        from .files import check_writable, slugify
        from .guidance import load_prior
        from .guidance.image import check_image_request, optimize_image
        from .runtime import resolve_device

        # 1. Check inputs
        if not prompt.strip():
            raise UserError("the prompt is empty")
        if perp_neg:
            raise UserError("--perp-neg needs view-dependent prompts from 3D cameras; the 2D experiment has one view")
        check_image_options(steps=steps, lr=lr, seed=seed)
        check_drawn_prompt(prompt, model)
        if source_prompt is not None:
            check_drawn_prompt(source_prompt, model)
        settings = GuidanceConfig(model=model, revision=revision, offline=offline, method=guidance, scale=scale,
                                  negative_prompt=negative_prompt)
        source = check_image_request(settings, edit, source_prompt)  # and reads --edit
        torch_device = resolve_device(device)
        folder = out / slugify(prompt)
        check_writable(out)  # not the folder: it is made when the PNGs are written, so an error leaves none
        # 2. Prior, then the optimisation
        console = Console(soft_wrap=True)
        prior = load_prior(model, revision=revision, device=torch_device, offline=offline, image_size=64)
        with _rich_progress(console, guidance.upper()) as bar:
            task = bar.add_task("image", total=steps)
            path = optimize_image(prior, prompt, settings, steps=steps, lr=lr, seed=seed, out_dir=folder, edit=source,
                                  callback=lambda step, info: bar.update(task, completed=step + 1))
        console.print(f"wrote {path}")

    run_command(body)


@app.command()
def decompose(
    prompt: str = typer.Argument(..., help="Text prompt of dC (with --model builtin and no --image: the object to render)."),
    image: Optional[Path] = typer.Option(None, "--image", help="In-domain image; optional with --model builtin (its true object)."),
    ood: Optional[Path] = typer.Option(None, "--ood", help="Out-of-domain image, same size; unset: --image blurred, "
                                       "lower contrast, desaturated."),
    timesteps: str = typer.Option("100,200,400,600,800", "--t", help="Diffusion times, one figure row each."),
    model: str = typer.Option(DEFAULT_MODEL, help='Hugging Face id, local diffusers folder, or "builtin".'),
    revision: Optional[str] = typer.Option(None, help="Hub revision of --model."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network."),
    out: Path = typer.Option(Path("outputs/decompose"), help="Parent folder of the figure's folder."),
    seed: int = typer.Option(0, help="Seed of the shared noise."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """The paper's score decomposition: dN, dD, NFSD's estimate of dD and dC of an image pair, per t (PNG + JSON)."""

    def body():
        from rich.console import Console

        from .config import BUILTIN_MODEL
        from .config.checks import check_seed
        from .files import check_writable, slugify
        from .guidance import load_prior
        from .guidance.decompose import check_inputs, check_timesteps, parse_timesteps, run_decomposition
        from .runtime import resolve_device

        # 1. Check inputs and read the images before anything loads or is written
        check_seed(seed, "--seed")
        times = parse_timesteps(timesteps)
        in_domain, outside, sources = check_inputs(prompt, image, ood, builtin=model == BUILTIN_MODEL)
        torch_device = resolve_device(device)
        # 2. Prior; the schedule's range; then the folder and the files
        console = Console(soft_wrap=True)
        prior = load_prior(model, revision=revision, device=torch_device, offline=offline, image_size=64)
        check_timesteps(times, prior.num_train_timesteps)
        folder = out / slugify(prompt)
        check_writable(out)  # the folder itself is made when the figure is written
        with console.status(f"decomposing at t = {', '.join(map(str, times))}..."):
            paths = run_decomposition(prior, prompt, out_dir=folder, timesteps=times, in_domain=in_domain, ood=outside,
                                      sources=sources, seed=seed)
        for path in paths:
            console.print(f"wrote {path}")

    run_command(body)
