"""Render throughput: one training render (forward + backward) of a freshly initialised NeRFField.

Two settings, labelled in every key:

* ``cpu32``: CPU-preset-like field (8 levels x 2 features, table 2^14, MLP 32 wide, bound 1),
  32 marching steps across the box diagonal, 32x32 image.
* ``default64``: the default field (16 levels x 2, table 2^19, MLP 64 wide, bound 2), 512 steps,
  64x64 image.

Each is timed with albedo shading and with Lambertian shading + orientation loss (finite-difference
normals: 6 extra density evaluations per sample). The occupancy grid (32^3) is refreshed once from
the initial blob first, as training does, so skipping is what step 16 of a run sees.
"""

from __future__ import annotations

import time

import torch

from nfsd_nerf.cameras import generate_rays, sample_training_cameras
from nfsd_nerf.config import BackgroundConfig, FieldConfig
from nfsd_nerf.field import Background, NeRFField
from nfsd_nerf.render import OccupancyGrid, render_rays, step_size_from_samples

SETTINGS = {
    "cpu32": dict(field=dict(n_levels=8, log2_hashmap_size=14, hidden_dim=32, bound=1.0), n_samples=32, size=32),
    "default64": dict(field={}, n_samples=512, size=64),
}


def _one_setting(field_kw: dict, n_samples: int, size: int, repeats: int, device: str, early_stop_eps: float) -> dict:
    torch.manual_seed(0)
    field = NeRFField(FieldConfig(**field_kw)).to(device)
    background = Background(BackgroundConfig(kind="mlp")).to(device)
    grid = OccupancyGrid(field.bound, 32).to(device)
    gen = torch.Generator().manual_seed(0)
    grid.update(0, field.density, step_size=step_size_from_samples(field.bound, n_samples), generator=gen)
    cams = sample_training_cameras(1, generator=gen, device=device)
    rays_o, rays_d = (r.reshape(-1, 3) for r in generate_rays(cams, size, size))
    lights = cams.light_positions.expand(rays_o.shape[0], 3)
    n_rays = rays_o.shape[0]
    out = {}
    for mode in ("albedo", "lambertian"):
        kw = dict(occupancy=grid, n_samples=n_samples, stratified=True, generator=gen, early_stop_eps=early_stop_eps)
        if mode == "lambertian":
            kw.update(shading="lambertian", light_positions=lights, need_normals=True)

        def step() -> int:
            r = render_rays(field, background, rays_o, rays_d, **kw)
            loss = r.rgb.mean() + r.opacity.mean() + r.orientation.mean()
            loss.backward()
            return r.n_field_samples

        step()  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        times, samples = [], 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            samples = step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        best = min(times)
        out[f"{mode}_rays_per_s"] = n_rays / best
        out[f"{mode}_field_points_per_ray"] = samples / n_rays
        out[f"{mode}_ms_per_render"] = best * 1e3
    out["occupied_cells_fraction"] = grid.occupied_fraction()
    return out


def bench_render(
    size: int = 64,
    *,
    repeats: int = 3,
    device: str | None = None,
    early_stop_eps: float = 1e-4,
    settings: tuple[str, ...] = ("cpu32", "default64"),
) -> dict:
    """{"<setting>_<mode>_rays_per_s": ..., ...}: best of ``repeats`` training renders (fwd + bwd).

    ``size`` is the default64 setting's image size (cpu32 always renders 32x32).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {"device": device}
    for name in settings:
        s = SETTINGS[name]
        render_size = size if name == "default64" else s["size"]
        for key, value in _one_setting(s["field"], s["n_samples"], render_size, repeats, device, early_stop_eps).items():
            results[f"{name}_{render_size}px_{key}"] = value
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--early-stop-eps", type=float, default=1e-4, help="0 disables early ray termination")
    args = parser.parse_args()
    for key, value in bench_render(args.size, repeats=args.repeats, early_stop_eps=args.early_stop_eps).items():
        print(f"{key:<58} {value if isinstance(value, str) else f'{value:.4g}'}")
