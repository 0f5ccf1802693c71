"""The paper's 2D experiment: optimize one image in the prior's space directly with NFSD or SDS.

No NeRF: the optimized variable is the latent itself (Stable Diffusion's VAE latent, or the pixels
of a pixel-space prior), starting from a mid-grey image. Running it with ``method="nfsd",
scale=7.5`` and ``method="sds", scale=7.5 / 100`` (the ``guidance`` config section) shows on one picture what NFSD changes
(SDS at 7.5 over-smooths; at 100 it saturates).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor

from .. import files
from ..cameras import orbit_cameras
from .distill import ScoreDistillation
from .prior import DiffusionPrior

if TYPE_CHECKING:
    from ..config import GuidanceConfig


def optimize_image(
    prior: DiffusionPrior,
    prompt: str,
    guidance: "GuidanceConfig",
    *,
    steps: int = 500,
    lr: float = 0.05,
    seed: int = 0,
    out_dir: Path,
    n_snapshots: int = 8,
    callback: Callable[[int, dict], None] | None = None,
) -> Path:
    """Optimize a latent for ``steps`` Adam steps with the rule and settings of ``guidance``; write
    the final PNG, a strip of snapshots and the settings.

    Files in ``out_dir`` (stem ``<method>-s<scale>``): ``.png`` the decoded result, ``-steps.png``
    a grid of ``n_snapshots`` decodes from step 0 to the end (4 per row), ``.json`` the resolved settings
    (model id and revision included). The camera is a fixed front view (``orbit_cameras(1)``),
    which camera-aware priors use and Stable Diffusion ignores. Returns the final PNG's path.
    ``callback(step, info)`` is called after every step with the loss info (plus ``loss``).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    # 1. Guidance, camera and the starting latent.
    distill = ScoreDistillation(prior, guidance)
    device = prior.alphas_cumprod.device
    cameras = orbit_cameras(1, device=device)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        start = prior.encode(torch.full((1, 3, 64, 64), 0.5, device=device))
    latent = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([latent], lr=lr)

    # 2. Optimize, keeping decoded snapshots at evenly spaced steps.
    snapshot_steps = set(np.linspace(0, steps, max(n_snapshots, 2)).round().astype(int).tolist())
    snapshots: list[Tensor] = []
    for step in range(steps + 1):
        if step in snapshot_steps:
            with torch.no_grad():
                snapshots.append(prior.decode(latent.detach())[0].cpu())
        if step == steps:
            break
        loss, info = distill.loss_from_latents(latent, [prompt], cameras, step / max(steps - 1, 1), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if callback is not None:
            callback(step, {**info, "loss": loss.item()})

    # 3. Write the result, the strip of snapshots and the settings.
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = distill.cfg
    stem = f"{g.method}-s{g.scale:g}"
    final = out_dir / f"{stem}.png"
    write_png(final, snapshots[-1])
    write_png(out_dir / f"{stem}-steps.png", image_grid(torch.stack(snapshots)))
    settings = {
        "prompt": prompt, "model": prior.model_id, "revision": prior.revision, "method": g.method,
        "scale": g.scale, "negative_prompt": g.negative_prompt, "steps": steps, "lr": lr,
        "seed": seed, "t_min": g.t_min, "t_max": g.t_max, "t_max_end": g.t_max_end, "weighting": g.weighting,
        "grad_clip": g.grad_clip, "snapshot_steps": sorted(snapshot_steps),
    }
    files.atomic_write_bytes(out_dir / f"{stem}.json", (json.dumps(settings, indent=2) + "\n").encode())
    return final


def image_grid(images: Tensor, columns: int = 4, tile: int = 256) -> Tensor:
    """images [N, 3, H, W] -> one [3, rows * h, columns * w] picture.

    Tiles larger than ``tile`` px are shrunk to it; small ones (pixel-space priors) are enlarged by
    an integer factor with nearest-neighbour, so their pixels stay visible.
    """
    n, c, h, w = images.shape
    if max(h, w) > tile:
        h, w = round(h * tile / max(h, w)), round(w * tile / max(h, w))
        images = torch.nn.functional.interpolate(images, (h, w), mode="bilinear", antialias=True, align_corners=False)
    elif 2 * max(h, w) <= tile:
        factor = tile // max(h, w)
        h, w = h * factor, w * factor
        images = torch.nn.functional.interpolate(images, (h, w), mode="nearest")
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = torch.ones(c, rows * h, columns * w, dtype=images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return grid


def write_png(path: Path, rgb: Tensor) -> None:
    """rgb [3, H, W] float in [0, 1] -> 8-bit PNG."""
    array = (rgb.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    files.write_png(path, array)
