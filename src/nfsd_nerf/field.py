"""The radiance field (hash grid + small MLP -> density, albedo) and the background model.

Density follows threestudio's ``dreamfusion-sd`` / Magic3D setup (docs/design.md, section 4):
``sigma = act(raw + blob(x))`` with ``blob(x) = blob_density * (1 - |x| / blob_radius)``, so training
starts from a centred ball; ``act`` is softplus or trunc_exp. The MLP has no biases (like
tiny-cuda-nn's fused MLP and threestudio's), so at initialisation (hash features ~1e-4) the
density is exactly the blob and the albedo exactly 0.5 grey.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoding import HashGridEncoding

if TYPE_CHECKING:
    from .config import BackgroundConfig, FieldConfig

DensityActivation = Literal["softplus", "trunc_exp"]
NormalMethod = Literal["auto", "analytic", "finite_difference"]
Heads = Literal["shared", "separate"]

NORMAL_EPS_PER_BOUND = 5e-3
"""Finite-difference step for normals, as a fraction of ``bound`` (0.01 at bound 2, as threestudio).
Larger than the finest hash cell (2 * bound / 4096), so normals are smooth at the surface scale."""
TRUNC_EXP_MAX = 15.0
"""trunc_exp's gradient uses exp(min(x, 15)) so a large raw density cannot blow up Adam."""


# --------------------------------------------------------------------------- pure functions


class _TruncExp(torch.autograd.Function):
    """exp(x) with the gradient of exp(min(x, 15)) (torch-ngp / stable-dreamfusion).

    The backward is written with differentiable ops, so double backward (analytic normals with
    ``create_graph``) works.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=TRUNC_EXP_MAX))


def trunc_exp(x: Tensor) -> Tensor:
    return _TruncExp.apply(x)


def blob_bias_from_points(x: Tensor, blob_density: float, blob_radius: float) -> Tensor:
    """Magic3D's centred density bias: x [N, 3] world -> [N] = density * (1 - |x| / radius)."""
    return blob_density * (1.0 - x.norm(dim=-1) / blob_radius)


def unit_cube_from_world(x: Tensor, bound: float) -> Tensor:
    """x [N, 3] in [-bound, bound]^3 -> [N, 3] in [0, 1]^3 (the hash grid's domain)."""
    return (x + bound) / (2.0 * bound)


def frequency_encoding(x: Tensor, n_frequencies: int) -> Tensor:
    """x [N, D] -> [N, D * (1 + 2F)]: x, sin(2^k pi x), cos(2^k pi x) for k < F."""
    freqs = (2.0 ** torch.arange(n_frequencies, device=x.device, dtype=x.dtype)) * math.pi
    angles = (x[..., None] * freqs).flatten(-2)  # [N, D*F]
    return torch.cat([x, torch.sin(angles), torch.cos(angles)], dim=-1)


def resolve_normal_method(method: NormalMethod, device: torch.device) -> Literal["analytic", "finite_difference"]:
    """The normal method that runs for inputs on ``device``: ``auto`` is analytic on CUDA (both hash
    grid backends give the double backward) and finite differences elsewhere (5-6% faster per
    training render at the CPU presets' size, README "Configuration")."""
    if method == "auto":
        return "analytic" if device.type == "cuda" else "finite_difference"
    return method


def _mlp(n_in: int, hidden: int, n_hidden_layers: int, n_out: int, bias: bool) -> nn.Sequential:
    """Linear-ReLU stack with ``n_hidden_layers`` hidden layers (0: a single linear map)."""
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(n_hidden_layers):
        layers += [nn.Linear(width, hidden, bias=bias), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, n_out, bias=bias))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- the field


class NeRFField(nn.Module):
    """Density and albedo over the scene box [-bound, bound]^3; zero density outside it.

    State dict: ``encoding.params`` (the hash table, tcnn layout), then ``mlp.<i>.weight`` (``heads:
    shared``: one MLP, outputs raw density and 3 albedo logits) or ``density_mlp.<i>.weight`` and
    ``albedo_mlp.<i>.weight`` (``separate``: threestudio's two MLPs on the same features; density
    alone then skips the albedo MLP). Built from a :class:`~nfsd_nerf.config.FieldConfig`, the one
    place its settings default.
    """

    def __init__(self, cfg: FieldConfig):
        super().__init__()
        if cfg.density_activation not in ("softplus", "trunc_exp"):
            raise ValueError(f"density_activation must be 'softplus' or 'trunc_exp', got {cfg.density_activation!r}")
        if cfg.normal_method not in ("auto", "analytic", "finite_difference"):
            raise ValueError(
                f"normal_method must be 'auto', 'analytic' or 'finite_difference', got {cfg.normal_method!r}")
        if cfg.heads not in ("shared", "separate"):
            raise ValueError(f"heads must be 'shared' or 'separate', got {cfg.heads!r}")
        if cfg.bound <= 0 or cfg.blob_radius <= 0:
            raise ValueError(f"bound and blob_radius must be positive, got {cfg.bound} and {cfg.blob_radius}")
        self.bound = float(cfg.bound)
        self.density_activation: DensityActivation = cfg.density_activation
        self.blob_density = float(cfg.blob_density)
        self.blob_radius = float(cfg.blob_radius)
        self.normal_method: NormalMethod = cfg.normal_method
        self.normal_eps = NORMAL_EPS_PER_BOUND * self.bound
        self.heads: Heads = cfg.heads
        self.encoding = HashGridEncoding.from_config(cfg)  # initialised before the MLP: seeded runs depend on it
        n_in = self.encoding.n_output_dims
        if self.heads == "shared":
            self.mlp = _mlp(n_in, cfg.hidden_dim, cfg.n_hidden_layers, 4, bias=False)
        else:  # density first: seeded runs depend on the order
            self.density_mlp = _mlp(n_in, cfg.hidden_dim, cfg.n_hidden_layers, 1, bias=False)
            self.albedo_mlp = _mlp(n_in, cfg.hidden_dim, cfg.n_hidden_layers, 3, bias=False)

    def _activate(self, raw: Tensor) -> Tensor:
        return F.softplus(raw) if self.density_activation == "softplus" else trunc_exp(raw)

    def _raw(self, x: Tensor, with_albedo: bool = True) -> tuple[Tensor, Tensor | None]:
        """x [N, 3] world -> (sigma [N], albedo logits [N, 3], or None when not asked for and the
        heads are separate)."""
        inside = (x.abs() <= self.bound).all(dim=-1)
        features = self.encoding(unit_cube_from_world(x, self.bound).clamp(0.0, 1.0)).float()
        if self.heads == "shared":
            out = self.mlp(features)  # [N, 4]
            raw, logits = out[:, 0], out[:, 1:]
        else:
            raw = self.density_mlp(features)[:, 0]
            logits = self.albedo_mlp(features) if with_albedo else None
        raw_density = raw + blob_bias_from_points(x, self.blob_density, self.blob_radius)
        sigma = torch.where(inside, self._activate(raw_density), torch.zeros_like(raw_density))
        return sigma, logits

    def density(self, x: Tensor) -> Tensor:
        """x [N, 3] world -> sigma [N] (blob bias included, 0 outside the box)."""
        return self._raw(x, with_albedo=False)[0]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, 3] world -> (sigma [N], albedo [N, 3] in [0, 1])."""
        sigma, logits = self._raw(x)
        return sigma, torch.sigmoid(logits)

    def normals(self, x: Tensor) -> Tensor:
        """x [N, 3] world -> unit normals [N, 3] = -normalize(grad sigma), pointing out of the density.

        ``finite_difference``: central differences with step ``normal_eps`` (6 density evaluations
        per point), differentiable w.r.t. the field by plain backprop. ``analytic``: autograd through
        the encoding; when grad is enabled the graph is kept (``create_graph``) so a loss on the
        normals trains the field (double backward through the hash grid). ``auto``: by x's device
        (:func:`resolve_normal_method`).
        """
        if resolve_normal_method(self.normal_method, x.device) == "finite_difference":
            grad = self._density_gradient_fd(x)
        else:
            grad = self._density_gradient_autograd(x)
        return -F.normalize(grad, dim=-1)

    def _density_gradient_fd(self, x: Tensor) -> Tensor:
        eps = self.normal_eps
        offsets = torch.eye(3, device=x.device, dtype=x.dtype)
        offsets = torch.stack([offsets, -offsets], dim=1).reshape(6, 3) * eps  # +x, -x, +y, -y, +z, -z
        sigma = self.density((x[:, None, :] + offsets).reshape(-1, 3)).reshape(-1, 3, 2)
        return (sigma[..., 0] - sigma[..., 1]) / (2.0 * eps)

    def _density_gradient_autograd(self, x: Tensor) -> Tensor:
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            sigma = self.density(xg)
            (grad,) = torch.autograd.grad(sigma.sum(), xg, create_graph=create_graph)
        return grad if create_graph else grad.detach()


# --------------------------------------------------------------------------- background


class Background(nn.Module):
    """What a ray sees after leaving the scene.

    ``mlp``: a small MLP on the frequency-encoded view direction (27 -> 16 -> 3, sigmoid), learned.
    ``solid``: the fixed ``color``. ``random_solid_prob`` is stored for the training loop, which
    decides per step whether to replace the background by a random colour. Built from a
    :class:`~nfsd_nerf.config.BackgroundConfig`.
    """

    N_FREQUENCIES = 4
    HIDDEN = 16

    def __init__(self, cfg: BackgroundConfig):
        super().__init__()
        if cfg.kind not in ("mlp", "solid"):
            raise ValueError(f"background kind must be 'mlp' or 'solid', got {cfg.kind!r}")
        if len(cfg.color) != 3:
            raise ValueError(f"background color must have 3 values, got {cfg.color!r}")
        self.kind = cfg.kind
        self.random_solid_prob = float(cfg.random_solid_prob)
        # not saved: it comes from the config
        self.register_buffer("color", torch.tensor([float(c) for c in cfg.color]), persistent=False)
        if cfg.kind == "mlp":
            self.mlp = _mlp(3 * (1 + 2 * self.N_FREQUENCIES), self.HIDDEN, 1, 3, bias=True)

    def forward(self, dirs: Tensor) -> Tensor:
        """dirs [N, 3] unit -> rgb [N, 3] in [0, 1]."""
        if self.kind == "solid":
            return self.color.to(dirs.dtype).expand(dirs.shape[0], 3)
        return torch.sigmoid(self.mlp(frequency_encoding(dirs, self.N_FREQUENCIES)))
