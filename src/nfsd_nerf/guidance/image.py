"""The paper's 2D experiment: optimize one image in the prior's space directly with NFSD or SDS,
or edit one with DDS.

No NeRF: the optimized variable is the latent itself (Stable Diffusion's VAE latent, or the pixels
of a pixel-space prior), starting from a mid-grey image. Running it with ``method="nfsd",
scale=7.5`` and ``method="sds", scale=7.5 / 100`` (the ``guidance`` config section) shows on one picture what NFSD changes
(SDS at 7.5 over-smooths; at 100 it saturates).

Editing (``method`` a key of :data:`~nfsd_nerf.guidance.dds.EDIT_RULES`, i.e. ``"dds"``): the latent starts
from a source image instead, and :class:`EditDistillation` computes the edit rule's gradient against that
fixed source (see :mod:`.dds` for the formula and for why it is not in the 3D rules table).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor

from .. import files
from ..cameras import orbit_cameras
from ..errors import UserError
from .dds import EDIT_RULES, EditPredictions
from .distill import ScoreDistillation, annealed_t_max, draw_timesteps_and_noise, surrogate_loss
from .prior import DiffusionPrior, noised_from_clean
from .rules import RULES, weight_from_timesteps

if TYPE_CHECKING:
    from ..cameras import Cameras
    from ..config import GuidanceConfig


@dataclass(frozen=True)
class EditSource:
    """The image an edit rule starts from and what it shows."""

    rgb: Tensor
    """[1, 3, H, W] in [0, 1], any size (the prior's ``encode`` resizes it)."""
    prompt: str
    """The source prompt ``ys``: what the image shows."""
    name: str = ""
    """Where it came from (a path), for the settings file."""


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
    edit: EditSource | None = None,
) -> Path:
    """Optimize a latent for ``steps`` Adam steps with the rule and settings of ``guidance``; write
    the final PNG, a strip of snapshots and the settings.

    Files in ``out_dir`` (stem ``<method>-s<scale>``): ``.png`` the decoded result, ``-steps.png``
    a grid of ``n_snapshots`` decodes from step 0 to the end (4 per row), ``.json`` the resolved settings
    (model id and revision included). The camera is a fixed front view (``orbit_cameras(1)``),
    which camera-aware priors use and Stable Diffusion ignores. Returns the final PNG's path.
    ``callback(step, info)`` is called after every step with the loss info (plus ``loss``).

    With ``guidance.method`` an edit rule (``"dds"``), ``edit`` is required: the latent starts from
    ``encode(edit.rgb)`` and the rule pulls it from ``edit.prompt`` towards ``prompt``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    editing = guidance.method in EDIT_RULES
    if editing != (edit is not None):
        raise ValueError(f"method {guidance.method!r} {'needs' if editing else 'takes no'} source image to edit")
    # 1. Guidance, camera and the starting latent (mid-grey, or the source image to edit).
    device = prior.alphas_cumprod.device
    cameras = orbit_cameras(1, device=device)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        start = prior.encode((edit.rgb if editing else torch.full((1, 3, 64, 64), 0.5)).to(device))
    distill = EditDistillation(prior, guidance, start, edit.prompt) if editing else ScoreDistillation(prior, guidance)
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
    settings = {"prompt": prompt, "model": prior.model_id, "revision": prior.revision, "steps": steps, "lr": lr,
                "seed": seed, "snapshot_steps": sorted(snapshot_steps)}
    if editing:
        settings.update(edit=edit.name, source_prompt=edit.prompt)
    return _write_outputs(Path(out_dir), snapshots, distill.cfg, settings)


def _write_outputs(out_dir: Path, snapshots: list[Tensor], g: "GuidanceConfig", settings: dict) -> Path:
    """``<method>-s<scale>.png``, ``-steps.png`` and ``.json`` (the run's and the resolved guidance
    settings) in ``out_dir``; returns the final PNG's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{g.method}-s{g.scale:g}"
    final = out_dir / f"{stem}.png"
    write_png(final, snapshots[-1])
    write_png(out_dir / f"{stem}-steps.png", image_grid(torch.stack(snapshots)))
    guidance = {"method": g.method, "scale": g.scale, "negative_prompt": g.negative_prompt, "t_min": g.t_min,
                "t_max": g.t_max, "t_max_end": g.t_max_end, "weighting": g.weighting, "grad_clip": g.grad_clip}
    files.atomic_write_bytes(out_dir / f"{stem}.json", (json.dumps({**settings, **guidance}, indent=2) + "\n").encode())
    return final


class EditDistillation:
    """An edit rule of :data:`~nfsd_nerf.guidance.dds.EDIT_RULES` against a fixed source latent; the same
    ``loss_from_latents`` interface as :class:`~nfsd_nerf.guidance.distill.ScoreDistillation`.

    Each step draws ONE ``t`` and noise per sample, noises the edited and the source latent with them,
    and asks the prior for all four predictions (edit prompt and empty prompt on ``z_t``, source prompt
    and empty prompt on ``zs_t``) in one batched call.
    """

    def __init__(self, prior: DiffusionPrior, cfg: "GuidanceConfig", source: Tensor, source_prompt: str):
        """``source`` [1, C, h, w]: the source image's latent; ``source_prompt``: what it shows."""
        self.cfg = resolve_image_guidance(cfg)
        self.prior, self.rule = prior, EDIT_RULES[cfg.method]
        self.source = source.detach().float()
        self.source_prompt = source_prompt

    def loss_from_latents(
        self, z: Tensor, prompts: list[str], cameras: "Cameras | None", progress: float, generator: torch.Generator
    ) -> tuple[Tensor, dict]:
        """z [B, C, h, w] (B copies of the source are used), one prompt and camera per sample -> (scalar loss, info).

        info: ``t`` (list of B ints), ``grad_norm`` (0-dim tensor, L2 norm of the gradient).
        """
        prior, g, batch = self.prior, self.cfg, z.shape[0]
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for a batch of {batch}")
        t_max = annealed_t_max(g.t_min, g.t_max, g.t_max_end, progress)
        t_cpu, noise = draw_timesteps_and_noise(z, prior.num_train_timesteps, g.t_min, t_max, generator)
        t = t_cpu.to(z.device)
        with torch.no_grad():
            ab_t = prior.alphas_cumprod[t]
            z_t = noised_from_clean(z.detach().float(), noise, ab_t)
            source_t = noised_from_clean(self.source.to(z.device).expand_as(z_t), noise, ab_t)  # the same noise
            embeddings = prior.embed([*prompts, "", self.source_prompt])  # [B + 2, ...]
            pick = torch.cat([torch.arange(batch), torch.full((batch,), batch), torch.full((batch,), batch + 1),
                              torch.full((batch,), batch)])  # rows: y on z_t | 0 on z_t | ys on zs_t | 0 on zs_t
            rows_cameras = None if cameras is None else cameras[(torch.arange(4 * batch) % batch).to(cameras.device)]
            eps = prior.predict_noise(torch.cat([z_t, z_t, source_t, source_t]), t.repeat(4),
                                      embeddings[pick.to(embeddings.device)], rows_cameras).float()
            cond, uncond, source_cond, source_uncond = eps.split(batch)
            grad = self.rule.grad(EditPredictions(
                cond=cond, uncond=uncond, source_cond=source_cond, source_uncond=source_uncond, noise=noise, t=t,
                weight=weight_from_timesteps(prior.alphas_cumprod, t, g.weighting), scale=g.scale))
            if g.grad_clip is not None:
                grad = grad.clamp(-g.grad_clip, g.grad_clip)
        return surrogate_loss(z.float(), grad), {"t": t_cpu.tolist(), "grad_norm": grad.norm()}


def resolve_image_guidance(g: "GuidanceConfig") -> "GuidanceConfig":
    """The 2D command's guidance settings, checked, with the rule's defaults filled in.

    ``g.method`` may name a rule of ``RULES`` or of ``EDIT_RULES``; edit rules use the empty prompt as
    their unconditional branch, so they take no negative prompt. Raises :class:`UserError`.
    """
    from ..config import check_guidance, with_rule_defaults

    if g.method in RULES:
        check_guidance(g)
        return with_rule_defaults(g)
    if g.method not in EDIT_RULES:
        raise UserError(f"unknown guidance method {g.method!r} (known: {', '.join([*RULES, *EDIT_RULES])})")
    if g.negative_prompt:
        raise UserError(f"--negative-prompt does not apply to --guidance {g.method} (its unconditional rows "
                        "use the empty prompt)")
    check_guidance(dataclasses.replace(g, method=next(iter(RULES))))  # the shared checks: t range, scale, clip, weighting
    scale = EDIT_RULES[g.method].default_scale if g.scale is None else g.scale
    return dataclasses.replace(g, scale=float(scale), negative_prompt="")


def check_image_request(g: "GuidanceConfig", edit: Path | None, source_prompt: str | None) -> EditSource | None:
    """Validate the 2D command's guidance and edit flags before any model loads; read the source image.

    ``--edit`` and ``--source-prompt`` go together, and only with an edit rule (``--guidance dds``),
    which needs them. Returns the source to edit, or None. Raises :class:`UserError`.
    """
    resolve_image_guidance(g)
    if (edit is None) != (source_prompt is None):
        given, missing = ("--edit", "--source-prompt") if edit is not None else ("--source-prompt", "--edit")
        raise UserError(f"{given} needs {missing} too: --edit SOURCE.png --source-prompt \"what it shows\"")
    if g.method in EDIT_RULES and edit is None:
        raise UserError(f"--guidance {g.method} edits an image: give --edit SOURCE.png --source-prompt \"what it shows\"")
    if edit is None:
        return None
    if g.method not in EDIT_RULES:
        raise UserError(f"--edit needs an editing rule ({', '.join(EDIT_RULES)}), e.g. --guidance dds; "
                        f"got --guidance {g.method}")
    if not source_prompt.strip():
        raise UserError("--source-prompt is empty: say what the --edit image shows")
    return EditSource(read_rgb(edit, "--edit"), source_prompt, str(edit))


def read_rgb(path: Path | str, what: str = "image") -> Tensor:
    """An image file -> rgb [1, 3, H, W] float32 in [0, 1]; UserError if it cannot be read.

    Grey images are repeated over the channels; an alpha channel is composited over white (the
    built-in prior's background); 8- and 16-bit integers are scaled to [0, 1].
    """
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: file not found")
    try:
        pixels = np.asarray(iio.imread(path, plugin="pillow", index=0))  # PNG, JPEG, BMP, TIFF, WebP; first frame
    except Exception as exc:  # Pillow raises several types for undecodable files  # noqa: BLE001
        raise UserError(f"{what} {path}: cannot read it as an image ({type(exc).__name__})") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 2, 3, 4):
        raise UserError(f"{what} {path}: expected one grey, RGB or RGBA picture, got an array of shape {pixels.shape}")
    if np.issubdtype(pixels.dtype, np.integer):
        values = pixels.astype(np.float32) / float(np.iinfo(pixels.dtype).max)
    elif np.issubdtype(pixels.dtype, np.floating):
        values = np.clip(pixels.astype(np.float32), 0.0, 1.0)
    else:
        raise UserError(f"{what} {path}: unsupported pixel type {pixels.dtype}")
    if values.shape[0] < 8 or values.shape[1] < 8:
        raise UserError(f"{what} {path}: {values.shape[1]}x{values.shape[0]} pixels is too small (at least 8x8)")
    colour, alpha = (values[..., :-1], values[..., -1:]) if values.shape[2] in (2, 4) else (values, None)
    colour = np.repeat(colour, 3, axis=2) if colour.shape[2] == 1 else colour
    if alpha is not None:
        colour = colour * alpha + (1.0 - alpha)
    return torch.from_numpy(np.ascontiguousarray(colour)).permute(2, 0, 1)[None].float()


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
