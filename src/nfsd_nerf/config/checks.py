"""Values that type-check but cannot work, refused with the key's name before any expensive work.

One function per scope: :func:`check_config` for a whole run (``train``), :func:`check_guidance`
for the guidance section alone (the 2D experiment, :class:`~nfsd_nerf.guidance.distill.ScoreDistillation`),
:func:`check_image_options` for the 2D command's own numbers. Sizes are checked against the machine:
:func:`run_memory_needs` is the least memory a run's settings force, :func:`check_memory` refuses what
exceeds the device's memory (``render-video`` uses it too), naming the settings.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import Callable

from ..errors import UserError
from ..guidance.rules import RULES
from .sections import BUILTIN_MODEL, Config, GuidanceConfig, PromptsConfig


SEED_MAX = 2**63 - 1
"""Seeds are 0..2^63-1. torch takes -2^63..2^64-1 but reads a negative seed as its two's complement
(-1 is 2^64-1), so a negative seed would silently alias a positive one; it is refused instead."""


def _check_all(kind: str, values: dict[str, float], ok: Callable[[float], bool]) -> None:
    for key, value in values.items():
        if not ok(value):
            raise UserError(f"{key} must be {kind}, got {value!r}")


def check_seed(seed: int, key: str = "train.seed") -> None:
    """A seed every generator of the run accepts, one name per random stream (:data:`SEED_MAX`)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise UserError(f"{key} must be an integer from 0 to 2^63-1, got {seed!r}")


def check_image_options(*, steps: int, lr: float, seed: int) -> None:
    """The 2D command's own numbers, held to the rules of train.steps, optim.lr and train.seed
    (they are not config settings, so no YAML coercion checked them)."""
    from .loading import INT_MAX

    if not 0 < steps <= INT_MAX:
        raise UserError(f"--steps must be a positive integer up to 2^63-1, got {steps}")
    if not (math.isfinite(lr) and lr > 0):
        raise UserError(f"--lr must be a positive finite number, got {lr}")
    check_seed(seed, "--seed")


def check_drawn_prompt(prompt: str, model: str) -> None:
    """The built-in prior draws only its own objects: refuse any other prompt (another script, an
    image-quality phrase, an unknown object) before a model loads, not at the evaluation after training."""
    if model == BUILTIN_MODEL:
        from ..guidance.shapes import parse_prompt

        parse_prompt(prompt, drawn=True)


def check_guidance(g: GuidanceConfig) -> None:
    """Refuse guidance settings that cannot work; cheap, so it runs before any model loads."""
    if g.method not in RULES:
        raise UserError(f"unknown guidance method {g.method!r} (known: {', '.join(RULES)})")
    if not 0.0 <= g.t_min <= g.t_max <= 1.0:
        raise UserError(f"guidance.t_min/t_max: need 0 <= t_min <= t_max <= 1, got t_min={g.t_min}, t_max={g.t_max}")
    if g.t_max_end is not None and not g.t_min <= g.t_max_end <= 1.0:
        raise UserError(f"guidance.t_max_end={g.t_max_end} must lie in [t_min={g.t_min}, 1]")
    if g.scale is not None and not math.isfinite(g.scale):
        raise UserError(f"guidance scale must be a finite number, got {g.scale}")
    if g.grad_clip is not None and not g.grad_clip > 0:
        raise UserError(f"guidance.grad_clip must be positive, got {g.grad_clip}")
    if g.weighting not in ("sds", "uniform"):
        raise UserError(f"unknown guidance weighting {g.weighting!r} (known: 'sds', 'uniform')")
    if g.t_max_after is not None and not g.t_min <= g.t_max_after <= 1.0:
        raise UserError(f"guidance.t_max_after={g.t_max_after} must lie in [t_min={g.t_min}, 1]")
    if g.t_max_after_step < 0 or g.lora_rank < 1 or not g.lora_lr > 0:
        raise UserError(f"guidance: need t_max_after_step >= 0, lora_rank >= 1 and lora_lr > 0, got "
                        f"{g.t_max_after_step}, {g.lora_rank} and {g.lora_lr}")
    if RULES[g.method].needs_unet and g.model == BUILTIN_MODEL:
        raise UserError(f"--guidance {g.method} trains LoRA adapters on a diffusion model's UNet and the built-in "
                        "prior has none: use a Stable Diffusion model (--model)")


def with_rule_defaults(g: GuidanceConfig) -> GuidanceConfig:
    """The settings with the rule's default scale and negative prompt filled in where unset
    (what a run records in its ``config.yaml``)."""
    rule = RULES[g.method]
    return dataclasses.replace(
        g,
        scale=float(rule.default_scale if g.scale is None else g.scale),
        negative_prompt=rule.default_negative_prompt if g.negative_prompt is None else g.negative_prompt,
    )


def check_config(cfg: Config) -> None:
    """Refuse values that type-check but cannot work, naming the key (before any expensive work)."""
    t, r, f, c, o, loss = cfg.train, cfg.render, cfg.field, cfg.cameras, cfg.optim, cfg.loss
    if not cfg.prompt.strip():
        raise UserError('the prompt is empty: give a text prompt, e.g. nfsd-nerf train "a red cube" --model builtin')
    _check_all("positive", {
        "train.steps": t.steps, "train.log_every": t.log_every, "train.level_growth_every": t.level_growth_every,
        "render.size": r.size, "render.batch_size": r.batch_size, "render.n_samples": r.n_samples,
        "render.occupancy_resolution": r.occupancy_resolution, "render.occupancy_update_every": r.occupancy_update_every,
        "field.n_levels": f.n_levels, "field.n_features_per_level": f.n_features_per_level,
        "field.base_resolution": f.base_resolution, "field.hidden_dim": f.hidden_dim,
        "field.bound": f.bound, "field.blob_radius": f.blob_radius, "optim.lr": o.lr, "optim.eps": o.eps,
        "cameras.distance_range[0]": c.distance_range[0],  # 0 puts the camera on the point it looks at
    }, lambda v: v > 0)
    check_seed(t.seed)
    from ..encoding.layout import check_hyperparameters  # numpy: imported only when checking

    check_hyperparameters(f.n_levels, f.n_features_per_level, f.log2_hashmap_size, f.base_resolution,
                          f.per_level_scale, prefix="field.")
    if t.cpu_threads is not None and t.cpu_threads < 1:
        raise UserError(f"train.cpu_threads must be at least 1 (or unset: one per core), got {t.cpu_threads}")
    if t.start_levels is not None and not 1 <= t.start_levels <= f.n_levels:
        raise UserError(f"train.start_levels must be between 1 and field.n_levels ({f.n_levels}), got {t.start_levels}")
    _check_all("zero or positive", {
        "train.preview_every": t.preview_every, "train.checkpoint_every": t.checkpoint_every,
        "optim.background_lr": o.background_lr, "field.n_hidden_layers": f.n_hidden_layers,
        "render.ambient_only_steps": r.ambient_only_steps, "render.albedo_prob": r.albedo_prob,
        "render.lambertian_prob": r.lambertian_prob, "render.textureless_prob": r.textureless_prob,
        "loss.sparsity": loss.sparsity, "loss.orientation_start": loss.orientation_start,
        "loss.orientation_end": loss.orientation_end, "cameras.position_perturb": c.position_perturb,
        "cameras.center_perturb": c.center_perturb, "cameras.up_perturb": c.up_perturb,
        "train.level_growth_start": t.level_growth_start, "loss.orientation_ramp_steps": loss.orientation_ramp_steps,
        "cameras.light_distance_range[0]": c.light_distance_range[0],
    }, lambda v: v >= 0)
    if r.albedo_prob + r.lambertian_prob + r.textureless_prob <= 0:
        raise UserError("render.albedo_prob, lambertian_prob and textureless_prob cannot all be zero")
    _check_all("in [0, 1]", {
        "optim.betas[0]": o.betas[0], "optim.betas[1]": o.betas[1], "render.ambient": r.ambient,
        "background.random_solid_prob": cfg.background.random_solid_prob,
        "render.occupancy_ema_decay": r.occupancy_ema_decay, "render.alpha_threshold": r.alpha_threshold,
        "render.occupancy_threshold": r.occupancy_threshold,
        **{f"background.color[{i}]": v for i, v in enumerate(cfg.background.color)},
    }, lambda v: 0 <= v <= 1)
    for key, (lo, hi) in {"cameras.distance_range": c.distance_range, "cameras.fovy_range": c.fovy_range,
                          "cameras.elevation_range": c.elevation_range,
                          "cameras.light_distance_range": c.light_distance_range}.items():
        if not lo <= hi:
            raise UserError(f"{key} must be [low, high] with low <= high, got [{lo}, {hi}]")
    if not (0 < c.fovy_range[0] and c.fovy_range[1] < 180):
        raise UserError(f"cameras.fovy_range must lie in (0, 180) degrees, got {list(c.fovy_range)}")
    if not (-90 <= c.elevation_range[0] and c.elevation_range[1] <= 90):
        raise UserError(f"cameras.elevation_range must lie in [-90, 90] degrees, got {list(c.elevation_range)}")
    check_guidance(cfg.guidance)
    check_prompts(cfg.prompts)
    check_drawn_prompt(cfg.prompt, cfg.guidance.model)
    if cfg.guidance.perp_neg:
        if cfg.guidance.model == BUILTIN_MODEL:
            raise UserError("--perp-neg needs a prior conditioned on view prompts; the built-in prior conditions "
                            "on the camera itself: use a Stable Diffusion model")
        if not cfg.guidance.view_dependent_prompts:
            raise UserError("--perp-neg needs view-dependent prompts: drop guidance.view_dependent_prompts=false")
    check_memory(run_memory_needs(cfg), cfg.train.device)


def check_prompts(p: PromptsConfig) -> None:
    """View thresholds in order and finite Perp-Neg weights; empty per-view prompts refused."""
    if not 0 <= p.front_max_azimuth <= p.back_min_azimuth <= 180:
        raise UserError("prompts: need 0 <= front_max_azimuth <= back_min_azimuth <= 180, got "
                        f"{p.front_max_azimuth} and {p.back_min_azimuth}")
    if not -90 <= p.overhead_min_elevation <= 90:
        raise UserError(f"prompts.overhead_min_elevation must be in [-90, 90] degrees, got {p.overhead_min_elevation}")
    for name in ("f_fs", "f_sf", "f_sb", "f_fsb"):
        if not all(math.isfinite(v) for v in getattr(p, name)):
            raise UserError(f"prompts.{name} must be three finite numbers, got {list(getattr(p, name))}")
    for view in ("front", "side", "back", "overhead"):
        text = getattr(p, view)
        if text is not None and not text.strip():
            raise UserError(f"prompts.{view} is empty: leave it unset for the default \"<prompt>, {view} view\"")


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryNeed:
    """The least memory one part of a run holds at once, and the settings that size it."""

    what: str
    """e.g. "the occupancy grid"."""
    settings: str
    """e.g. "render.occupancy_resolution=5000": what the user can lower."""
    bytes: int


SAMPLE_BYTES = 28
"""Per ray-marching sample, besides its field features: ray index (8), start and end (8), position (12)."""
RAY_BYTES = 48
"""Per rendered ray: origin and direction (24), colour, opacity, depth and one more value (24), float32."""
PARAMETER_BYTES = 16
"""Per trained float32 parameter: the value, its gradient and Adam's two moments."""
OCCUPANCY_CELL_BYTES = 49
"""Per occupancy cell: its float occupancy and bool flag (5), and in the first refreshes, which visit
every cell, its index, jitter and point (44)."""
REFRESH_CHUNK = 1 << 16
"""Points the occupancy refresh sends through the field at once (``OccupancyGrid.update``'s chunk)."""


def check_memory(needs: list[MemoryNeed], device: str) -> None:
    """Refuse settings whose least memory exceeds the total memory of ``device`` ('auto', 'cuda', 'cpu').

    The needs are lower bounds and the comparison is with the device's total, not what is free now,
    so this refuses only what cannot run here, before anything is allocated; the message names the
    largest need's settings.
    """
    total, kind = device_memory(device)
    need = sum(n.bytes for n in needs)
    if total is None or need <= total:
        return
    worst = max(needs, key=lambda n: n.bytes)
    rest = "" if need < 1.1 * worst.bytes else f" ({_size(need)} in all)"
    raise UserError(f"{worst.what} ({worst.settings}) needs at least {_size(worst.bytes)}{rest}, more than the "
                    f"{_size(total)} of {kind} here: lower {'them' if ',' in worst.settings else 'it'}")


@functools.lru_cache(maxsize=None)
def device_memory(device: str) -> tuple[int | None, str]:
    """(total bytes, what they are) of the device a run of ``device`` uses: the GPU's memory for
    'auto' and 'cuda[:N]' where CUDA is available, else the machine's RAM; (None, ...) if unknown."""
    kind, _, index = device.partition(":")  # a module's device may be "cuda:1"
    if kind in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(int(index) if index else torch.cuda.current_device())
            return int(props.total_memory), f"GPU memory ({props.name})"
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "RAM"
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): not checked
        return None, "RAM"


def run_memory_needs(cfg: Config) -> list[MemoryNeed]:
    """The least memory a training run of ``cfg`` holds at once, per part (values already range-checked).

    Hash grid and MLP: parameters with gradients and Adam's moments, plus the MLP's hidden layer for
    one refresh chunk. Occupancy grid: its cells. Training render: its rays, and the samples of the
    first renders, which march an all-occupied grid (refreshes empty it later): a quarter of the live
    lattice fraction of an unjittered camera at the farthest distance and widest field of view (the
    look-at jitter moves the box off-centre: measured down to 0.36 of it, far camera, small box), each
    sample with its features and one hidden layer. The prior's own memory is not counted.
    """
    from ..encoding.layout import hash_grid_layout

    f, r, c = cfg.field, cfg.render, cfg.cameras
    layout = hash_grid_layout(f.n_levels, f.n_features_per_level, f.log2_hashmap_size, f.base_resolution,
                              f.per_level_scale)
    features, hidden = f.n_levels * f.n_features_per_level, f.hidden_dim if f.n_hidden_layers else 0
    heads = [4] if f.heads == "shared" else [1, 3]
    mlp_params = sum(features * hidden + max(f.n_hidden_layers - 1, 0) * hidden * hidden + hidden * out
                     if hidden else features * out for out in heads)
    cells = r.occupancy_resolution**3
    rays = r.batch_size * r.size * r.size
    samples = int(0.25 * _live_lattice_fraction(f.bound, c.distance_range[1], c.fovy_range[1]) * rays * r.n_samples)
    return [
        MemoryNeed("the hash grid", f"field.log2_hashmap_size={f.log2_hashmap_size}, field.n_levels={f.n_levels}, "
                   f"field.n_features_per_level={f.n_features_per_level}", PARAMETER_BYTES * layout.n_params),
        MemoryNeed("the MLP", f"field.hidden_dim={f.hidden_dim}, field.n_hidden_layers={f.n_hidden_layers}",
                   PARAMETER_BYTES * mlp_params + 4 * hidden * min(cells, REFRESH_CHUNK)),
        MemoryNeed("the occupancy grid", f"render.occupancy_resolution={r.occupancy_resolution}",
                   OCCUPANCY_CELL_BYTES * cells),
        MemoryNeed("a training render", f"render.size={r.size}, render.n_samples={r.n_samples}, "
                   f"render.batch_size={r.batch_size}",
                   RAY_BYTES * rays + samples * (SAMPLE_BYTES + 4 * (features + hidden))),
    ]


def _live_lattice_fraction(bound: float, distance: float, fovy_deg: float, grid: int = 16) -> float:
    """Mean length inside the box [-bound, bound]^3 of the rays of a camera at ``distance`` on +X looking
    at the origin (``grid`` x ``grid`` rays over its field of view), as a fraction of the box diagonal:
    the share of ``rays x n_samples`` lattice samples that lie in the box."""
    half = math.tan(math.radians(fovy_deg) / 2)
    total = 0.0
    for i in range(grid):
        for j in range(grid):
            d = (-1.0, (2 * (j + 0.5) / grid - 1) * half, (1 - 2 * (i + 0.5) / grid) * half)
            norm = math.sqrt(sum(v * v for v in d))
            o, d = (distance, 0.0, 0.0), tuple(v / norm for v in d)
            near, far = 0.0, math.inf
            for oa, da in zip(o, d):
                if abs(da) < 1e-12:
                    if abs(oa) > bound:
                        far = -1.0
                    continue
                t0, t1 = sorted(((-bound - oa) / da, (bound - oa) / da))
                near, far = max(near, t0), min(far, t1)
            total += max(far - near, 0.0)
    return total / (grid * grid) / (2 * math.sqrt(3) * bound)


def _size(n: int) -> str:
    """Bytes for people: ``"23.4 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable
