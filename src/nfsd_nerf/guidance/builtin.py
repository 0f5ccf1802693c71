"""The built-in offline prior: the exact diffusion model of a finite set of rendered references.

For a finite set of images ``x_i`` the optimal denoiser has a closed form (docs/design.md, section 6):

.. math::

    \\hat x_0(z_t) = \\sum_i \\mathrm{softmax}_i\\Big(-\\frac{\\|z_t - \\sqrt{\\bar\\alpha_t}\\, x_i\\|^2}
                    {2 (1 - \\bar\\alpha_t)}\\Big)\\, x_i, \\qquad
    \\epsilon(z_t) = \\frac{z_t - \\sqrt{\\bar\\alpha_t}\\, \\hat x_0}{\\sqrt{1 - \\bar\\alpha_t}}

The references are procedural renders (:mod:`.shapes`) of every (shape, colour) object from
``n_references`` cameras drawn like the training cameras but without jitter (each looks straight
at the object, world up), so every reference is in a *canonical frame*; all objects share them.
Which references form the set depends on the prompt *and on the render's camera*:

* conditional ("a red cube, side view"): the ``n_neighbours`` references of that object whose
  cameras are nearest to the render's camera;
* unconditional (the empty prompt): those same-camera neighbours of every object in the vocabulary;
* negative (the paper's negative prompt): blurred, low-contrast, darker copies of the unconditional set.

The references, their cache on disk, the nearness of cameras and the re-projection of each
neighbour into the render's camera (``align``) are in :mod:`.references`.

Without cameras (``cameras=None``) the sets are every reference of the object / of every object
(text-only conditioning: correct, but slower, and it trains a blob; docs/design.md, section 6).

This is an exact model of a small set of rendered objects, for trying the tool offline and for
verifying training against ground truth; it is not a general text-to-image model, and results
on it say nothing about which guidance rule is better on real models.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cameras import Cameras
from ..errors import UserError
from .prior import DiffusionPrior, eps_from_sample_prediction
from .references import (align_maps, alignment_grid, load_or_build_references, nearest_references,
                         reference_cameras, view_features)
from .shapes import BACKGROUND_RGB, COLOURS, SHAPES, parse_prompt

UNCONDITIONAL = -1
"""Embedding code of the empty prompt."""
NEGATIVE = -2
"""Embedding code of a negative (image-quality) prompt."""

NEGATIVE_BLUR_SIGMA = 0.75
"""Gaussian blur of the negative set, in pixels at 32x32 (scaled with the image size)."""
NEGATIVE_CONTRAST = 1.0
"""The negative set's contrast, as a fraction of the original around each image's mean (1: unchanged)."""
NEGATIVE_BRIGHTNESS = 1.0
"""The negative set's brightness factor.

NFSD pushes renders away from the negative set with a constant bias (x - degrade(x) is never
zero), so every degradation here becomes a colour or sharpness bias of NFSD results. Measured on
the references of cache format 1 (NFSD 7.5, 800 steps, seeds 1-3, final PSNR blue torus / red
cube): blur 1.5 + contrast 0.5 + brightness 0.85: 18.1 / 20.9 dB (torus stuck saturated at 15.7
in 1 of 3); blur only: 18.6 / 21.0 (1 of 3 stuck); blur + contrast 0.75: 18.9 / 21.3 (none stuck).
With format 2 (Lambertian references, the built-in preset, issue #16) lower contrast pushed the
cube's albedo to clipped saturation (mean texture colour (0.68, 0.00, 0.00) vs the true (0.85,
0.12, 0.10), seed 0); blur 1.5 alone still (0.76, 0.02, 0.02); blur 0.75 alone (0.81, 0.13, 0.15);
with the preset's other changes (0.80-0.83, 0.05-0.10, 0.05-0.08) over seeds 0-2 at t_max 0.5 and
(0.82-0.86, 0.08-0.14, 0.06-0.13) at the preset's 0.35. Blur 0.5 or 0.6 kept the cube's colour but
let the torus degrade (seed 0: IoU 0.886 / 0.914, colour 0.14 off)."""


# --------------------------------------------------------------------------- schedule and denoiser


def alphas_cumprod_scaled_linear(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """Stable Diffusion's ``scaled_linear`` schedule: ``ab = cumprod(1 - linspace(sqrt b0, sqrt b1, T)^2)``, [T] float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def x0_from_noisy_exact(z_t: Tensor, alpha_bar: Tensor, refs: Tensor) -> Tensor:
    """The optimal denoiser of a finite set: posterior mean ``x0_hat`` [N, D] of ``z_t`` [N, D].

    ``alpha_bar`` [N]; ``refs`` [N, K, D] (a set per row) or [K, D] (one set for all rows).
    Float64, softmax by log-sum-exp: stable at every t, including ``1 - alpha_bar`` ~ 1e-3.
    This is the plain form; :func:`x0_from_noisy_tinted` computes the same for tinted sets
    without building them.
    """
    z, ab = z_t.double(), alpha_bar.double().to(z_t.device)
    refs = refs.double().to(z_t.device)
    refs = refs.expand(z.shape[0], *refs.shape) if refs.dim() == 2 else refs  # [N, K, D]
    dist2 = (z[:, None, :] - ab.sqrt()[:, None, None] * refs).pow(2).sum(-1)  # [N, K]
    weights = torch.softmax(-dist2 / (2.0 * (1.0 - ab))[:, None], dim=1)
    return torch.einsum("nk,nkd->nd", weights, refs)


def x0_from_noisy_tinted(
    z_t: Tensor, alpha_bar: Tensor, albedo_maps: Tensor, background_maps: Tensor, albedos: Tensor, background: Tensor
) -> Tensor:
    """:func:`x0_from_noisy_exact` for the set of tinted images, without building the set.

    The set holds, for every map m and albedo k, the image (in z space, 2 rgb - 1)
    ``x_mk = 2 * (albedos[k] (x) albedo_maps[m] + background (x) background_maps[m]) - 1``
    (per channel: albedo times a map plus background times another map; a reference is
    ``(shade, 1 - coverage)``, and blur, contrast and brightness keep this form).

    ``z_t`` [N, 3, P] (P pixels), ``alpha_bar`` [N], ``albedo_maps`` and ``background_maps``
    [N, M, P] (a set per row) or [1, M, P] (shared), ``albedos`` [K, 3], ``background`` [3]
    -> x0_hat [N, 3, P]. Squared distances are expanded into dot products with the maps, so the
    cost is O(N M P) whatever K is; float64 and log-sum-exp throughout.
    """
    z = z_t.double()
    ab = alpha_bar.double().to(z.device)
    a = ab.sqrt()
    A = 2.0 * albedo_maps.double()  # x + 1 = albedo (x) A + background (x) U, per channel
    U = 2.0 * background_maps.double()
    alb, bg = albedos.double(), background.double()
    y = z + a[:, None, None]  # z - a x = y - a (x + 1)
    shared = A.shape[0] == 1 and z.shape[0] != 1
    spec = "ncp,mp->ncm" if shared else "ncp,nmp->ncm"
    yA = torch.einsum(spec, y, A[0] if shared else A)  # [N, 3, M]
    yU = torch.einsum(spec, y, U[0] if shared else U)
    cross = torch.einsum("ncm,kc->nmk", yA, alb) + torch.einsum("ncm,c->nm", yU, bg)[..., None]  # y.(x+1) [N, M, K]
    sq = ((A * A).sum(-1)[..., None] * (alb * alb).sum(-1) + 2.0 * (A * U).sum(-1)[..., None] * (alb @ bg)
          + (U * U).sum(-1)[..., None] * (bg @ bg))  # |x+1|^2 [N|1, M, K]
    dist2 = (y * y).sum(dim=(1, 2))[:, None, None] - 2.0 * a[:, None, None] * cross + ab[:, None, None] * sq
    logits = -dist2 / (2.0 * (1.0 - ab))[:, None, None]
    weights = torch.softmax(logits.flatten(1), dim=1).reshape(logits.shape)  # [N, M, K]
    w_albedo = torch.einsum("nmk,kc->ncm", weights, alb)  # [N, 3, M]
    w_background = weights.sum(-1)  # [N, M]
    if shared:
        x0 = torch.einsum("ncm,mp->ncp", w_albedo, A[0]) + bg[None, :, None] * (w_background @ U[0])[:, None, :]
    else:
        x0 = torch.einsum("ncm,nmp->ncp", w_albedo, A) + bg[None, :, None] * torch.einsum("nm,nmp->np", w_background, U)[:, None, :]
    return x0 - 1.0


# --------------------------------------------------------------------------- image helpers


def blur_matrix(size: int, sigma: float, *, dtype=torch.float32, device=None) -> Tensor:
    """[size, size] matrix M of a 1-D Gaussian blur with replicate padding: blurred image = M @ X @ M.T.

    Rows sum to 1, so a constant image stays constant, and blur commutes with tinting.
    """
    radius = max(1, int(math.ceil(2.5 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    matrix = torch.zeros(size, size, dtype=torch.float64)
    rows = torch.arange(size)
    for offset, weight in zip(offsets.long().tolist(), kernel.tolist()):
        matrix[rows, (rows + offset).clamp(0, size - 1)] += weight
    return matrix.to(dtype=dtype, device=device)


def degrade(rgb: Tensor, blur: Tensor, contrast: float = NEGATIVE_CONTRAST, brightness: float = NEGATIVE_BRIGHTNESS) -> Tensor:
    """rgb [..., 3, H, W] in [0, 1] -> the negative prompt's look: blurred (``blur`` [H, H] from
    :func:`blur_matrix`), contrast scaled around each image's mean, brightness scaled."""
    blurred = blur @ rgb @ blur.T
    mean = blurred.mean(dim=(-2, -1), keepdim=True)
    return brightness * (mean + contrast * (blurred - mean))


# --------------------------------------------------------------------------- the prior


class BuiltinPrior(DiffusionPrior):
    """Exact denoiser of camera-selected sets of procedural references, in pixel space.

    ``z = 2 * rgb - 1`` at ``image_size`` x ``image_size``; embeddings are integer codes [N]
    (object id = shape index * n_colours + colour index, or :data:`UNCONDITIONAL` /
    :data:`NEGATIVE`).
    """

    conditions_on_camera = True

    def __init__(
        self,
        *,
        device: torch.device | str = "cpu",
        image_size: int = 32,
        n_references: int = 500,
        n_neighbours: int = 4,
        align: bool = True,
        seed: int = 0,
        supersample: int = 2,
        cache_dir: Path | str | None = None,
        negative_blur: float = NEGATIVE_BLUR_SIGMA,
        negative_contrast: float = NEGATIVE_CONTRAST,
        negative_brightness: float = NEGATIVE_BRIGHTNESS,
    ):
        if image_size < 8:
            raise UserError(f"the built-in prior needs renders of at least 8x8 pixels (render.size), got {image_size}")
        if not 1 <= n_neighbours <= n_references:
            raise ValueError(f"need 1 <= n_neighbours <= n_references, got {n_neighbours}, {n_references}")
        self.device = torch.device(device)
        self.image_size = image_size
        self.n_neighbours = n_neighbours
        self.align = align
        self.model_id = "builtin"
        self.shapes = list(SHAPES)
        self.colours = list(COLOURS)
        self.alphas_cumprod = alphas_cumprod_scaled_linear().float().to(self.device)

        # 1. Reference cameras: the training distribution without jitter (fixed seed), and their features.
        self.cameras = self.reference_cameras(n_references, seed).to(self.device)
        self._features = view_features(self.cameras)
        self._weights = {"distance_weight": 0.3, "size_weight": 0.0} if align else {"distance_weight": 0.0, "size_weight": 1.0}

        # 2. Colour-free renders of every shape (cached on disk), tinted per colour on use.
        shade, coverage, self.build_info = load_or_build_references(
            self.cameras, image_size, supersample=supersample, cache_dir=None if cache_dir is None else Path(cache_dir),
            device=self.device,
        )
        self.shade = shade.to(self.device)  # [n_shapes, M, H, W]
        self.coverage = coverage.to(self.device)  # [n_shapes, M, H, W]
        self.revision = f"refs-{self.build_info['key']}"
        self._palette = torch.tensor([COLOURS[c] for c in self.colours], device=self.device)  # [n_colours, 3]
        self._background = torch.tensor(BACKGROUND_RGB, device=self.device)  # [3]
        self._blur = blur_matrix(image_size, negative_blur * image_size / 32, device=self.device)  # [S, S]
        self.negative_contrast, self.negative_brightness = negative_contrast, negative_brightness
        self._codes: dict[str, int] = {}

    @staticmethod
    def reference_cameras(n_references: int = 500, seed: int = 0) -> Cameras:
        """The references' cameras (:func:`.references.reference_cameras`)."""
        return reference_cameras(n_references, seed)

    # ----- interface

    def encode(self, rgb: Tensor) -> Tensor:
        """rgb [B, 3, H, W] in [0, 1] -> z = 2 rgb - 1 [B, 3, S, S] (area-averaged / bilinear to image_size if needed)."""
        if rgb.shape[-2:] != (self.image_size, self.image_size):
            smaller = rgb.shape[-1] > self.image_size
            rgb = F.interpolate(rgb, size=(self.image_size, self.image_size), mode="area" if smaller else "bilinear",
                                **({} if smaller else {"align_corners": False}))
        return 2.0 * rgb.float() - 1.0

    def decode(self, z: Tensor) -> Tensor:
        return ((z.float() + 1.0) * 0.5).clamp(0.0, 1.0)

    def embed(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> codes long [N]; unknown prompts raise a UserError listing the vocabulary."""
        for prompt in prompts:
            if prompt not in self._codes:
                self._codes[prompt] = self.code_from_prompt(prompt)
        return torch.tensor([self._codes[p] for p in prompts], dtype=torch.long, device=self.device)

    def predict_noise(self, z_t: Tensor, t: Tensor, embeddings: Tensor, cameras: Cameras | None = None) -> Tensor:
        """eps [N, 3, S, S] for z_t [N, 3, S, S], t [N], codes [N] (from :meth:`embed`), N cameras or None."""
        n = z_t.shape[0]
        if z_t.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"z_t must be [N, 3, {self.image_size}, {self.image_size}], got {list(z_t.shape)}")
        codes = embeddings.reshape(n, -1)[:, 0].round().long().to(self.device)
        if cameras is not None and len(cameras) != n:
            raise ValueError(f"got {len(cameras)} cameras for {n} rows")
        with torch.no_grad():
            z = z_t.detach().to(self.device, torch.float64).reshape(n, 3, -1)
            ab = self.alphas_cumprod.double()[t.to(self.device).long()]
            x0 = torch.empty_like(z)
            plan = None if cameras is None else self._plan(cameras.to(self.device))
            for code in codes.unique().tolist():
                rows = torch.nonzero(codes == code).squeeze(1)
                albedo_maps, background_maps, albedos = self._maps(code, _plan_rows(plan, rows))
                x0[rows] = x0_from_noisy_tinted(z[rows], ab[rows], albedo_maps.flatten(-2), background_maps.flatten(-2),
                                                albedos, self._background)
            eps = eps_from_sample_prediction(x0, z, ab)
        return eps.reshape(z_t.shape).to(z_t.device, torch.float32)

    # ----- prompts and sets

    def code_from_prompt(self, prompt: str) -> int:
        parsed = parse_prompt(prompt)
        if parsed.kind == "unconditional":
            return UNCONDITIONAL
        if parsed.kind == "negative":
            return NEGATIVE
        return self.shapes.index(parsed.shape) * len(self.colours) + self.colours.index(parsed.colour)

    def neighbours(self, cameras: Cameras) -> Tensor:
        """Indices [N, k] of the references nearest to each of N cameras, nearest first."""
        return nearest_references(view_features(cameras.to(self.device)), self._features, self.n_neighbours,
                                  **self._weights)

    def _plan(self, cameras: Cameras) -> tuple[Tensor, Tensor | None]:
        """Per camera: the nearest references [N, k] and, with ``align``, where to sample them [N, k, S, S, 2]."""
        idx = self.neighbours(cameras)
        if not self.align:
            return idx, None
        ref_distance = self.cameras.c2w[:, :3, 3].norm(dim=-1)
        return idx, alignment_grid(cameras, self.cameras.fovy[idx], ref_distance[idx], self.image_size)

    def reference_maps(self, code: int, cameras: Cameras | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The set of a prompt code for each of n cameras, in factored form (see :func:`x0_from_noisy_tinted`).

        Returns albedo maps and background maps [n, M, S, S] (or [1, M, S, S] shared, when
        ``cameras`` is None: every reference) and albedos [K, 3]; the set is every (map, albedo)
        pair. Conditional: the object's shape at the k nearest references, its colour;
        unconditional: every shape there, every colour; negative: the unconditional maps blurred,
        with lower contrast and darker (:func:`degrade`, which keeps the form). With ``align``,
        the maps are warped into each camera (:func:`alignment_grid`).
        """
        return self._maps(code, None if cameras is None else self._plan(cameras.to(self.device)))

    def _maps(self, code: int, plan: tuple[Tensor, Tensor | None] | None) -> tuple[Tensor, Tensor, Tensor]:
        shapes = slice(code // len(self.colours), code // len(self.colours) + 1) if code >= 0 else slice(None)
        albedos = self._palette[code % len(self.colours)][None] if code >= 0 else self._palette
        all_shade, all_coverage = self.shade[shapes], self.coverage[shapes]  # views [shapes, M, S, S]
        n_shapes = all_shade.shape[0]
        if plan is None:
            shade = all_shade.flatten(0, 1)[None]  # [1, shapes * M, S, S]
            coverage = all_coverage.flatten(0, 1)[None]
        else:
            idx, grid = plan  # [n, k], [n, k, S, S, 2] or None
            maps = torch.cat([all_shade[:, idx], all_coverage[:, idx]])  # [2 shapes, n, k, S, S]
            maps = maps.permute(1, 2, 0, 3, 4)  # [n, k, 2 shapes, S, S]
            if grid is not None:
                maps = align_maps(maps, grid)
            n, k = idx.shape
            shade, coverage = maps.reshape(n, k, 2, n_shapes, self.image_size, self.image_size).unbind(2)
            shade, coverage = shade.flatten(1, 2), coverage.flatten(1, 2)  # [n, k * shapes, S, S]
        if code != NEGATIVE:
            return shade, 1.0 - coverage, albedos
        # degrade(albedo (x) S + bg (x) (1 - C)), with blur b(.) and m(.) the image mean:
        #   = albedo (x) f(b(S)) + bg (x) f(1 - b(C)), f(X) = brightness * (contrast * X + (1 - contrast) * m(X))
        def f(x: Tensor) -> Tensor:
            contrast = self.negative_contrast
            return self.negative_brightness * (contrast * x + (1 - contrast) * x.mean(dim=(-2, -1), keepdim=True))

        blur = self._blur
        return f(blur @ shade @ blur.T), f(1.0 - blur @ coverage @ blur.T), albedos

    def references(self, code: int, cameras: Cameras | None = None) -> Tensor:
        """The set of a prompt code as images: rgb [n or 1, M * K, 3, S, S] in [0, 1] (for tests and inspection).

        Ordered map-major (all albedos of map 0, then map 1, ...); ``cameras`` as in :meth:`reference_maps`.
        """
        albedo_maps, background_maps, albedos = self.reference_maps(code, cameras)
        rgb = (albedo_maps[:, :, None, None] * albedos[None, None, :, :, None, None]
               + background_maps[:, :, None, None] * self._background[:, None, None])  # [n, M, K, 3, S, S]
        return rgb.flatten(1, 2)


def _plan_rows(plan: tuple[Tensor, Tensor | None] | None, rows: Tensor) -> tuple[Tensor, Tensor | None] | None:
    """The rows of a neighbour plan (no alignment grid without ``align``)."""
    if plan is None:
        return None
    neighbours, grid = plan
    return neighbours[rows], None if grid is None else grid[rows]
