"""Export and video timings on a default-size NeRFField (16 levels x 2, table 2^19, bound 2).

The field is the untrained one: its Magic3D blob is a ball of radius ~0.5, a realistic size for
a generated object; the occupancy grid is refreshed from it as training would. Every stage of
``nfsd-nerf export`` is timed alone (seconds, wall clock), then ``render-video`` per frame.

Run alone: ``.venv/bin/python benchmarks/bench_export.py`` (prints the dict).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


@torch.no_grad()
def bench_export(
    resolution: int = 256,
    texture_size: int = 1024,
    video_sizes: tuple[int, ...] = (256, 512),
    full_grid_resolution: int = 128,
    seed: int = 0,
) -> dict:
    """Seconds per stage of a mesh export at ``resolution`` and per video frame at each size.

    Keys ending in ``_s`` are seconds; the others are counts and fractions. The lattice is sampled
    the way ``export_run`` does (skipping cells the occupancy grid marks empty); the full-box
    lattice is timed at ``full_grid_resolution`` (a 256^3 full lattice is 8x that).
    """
    from nfsd_nerf.config import BackgroundConfig, FieldConfig, RenderConfig
    from nfsd_nerf.export import extract, texture
    from nfsd_nerf.export.formats import write_mesh
    from nfsd_nerf.export.video import render_frame
    from nfsd_nerf.field import Background, NeRFField
    from nfsd_nerf.cameras import orbit_cameras
    from nfsd_nerf.render import OccupancyGrid, step_size_from_samples

    torch.manual_seed(seed)
    cfg, render_cfg = FieldConfig(), RenderConfig()
    field = NeRFField(cfg).eval()
    background = Background(BackgroundConfig(kind="mlp"))
    occupancy = OccupancyGrid(cfg.bound, render_cfg.occupancy_resolution, render_cfg.occupancy_threshold)
    occupancy.update(0, field.density, step_size=step_size_from_samples(cfg.bound, render_cfg.n_samples))
    out: dict = {"occupied_fraction": occupancy.occupied_fraction()}

    # 1. Lattice, threshold, marching cubes, floaters
    mask = extract.lattice_mask_from_occupancy(occupancy.binaries, cfg.bound, resolution)
    out["lattice_fraction_evaluated"] = float(mask.float().mean())
    grid, out[f"grid_{resolution}_occupancy_s"] = _timed(
        extract.sample_density_grid, field.density, cfg.bound, resolution, mask=mask
    )
    _, out[f"grid_{full_grid_resolution}_full_s"] = _timed(
        extract.sample_density_grid, field.density, cfg.bound, full_grid_resolution
    )
    spacing = 2.0 * cfg.bound / (resolution - 1)
    level, out["threshold_auto_s"] = _timed(extract.threshold_from_density_grid, grid, spacing)
    mesh, out[f"marching_cubes_{resolution}_s"] = _timed(extract.mesh_from_density_grid, grid, level, cfg.bound)
    mesh, out["components_s"] = _timed(extract.keep_large_components, mesh)
    _ = mesh.vertex_normals
    out["mesh_face_count"] = len(mesh.faces)

    # 2. Unwrap and bake (bake = unwrap + rasterize + albedo + dilation; unwrap also timed alone)
    _, out["unwrap_s"] = _timed(texture.unwrap_uv, mesh, texture_size)
    albedo_fn = texture.albedo_fn_from_field(field)
    textured, out[f"bake_{texture_size}_s"] = _timed(texture.bake_texture, mesh, albedo_fn, texture_size)
    out[f"bake_{texture_size}_without_unwrap_s"] = out[f"bake_{texture_size}_s"] - out["unwrap_s"]
    with tempfile.TemporaryDirectory() as tmp:
        _, out["write_glb_s"] = _timed(write_mesh, textured, Path(tmp) / "mesh.glb")

    # 3. Video frames (rgb + normal + depth, as render-video's default), the first orbit view
    cams = orbit_cameras(1)
    render_frame(field, background, cams, 16, ("rgb", "normal", "depth"), occupancy=occupancy)  # warm-up
    for size in video_sizes:
        _, out[f"video_frame_{size}_s"] = _timed(
            render_frame, field, background, cams, size, ("rgb", "normal", "depth"),
            occupancy=occupancy, n_samples=render_cfg.n_samples,
        )
    return out


if __name__ == "__main__":
    for key, value in bench_export().items():
        print(f"{key:<36} {value:.4g}")
