"""The built-in prior's world: analytic shapes, named colours, prompt parsing and a sphere tracer.

Every object is an exact (or conservative) signed distance function in world units: +Z up,
centred at the origin, sized so that it covers about a third of the frame for the training
cameras (distance 1.5-2.0, fovy 40-70 deg). It is lit exactly as a NeRF's Lambertian shading
lights a render (:func:`~nfsd_nerf.render.shading.lambert`) with the camera-attached point light
(:func:`~nfsd_nerf.render.shading.camera_light_positions`, ambient
:data:`~nfsd_nerf.render.shading.CAMERA_LIGHT_AMBIENT`): a NeRF trained with that shading
(``render.light: camera``, the built-in preset) can reproduce every reference with its true albedo
and true normals, so its albedo is the object's albedo and its normals are constrained. (Until
reference cache format 2 the lights were fixed in world space and baked into an albedo-only NeRF's
colour: clipped, blotchy albedo and unconstrained normals, issue #16.)

A render is the product of a per-shape part (``shade`` and ``coverage``, colour-free) and a
per-colour tint, so the references are rendered once per shape and tinted per colour:

.. math::

    \\mathrm{rgb} = \\mathrm{colour} \\cdot S + (1 - C) \\cdot \\mathrm{background}

with ``S`` the pixel average of hit * shade over the supersamples and ``C`` the pixel's coverage.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from ..cameras import Cameras, generate_rays
from ..errors import UserError
from ..render.shading import CAMERA_LIGHT_AMBIENT, camera_light_positions, lambert
from ..runtime import cpu_threads

# --------------------------------------------------------------------------- constants

BACKGROUND_RGB: tuple[float, float, float] = (1.0, 1.0, 1.0)
"""The fixed background of every reference (a NeRF trained on the prior needs a solid, equal one)."""


COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.12, 0.62, 0.20),
    "blue": (0.12, 0.28, 0.85),
    "yellow": (0.95, 0.80, 0.10),
    "orange": (0.95, 0.45, 0.05),
    "purple": (0.50, 0.18, 0.70),
    "pink": (0.95, 0.45, 0.70),
    "cyan": (0.10, 0.72, 0.80),
    "brown": (0.50, 0.30, 0.12),
    "grey": (0.50, 0.50, 0.50),
}
"""Albedos of the named colours (no white: it would vanish into the white background)."""

COLOUR_ALIASES = {"gray": "grey", "violet": "purple", "magenta": "pink", "turquoise": "cyan"}

# --------------------------------------------------------------------------- signed distances
# Each takes points p [N, 3] (world) and returns signed distances [N]: negative inside, and
# never larger than the true distance (so sphere tracing cannot step through a surface).


def _rotation_to(axis: tuple[float, float, float]) -> Tensor:
    """[3, 3] rotation R with R @ e_z = unit(axis): world-from-local for shapes built around +Z."""
    z = torch.nn.functional.normalize(torch.tensor(axis, dtype=torch.float64), dim=0)
    helper = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    if abs(float(z @ helper)) > 0.9:
        helper = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    x = torch.nn.functional.normalize(torch.linalg.cross(helper, z), dim=0)
    y = torch.linalg.cross(z, x)
    return torch.stack([x, y, z], dim=1)


def _to_local(p: Tensor, rotation: Tensor) -> Tensor:
    """World points [N, 3] -> local coordinates of a shape rotated by ``rotation`` [3, 3]."""
    return p @ rotation.to(p)  # p_local = R^T p, written for row vectors


def sdf_sphere(p: Tensor, radius: float = 0.5) -> Tensor:
    return p.norm(dim=-1) - radius


def sdf_box(p: Tensor, half: float = 0.36) -> Tensor:
    q = p.abs() - half
    return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)


def sdf_cylinder(p: Tensor, radius: float = 0.38, half_height: float = 0.45) -> Tensor:
    """Capped cylinder around the Z axis."""
    d = torch.stack([p[:, :2].norm(dim=-1) - radius, p[:, 2].abs() - half_height], dim=-1)
    return d.max(dim=-1).values.clamp(max=0) + d.clamp(min=0).norm(dim=-1)


def sdf_cone(p: Tensor, radius: float = 0.54, height: float = 1.06) -> Tensor:
    """Solid cone, apex up, base centred below the origin (bounding box centred on the origin).

    Exact distance to the revolved right triangle (Inigo Quilez's ``sdCone`` in 2D form).
    """
    qx, qy = radius, -height  # base rim relative to the apex, in (radial, vertical)
    wx, wy = p[:, :2].norm(dim=-1), p[:, 2] - 0.5 * height
    # nearest point on the slanted side (apex -> rim segment) and on the base disc
    h = ((wx * qx + wy * qy) / (qx * qx + qy * qy)).clamp(0.0, 1.0)
    ax, ay = wx - qx * h, wy - qy * h
    bx, by = wx - qx * (wx / qx).clamp(0.0, 1.0), wy - qy
    d2 = torch.minimum(ax * ax + ay * ay, bx * bx + by * by)
    k = math.copysign(1.0, qy)
    s = torch.maximum(k * (wx * qy - wy * qx), k * (wy - qy))
    return d2.sqrt() * torch.sign(s)


def sdf_capsule(p: Tensor, radius: float = 0.31, half_length: float = 0.43) -> Tensor:
    """Capsule (pill) along the Z axis: all points within ``radius`` of a segment."""
    z = p[:, 2].clamp(-half_length, half_length)
    return torch.stack([p[:, 0], p[:, 1], p[:, 2] - z], dim=-1).norm(dim=-1) - radius


def sdf_torus(p: Tensor, major: float = 0.46, minor: float = 0.185) -> Tensor:
    """Torus around the Z axis."""
    return torch.stack([p[:, :2].norm(dim=-1) - major, p[:, 2]], dim=-1).norm(dim=-1) - minor


def sdf_octahedron(p: Tensor, size: float = 0.67) -> Tensor:
    """Regular octahedron |x| + |y| + |z| <= size (conservative bound; exact inside)."""
    return (p.abs().sum(dim=-1) - size) * (1.0 / math.sqrt(3.0))


@dataclass(frozen=True)
class Shape:
    """A named analytic object: its signed distance and a bounding radius for ray culling."""

    name: str
    sdf: Callable[[Tensor], Tensor]
    """points [N, 3] world -> signed distance [N]."""
    radius: float
    """Every surface point lies within this distance of the origin."""


_TORUS_AXIS = _rotation_to((1.0, 0.45, 1.1))  # tilted towards the front so it reads from most views
_CAPSULE_AXIS = _rotation_to((0.35, 0.75, 1.0))  # a pill leaning sideways, not a plain cylinder

SHAPES: dict[str, Shape] = {
    "cube": Shape("cube", sdf_box, 0.36 * math.sqrt(3.0)),
    "sphere": Shape("sphere", sdf_sphere, 0.5),
    "torus": Shape("torus", lambda p: sdf_torus(_to_local(p, _TORUS_AXIS)), 0.46 + 0.185),
    "cone": Shape("cone", sdf_cone, math.hypot(0.54, 0.53)),
    "cylinder": Shape("cylinder", sdf_cylinder, math.hypot(0.38, 0.45)),
    "capsule": Shape("capsule", lambda p: sdf_capsule(_to_local(p, _CAPSULE_AXIS)), 0.31 + 0.43),
    "octahedron": Shape("octahedron", sdf_octahedron, 0.67),
}
"""The vocabulary of shapes, in a fixed order (object ids depend on it)."""

SHAPE_ALIASES = {
    "box": "cube",
    "block": "cube",
    "ball": "sphere",
    "orb": "sphere",
    "donut": "torus",
    "doughnut": "torus",
    "ring": "torus",
    "pill": "capsule",
    "tube": "cylinder",
    "diamond": "octahedron",
}

# --------------------------------------------------------------------------- prompts

NEGATIVE_WORDS = frozenset(
    "unrealistic blurry blur low quality out of focus ugly contrast dull dark resolution gloomy bad "
    "worst noisy deformed distorted".split()
)
"""Words that mark a negative prompt (the paper's is made only of these and a few fillers)."""

VIEW_WORDS = frozenset("front side back overhead top bottom view".split())


@dataclass(frozen=True)
class ParsedPrompt:
    """What a prompt asks the built-in prior for."""

    kind: Literal["object", "unconditional", "negative"]
    shape: str | None = None
    colour: str | None = None


def _vocabulary_message() -> str:
    return f"known shapes: {', '.join(SHAPES)}; known colours: {', '.join(COLOURS)}"


def parse_prompt(prompt: str, *, drawn: bool = False) -> ParsedPrompt:
    """"a DSLR photo of a blue torus, front view" -> object (torus, blue).

    A prompt of only spaces and punctuation is the unconditional one; a prompt made of image-quality
    words (the paper's negative prompt, "blurry, low quality, ...") is the negative one. Anything
    else must name exactly one known shape and one known colour, or a :class:`UserError` lists the
    vocabulary. ``drawn``: the prompt is the one a run draws (the user's), which must name an object:
    the unconditional and negative prompts are only the rules' other rows, and taking a user's prompt
    for one ("a photo of a hamburger" has "of", as in "out of focus") would train a run that cannot
    be evaluated. Text in another script is not blank: it names no known shape.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    if not drawn and not prompt.strip(string.whitespace + string.punctuation):
        return ParsedPrompt("unconditional")
    shapes, colours = [], []
    for word in words:
        for candidate in (word, word[:-1] if word.endswith("s") else None, word[:-2] if word.endswith("es") else None):
            if candidate in SHAPES or candidate in SHAPE_ALIASES:
                shapes.append(SHAPE_ALIASES.get(candidate, candidate))
                break
        if word in COLOURS or word in COLOUR_ALIASES:
            colours.append(COLOUR_ALIASES.get(word, word))
    if not drawn and not shapes and not colours and any(w in NEGATIVE_WORDS for w in words):
        return ParsedPrompt("negative")
    if len(set(shapes)) != 1 or len(set(colours)) != 1:
        problem = "names no" if not shapes or not colours else "names more than one"
        missing = "shape" if len(set(shapes)) != 1 else "colour"
        raise UserError(
            f"the built-in prior cannot draw {prompt!r}: it {problem} known {missing} "
            f"(write e.g. 'a red cube'; {_vocabulary_message()})"
        )
    return ParsedPrompt("object", shapes[0], colours[0])


# --------------------------------------------------------------------------- sphere tracing


def normals_from_sdf(sdf: Callable[[Tensor], Tensor], p: Tensor, eps: float = 1e-3) -> Tensor:
    """Unit outward normals [N, 3] at points p [N, 3] by central differences of the SDF."""
    offsets = torch.eye(3, dtype=p.dtype, device=p.device) * eps  # [3, 3]
    plus = sdf((p[:, None, :] + offsets).reshape(-1, 3)).reshape(-1, 3)
    minus = sdf((p[:, None, :] - offsets).reshape(-1, 3)).reshape(-1, 3)
    return torch.nn.functional.normalize(plus - minus, dim=-1)


def shade_from_normals(normals: Tensor, points: Tensor, light_positions: Tensor) -> Tensor:
    """Normals, surface points and point-light positions [N, 3] -> shading [N] in
    [CAMERA_LIGHT_AMBIENT, 1]: exactly the NeRF's Lambertian brightness (:func:`~nfsd_nerf.render.shading.lambert`)."""
    return lambert(normals, points, light_positions, CAMERA_LIGHT_AMBIENT)


def trace_sdf(
    shape: Shape, rays_o: Tensor, rays_d: Tensor, *, max_steps: int = 64, hit_eps: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """Sphere-trace rays_o, rays_d [N, 3] (unit directions) against ``shape``.

    Returns ``hit`` [N] bool and the hit points [N, 3] (meaningless where not hit). Rays start
    where they enter the shape's bounding sphere, and the still-marching rays are kept compacted,
    so the cost follows the rays near the surface. A ray still marching after ``max_steps``
    (grazing a silhouette) counts as a hit if it is within ``4 * hit_eps``.
    """
    # 1. clip to the bounding sphere |o + t d| = radius
    b = (rays_o * rays_d).sum(-1)
    disc = b * b - ((rays_o * rays_o).sum(-1) - (shape.radius * 1.01) ** 2)
    enters = disc > 0
    hit = torch.zeros(rays_o.shape[0], dtype=torch.bool, device=rays_o.device)
    points = torch.zeros_like(rays_o)
    idx = torch.nonzero(enters).squeeze(1)  # compacted state of the marching rays:
    o, d = rays_o[idx], rays_d[idx]
    root = disc[idx].sqrt()
    t = (-b[idx] - root).clamp(min=0)
    t_far = -b[idx] + root
    # 2. march; every step retires the rays that hit or left the sphere
    for step in range(max_steps + 1):
        p = torch.addcmul(o, t[:, None], d)
        dist = shape.sdf(p)
        done = dist < (hit_eps if step < max_steps else 4 * hit_eps)
        if done.any():
            hit[idx[done]] = True
            points[idx[done]] = p[done]
        t = t + dist
        keep = ~done & (t < t_far)
        if step == max_steps or not keep.any():
            break
        idx, o, d, t, t_far = idx[keep], o[keep], d[keep], t[keep], t_far[keep]
    return hit, points


def shade_and_coverage(
    shape: Shape, cameras: Cameras, size: int, *, supersample: int = 2, chunk_views: int = 512
) -> tuple[Tensor, Tensor]:
    """Colour-free render of ``shape`` from B cameras at size x size pixels.

    Returns ``shade`` [B, H, W] (pixel mean of hit * shading over supersample^2 subpixels, each
    camera's own camera-attached light, :func:`shade_from_normals`) and
    ``coverage`` [B, H, W] in [0, 1] (fraction of subpixels that hit), both float32.
    """
    # Sphere tracing is hundreds of small ops: on a 2-core machine busy with anything else OpenMP's
    # fork-join made it 20-50x slower (0.5 s vs 12-25 s for 60 views x 7 shapes at 16x16), while one
    # thread costs at most ~1.7x on an idle machine (6.0 s vs 3.5 s for 500 views x 7 at 32x32).
    with cpu_threads(1 if cameras.device.type == "cpu" else None):
        return _shade_and_coverage(shape, cameras, size, supersample, chunk_views)


def _shade_and_coverage(shape: Shape, cameras: Cameras, size: int, supersample: int, chunk_views: int):
    shades, coverages = [], []
    s = supersample
    for start in range(0, len(cameras), chunk_views):
        cams = cameras[start : start + chunk_views]
        rays_o, rays_d = generate_rays(cams, size * s, size * s)  # [b, Hs, Ws, 3]
        shape_hw = rays_o.shape[:3]
        hit, points = trace_sdf(shape, rays_o.reshape(-1, 3), rays_d.reshape(-1, 3))
        lights = camera_light_positions(cams.c2w[:, :3, 3]).repeat_interleave(shape_hw[1] * shape_hw[2], dim=0)
        shade = torch.zeros(hit.shape, dtype=rays_o.dtype, device=hit.device)
        if hit.any():
            shade[hit] = shade_from_normals(normals_from_sdf(shape.sdf, points[hit]), points[hit], lights[hit].to(points))
        pool = lambda x: torch.nn.functional.avg_pool2d(x.reshape(shape_hw)[:, None], s)[:, 0]  # noqa: E731
        shades.append(pool(shade).float())
        coverages.append(pool(hit.to(shade.dtype)).float())
    return torch.cat(shades), torch.cat(coverages)


def rgb_from_shade(shade: Tensor, coverage: Tensor, colour: Tensor, background: Tensor) -> Tensor:
    """Tint a colour-free render: shade, coverage [..., H, W], colour and background [3] -> rgb [..., H, W, 3]."""
    return shade[..., None] * colour + (1.0 - coverage[..., None]) * background


def render_object(
    shape: str, colour: str, cameras: Cameras, size: int, *, supersample: int = 2
) -> tuple[Tensor, Tensor]:
    """The true object seen from ``cameras``: rgb [B, H, W, 3] in [0, 1] and coverage [B, H, W] in [0, 1]."""
    shade, coverage = shade_and_coverage(SHAPES[shape], cameras, size, supersample=supersample)
    device = shade.device
    rgb = rgb_from_shade(shade, coverage, torch.tensor(COLOURS[colour], device=device), torch.tensor(BACKGROUND_RGB, device=device))
    return rgb, coverage
