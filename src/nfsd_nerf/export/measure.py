"""Mesh figures of an exported built-in run against the true object (issue #16).

Why: PSNR and IoU of renders say little about a mesh (a NeRF can render a cube well while its
level set is full of tunnels, bumps and clipped colour). These figures compare the mesh itself
with the analytic object of the prompt (:mod:`~nfsd_nerf.guidance.shapes`), in world units:

* ``pieces`` and ``euler`` after welding the vertices that UV seams split (a closed surface of
  genus g has Euler number 2 - 2g; the true cube 2, the torus 0), ``genus`` where every piece is
  closed;
* ``volume`` (of the welded surface) vs ``true_volume`` (analytic where known, else a lattice
  estimate of the SDF, :func:`sdf_volume`);
* ``surface_distance_median``: median |SDF| at area-uniform samples of the mesh surface;
* ``normal_error_median_deg``: median angle between the face normal and the SDF's gradient there;
* ``colour_mean`` (texture or vertex colours at the same samples) vs the true albedo,
  ``colour_error`` (largest channel difference), ``colour_std`` (blotchiness) and
  ``colour_clipped_fraction`` (per channel, samples at 0 or 255).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

if TYPE_CHECKING:
    import trimesh

N_SAMPLES = 20_000
"""Surface samples of the distance, normal and colour figures (median error ~1% of its value)."""
WELD_DECIMALS = 6
"""Vertices equal to this many decimals (world units) are one vertex: UV seams duplicate positions exactly."""
TRUE_VOLUMES = {
    "cube": 0.72**3,
    "sphere": 4.0 / 3.0 * math.pi * 0.5**3,
    "torus": 2.0 * math.pi**2 * 0.46 * 0.185**2,
    "cylinder": math.pi * 0.38**2 * 0.9,
    "cone": math.pi * 0.54**2 * 1.06 / 3.0,
    "capsule": math.pi * 0.31**2 * 0.86 + 4.0 / 3.0 * math.pi * 0.31**3,
    "octahedron": 4.0 / 3.0 * 0.67**3,
}
"""Analytic volumes of the built-in shapes (their sizes in :mod:`~nfsd_nerf.guidance.shapes`)."""


def weld(mesh: "trimesh.Trimesh") -> tuple[np.ndarray, np.ndarray]:
    """Merge vertices at the same position (UV seams split them) -> (vertices [V, 3], faces [F, 3]).

    Faces that become degenerate are dropped. Without this a textured mesh is cut into charts and
    its Euler number counts the seams."""
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    _, first, inverse = np.unique(np.round(vertices, WELD_DECIMALS), axis=0, return_index=True, return_inverse=True)
    faces = inverse.reshape(-1)[faces]
    ok = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    return vertices[first], faces[ok]


def topology(vertices: np.ndarray, faces: np.ndarray) -> dict:
    """Pieces (connected by shared vertices), Euler number V - E + F, and whether every edge has two
    faces (closed); ``genus`` = pieces - euler / 2 when closed, else None."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    used = np.unique(faces)
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    unique_edges, counts = np.unique(edges, axis=0, return_counts=True)
    n = len(vertices)
    adjacency = coo_matrix((np.ones(len(unique_edges)), (unique_edges[:, 0], unique_edges[:, 1])), shape=(n, n))
    _, labels = connected_components(adjacency, directed=False)
    pieces = len(np.unique(labels[used]))
    euler = len(used) - len(unique_edges) + len(faces)
    closed = bool((counts == 2).all())
    genus = pieces - euler // 2 if closed and euler % 2 == 0 else None
    return {"pieces": pieces, "euler": int(euler), "closed": closed, "genus": genus}


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Sum of signed tetrahedra (origin, face): the enclosed volume of a closed outward-wound surface."""
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def sdf_volume(sdf: Callable[[torch.Tensor], torch.Tensor], radius: float, resolution: int = 160) -> float:
    """Volume of {sdf < 0} inside the cube [-radius, radius]^3 on a lattice, each cell counted by
    ``clamp(0.5 - sdf / h, 0, 1)`` (the fraction of a cell of side h below a plane at that distance):
    second-order accurate for an exact SDF, for shapes without a formula."""
    h = 2.0 * radius / resolution
    axis = torch.linspace(-radius + h / 2, radius - h / 2, resolution, dtype=torch.float64)
    total = 0.0
    for x in axis:  # one slab at a time: resolution^2 points
        yz = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
        p = torch.cat([x.expand(len(yz), 1), yz], dim=1)
        total += float((0.5 - sdf(p) / h).clamp(0.0, 1.0).sum())
    return total * h**3


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area-uniform samples: (face index [n], barycentric weights [n, 3], points [n, 3]); fixed seed."""
    rng = np.random.default_rng(seed)
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    face = rng.choice(len(faces), size=n, p=area / area.sum())
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    bary = np.stack([1 - u - v, u, v], axis=1)
    points = np.einsum("nk,nkd->nd", bary, vertices[faces[face]])
    return face, bary, points


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit normals [F, 3] of the faces as wound (outward for an exported mesh)."""
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    n = np.cross(b - a, c - a)
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-30)


def surface_colours(mesh: "trimesh.Trimesh", face: np.ndarray, bary: np.ndarray) -> np.ndarray | None:
    """Colours in [0, 1] [n, 3] at samples (face, barycentric) of ``mesh`` (not welded): the baked
    texture at the interpolated UV (nearest texel), else interpolated vertex colours, else None."""
    visual = mesh.visual
    faces = np.asarray(mesh.faces)
    material = getattr(visual, "material", None)
    image = getattr(material, "baseColorTexture", None) if material is not None else None
    if getattr(visual, "uv", None) is not None and image is not None:
        texture = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0  # [H, W, 3], row 0 = top (v = 1)
        uv = np.einsum("nk,nkd->nd", bary, np.asarray(visual.uv, dtype=np.float64)[faces[face]])
        h, w = texture.shape[:2]
        col = np.clip(np.floor(uv[:, 0] * w), 0, w - 1).astype(int)
        row = np.clip(np.floor((1.0 - uv[:, 1]) * h), 0, h - 1).astype(int)
        return texture[row, col]
    if getattr(visual, "kind", None) == "vertex":
        colours = np.asarray(visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0
        return np.einsum("nk,nkd->nd", bary, colours[faces[face]])
    return None


def measure_mesh(mesh: "trimesh.Trimesh", shape: str, albedo: tuple[float, float, float] | None = None,
                 *, coloured: "trimesh.Trimesh | None" = None, n_samples: int = N_SAMPLES, seed: int = 0) -> dict:
    """The mesh figures (module docstring) of ``mesh`` (world units, +Z up, as extracted) against
    the built-in ``shape`` and its ``albedo`` -> a JSON-ready dict. Distances in world units.

    ``coloured``: the same faces in the same order with colours (the texture bake splits
    vertices along seams): its colours are measured and ``mesh`` is taken as connected by its
    vertex indices, not welded by position (marching cubes puts distinct vertices at one point
    where the level meets a lattice point; welding them opens the surface). Without it, ``mesh``
    holds the colours and is welded (a mesh read back from a file)."""
    from ..guidance.shapes import SHAPES, normals_from_sdf

    true = SHAPES[shape]
    if coloured is not None and len(coloured.faces) != len(mesh.faces):
        raise ValueError(f"coloured mesh has {len(coloured.faces)} faces, the surface {len(mesh.faces)}")
    if coloured is None:
        vertices, faces = weld(mesh)
    else:
        vertices, faces = np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)
    figures: dict = {"shape": shape, **topology(vertices, faces)}
    volume = abs(signed_volume(vertices, faces))
    true_volume = TRUE_VOLUMES.get(shape) or sdf_volume(true.sdf, true.radius * 1.05)
    figures.update(volume=volume, true_volume=true_volume, volume_error=volume / true_volume - 1.0)

    face, bary, points = sample_surface(np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces), n_samples,
                                        seed)
    p = torch.from_numpy(points)
    distance = true.sdf(p).abs().numpy()
    true_normals = normals_from_sdf(true.sdf, p).numpy()
    mesh_normals = face_normals(np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces))[face]
    angle = np.degrees(np.arccos(np.clip((true_normals * mesh_normals).sum(-1), -1.0, 1.0)))
    figures.update(surface_distance_median=float(np.median(distance)), surface_distance_p90=float(np.quantile(distance, 0.9)),
                   normal_error_median_deg=float(np.median(angle)), normal_error_mean_deg=float(angle.mean()))

    colours = surface_colours(mesh if coloured is None else coloured, face, bary)
    if colours is not None:
        mean = colours.mean(axis=0)
        clipped = ((colours <= 0.5 / 255) | (colours >= 254.5 / 255)).mean(axis=0)
        figures.update(colour_mean=[float(c) for c in mean], colour_std=[float(c) for c in colours.std(axis=0)],
                       colour_clipped_fraction=[float(c) for c in clipped])
        if albedo is not None:
            figures.update(true_albedo=list(albedo), colour_error=float(np.abs(mean - np.asarray(albedo)).max()))
    return figures


def measure_for_prompt(mesh: "trimesh.Trimesh", prompt: str, **kwargs) -> dict | None:
    """:func:`measure_mesh` against the object a built-in prompt names; None for other prompts."""
    from ..errors import UserError
    from ..guidance.shapes import COLOURS, parse_prompt

    try:
        parsed = parse_prompt(prompt, drawn=True)
    except UserError:
        return None
    return {"prompt": prompt, **measure_mesh(mesh, parsed.shape, COLOURS[parsed.colour], **kwargs)}
