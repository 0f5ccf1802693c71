"""Values that type-check but cannot work, refused with the key's name before any expensive work.

One function per scope: :func:`check_config` for a whole run (``train``), :func:`check_guidance`
for the guidance section alone (the 2D experiment, :class:`~nfsd_nerf.guidance.distill.ScoreDistillation`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from ..errors import UserError
from ..guidance.rules import RULES
from .sections import BUILTIN_MODEL, Config, GuidanceConfig, PromptsConfig


def _check_all(kind: str, values: dict[str, float], ok: Callable[[float], bool]) -> None:
    for key, value in values.items():
        if not ok(value):
            raise UserError(f"{key} must be {kind}, got {value!r}")


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
    }, lambda v: v > 0)
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
        "train.level_growth_start": t.level_growth_start,
    }, lambda v: v >= 0)
    if r.albedo_prob + r.lambertian_prob + r.textureless_prob <= 0:
        raise UserError("render.albedo_prob, lambertian_prob and textureless_prob cannot all be zero")
    _check_all("in [0, 1]", {
        "optim.betas[0]": o.betas[0], "optim.betas[1]": o.betas[1], "render.ambient": r.ambient,
        "background.random_solid_prob": cfg.background.random_solid_prob,
        "render.occupancy_ema_decay": r.occupancy_ema_decay, "render.alpha_threshold": r.alpha_threshold,
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
    if cfg.guidance.perp_neg:
        if cfg.guidance.model == BUILTIN_MODEL:
            raise UserError("--perp-neg needs a prior conditioned on view prompts; the built-in prior conditions "
                            "on the camera itself: use a Stable Diffusion model")
        if not cfg.guidance.view_dependent_prompts:
            raise UserError("--perp-neg needs view-dependent prompts: drop guidance.view_dependent_prompts=false")


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
