"""The paper's score decomposition (``nfsd-nerf decompose``): what the unconditional prediction of an
out-of-domain (OOD) image is made of, and how well NFSD estimates its domain part.

Both images are noised with the SAME noise ``eps`` (one draw, shared by every ``t``):
``z_t(x) = sqrt(ab_t) x + sqrt(1 - ab_t) eps``. With ``e(z; p)`` the prior's noise prediction for prompt
``p`` (``0`` = empty prompt, ``y`` = the prompt, ``neg`` = NFSD's negative prompt):

* ``dN = e(z_t(x_ID); 0)``: the noise direction, read off the in-domain image, where the
  unconditional prediction should be the added noise alone;
* ``dD = e(z_t(x_OOD); 0) - e(z_t(x_ID); 0)``: the domain direction, what the OOD image adds;
* ``dD_nfsd``: NFSD's estimate of ``dD`` from the OOD image alone, ``e(z_t(x_OOD); 0)`` for
  ``t < tau`` and ``e(z_t(x_OOD); 0) - e(z_t(x_OOD); neg)`` above (``tau`` =
  :func:`~nfsd_nerf.guidance.rules.threshold_for_schedule`, 200 of 1000);
* ``dC = e(z_t(x_OOD); y) - e(z_t(x_OOD); 0)``: the condition direction, on the OOD image (the
  render NFSD sees during training);
* ``x_OOD - sqrt((1 - ab_t) / ab_t) dD``: the OOD image moved along ``dD`` by one x0-style step.
  That is the denoiser's one-step estimate ``(z_t(x_OOD) - sqrt(1 - ab_t) e(z_t(x_OOD); 0)) / sqrt(ab_t)``
  with the in-domain image's own denoising error added back; where ``dN = eps`` exactly, it is
  that estimate.

The maths are pure functions below; :func:`run_decomposition` runs them for several ``t`` (ONE
``predict_noise`` call per ``t``) and writes the figure and the JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import files
from ..cameras import Cameras, orbit_cameras
from ..errors import UserError
from .builtin import NEGATIVE_BLUR_SIGMA, NEGATIVE_CONTRAST, blur_matrix
from .prior import DiffusionPrior
from .rules import PAPER_NEGATIVE_PROMPT, threshold_for_schedule

if TYPE_CHECKING:
    from .builtin import BuiltinPrior

DEFAULT_TIMESTEPS = (100, 200, 400, 600, 800)
"""The rows of the figure when ``--t`` is not given."""

OOD_SATURATION = 0.5
"""Colour kept by the default OOD image (0 = grey, 1 = unchanged)."""

LUMA = (0.299, 0.587, 0.114)
"""Rec. 601 weights of the grey that desaturation mixes in."""

COLUMNS = ("in-domain", "OOD", "dN", "dD", "dD by NFSD", "dC", "OOD moved by dD")
"""Figure columns, left to right."""


# --------------------------------------------------------------------------- pure maths


def parse_timesteps(text: str) -> list[int]:
    """``"100, 200,400"`` -> [100, 200, 400]; UserError if empty, not integers or repeated.

    The range is checked against the prior's schedule by :func:`check_timesteps`.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise UserError("--t is empty: give diffusion times such as --t 100,200,400,600,800")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--t {text!r}: expected comma-separated integers such as 100,200,400") from None
    if len(set(values)) != len(values):
        raise UserError(f"--t {text!r}: a time is repeated")
    return values


def check_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> None:
    """UserError unless every t lies in the schedule, ``0 <= t < T``."""
    outside = [t for t in timesteps if not 0 <= t < num_train_timesteps]
    if outside:
        raise UserError(f"--t {','.join(map(str, outside))}: outside the model's schedule (0 to {num_train_timesteps - 1})")


def degrade_to_ood(rgb: Tensor, *, blur_sigma_32: float = NEGATIVE_BLUR_SIGMA, contrast: float = NEGATIVE_CONTRAST,
                   saturation: float = OOD_SATURATION) -> Tensor:
    """rgb [B, 3, H, W] in [0, 1] -> the default OOD image, same shape: the built-in prior's negative look
    (Gaussian blur of ``blur_sigma_32`` px per 32 px of each side by its ``blur_matrix``, contrast
    ``contrast`` around each image's mean: what :func:`~nfsd_nerf.guidance.builtin.degrade` does to a
    square image, with one matrix per axis), then desaturated towards its luma by ``saturation``.
    """
    h, w = rgb.shape[-2:]
    blur_h = blur_matrix(h, blur_sigma_32 * h / 32, dtype=rgb.dtype, device=rgb.device)
    blur_w = blur_matrix(w, blur_sigma_32 * w / 32, dtype=rgb.dtype, device=rgb.device)
    blurred = blur_h @ rgb @ blur_w.T
    mean = blurred.mean(dim=(-2, -1), keepdim=True)
    low = mean + contrast * (blurred - mean)
    grey = (low * torch.tensor(LUMA, dtype=rgb.dtype, device=rgb.device)[:, None, None]).sum(-3, keepdim=True)
    return (grey + saturation * (low - grey)).clamp(0.0, 1.0)


def noised(z: Tensor, noise: Tensor, alpha_bar: float) -> Tensor:
    """``sqrt(ab) z + sqrt(1 - ab) noise``; z, noise [B, C, h, w] (noise broadcastable)."""
    return math.sqrt(alpha_bar) * z + math.sqrt(1.0 - alpha_bar) * noise


@dataclass
class Components:
    """The decomposition at one ``t``; every tensor [B, C, h, w]."""

    dN: Tensor
    """e(z_t(x_ID); 0)."""
    dD: Tensor
    """e(z_t(x_OOD); 0) - e(z_t(x_ID); 0)."""
    dD_nfsd: Tensor
    """NFSD's estimate of dD on the OOD image."""
    dC: Tensor
    """e(z_t(x_OOD); y) - e(z_t(x_OOD); 0)."""


def decompose_predictions(e_id_uncond: Tensor, e_ood_uncond: Tensor, e_ood_cond: Tensor, e_ood_neg: Tensor | None,
                          t: int, threshold: int) -> Components:
    """The four directions from the predictions at one ``t`` (all [B, C, h, w]).

    ``e_ood_neg`` = e(z_t(x_OOD); neg) is read only when ``t >= threshold`` (NFSD's switch).
    """
    if t >= threshold and e_ood_neg is None:
        raise ValueError(f"t={t} >= {threshold} needs the negative prompt's prediction")
    estimate = e_ood_uncond if t < threshold else e_ood_uncond - e_ood_neg
    return Components(dN=e_id_uncond, dD=e_ood_uncond - e_id_uncond, dD_nfsd=estimate, dC=e_ood_cond - e_ood_uncond)


def move_along(x: Tensor, direction: Tensor, alpha_bar: float) -> Tensor:
    """One x0-style step: ``x - sqrt((1 - ab) / ab) * direction``; x, direction [B, C, h, w]."""
    return x - math.sqrt((1.0 - alpha_bar) / alpha_bar) * direction


def rms(x: Tensor) -> float:
    """Root mean square of all elements (the added noise has about 1)."""
    return float(x.double().pow(2).mean().sqrt())


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine between a and b flattened (0 if either is zero)."""
    a, b = a.double().flatten(), b.double().flatten()
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else 0.0


def direction_to_rgb(d: Tensor, quantile: float = 0.99) -> Tensor:
    """A pixel-space direction d [B, 3, H, W] -> rgb [B, 3, H, W] in [0, 1]: 0 is mid-grey and each
    image is scaled so that its ``quantile`` of |d| reaches 0 or 1 (the sizes are in the JSON)."""
    flat = d.detach().float().abs().flatten(1)
    scale = torch.quantile(flat, quantile, dim=1).clamp(min=1e-12).reshape(-1, 1, 1, 1)
    return (0.5 + 0.5 * d.float() / scale).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- inputs


def check_inputs(prompt: str, image: Path | None, ood: Path | None, *, builtin: bool) -> tuple[Tensor | None, Tensor | None, dict]:
    """Validate the command's prompt and images and read them, before any model loads.

    Returns the in-domain and OOD images (rgb [1, 3, H, W] in [0, 1], or None: the built-in truth /
    the degraded in-domain image) and their sources for the JSON. UserError on an empty prompt, a
    missing ``--image`` (needed unless ``builtin``), a prompt the built-in prior cannot draw,
    unreadable images, or two images of different sizes.
    """
    from .image import read_rgb

    if not prompt.strip():
        raise UserError("the prompt is empty")
    if builtin:
        from .shapes import parse_prompt

        if parse_prompt(prompt).kind != "object" and image is None:
            raise UserError(f"the built-in in-domain image needs a prompt naming one object, e.g. 'a red cube' (got {prompt!r})")
    elif image is None:
        raise UserError("--image is needed: only --model builtin can render its own in-domain image")
    x_id = None if image is None else read_rgb(image, "--image")
    x_ood = None if ood is None else read_rgb(ood, "--ood")
    if x_id is not None and x_ood is not None and x_id.shape != x_ood.shape:
        raise UserError(f"--image and --ood differ in size ({x_id.shape[-1]}x{x_id.shape[-2]} vs "
                        f"{x_ood.shape[-1]}x{x_ood.shape[-2]}): give the same picture before and after")
    sources = {k: str(v) for k, v in (("in_domain", image), ("ood", ood)) if v is not None}
    return x_id, x_ood, sources


# --------------------------------------------------------------------------- the built-in in-domain image


def builtin_in_domain(prior: "BuiltinPrior", prompt: str) -> tuple[Tensor, Cameras, dict]:
    """The true object of ``prompt`` seen by the built-in prior's reference camera nearest to the front
    camera (``orbit_cameras(1)``, the 2D command's): rgb [1, 3, S, S], that camera, and a description.

    Why that camera and not the front camera itself: the prior's sets hold each reference's view
    warped into the query camera, never the query's own render, so the true front render is not in
    the set. Measured (red cube, 32 and 64 px, same noise): its ``||e(z_t; 0) - eps|| / ||eps||`` is
    0.15-0.18 at t = 100 and 0.09-0.11 at t = 200; from the reference camera it is ~1e-4 (the
    references' float16 cache), so there ``e(z_t(x_ID); 0)`` is the added noise.
    """
    from .shapes import parse_prompt, render_object

    if not hasattr(prior, "neighbours"):
        raise ValueError(f"only the built-in prior renders its own in-domain image, not {prior.model_id}")
    parsed = parse_prompt(prompt)
    if parsed.kind != "object":
        raise UserError(f"the built-in in-domain image needs a prompt naming one object, e.g. 'a red cube' (got {prompt!r})")
    index = int(prior.neighbours(orbit_cameras(1, device=prior.device))[0, 0])
    camera = prior.cameras[index]
    rgb, _ = render_object(parsed.shape, parsed.colour, camera, prior.image_size)
    info = {"source": f"built-in truth: {parsed.colour} {parsed.shape}", "reference_camera": index,
            "azimuth_deg": float(camera.azimuth[0]), "elevation_deg": float(camera.elevation[0]),
            "distance": float(camera.c2w[0, :3, 3].norm()), "fovy_deg": math.degrees(float(camera.fovy[0]))}
    return rgb.permute(0, 3, 1, 2).float(), camera, info


# --------------------------------------------------------------------------- running it


def decompose(
    prior: DiffusionPrior,
    prompt: str,
    x_id: Tensor,
    x_ood: Tensor,
    timesteps: Sequence[int],
    *,
    cameras: Cameras | None = None,
    seed: int = 0,
    negative_prompt: str = PAPER_NEGATIVE_PROMPT,
) -> tuple[list[dict], list[Tensor]]:
    """Per t: the measurements (a dict) and the figure's row of tiles (rgb [7, 3, H, W] in [0, 1]).

    ``x_id``, ``x_ood``: rgb [1, 3, H, W] in [0, 1] (any size, the prior encodes them); ``cameras``:
    one camera for camera-aware priors. Directions of pixel-space priors are shown by
    :func:`direction_to_rgb`; those of latent priors are decoded by ``prior.decode`` as if they were
    latents, after scaling to unit RMS (a Stable Diffusion latent's size).
    """
    device = prior.alphas_cumprod.device
    with torch.no_grad():
        z_id, z_ood = prior.encode(x_id.to(device)).float(), prior.encode(x_ood.to(device)).float()
        clean = prior.decode(torch.cat([z_id, z_ood])).float().cpu()
    pixel_space = clean.shape[-2:] == z_id.shape[-2:]
    noise = torch.randn(z_id.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    threshold = threshold_for_schedule(prior.num_train_timesteps)
    records, rows = [], []
    for t in timesteps:
        ab = float(prior.alphas_cumprod[t])
        z_t_id, z_t_ood = noised(z_id, noise, ab), noised(z_ood, noise, ab)
        # ONE call: [z_t(ID) with 0, z_t(OOD) with 0, z_t(OOD) with y, z_t(OOD) with neg only where NFSD reads it]
        texts = ["", "", prompt] + ([negative_prompt] if t >= threshold else [])
        with torch.no_grad():
            eps = prior.predict_noise(torch.cat([z_t_id, z_t_ood, z_t_ood, z_t_ood][: len(texts)]),
                                      torch.full((len(texts),), t, dtype=torch.long, device=device), prior.embed(texts),
                                      None if cameras is None else cameras[torch.zeros(len(texts), dtype=torch.long, device=cameras.device)]).float()
        c = decompose_predictions(eps[0:1], eps[1:2], eps[2:3], eps[3:4] if t >= threshold else None, t, threshold)
        moved = move_along(z_ood, c.dD, ab)
        records.append({
            "t": t, "alpha_bar": ab, "nfsd_estimate": "e(0)" if t < threshold else "e(0) - e(neg)",
            "rms": {"eps": rms(noise), "dN": rms(c.dN), "dD": rms(c.dD), "dD_nfsd": rms(c.dD_nfsd), "dC": rms(c.dC)},
            "cosine_dD_dD_nfsd": cosine(c.dD, c.dD_nfsd),
            "cosine_dN_eps": cosine(c.dN, noise),
            "noise_error_in_domain": rms(c.dN - noise) / rms(noise),
        })
        directions = torch.cat([c.dN, c.dD, c.dD_nfsd, c.dC])
        with torch.no_grad():
            if pixel_space:
                shown = torch.cat([direction_to_rgb(directions), prior.decode(moved)])
            else:
                scaled = directions / directions.flatten(1).pow(2).mean(1).sqrt().clamp(min=1e-12).reshape(-1, 1, 1, 1)
                shown = prior.decode(torch.cat([scaled, moved]))
        rows.append(torch.cat([clean, shown.float().cpu().clamp(0.0, 1.0)]))
    return records, rows


def compose_figure(rows: list[Tensor], row_labels: list[str], column_labels: Sequence[str] = COLUMNS,
                   tile: int = 128) -> np.ndarray:
    """Rows of tiles (each rgb [K, 3, H, W] in [0, 1]) -> a labelled uint8 picture [H', W', 3].

    Tiles larger than ``tile`` px are shrunk to it, small ones enlarged by an integer factor
    (nearest, so pixels stay visible); column labels on top, row labels on the left.
    """
    from PIL import Image, ImageDraw, ImageFont

    from .image import image_grid

    k = rows[0].shape[0]
    grid = image_grid(torch.cat(rows), columns=k, tile=tile)  # [3, R * h, K * w]
    h, w = grid.shape[1] // len(rows), grid.shape[2] // k
    font = ImageFont.load_default(size=12)
    left, top, gap = 84, 20, 2
    canvas = Image.new("RGB", (left + k * (w + gap), top + len(rows) * (h + gap)), (215, 215, 215))  # white tiles stand out
    pixels = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    for r in range(len(rows)):
        for col in range(k):
            tile_pixels = pixels[r * h : (r + 1) * h, col * w : (col + 1) * w]
            canvas.paste(Image.fromarray(tile_pixels), (left + col * (w + gap), top + r * (h + gap)))
    draw = ImageDraw.Draw(canvas)
    for col, label in enumerate(column_labels):
        draw.text((left + col * (w + gap) + 3, 3), label, fill=(0, 0, 0), font=font)
    for r, label in enumerate(row_labels):
        draw.multiline_text((4, top + r * (h + gap) + 4), label, fill=(0, 0, 0), font=font, spacing=3)
    return np.asarray(canvas)


def run_decomposition(
    prior: DiffusionPrior,
    prompt: str,
    *,
    out_dir: Path,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    in_domain: Tensor | None = None,
    ood: Tensor | None = None,
    sources: dict | None = None,
    seed: int = 0,
    negative_prompt: str = PAPER_NEGATIVE_PROMPT,
) -> tuple[Path, Path]:
    """Decompose and write ``out_dir/decomposition.png`` (rows = t, :data:`COLUMNS`) and
    ``decomposition.json``; returns both paths.

    ``in_domain`` rgb [1, 3, H, W] in [0, 1]; None means the built-in prior's true object
    (:func:`builtin_in_domain`). ``ood`` likewise; None means :func:`degrade_to_ood` of the in-domain
    image. ``sources`` (e.g. the file names) is recorded as is. Camera-aware priors get the front camera
    ``orbit_cameras(1)`` (the 2D command's) for given images, the in-domain image's camera otherwise.
    """
    check_timesteps(timesteps, prior.num_train_timesteps)
    sources = dict(sources or {})
    cameras = orbit_cameras(1, device=prior.alphas_cumprod.device)
    if in_domain is None:
        in_domain, cameras, sources["in_domain"] = builtin_in_domain(prior, prompt)
    if ood is None:
        ood = degrade_to_ood(in_domain)
        sources["ood"] = (f"the in-domain image degraded: Gaussian blur {NEGATIVE_BLUR_SIGMA:g} px per 32 px, "
                          f"contrast x{NEGATIVE_CONTRAST:g} around the mean, saturation x{OOD_SATURATION:g}")
    records, rows = decompose(prior, prompt, in_domain, ood, timesteps,
                              cameras=cameras if getattr(prior, "conditions_on_camera", False) else None,
                              seed=seed, negative_prompt=negative_prompt)

    labels = [f"t = {r['t']}\ncos(dD, NFSD)\n= {r['cosine_dD_dD_nfsd']:.2f}" for r in records]
    picture = compose_figure(rows, labels)
    report = {
        "prompt": prompt, "model": prior.model_id, "revision": prior.revision, "seed": seed,
        "negative_prompt": negative_prompt, "nfsd_threshold": threshold_for_schedule(prior.num_train_timesteps),
        "sources": sources,
        "formulas": {
            "z_t(x)": "sqrt(ab_t) x + sqrt(1 - ab_t) eps, the same eps for both images and every t",
            "dN": "e(z_t(x_ID); 0)",
            "dD": "e(z_t(x_OOD); 0) - e(z_t(x_ID); 0)",
            "dD_nfsd": "e(z_t(x_OOD); 0) if t < threshold else e(z_t(x_OOD); 0) - e(z_t(x_OOD); neg)",
            "dC": "e(z_t(x_OOD); y) - e(z_t(x_OOD); 0)",
            "moved": "x_OOD - sqrt((1 - ab_t) / ab_t) dD (the figure's last column)",
            "rms": "root mean square over the latent's elements",
            "noise_error_in_domain": "||e(z_t(x_ID); 0) - eps|| / ||eps||",
        },
        "columns": list(COLUMNS),
        "timesteps": records,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = files.write_png(out_dir / "decomposition.png", picture)
    report_path = files.atomic_write_bytes(out_dir / "decomposition.json", (json.dumps(report, indent=2) + "\n").encode())
    return png, report_path
