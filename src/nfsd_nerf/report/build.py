"""``nfsd-nerf report``: read the folders, optionally make missing media, and write the report folder.

The report is built in a temporary sibling folder and renamed into place only when complete, so an
existing report is replaced only by a whole new one (a failure or Ctrl-C leaves the old one). Media
are hard links (or copies) of the run's files, so the report stays valid when the run is exported
or rendered again, and costs no space where links are possible. A report folder carries a marker
file: only a folder with it (or an empty one) is ever replaced.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .collect import VIDEO_MODES, BatchData, RunData, read_inputs
from .compare import comparison_page
from .page import RunMedia, run_page

MARKER = ".nfsd-nerf-report"
"""File in every report folder; a folder without it is never replaced."""
MAX_PREVIEWS = 48
"""Previews copied into a report: evenly spaced over training, the last one always."""


@dataclass(frozen=True)
class MakeMissing:
    """What ``--make-missing`` renders: the turntables' size and frames, the mesh's grid resolution."""

    size: int = 256
    frames: int = 60
    resolution: int = 256


def default_target(data: BatchData | list[RunData]) -> Path:
    if isinstance(data, BatchData):
        return data.folder / "report"
    if len(data) == 1:
        return data[0].folder / "report"
    raise UserError("several runs: say where the comparison goes with --out DIR")


def check_target(target: Path) -> None:
    """Refuse a target that is a file, or a folder with other content than an earlier report."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise UserError(f"{target} exists and is not a folder: choose another --out")
    if target.is_dir() and not (target / MARKER).exists() and any(target.iterdir()):
        raise UserError(f"{target} holds files that are not a report: choose an empty or new folder with --out")


def link_or_copy(source: Path, target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    return target.name


def spaced(items: list, limit: int) -> list:
    """At most ``limit`` items, evenly spaced, the first and the last kept."""
    if len(items) <= limit:
        return list(items)
    picks = {round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)}
    return [items[i] for i in sorted(picks)]


def stage_run_media(run: RunData, folder: Path, prefix: str = "") -> RunMedia:
    """Copy a run's media into ``folder/media`` and say where they are, relative to ``folder``'s
    parent joined with ``prefix`` (``""`` for a page in ``folder`` itself)."""
    media_dir = folder / "media"
    media = RunMedia()
    for mode in VIDEO_MODES:
        if mode in run.videos:
            name = link_or_copy(run.videos[mode], media_dir / run.videos[mode].name)
            media.videos[mode] = f"{prefix}media/{name}"
    for step, path in spaced(run.previews, MAX_PREVIEWS):
        name = link_or_copy(path, media_dir / "previews" / path.name)
        media.previews.append((step, f"{prefix}media/previews/{name}"))
    if run.mesh is not None:
        data = run.mesh.read_bytes()
        link_or_copy(run.mesh, media_dir / "mesh.glb")
        media.mesh_href = f"{prefix}media/mesh.glb"
        media.mesh_data_url = "data:model/gltf-binary;base64," + base64.b64encode(data).decode("ascii")
    return media


def write_run_report(run: RunData, folder: Path, back: str | None = None) -> RunMedia:
    folder.mkdir(parents=True, exist_ok=True)
    media = stage_run_media(run, folder)
    (folder / "index.html").write_text(run_page(run, media, back=back), encoding="utf-8")
    return media


def write_comparison(title: str, subtitle: str, runs: list[RunData], stage: Path) -> None:
    """The comparison page in ``stage`` and each run's own page in ``stage/runs/<n>/``."""
    media, pages = {}, {}
    for i, run in enumerate(runs, start=1):
        sub = f"runs/{i:03d}/"
        run_media = write_run_report(run, stage / sub, back="../../index.html")
        media[run.label] = RunMedia(videos={m: sub + href for m, href in run_media.videos.items()})
        pages[run.label] = sub + "index.html"
    (stage / "index.html").write_text(comparison_page(title, runs, media, pages, subtitle=subtitle), encoding="utf-8")


def swap_into_place(stage: Path, target: Path) -> None:
    """Put the complete ``stage`` at ``target``; the old report goes only after the new one is in place."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
        os.replace(target, old)
    try:
        os.replace(stage, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


FrameProgress = Callable[[str], Callable[[int, int], None]]
"""Given a run's label, the ``(done, total)`` frame callback of its turntable rendering (a progress bar)."""


def make_missing(runs: list[RunData], settings: MakeMissing, log: Callable[[str], None],
                 progress: FrameProgress | None = None) -> None:
    """Export ``mesh.glb`` and render the turntables of runs that lack them, through the library calls
    of ``export`` and ``render-video``; a run with no checkpoint is only reported."""
    from ..export.pipeline import export_run
    from ..export.video import check_video_inputs, render_run_video

    modes = VIDEO_MODES
    check_video_inputs(settings.frames, settings.size, 30.0, 15.0, modes)
    for run in runs:
        missing = [m for m in modes if m not in run.videos]
        if run.mesh is not None and not missing:
            continue
        if not run.has_checkpoint:
            log(f"{run.label}: no checkpoint yet, nothing to export or render")
            continue
        if run.mesh is None:
            log(f"{run.label}: exporting the mesh (grid {settings.resolution})")
            export_run(run.folder, format="glb", resolution=settings.resolution)
        if missing:
            log(f"{run.label}: rendering the {', '.join(missing)} turntable ({settings.frames} frames, {settings.size} px)")
            render_run_video(run.folder, frames=settings.frames, size=settings.size, modes=tuple(missing),
                             progress=None if progress is None else progress(run.label))


def build_report(paths: list[Path], *, out: Path | None = None, missing: MakeMissing | None = None,
                 log: Callable[[str], None] = lambda line: None, progress: FrameProgress | None = None) -> Path:
    """Write the report of one run, several runs or a batch; returns its ``index.html``.
    ``missing``: make absent meshes and turntables first (``--make-missing``, ``progress`` per run)."""
    data = read_inputs([Path(p) for p in paths])
    target = Path(out) if out is not None else default_target(data)
    check_target(target)
    if missing is not None:
        make_missing(data.runs if isinstance(data, BatchData) else data, missing, log, progress)
        data = read_inputs([Path(p) for p in paths])
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        stage.mkdir()
    except OSError as exc:
        raise UserError(f"cannot write the report in {target.parent}: {exc.strerror or exc}") from None
    try:
        (stage / MARKER).write_text("made by nfsd-nerf report; this whole folder is replaced by the next report\n")
        if isinstance(data, BatchData):
            write_comparison(f"batch {data.name}", str(data.folder), data.runs, stage)
        elif len(data) == 1:
            write_run_report(data[0], stage)
        else:
            write_comparison("comparison of runs", "", data, stage)
        swap_into_place(stage, target)
    except OSError as exc:
        raise UserError(f"cannot write the report in {target}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target / "index.html"
