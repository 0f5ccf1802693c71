"""Measure a NeRF trained on the built-in prior against the true object (docs/design.md, section 7).

The field and the analytic object are rendered from the same 8 fixed evaluation cameras (an
orbit inside the training distribution that coincides with no reference camera), and compared
pixel for pixel: PSNR over the full frame, PSNR inside the union of the two silhouettes, and
silhouette IoU. Never compare against the nearest *reference image*: its camera differs, so a
perfect reconstruction scores ~17 dB on it while a scene filled with colour scores more.

The truth is lit as the prior's references are (reference cache format 2): Lambertian, the
camera-attached light (:func:`~nfsd_nerf.render.shading.camera_light_positions`), ambient
:data:`~nfsd_nerf.render.shading.CAMERA_LIGHT_AMBIENT`; the NeRF is rendered with exactly that
shading, so a field with the true albedo and the true normals scores as high as its antialiasing
allows. (Before format 2 the truth was lit by world-fixed lights and the NeRF rendered in albedo:
figures measured on that truth are not comparable.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cameras import EVALUATION_ORBIT, Cameras
from .errors import UserError

EVAL_VIEWS = 8
"""Views of :data:`~nfsd_nerf.cameras.EVALUATION_ORBIT` the metrics average over."""

EVAL_SUPERSAMPLE = 4
"""The true object is antialiased with 4x4 subpixels, so its coverage is a fine estimate of the box-filtered truth."""

SILHOUETTE_THRESHOLD = 0.5
"""A pixel is inside a silhouette when its opacity (NeRF) or coverage (true object) exceeds this."""


def evaluation_cameras(device: torch.device | str = "cpu") -> Cameras:
    """The 8 fixed evaluation cameras."""
    return EVALUATION_ORBIT.cameras(EVAL_VIEWS, device=device)


def psnr_from_mse(mse: Tensor) -> Tensor:
    """PSNR in dB for signals in [0, 1]; mse [...] (clamped at 1e-10, i.e. at most 100 dB)."""
    return -10.0 * torch.log10(mse.clamp(min=1e-10))


def image_metrics(rgb: Tensor, opacity: Tensor, true_rgb: Tensor, true_coverage: Tensor) -> dict[str, Tensor]:
    """Per-view metrics of renders against the truth.

    rgb, true_rgb [B, H, W, 3] in [0, 1]; opacity, true_coverage [B, H, W] in [0, 1]
    -> {"psnr" [B], "psnr_masked" [B], "silhouette_iou" [B]}. Masked PSNR is over the pixels in
    either silhouette (NaN for a view where both are empty); IoU is 1 where both are empty.
    """
    err = (rgb - true_rgb).pow(2).mean(-1)  # [B, H, W]
    mask, true_mask = opacity > SILHOUETTE_THRESHOLD, true_coverage > SILHOUETTE_THRESHOLD
    union = (mask | true_mask).float().sum(dim=(1, 2))
    inter = (mask & true_mask).float().sum(dim=(1, 2))
    masked_mse = (err * (mask | true_mask)).sum(dim=(1, 2)) / union
    return {
        "psnr": psnr_from_mse(err.mean(dim=(1, 2))),
        "psnr_masked": psnr_from_mse(masked_mse),
        "silhouette_iou": torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)),
    }


def evaluate_against_truth(
    field,
    background,
    prompt: str,
    *,
    size: int = 32,
    device: torch.device | str = "cpu",
    occupancy=None,
    n_samples: int = 512,
    **render_kwargs,
) -> dict[str, float]:
    """Render the NeRF and the prompt's true object from the 8 evaluation cameras at size x size.

    -> {"psnr", "psnr_masked", "silhouette_iou"}: means over the views (dB, dB, fraction).
    The NeRF is rendered with the truth's Lambertian shading and light (module docstring), no
    stratification, no grad; ``occupancy``, ``n_samples`` and ``render_kwargs`` go
    to :func:`~nfsd_nerf.render.render_image`. Raises UserError for a prompt that names no
    built-in object.
    """
    from .guidance.shapes import parse_prompt, render_object
    from .render import render_image
    from .render.shading import CAMERA_LIGHT_AMBIENT, camera_light_positions

    # 1. The true object
    parsed = parse_prompt(prompt)
    if parsed.kind != "object":
        raise UserError(f"cannot evaluate {prompt!r}: it names no built-in object")
    cameras = evaluation_cameras(device)
    true_rgb, true_coverage = render_object(parsed.shape, parsed.colour, cameras.to("cpu"), size,
                                           supersample=EVAL_SUPERSAMPLE)

    # 2. The NeRF from the same cameras
    was_training = field.training
    field.eval()
    try:
        with torch.no_grad():
            out = render_image(field, background, cameras, size, size, occupancy=occupancy, n_samples=n_samples,
                               shading="lambertian", ambient=CAMERA_LIGHT_AMBIENT,
                               light_positions=camera_light_positions(cameras.c2w[:, :3, 3]), stratified=False,
                               **render_kwargs)
    finally:
        field.train(was_training)

    # 3. Compare
    per_view = image_metrics(out["rgb"].float().cpu().clamp(0, 1), out["opacity"].float().cpu(), true_rgb, true_coverage)
    return {name: float(values.nanmean()) for name, values in per_view.items()}
