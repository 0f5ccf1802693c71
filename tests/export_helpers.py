"""Shared by the export tests (``from export_helpers import ...``); holds no tests itself.

Analytic stand-in fields (no hash grid) give exact volumes, outlines and colours; ``box_run`` is
the real hash-grid NeRF fitted to a box and saved as a run folder, the path users take.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import trimesh


def albedo_from_points(x: torch.Tensor) -> torch.Tensor:
    """A colour that changes along every axis, so a swapped or flipped axis shows. x [N, 3] -> [N, 3]."""
    return torch.stack(
        [0.2 + 0.6 * torch.sigmoid(4 * x[:, 2]), 0.3 + 0.4 * torch.sigmoid(4 * x[:, 0]), 0.8 - 0.5 * torch.sigmoid(4 * x[:, 1])],
        dim=-1,
    )


class Ellipsoid:
    """sigma = S * sigmoid((1 - r) / w), r the ellipsoid's normalised radius (a step when w = 0).

    At threshold S / 2 the level set is exactly the ellipsoid. Zero outside the box, like NeRFField.
    """

    normal_method = "analytic"

    def __init__(self, center=(0.15, -0.1, 0.05), axes=(0.3, 0.25, 0.5), sigma=50.0, width=0.03, bound=1.0):
        self.center, self.axes = torch.tensor(center), torch.tensor(axes)
        self.sigma, self.width, self.bound = sigma, width, bound

    def radius(self, x):
        return (((x - self.center) / self.axes) ** 2).sum(-1).sqrt()

    def density(self, x):
        r = self.radius(x)
        if self.width == 0:
            sigma = torch.where(r <= 1, torch.full_like(r, self.sigma), torch.zeros_like(r))
        else:
            sigma = self.sigma * torch.sigmoid((1 - r) / self.width)
        return torch.where((x.abs() <= self.bound).all(-1), sigma, torch.zeros_like(sigma))

    def __call__(self, x):
        return self.density(x), albedo_from_points(x)

    def normals(self, x):
        return F.normalize((x - self.center) / self.axes**2, dim=-1)

    @property
    def volume(self):
        return 4.0 / 3.0 * math.pi * float(self.axes.prod())


class TwoBalls:
    """A ball and a small far-away floater (both steps)."""

    bound = 1.0

    def density(self, x):
        big = (x**2).sum(-1) <= 0.4**2
        small = ((x - torch.tensor([0.7, 0.7, 0.7])) ** 2).sum(-1) <= 0.08**2
        return (big | small).float() * 40.0

    def __call__(self, x):
        return self.density(x), albedo_from_points(x)


class White:
    def __call__(self, dirs):
        return torch.ones(dirs.shape[0], 3)


def loaded_mesh(path: Path) -> trimesh.Trimesh:
    loaded = trimesh.load(path, process=False)
    if isinstance(loaded, trimesh.Scene):
        assert len(loaded.geometry) == 1
        loaded = loaded.to_geometry()  # applies the node transform
    return loaded


def texture_colors_at_faces(mesh: trimesh.Trimesh) -> np.ndarray:
    """Texture colour (nearest texel) at each face's UV centroid -> [F, 3] in [0, 1]."""
    material = mesh.visual.material
    image = getattr(material, "baseColorTexture", None) or material.image
    tex = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    size = tex.shape[0]
    uv = mesh.visual.uv[mesh.faces].mean(axis=1)
    col = np.clip(np.floor(uv[:, 0] * size), 0, size - 1).astype(int)
    row = np.clip(np.floor((1.0 - uv[:, 1]) * size), 0, size - 1).astype(int)
    return tex[row, col]


def bilinear_texture_at(mesh: trimesh.Trimesh, uv: np.ndarray) -> np.ndarray:
    """What a viewer's bilinear filter reads at ``uv`` [N, 2] (v up) -> [N, 3] in [0, 1]."""
    material = mesh.visual.material
    image = getattr(material, "baseColorTexture", None) or material.image
    tex = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    size = tex.shape[0]
    x, y = uv[:, 0] * size - 0.5, (1.0 - uv[:, 1]) * size - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    at = lambda r, c: tex[np.clip(r, 0, size - 1), np.clip(c, 0, size - 1)]  # noqa: E731
    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


# --------------------------------------------------------------------------- the real field, through a checkpoint

BOX_CENTER = np.array([0.1, -0.05, 0.05])
BOX_HALF = np.array([0.25, 0.2, 0.4])  # tallest along world Z


def fit_box_run(run: Path) -> Path:
    """A run folder whose checkpoint holds the hash-grid NeRF fitted (150 Adam steps, direct
    supervision of density 50 inside / 0 outside and of the albedo) to an off-centre box."""
    from nfsd_nerf.checkpoint import save_checkpoint
    from nfsd_nerf.config import BackgroundConfig, Config, FieldConfig, RenderConfig
    from nfsd_nerf.render import step_size_from_samples
    from nfsd_nerf.scene import build_scene

    cfg = Config(
        prompt="a box",
        field=FieldConfig(n_levels=6, log2_hashmap_size=14, base_resolution=16, per_level_scale=1.5, hidden_dim=16, bound=1.0),
        background=BackgroundConfig(kind="solid"),
        render=RenderConfig(n_samples=96, occupancy_resolution=16),
    )
    torch.manual_seed(0)
    scene = build_scene(cfg)
    field = scene.field
    center, half = torch.tensor(BOX_CENTER, dtype=torch.float32), torch.tensor(BOX_HALF, dtype=torch.float32)
    optimizer = torch.optim.Adam(field.parameters(), lr=0.03, betas=(0.9, 0.99), eps=1e-15)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        uniform = torch.rand(1024, 3, generator=generator) * 2 - 1
        near = center + (torch.rand(1024, 3, generator=generator) * 2 - 1) * (half + 0.1)
        x = torch.cat([uniform, near])
        inside = ((x - center).abs() <= half).all(-1).float()
        sigma, albedo = field(x)
        loss = ((sigma - 50.0 * inside) / 50.0).pow(2).mean() + (albedo - albedo_from_points(x)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scene.occupancy.update(0, field.density, step_size=step_size_from_samples(1.0, cfg.render.n_samples))
    (run / "checkpoints").mkdir(parents=True)
    save_checkpoint(run / "checkpoints" / "latest.safetensors", config=cfg, scene=scene, step=150)
    return run


class StepField:
    """A step field ``sigma * inside(x)`` (0 outside the box) from a boolean function of the points."""

    bound = 1.0

    def __init__(self, inside, sigma: float = 40.0):
        self.inside, self.sigma = inside, sigma

    def density(self, x):
        return self.inside(x).float() * self.sigma

    def __call__(self, x):
        return self.density(x), albedo_from_points(x)


def hollow_ball_with_core(outer=0.6, wall=0.15, core=0.2) -> StepField:
    """A shell (radii outer - wall .. outer) around an empty cavity holding a solid core ball: the raw
    level set has three pieces, the middle one an inner shell (the cavity wall, wound inward)."""
    def inside(x):
        r = x.norm(dim=-1)
        return ((r <= outer) & (r >= outer - wall)) | (r <= core)

    return StepField(inside)


def ball_with_cavity(outer=0.6, cavity=0.3) -> StepField:
    """A solid ball with an empty, closed bubble in it: two pieces raw, one filled ball outside."""
    return StepField(lambda x: (x.norm(dim=-1) <= outer) & (x.norm(dim=-1) > cavity))


def torus(major=0.5, minor=0.18) -> StepField:
    """A solid torus around world Z: genus 1 (Euler number 0); its hole is open to the outside."""
    def inside(x):
        ring = (x[:, :2].norm(dim=-1) - major) ** 2 + x[:, 2] ** 2
        return ring <= minor**2

    return StepField(inside)
