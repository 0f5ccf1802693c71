"""The built-in prior's references: their cameras, the on-disk cache of their renders, and which
of them a render's camera sees.

The references are procedural renders (:mod:`.shapes`) of every shape from ``n_references``
cameras drawn like the training cameras but without jitter (each looks straight at the object,
world up), so every reference is in a *canonical frame*; all objects share them. They are
rendered once per shape, colour-free (shade and coverage), and cached on disk under a key of
everything they depend on.

Nearness of cameras, ``align=True`` (the default of :class:`~.builtin.BuiltinPrior`): the nearest
camera *positions* (angle between the directions from the object + 0.3 |difference of log
distance|), and each neighbour is re-projected into the render's camera by a 2D warp: the render
camera's rotation relative to its own canonical frame (look-at and up jitter), its field of view,
and a zoom for the distance difference. What is left is the small change of viewpoint between
neighbouring positions. ``align=False``: the plain rule of docs/design.md, section 6, nearest by angle
+ |difference of log apparent size| (apparent size ~ 1 / (distance * tan(fovy / 2))), no warp.
Measured on 200 jittered training cameras at 32x32 with the references of cache format 1 (PSNR of
the nearest / mean of 4 selected references against the true object at the query camera, cube and
torus): plain rule 8.8 / 10.6
and 8.7 / 10.3 dB; aligned 24.7 / 25.1 and 23.8 / 24.2 dB. In training (SDS 7.5, 600 steps, red
cube) the plain rule reached 17.6 dB with jittered cameras and 24.5 dB without jitter.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cameras import WORLD_UP, Cameras, generate_rays, look_at, sample_training_cameras
from ..files import atomic_write_bytes
from .shapes import SHAPES, shade_and_coverage

CACHE_FORMAT = 2
"""Bump when the cached file's layout or meaning changes. 2: lit by each camera's camera-attached
light (the NeRF's Lambertian model) instead of world-fixed lights (issue #16)."""


def reference_cameras(n_references: int = 500, seed: int = 0) -> Cameras:
    """The references' cameras: the default training distribution without jitter, fixed seed (CPU)."""
    return sample_training_cameras(n_references, generator=torch.Generator().manual_seed(seed),
                                   position_perturb=0.0, center_perturb=0.0, up_perturb=0.0)


# --------------------------------------------------------------------------- camera nearness


def view_features(cameras: Cameras) -> Tensor:
    """[B] cameras -> [B, 5] float64 features: unit direction object -> camera (3), log distance,
    log apparent size (apparent size = 1 / (distance * tan(fovy / 2)))."""
    pos = cameras.c2w[:, :3, 3].double()  # [B, 3]
    dist = pos.norm(dim=-1).clamp(min=1e-9)
    log_size = -torch.log(dist * torch.tan(0.5 * cameras.fovy.double()))
    return torch.cat([pos / dist[:, None], dist.log()[:, None], log_size[:, None]], dim=1)


def camera_distance(query: Tensor, refs: Tensor, *, distance_weight: float = 0.3, size_weight: float = 0.0) -> Tensor:
    """Features [Q, 5] and [R, 5] (from :func:`view_features`) -> nearness [Q, R] (0 for equal cameras).

    angle between view directions (radians) + distance_weight * |log distance ratio|
    + size_weight * |log apparent size ratio|.
    """
    angle = torch.arccos((query[:, None, :3] * refs[None, :, :3]).sum(-1).clamp(-1.0, 1.0))
    distance = (query[:, None, 3] - refs[None, :, 3]).abs()
    size = (query[:, None, 4] - refs[None, :, 4]).abs()
    return angle + distance_weight * distance + size_weight * size


def nearest_references(query: Tensor, refs: Tensor, k: int, **weights: float) -> Tensor:
    """Indices [Q, k] of the k reference cameras nearest to each query camera, nearest first."""
    return torch.topk(camera_distance(query, refs, **weights), k, dim=1, largest=False).indices


# --------------------------------------------------------------------------- alignment


def canonical_rotation(positions: Tensor) -> Tensor:
    """[B, 3] camera positions -> [B, 3, 3] rotations (columns right, up, backward) of cameras there
    that look at the origin with +Z up: the frame every reference was rendered in."""
    up = torch.tensor(WORLD_UP, dtype=positions.dtype, device=positions.device).expand_as(positions)
    straight_down = (torch.nn.functional.normalize(positions, dim=-1)[:, 2].abs() > 0.999)[:, None]
    up = torch.where(straight_down, torch.tensor([1.0, 0.0, 0.0], dtype=positions.dtype, device=positions.device), up)
    return look_at(positions, torch.zeros_like(positions), up)[:, :3, :3]


def alignment_grid(query: Cameras, ref_fovy: Tensor, ref_distance: Tensor, size: int) -> Tensor:
    """Where each pixel of the query's image falls in each of its references' images.

    query: N cameras; ref_fovy, ref_distance [N, k] of the canonical reference cameras
    -> grid [N, k, S, S, 2] for ``grid_sample`` (x, y in [-1, 1], align_corners=False; outside
    the reference image where a pixel looks away from it). A query pixel's ray is expressed in
    the query's canonical frame and projected by the reference's focal length scaled by
    distance_query / distance_ref (a zoom standing in for the dolly between the two distances).
    """
    _, rays_d = generate_rays(query, size, size)  # [N, S, S, 3]
    rotation = canonical_rotation(query.c2w[:, :3, 3])
    v = torch.einsum("nji,nhwj->nhwi", rotation, rays_d)  # in the canonical frame (R^T d)
    depth = -v[..., 2]  # [N, S, S], positive in front
    focal = 0.5 * size / torch.tan(0.5 * ref_fovy) * (query.c2w[:, :3, 3].norm(dim=-1)[:, None] / ref_distance)  # [N, k]
    inv_depth = 1.0 / depth.clamp(min=1e-6)
    x = focal[:, :, None, None] * (v[..., 0] * inv_depth)[:, None] / (0.5 * size)  # column, in [-1, 1] units
    y = -focal[:, :, None, None] * (v[..., 1] * inv_depth)[:, None] / (0.5 * size)  # row, down
    grid = torch.stack([x, y], dim=-1)  # [N, k, S, S, 2]
    return torch.where((depth > 1e-6)[:, None, :, :, None], grid, torch.full_like(grid, 2.0))


def align_maps(maps: Tensor, grid: Tensor) -> Tensor:
    """Warp maps [N, k, C, S, S] (zero outside, like shade and coverage) by grid [N, k, S, S, 2] (bilinear)."""
    n, k, c, h, w = maps.shape
    out = F.grid_sample(maps.reshape(n * k, c, h, w), grid.reshape(n * k, h, w, 2).to(maps.dtype),
                        mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(n, k, c, h, w)


# --------------------------------------------------------------------------- references on disk


def default_cache_dir() -> Path:
    """``$NFSD_NERF_CACHE``, else ``$XDG_CACHE_HOME/nfsd-nerf``, else ``~/.cache/nfsd-nerf``."""
    if os.environ.get("NFSD_NERF_CACHE"):
        return Path(os.environ["NFSD_NERF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nfsd-nerf"


def reference_key(cameras: Cameras, image_size: int, supersample: int) -> str:
    """Hash of everything the reference renders depend on: cameras, size, supersampling, shape and light code."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "size": image_size, "supersample": supersample,
                         "shapes": list(SHAPES)}).encode())
    h.update((Path(__file__).parent / "shapes.py").read_bytes())
    h.update((Path(__file__).parent.parent / "render" / "shading.py").read_bytes())  # the light model
    for tensor in (cameras.c2w, cameras.fovy):
        h.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _write_cache(path: Path, shade: Tensor, coverage: Tensor, image_size: int) -> None:
    """Save shade and coverage [n_shapes, M, H, W] as float16 safetensors, atomically; OSError on failure.

    Serialized to bytes first: ``save_file`` renames its own private temporary file into place,
    which would make the cache unreadable to other users whatever the umask.
    """
    from safetensors.torch import save

    data = save({"shade": shade.half(), "coverage": coverage.half()},
                metadata={"format": str(CACHE_FORMAT), "shapes": ",".join(SHAPES), "size": str(image_size)})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def load_or_build_references(
    cameras: Cameras,
    image_size: int,
    *,
    supersample: int = 2,
    cache_dir: Path | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, dict]:
    """Colour-free references of every shape: shade and coverage [n_shapes, M, H, W] float32 (CPU).

    Read from ``cache_dir / builtin-refs-<key>.safetensors`` when present, else rendered on
    ``device`` (seconds on a CPU) and written there atomically; a cache that cannot be written
    only warns.
    Returns also info: {"key", "path", "cache_hit", "seconds"}.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    started = time.perf_counter()
    key = reference_key(cameras, image_size, supersample)
    path = (default_cache_dir() if cache_dir is None else Path(cache_dir)) / f"builtin-refs-{key}.safetensors"
    if path.exists():
        try:
            data = load_file(path)
            info = {"key": key, "path": str(path), "cache_hit": True, "seconds": time.perf_counter() - started}
            return data["shade"].float(), data["coverage"].float(), info
        except (OSError, SafetensorError, KeyError) as exc:  # a damaged file: render again and replace it
            warnings.warn(f"ignoring unreadable reference cache {path}: {exc}")
    cams = cameras.to(device)
    parts = [shade_and_coverage(shape, cams, image_size, supersample=supersample) for shape in SHAPES.values()]
    shade = torch.stack([p[0] for p in parts]).cpu()
    coverage = torch.stack([p[1] for p in parts]).cpu()
    try:
        _write_cache(path, shade, coverage, image_size)
    except OSError as exc:
        warnings.warn(f"could not cache the built-in prior's references in {path.parent}: {exc}")
    # what a later cache hit returns (float16 round trip), so a run does not depend on the cache
    shade, coverage = shade.half().float(), coverage.half().float()
    return shade, coverage, {"key": key, "path": str(path), "cache_hit": False, "seconds": time.perf_counter() - started}
