"""``nfsd-nerf doctor``: will ``train`` run on this machine with this model, and if not, what to do.

Run before a long job or when reporting a bug. Each check is a function returning :class:`Row`
(name, value, ``ok`` / ``warn`` / ``fail``, advice); :func:`run_checks` gathers them and
:func:`render` prints the table. Rules:

* a ``--model`` value that cannot name a model (a file, a folder that is not a diffusers folder,
  a malformed hub id) is a :class:`~nfsd_nerf.errors.UserError` (exit code 2) before any check;
* :func:`exit_code` is 1 when a row fails (``train`` would not run: a model missing from the
  cache, an unwritable output folder...), else 0;
* the network is never touched unless ``online=True``: then one hub request, under hub.py's
  deadline (:func:`~nfsd_nerf.guidance.hub.hub_timeout`);
* nerfacc's kernels are never imported without a GPU, and built only with ``build=True``.

torch, huggingface_hub and nerfacc are imported inside the functions (the CLI imports this module lazily anyway).
"""

from __future__ import annotations

from pathlib import Path

from ..config import BUILTIN_MODEL, load_config, preset_path
from ..errors import UserError
from .machine import cuda_rows, disk_rows, ffmpeg_row, hash_grid_row, nerfacc_row, offline_row, toolchain_rows, version_rows
from .model_files import model_rows
from .rows import Machine, ModelRef, Row

__all__ = ["Machine", "ModelRef", "Row", "exit_code", "parse_model", "render", "run_checks"]


# --------------------------------------------------------------------------- entry points


def run_checks(model: str, *, revision: str | None = None, out: Path = Path("outputs"), offline: bool = False,
               online: bool = False, build: bool = False, console=None) -> list[Row]:
    """Every check, in report order. Raises UserError for a ``--model`` that names no model."""
    ref = parse_model(model)
    if online and offline:
        raise UserError("--online and --offline contradict each other: pass one")
    import torch

    cfg = load_config(preset_path("builtin" if ref.kind == "builtin" else "default"))
    machine = Machine(torch.cuda.is_available(), cfg.guidance.half_precision, cfg.field.backend)
    return [
        *version_rows(ref),
        *cuda_rows(ref),
        hash_grid_row(machine),
        *toolchain_rows(machine),
        nerfacc_row(machine, build=build, console=console),
        ffmpeg_row(),
        *model_rows(ref, machine, revision=revision, offline=offline, online=online),
        *disk_rows(ref, out),
        offline_row(offline),
    ]


def exit_code(rows: list[Row]) -> int:
    """1 when any check fails (train would not run), else 0."""
    return 1 if any(row.status == "fail" for row in rows) else 0


_STYLES = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]"}


def render(rows: list[Row], console, model: str) -> None:
    """The table, then each row's advice on its own line (commands stay whole), then the verdict."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"nfsd-nerf doctor (--model {escape(model)})", title_justify="left")
    table.add_column("check", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("status", no_wrap=True)
    for row in rows:
        table.add_row(escape(row.name), escape(row.value), _STYLES[row.status])
    console.print(table, soft_wrap=False)
    for row in sorted((r for r in rows if r.advice), key=lambda r: ("fail", "warn", "ok").index(r.status)):
        label = {"ok": "tip", "warn": "warn", "fail": "FAIL"}[row.status]
        first, *more = row.advice.splitlines()
        console.print(f"{label} {escape(row.name)}: {escape(first)}", highlight=False)
        for line in more:  # commands: one line each, never wrapped (the console soft-wraps)
            console.print(f"    {escape(line)}", highlight=False)
    if exit_code(rows):
        console.print(f"[bold red]train --model {escape(model)} would not run here[/]: fix the FAIL rows above")
    else:
        console.print(f"[green]train --model {escape(model)} would run here[/]")


# --------------------------------------------------------------------------- the model argument


def parse_model(model: str) -> ModelRef:
    """Classify ``--model`` without touching the network; UserError for a value that names no model."""
    from ..guidance.hub import looks_like_path, missing_files, weight_variants

    if model == BUILTIN_MODEL:
        return ModelRef("builtin", model)
    path = Path(model).expanduser()
    if path.is_dir():
        missing = missing_files(path, weight_variants(path, half_precision=False))
        if missing:
            raise UserError(f"--model {model!r} is not a Stable Diffusion diffusers folder: missing {', '.join(missing)}")
        return ModelRef("folder", str(path.resolve()))
    if path.exists():
        raise UserError(f"--model {model!r} is a file; pass a diffusers folder, a hub id (org/name) or 'builtin'")
    if looks_like_path(model):
        raise UserError(f"--model {model!r}: no such folder; pass a diffusers folder, a hub id or 'builtin'")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        raise UserError(f"--model {model!r} is neither an existing folder nor a valid hub id (org/name)") from None
    return ModelRef("hub", model)
