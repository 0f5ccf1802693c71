"""Render throughput: one training render (forward + backward) of a freshly initialised NeRFField.

Two settings, labelled in every key:

* ``cpu32``: CPU-preset-like field (8 levels x 2 features, table 2^14, MLP 32 wide, bound 1),
  32 marching steps across the box diagonal, 32x32 image.
* ``default64``: the default field (16 levels x 2, table 2^19, MLP 64 wide, bound 2), 512 steps,
  64x64 image.

Each is timed with albedo shading and with Lambertian shading + orientation loss, the latter once
per normal method: ``lambertian`` rows use finite-difference normals (6 extra density evaluations
per sample), ``lambertian_analytic`` rows autograd normals (one density evaluation kept under
``create_graph``, then a double backward through the hash grid): what ``field.normal_method: auto``
chooses between. ``preview_*`` rows render the same Lambertian view without autograd, as previews do. ``--heads separate`` times threestudio's two MLP heads instead of the shared one.
The occupancy grid (32^3) is refreshed once from the initial blob first, as training does, so
skipping is what step 16 of a run sees.
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


MODES = {
    "albedo": (None, True),
    "lambertian": ("finite_difference", True),
    "lambertian_analytic": ("analytic", True),
    "preview_lambertian": ("finite_difference", False),
    "preview_lambertian_analytic": ("analytic", False),
}
"""Row label -> (normal method of a Lambertian render, None: albedo shading; whether it is a training
render, forward + backward, or a preview's, under no_grad and without a backward)."""


_clock = time.perf_counter
"""What the rows time: wall time, or (``--clock cpu``) this process's CPU time, which other load on a
shared machine does not inflate (with ``--threads 1`` it is the work of one thread)."""


def _one_setting(field_kw: dict, n_samples: int, size: int, repeats: int, device: str, early_stop_eps: float,
                 heads: str = "shared", alpha_threshold: float = 0.0) -> dict:
    """Best of ``repeats`` fwd+bwd renders per mode; the modes take turns (round-robin), so a shared
    machine's load drift hits them alike and their ratio is fair."""
    torch.manual_seed(0)
    field = NeRFField(FieldConfig(**field_kw, heads=heads)).to(device)
    background = Background(BackgroundConfig(kind="mlp")).to(device)
    grid = OccupancyGrid(field.bound, 32, alpha_threshold=alpha_threshold).to(device)
    gen = torch.Generator().manual_seed(0)
    grid.update(0, field.density, step_size=step_size_from_samples(field.bound, n_samples), generator=gen)
    cams = sample_training_cameras(1, generator=gen, device=device)
    rays_o, rays_d = (r.reshape(-1, 3) for r in generate_rays(cams, size, size))
    lights = cams.light_positions.expand(rays_o.shape[0], 3)
    n_rays = rays_o.shape[0]

    def step(normal_method: str | None, training: bool) -> int:
        kw = dict(occupancy=grid, n_samples=n_samples, stratified=training, generator=gen,
                  early_stop_eps=early_stop_eps)
        if normal_method is not None:
            field.normal_method = normal_method
            kw.update(shading="lambertian", light_positions=lights, need_normals=training)
        with torch.set_grad_enabled(training):
            r = render_rays(field, background, rays_o, rays_d, **kw)
        if training:
            loss = r.rgb.mean() + r.opacity.mean() + r.orientation.mean()
            loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return r.n_field_samples

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    samples: dict[str, int] = {}
    for mode, (normal_method, training) in MODES.items():
        step(normal_method, training)  # warm-up
    for _ in range(repeats):
        for mode, (normal_method, training) in MODES.items():
            t0 = _clock()
            samples[mode] = step(normal_method, training)
            times[mode].append(_clock() - t0)
    out = {}
    for mode in MODES:
        best = min(times[mode])
        out[f"{mode}_rays_per_s"] = n_rays / best
        out[f"{mode}_field_points_per_ray"] = samples[mode] / n_rays
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
    heads: str = "shared",
    alpha_threshold: float = 0.0,
) -> dict:
    """{"<setting>_<mode>_rays_per_s": ..., ...}: best of ``repeats`` training renders (fwd + bwd).

    ``size`` is the default64 setting's image size (cpu32 always renders 32x32).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {"device": device, "heads": heads, "alpha_threshold": alpha_threshold}
    for name in settings:
        s = SETTINGS[name]
        render_size = size if name == "default64" else s["size"]
        for key, value in _one_setting(s["field"], s["n_samples"], render_size, repeats, device, early_stop_eps,
                                       heads, alpha_threshold).items():
            results[f"{name}_{render_size}px_{key}"] = value
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--early-stop-eps", type=float, default=1e-4, help="0 disables early ray termination")
    parser.add_argument("--heads", choices=("shared", "separate"), default="shared", help="the field's MLP heads")
    parser.add_argument("--alpha-threshold", type=float, default=0.0, help="render.alpha_threshold (0: none)")
    parser.add_argument("--settings", default="cpu32,default64", help="comma-separated: cpu32,default64")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time, not wall")
    args = parser.parse_args()
    from nfsd_nerf.runtime import prepare_process

    prepare_process()  # the allocator tuning every command does
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        _clock = time.process_time
    results = bench_render(args.size, repeats=args.repeats, early_stop_eps=args.early_stop_eps, heads=args.heads,
                           alpha_threshold=args.alpha_threshold, settings=tuple(args.settings.split(",")))
    for key, value in results.items():
        print(f"{key:<58} {value if isinstance(value, str) else f'{value:.4g}'}")
