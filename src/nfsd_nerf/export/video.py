"""Turntable videos of a field: the published evaluation orbit (docs/design.md, sections 7 and 9) as H.264 MP4.

Cameras: :data:`~nfsd_nerf.cameras.TURNTABLE_ORBIT`'s fovy (70 deg) at a fixed elevation, the
light at the camera, at a distance that frames the object (:func:`turntable_cameras`: it spans
``FRAME_FILL`` of the frame height; ``distance`` / ``fovy`` override). Each frame is rendered in ray chunks under ``no_grad`` (a
512x512 frame fits in CPU memory) and streamed to the encoder, so memory does not grow with the
frame count (except ``depth``, whose grey scale is normalised over the whole video and so is
written at the end). Each file is encoded under a temporary name, read back (every frame must be
there: the encoder's exit status is not reported) and only then renamed into place.

Modes: ``rgb`` (albedo over the learned background, what training renders), ``shaded``
(Lambertian), ``textureless`` (white albedo, Lambertian: the geometry alone), ``normal`` (world
normals mapped to RGB as ``0.5 n + 0.5`` over white) and ``depth`` (near bright, far dark, over black).

Normals come by default from the rendered depth (``normals="depth"``: the surface through each
pixel's expected termination point, differentiated across neighbouring pixels). The field's own
normals (``normals="field"``) cost six extra density evaluations per sample with finite
differences, which makes a CPU frame ~4.6x slower; for a turntable the depth's geometry is what
one wants to see anyway.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from ..cameras import TURNTABLE_ORBIT, Cameras, generate_rays
from ..config.checks import RAY_BYTES, MemoryNeed, check_memory
from ..errors import UserError
from ..runtime import module_device
from .texture import rgb8_from_unit
from .framing import turntable_cameras
from .video_file import VideoFile, video_file

MODES: tuple[str, ...] = ("rgb", "shaded", "textureless", "normal", "depth")
DEFAULT_CHUNK_RAYS = 8192
"""Rays per render call: bounds the packed samples held at once (~0.5 GB at 512 samples per ray)."""
_SHADING = {"rgb": "albedo", "shaded": "lambertian", "textureless": "textureless"}

Progress = Callable[[int, int], None]
"""progress(frames_done, frames_total), called after every frame."""

SPECK_FRACTION = 0.05
"""Occupied pieces of the occupancy grid with fewer cells than this fraction of the largest piece's
are speck floaters (small isolated opacity away from the object): :func:`occupancy_without_specks`
drops them from videos, as :func:`~.extract.keep_large_components` drops them from meshes."""


def occupancy_without_specks(occupancy, min_fraction: float = SPECK_FRACTION):
    """A copy of an occupancy grid whose small isolated pieces (26-connected occupied cells with fewer
    than ``min_fraction`` of the largest piece's cells) are empty, or the grid itself if it has none.

    Why: the renderer never samples an empty cell, so a speck floater (issue #16: 1-3 per frame of
    the built-in demo's turntable) is not rendered, while the object's own cells are untouched.
    """
    import copy

    from scipy.ndimage import label

    if occupancy is None:
        return None
    binaries = occupancy.binaries.detach().cpu().numpy()
    labels, n = label(binaries, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return occupancy
    sizes = np.bincount(labels.ravel())[1:]
    small = np.flatnonzero(sizes < min_fraction * sizes.max()) + 1
    if len(small) == 0:
        return occupancy
    speck = torch.from_numpy(np.isin(labels, small)).to(occupancy.binaries.device)
    cleaned = copy.deepcopy(occupancy)
    cleaned.binaries[speck] = False
    cleaned.occs[speck] = 0.0
    return cleaned


# --------------------------------------------------------------------------- pure image maps


def image_from_normals(normal: Tensor, opacity: Tensor) -> Tensor:
    """Accumulated normals [H, W, 3] (``sum w n``) and opacity [H, W] -> RGB [H, W, 3] in [0, 1].

    ``0.5 n + 0.5`` of the unit mean normal, composited over white by opacity.
    """
    unit = torch.nn.functional.normalize(normal, dim=-1)
    a = opacity.clamp(0.0, 1.0)[..., None]
    return a * (0.5 * unit + 0.5) + (1.0 - a)


def normals_from_depth(depth: Tensor, opacity: Tensor, rays_o: Tensor, rays_d: Tensor) -> Tensor:
    """World normals of the rendered surface -> [H, W, 3] unit, facing the camera.

    depth, opacity [H, W] (expected distance along unit rays), rays_o, rays_d [H, W, 3]. The
    surface point of each pixel is ``o + depth * d``; per image axis the one-sided difference
    towards the neighbour with the closer depth is used at depth jumps (so silhouettes do not
    smear the background into the normal), the central difference elsewhere; neighbours less
    than half opaque never count. Pixels less than half opaque, or without a usable neighbour in
    some axis, face the camera (``-d``).
    """
    points = rays_o + depth[..., None] * rays_d  # [H, W, 3]
    solid = opacity >= 0.5

    def tangent(axis: int) -> tuple[Tensor, Tensor]:
        forward = points.roll(-1, dims=axis) - points
        backward = points - points.roll(1, dims=axis)
        ok_f, ok_b = solid.roll(-1, dims=axis).clone(), solid.roll(1, dims=axis).clone()
        n = depth.shape[axis]
        index = torch.arange(n, device=depth.device)
        shape = [1, 1]
        shape[axis] = n
        ok_f &= (index < n - 1).reshape(shape)  # no wrap-around across the border
        ok_b &= (index > 0).reshape(shape)
        step_f = (depth.roll(-1, dims=axis) - depth).abs().masked_fill(~ok_f, float("inf"))
        step_b = (depth - depth.roll(1, dims=axis)).abs().masked_fill(~ok_b, float("inf"))
        one_sided = torch.where((step_f <= step_b)[..., None], forward, backward)
        # a depth jump (silhouette, occlusion) is a step far larger than the other side's and than
        # the pixel's footprint on a surface seen at 80 degrees (~6 footprints)
        footprint = depth * (rays_d.roll(-1, dims=axis) - rays_d).norm(dim=-1)
        jump = torch.maximum(step_f, step_b) > torch.maximum(3.0 * torch.minimum(step_f, step_b), 6.0 * footprint)
        central = ok_f & ok_b & ~jump
        return torch.where(central[..., None], 0.5 * (forward + backward), one_sided), ok_f | ok_b

    right, ok_x = tangent(1)  # along columns (image right)
    down, ok_y = tangent(0)  # along rows (image down)
    normal = torch.nn.functional.normalize(torch.cross(down, right, dim=-1), dim=-1)
    facing = -rays_d
    normal = torch.where(((normal * facing).sum(-1) < 0)[..., None], -normal, normal)
    usable = solid & ok_x & ok_y & (normal.norm(dim=-1) > 0.5)
    return torch.where(usable[..., None], normal, facing)


def depth_range_from_frames(depth: np.ndarray, opacity: np.ndarray) -> tuple[float, float]:
    """(near, far): 1st and 99th percentiles of the depth of pixels at least half opaque.

    depth, opacity [F, H, W]. Robust to a few stray samples; (0, 1) when nothing is opaque.
    """
    fg = depth[opacity >= 0.5].astype(np.float64)
    if fg.size == 0:
        return 0.0, 1.0
    near, far = np.percentile(fg, [1.0, 99.0])
    if far - near < 1e-6:
        far = near + 1e-6
    return float(near), float(far)


def image_from_depth(depth: np.ndarray, opacity: np.ndarray, near: float, far: float) -> np.ndarray:
    """depth, opacity [H, W] -> grey RGB [H, W, 3] in [0, 1]: near 1, far 0.15, over black."""
    level = 1.0 - 0.85 * np.clip((depth.astype(np.float64) - near) / (far - near), 0.0, 1.0)
    grey = np.clip(opacity, 0.0, 1.0) * level
    return np.repeat(grey[..., None], 3, axis=-1)


# --------------------------------------------------------------------------- rendering


def check_video_inputs(frames: int, size: int, fps: float, elevation: float, modes: Sequence[str],
                       device: str = "cpu", distance: float | None = None, fovy: float | None = None) -> tuple[str, ...]:
    """Validate the command's inputs once, the memory a frame needs on ``device`` included (before the
    run loads or ``video/`` exists); returns the modes as a tuple. Messages quote the bad value."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise UserError(f"frames must be a positive integer, got {frames!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16 or size % 2:
        raise UserError(f"video size must be an even number of pixels >= 16 (H.264 yuv420p), got {size!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 240:
        raise UserError(f"fps must be a number in (0, 240], got {fps!r}")
    if not isinstance(elevation, (int, float)) or not -89.0 <= elevation <= 89.0:
        raise UserError(f"elevation must be in [-89, 89] degrees, got {elevation!r}")
    if distance is not None and not (isinstance(distance, (int, float)) and math.isfinite(distance) and distance > 0):
        raise UserError(f"--distance must be a positive number, got {distance!r}")
    if fovy is not None and not (isinstance(fovy, (int, float)) and 1.0 <= fovy <= 170.0):
        raise UserError(f"--fovy must be in [1, 170] degrees, got {fovy!r}")
    modes = tuple(modes)
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise UserError(f"unknown video mode(s) {', '.join(map(repr, unknown)) or '(none)'} (choose from {', '.join(MODES)})")
    if len(set(modes)) != len(modes):
        raise UserError(f"video modes repeat: {','.join(modes)}")
    check_memory(video_memory_needs(frames, size, modes), device)
    return modes


def video_memory_needs(frames: int, size: int, modes: Sequence[str]) -> list[MemoryNeed]:
    """The least memory :func:`render_turntable` holds: a frame's rays and images (the rays are made
    for the whole frame, then rendered in chunks), the orbit's cameras, and with ``depth`` every
    frame's depth (float32) and opacity (float16), kept for the video-wide grey scale."""
    pixels = size * size
    buffered = 6 * frames * pixels if "depth" in modes else 0
    return [MemoryNeed("a video frame", f"--size={size}", (RAY_BYTES + 12 * len(modes)) * pixels),
            MemoryNeed("the turntable", f"--frames={frames}, --size={size}", 100 * frames + buffered)]


@torch.no_grad()
def render_frame(
    field,
    background,
    camera: Cameras,
    size: int,
    modes: Sequence[str],
    *,
    occupancy=None,
    n_samples: int = 512,
    chunk_rays: int = DEFAULT_CHUNK_RAYS,
    normals: Literal["depth", "field"] = "depth",
) -> dict[str, Tensor]:
    """One camera -> {mode: RGB [size, size, 3] in [0, 1]} plus ``depth`` / ``opacity`` [size, size]
    floats when ``depth`` is asked for. One render pass per shading; normals and depth come with
    the first pass (``normals``: from the rendered depth, or the field's, see the module doc)."""
    from ..render import render_image

    device = module_device(field)
    camera = camera.to(device)
    shadings = [m for m in modes if m in _SHADING] or ["rgb"]
    out: dict[str, Tensor] = {}
    for i, mode in enumerate(shadings):
        first = i == 0
        result = render_image(
            field,
            background,
            camera,
            size,
            size,
            chunk_rays=chunk_rays,
            occupancy=occupancy,
            n_samples=n_samples,
            shading=_SHADING[mode],
            need_normals=first and "normal" in modes and normals == "field",
        )
        if mode in modes:
            out[mode] = result["rgb"][0].clamp(0.0, 1.0)
        if first:
            if "normal" in modes and normals == "field":
                out["normal"] = image_from_normals(result["normal"][0], result["opacity"][0])
            elif "normal" in modes:
                rays_o, rays_d = generate_rays(camera, size, size)
                unit = normals_from_depth(result["depth"][0], result["opacity"][0], rays_o[0], rays_d[0])
                out["normal"] = image_from_normals(unit, result["opacity"][0])
            if "depth" in modes:
                out["depth"], out["opacity"] = result["depth"][0], result["opacity"][0]
    return out


def estimate_seconds(
    field,
    background,
    *,
    frames: int = 120,
    size: int = 512,
    modes: Sequence[str] = ("rgb", "normal", "depth"),
    occupancy=None,
    n_samples: int = 512,
    elevation: float = TURNTABLE_ORBIT.elevation_deg,
    probe_size: int = 128,
    normals: Literal["depth", "field"] = "depth",
    distance: float | None = None,
    fovy: float | None = None,
) -> float:
    """Projected wall time of :func:`render_turntable`, in seconds.

    Renders three probe frames of ``min(size, probe_size)`` pixels (after a tiny warm-up frame)
    from three azimuths of the orbit (views differ in cost), and scales their mean by pixel count
    and frame count: rendering cost is proportional to the rays. Costs about three probe frames
    (~1-3 s at 128 on 2 CPU cores); within ~30% of the real time in our measurements.
    """
    probe = min(int(size), int(probe_size))
    cams = turntable_cameras(field, 3, elevation, occupancy=occupancy, distance=distance, fovy=fovy)
    kwargs = dict(occupancy=occupancy, n_samples=n_samples, normals=normals)
    render_frame(field, background, cams[0], 16, modes, **kwargs)  # warm-up (allocations, lazy imports)
    times = []
    for i in range(len(cams)):
        start = time.perf_counter()
        render_frame(field, background, cams[i], probe, modes, **kwargs)
        times.append(time.perf_counter() - start)
    return sum(times) / len(times) * (size / probe) ** 2 * frames


def render_turntable(
    field,
    background,
    *,
    out_dir: Path | str,
    frames: int = 120,
    size: int = 512,
    elevation: float = TURNTABLE_ORBIT.elevation_deg,
    modes: Sequence[str] = ("rgb", "normal", "depth"),
    fps: float = 30.0,
    gif: bool = False,
    occupancy=None,
    n_samples: int = 512,
    chunk_rays: int = DEFAULT_CHUNK_RAYS,
    quality: float = 8.0,
    normals: Literal["depth", "field"] = "depth",
    name: str = "turntable",
    progress: Progress | None = None,
    distance: float | None = None,
    fovy: float | None = None,
) -> list[Path]:
    """Render the turntable orbit and write ``out_dir/<name>_<mode>.mp4`` (and ``.gif`` if asked).

    field/background: as for :func:`~nfsd_nerf.render.render_image`; ``occupancy`` and
    ``n_samples`` should be the run's. ``frames`` views evenly spaced in azimuth starting at the
    front (azimuth 0), ``size`` x ``size`` pixels (even, for yuv420p), ``quality`` 0-10 (imageio's
    scale; 8 is x264 CRF 10). Every file is written under a temporary name and renamed when
    complete; on any error (or Ctrl-C) the temporary files are removed. Returns the paths written.
    ``distance`` / ``fovy``: the camera's; by default TURNTABLE_ORBIT's fovy at a distance that frames
    the object (:func:`turntable_cameras`).
    (One function of numbered stages, longer than most: they share the open writers.)
    """
    # 1. Check inputs
    modes = check_video_inputs(frames, size, fps, elevation, modes, device=str(module_device(field)),
                               distance=distance, fovy=fovy)
    if normals not in ("depth", "field"):
        raise UserError(f"normals must be 'depth' or 'field', got {normals!r}")
    out_dir = Path(out_dir)
    cams = turntable_cameras(field, frames, elevation, occupancy=occupancy, distance=distance, fovy=fovy)
    suffixes = (".mp4", ".gif") if gif else (".mp4",)

    # 2. Open one writer per output, each on a temporary file
    paths = {(mode, suffix): out_dir / f"{name}_{mode}{suffix}" for mode in modes for suffix in suffixes}
    with ExitStack() as stack:
        writers = _open_writers(stack, paths, out_dir, fps, quality)

        # 3. Render and stream frames (depth is buffered for its global grey scale)
        depth_frames, opacity_frames = [], []
        for i in range(frames):
            images = render_frame(
                field, background, cams[i], size, modes,
                occupancy=occupancy, n_samples=n_samples, chunk_rays=chunk_rays, normals=normals,
            )
            for mode in modes:
                if mode == "depth":
                    depth_frames.append(images["depth"].cpu().numpy().astype(np.float32))
                    opacity_frames.append(images["opacity"].cpu().numpy().astype(np.float16))
                    continue
                frame = rgb8_from_unit(images[mode])
                for suffix in suffixes:
                    writers[mode, suffix].append(frame)
            if progress is not None:
                progress(i + 1, frames)

        # 4. Depth, normalised over the whole video
        if "depth" in modes:
            _write_depth([writers["depth", suffix] for suffix in suffixes], depth_frames, opacity_frames)

        # 5. Close every encoder and check every file reads back complete, then rename them all into
        #    place (on any error above, leaving the block closes and removes the temporary files instead)
        for video in writers.values():
            video.finish()
        try:
            stack.close()
        except OSError as exc:
            raise UserError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None
    return list(paths.values())


def _open_writers(stack: ExitStack, paths: dict[tuple[str, str], Path], out_dir: Path, fps: float,
                  quality: float) -> dict[tuple[str, str], VideoFile]:
    """One writer per output on a temporary file, held by ``stack``; entered in reverse so that the
    stack, unwinding last-in first-out, renames them in order."""
    writers: dict[tuple[str, str], VideoFile] = {}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for key in reversed(paths):
            writers[key] = stack.enter_context(video_file(paths[key], fps, quality))
    except OSError as exc:
        raise UserError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None
    return writers


def _write_depth(writers: list[VideoFile], depth_frames: list[np.ndarray], opacity_frames: list[np.ndarray]) -> None:
    """Depth frames [H, W] grey-scaled over the whole video (one near/far for every frame)."""
    depth, opacity = np.stack(depth_frames), np.stack(opacity_frames).astype(np.float32)
    near, far = depth_range_from_frames(depth, opacity)
    for d, a in zip(depth, opacity):
        frame = rgb8_from_unit(image_from_depth(d, a, near, far))
        for writer in writers:
            writer.append(frame)


def render_run_video(
    run_dir: Path | str,
    *,
    frames: int = 120,
    fps: float = 30.0,
    size: int = 512,
    elevation: float = TURNTABLE_ORBIT.elevation_deg,
    modes: Sequence[str] = ("rgb", "normal", "depth"),
    gif: bool = False,
    normals: Literal["depth", "field"] = "depth",
    checkpoint: Path | str | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    announce: Callable[[float], None] | None = None,
    distance: float | None = None,
    fovy: float | None = None,
) -> list[Path]:
    """``nfsd-nerf render-video``: load a run (latest checkpoint by default) and write
    ``RUN_DIR/video/turntable_<mode>.mp4``, without speck floaters (:func:`occupancy_without_specks`).
    ``announce(seconds)`` receives the projected render time before rendering starts (the CLI prints it)."""
    from ..checkpoint import load_run
    from ..files import writing_folder

    check_video_inputs(frames, size, fps, elevation, modes, device=str(device), distance=distance, fovy=fovy)
    run = load_run(Path(run_dir), None if checkpoint is None else Path(checkpoint), device=device)
    kwargs = dict(occupancy=occupancy_without_specks(run.occupancy), n_samples=run.config.render.n_samples, normals=normals,
                  distance=distance, fovy=fovy)
    if announce is not None:
        announce(
            estimate_seconds(run.field, run.background, frames=frames, size=size, modes=modes, elevation=elevation, **kwargs)
        )
    with writing_folder(Path(run_dir) / "video", "turntable videos") as out_dir:
        return render_turntable(
            run.field,
            run.background,
            out_dir=out_dir,
            frames=frames,
            size=size,
            elevation=elevation,
            modes=modes,
            fps=fps,
            gif=gif,
            progress=progress,
            **kwargs,
        )
