"""Meshes from a density field: grid sampling, marching cubes, UV unwrap, texture bake, file output.

The pipeline (:func:`export_field` runs it top to bottom):

1. :func:`sample_density_grid`: sigma on an R^3 lattice over the scene box, in chunks, no grad.
2. :func:`threshold_from_density_grid` (``threshold="auto"``): the density level whose outline
   matches where the volume render is at least half opaque (see that function).
3. :func:`mesh_from_density_grid`: marching cubes (PyMCubes), vertices in world units, faces
   wound outward (density is positive inside), then :func:`keep_large_components` drops
   floaters; if the mesh has more than ``max_faces`` faces the grid is resampled coarser and
   meshed again (trimesh's quadric decimation needs ``fast_simplification``, not a dependency).
4. Colours from the albedo field: :func:`vertex_colors_from_albedo` (PLY) or :func:`bake_texture`
   (OBJ, GLB: xatlas unwrap, triangles rasterized in UV space on the CPU, albedo queried at each
   texel's 3D point, seams padded by dilation).
5. :func:`write_mesh`: centred, converted to the format's up axis, written atomically.

Axes. The world is +Z up and the object's front faces +X (``cameras.py``). glTF is +Y up with the
front of an asset facing +Z (glTF 2.0 spec, "Coordinate System and Units"); Blender's OBJ importer
assumes the same (forward -Z, up Y by default). GLB and OBJ files therefore get the rotation
``(x, y, z) -> (y, z, x)`` (a proper rotation: world up -> +Y, front -> +Z), so the object stands
upright and faces the default camera in Blender (front view) and browser viewers. PLY keeps the
world's axes (+Z up), which is what Blender's PLY importer expects by default.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

if TYPE_CHECKING:  # trimesh, PyMCubes and xatlas are imported lazily (``nfsd-nerf --help`` stays fast)
    import trimesh

MeshFormat = Literal["glb", "obj", "ply"]
FORMATS: tuple[str, ...] = ("glb", "obj", "ply")
Threshold = Union[float, Literal["auto"]]
AlbedoFn = Callable[[np.ndarray], np.ndarray]
"""points [N, 3] float (world) -> albedo [N, 3] float in [0, 1]."""

DEFAULT_CHUNK = 1 << 18
"""Field evaluations per call while sampling the grid / querying albedo (~100 MB peak on CPU)."""
FACES_PER_UV_BLOCK = 1000
"""xatlas' chart building is superlinear in a mesh's size (44k faces: ~25 s as one mesh, ~4 s in
blocks of 1000 on 2 CPU cores): the mesh is cut into spatially compact blocks of about this many
faces, unwrapped as separate meshes of one atlas, and packed together."""

DEFAULT_MAX_FACES = 100_000
"""Face cap of ``export``: enough for web viewers and Blender, and keeps the xatlas unwrap at a few
seconds (155k faces took 15-20 s, 74k faces 3 s on 2 CPU cores)."""
WORLD_TO_Y_UP = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
"""Rotation (det +1) taking world (x, y, z), +Z up / front +X, to glTF/OBJ (y, z, x), +Y up / front +Z."""


# --------------------------------------------------------------------------- 1. density grid


def grid_coordinates(bound: float, resolution: int) -> np.ndarray:
    """[R] lattice coordinates: R points from -bound to +bound inclusive (spacing 2 bound / (R - 1))."""
    return np.linspace(-bound, bound, resolution)


@torch.no_grad()
def sample_density_grid(
    density_fn: Callable[[Tensor], Tensor],
    bound: float,
    resolution: int,
    *,
    chunk: int = DEFAULT_CHUNK,
    mask: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """sigma on the lattice ``grid_coordinates(bound, R)`` in all three axes -> float32 [R, R, R].

    ``grid[i, j, k]`` is the density at ``(x_i, y_j, z_k)``. ``mask`` (bool [R, R, R], e.g.
    :func:`lattice_mask_from_occupancy`) marks the points worth evaluating; the others are 0
    without calling the field. Non-finite densities (trunc_exp overflow) become float32's
    largest value so they still count as inside.
    """
    r = int(resolution)
    coords = torch.as_tensor(grid_coordinates(bound, r), dtype=torch.float32)
    grid = torch.zeros(r, r, r)
    slabs = max(1, chunk // (r * r))  # x-slices per step: bounds the index tensors' memory
    for start in range(0, r, slabs):
        stop = min(r, start + slabs)
        ijk = torch.ones(stop - start, r, r, dtype=torch.bool) if mask is None else mask[start:stop]
        ijk = ijk.nonzero()
        ijk[:, 0] += start
        for part in ijk.split(chunk):
            sigma = density_fn(coords[part].to(device)).float().cpu()
            grid[part[:, 0], part[:, 1], part[:, 2]] = sigma
    big = np.finfo(np.float32).max
    return np.nan_to_num(grid.numpy(), copy=False, nan=0.0, posinf=big, neginf=0.0)


def lattice_mask_from_occupancy(binaries: Tensor, bound: float, resolution: int) -> Tensor:
    """A training occupancy grid (bool [G, G, G] over the box), dilated by one cell -> bool [R, R, R]
    over the lattice: the points worth evaluating.

    The renderer never samples unoccupied cells, so the surface users see lies in occupied ones;
    the one-cell margin keeps the lattice points just outside it (needed to close the surface).
    """
    g = binaries.shape[0]
    occ = binaries.detach().float().cpu()[None, None]
    dilated = torch.nn.functional.max_pool3d(occ, kernel_size=3, stride=1, padding=1)[0, 0] > 0
    coords = torch.as_tensor(grid_coordinates(bound, resolution), dtype=torch.float64)
    cell = ((coords + bound) * (g / (2.0 * bound))).floor().long().clamp_(0, g - 1)
    return dilated[cell[:, None, None], cell[None, :, None], cell[None, None, :]]


# --------------------------------------------------------------------------- 2. threshold


def threshold_from_density_grid(grid: np.ndarray, spacing: float, n_candidates: int = 96) -> float:
    """The density level whose outline matches the volume render's: ``threshold="auto"``.

    Why: the mesh should show what the renders show. Along every lattice line parallel to an axis
    (3 R^2 orthographic rays) the volume render is at least half opaque iff its optical depth
    ``sum(sigma) * spacing >= ln 2``; the level set {sigma >= t} meets that line iff
    ``max(sigma) >= t``. We pick the t (log-spaced candidates between ``ln 2 / box side``, below
    which no line can reach half opacity, and the grid's maximum) that minimises the number of
    lines on which the two disagree. Where several levels are equally good (a sharp field, whose
    outline hardly depends on t) we take the geometric middle of that range, the level furthest
    from both the empty space and the interior. This is independent of the mesh resolution (in
    the limit), needs no extra field evaluations, and ignores faint haze that renders transparent.

    grid [R, R, R] float (densities at lattice points ``spacing`` apart) -> threshold.
    Raises :class:`UserError` if no line of the field is half opaque (nothing to mesh).
    """
    sigma = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))
    side = spacing * (grid.shape[0] - 1)
    lowest = math.log(2.0) / side
    peak = float(sigma.max())
    line_max = [sigma.amax(dim=axis).flatten() for axis in range(3)]
    line_hit = [(sigma.sum(dim=axis, dtype=torch.float64) * spacing >= math.log(2.0)).flatten() for axis in range(3)]
    n_hits = int(sum(int(h.sum()) for h in line_hit))
    if n_hits == 0 or peak <= lowest:
        raise UserError(
            f"the field has no surface: no ray through it is half opaque (peak density {peak:.3g}); "
            "nothing to export"
        )
    candidates = torch.logspace(math.log10(lowest), math.log10(peak), n_candidates, dtype=torch.float64)
    errors = torch.zeros(n_candidates, dtype=torch.float64)
    for mx, hit in zip(line_max, line_hit):
        relevant = hit | (mx >= lowest)
        mx, hit = mx[relevant].double(), hit[relevant]
        crosses = mx[:, None] >= candidates[None, :]  # [L, C]
        errors += (crosses != hit[:, None]).sum(dim=0)
    best = int(errors.argmin())
    tolerance = errors[best] + max(1.0, 0.002 * n_hits)
    lo = hi = best
    while lo > 0 and errors[lo - 1] <= tolerance:
        lo -= 1
    while hi < n_candidates - 1 and errors[hi + 1] <= tolerance:
        hi += 1
    if hi == n_candidates - 1:  # the top candidate is the peak itself, crossed only at one point
        hi = max(lo, hi - 1)
    return float(math.sqrt(candidates[lo] * candidates[hi]))


# --------------------------------------------------------------------------- 3. marching cubes


def mesh_from_density_grid(grid: np.ndarray, threshold: float, bound: float) -> "trimesh.Trimesh":
    """Marching cubes of {sigma >= threshold} -> mesh in world units, faces wound outward.

    The grid is padded with one layer of zeros (the field is 0 outside the box), so a surface
    touching the box is closed there. Raises :class:`UserError` if there is no surface.
    """
    import mcubes
    import trimesh

    r = grid.shape[0]
    peak = float(grid.max())
    if not peak >= threshold:
        raise UserError(
            f"no surface at density threshold {threshold:g}: the field's density peaks at {peak:.3g} "
            "(try --threshold auto or a lower value)"
        )
    padded = np.pad(grid.astype(np.float32, copy=False), 1, constant_values=0.0)  # float32: half the memory
    vertices, faces = mcubes.marching_cubes(padded, float(threshold))
    if len(faces) == 0:
        raise UserError(f"no surface at density threshold {threshold:g}")
    spacing = 2.0 * bound / (r - 1)
    vertices = (vertices - 1.0) * spacing - bound  # padded index -> world
    mesh = trimesh.Trimesh(vertices, faces.astype(np.int64), process=False)
    # PyMCubes winds faces outward for a field that is larger inside (pinned by a test); a closed
    # surface with negative signed volume would mean that changed, so check rather than trust.
    if _signed_volume(mesh.vertices, mesh.faces) < 0:
        mesh.invert()
    return mesh


def _signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Sum of signed tetrahedron volumes (origin, triangle): > 0 for a closed outward-wound surface."""
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def keep_large_components(mesh: "trimesh.Trimesh", min_fraction: float = 0.05) -> "trimesh.Trimesh":
    """Drop connected pieces with fewer than ``min_fraction`` of the largest piece's faces (floaters)."""
    import trimesh
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    faces = np.asarray(mesh.faces)
    n = len(mesh.vertices)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    adjacency = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, labels = connected_components(adjacency, directed=False)
    face_labels = labels[faces[:, 0]]
    sizes = np.bincount(face_labels)
    keep_faces = sizes[face_labels] >= min_fraction * sizes.max()
    if keep_faces.all():
        return mesh
    kept = faces[keep_faces]
    used, inverse = np.unique(kept, return_inverse=True)
    return trimesh.Trimesh(np.asarray(mesh.vertices)[used], inverse.reshape(-1, 3), process=False)


def coarser_grid(grid: np.ndarray, resolution: int) -> np.ndarray:
    """Resample a lattice over the same box to ``resolution`` points per axis (trilinear)."""
    t = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
    size = (resolution,) * 3
    return torch.nn.functional.interpolate(t, size=size, mode="trilinear", align_corners=True)[0, 0].numpy()


@torch.no_grad()
def extract_mesh(
    field,
    *,
    resolution: int = 256,
    threshold: Threshold = "auto",
    chunk: int = DEFAULT_CHUNK,
    max_faces: int | None = None,
    min_component_fraction: float = 0.05,
    occupancy=None,
) -> "trimesh.Trimesh":
    """The field's surface as a triangle mesh in world units (not centred; +Z up).

    field: ``density(x [N, 3]) -> [N]`` and ``bound``. ``resolution``: lattice points per axis over
    the box. ``threshold``: a density or ``"auto"`` (:func:`threshold_from_density_grid`).
    ``max_faces``: if the mesh is larger, the lattice is resampled coarser until it fits.
    ``occupancy``: an object with ``binaries [G, G, G]`` (the run's occupancy grid) to skip empty
    space. The mesh has vertex normals; ``mesh.metadata`` holds ``threshold`` and ``resolution``.
    """
    # 1. Check inputs
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise UserError(f"resolution must be an integer >= 8, got {resolution!r}")
    if threshold != "auto" and not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise UserError(f"threshold must be 'auto' or a positive number, got {threshold!r}")
    if max_faces is not None and max_faces < 100:
        raise UserError(f"max_faces must be at least 100, got {max_faces!r}")
    bound = float(field.bound)
    device = module_device(field)

    # 2. Density on the lattice
    mask = lattice_mask_from_occupancy(occupancy.binaries, bound, resolution) if occupancy is not None else None
    grid = sample_density_grid(field.density, bound, resolution, chunk=chunk, mask=mask, device=device)
    spacing = 2.0 * bound / (resolution - 1)

    # 3. Level
    level = threshold_from_density_grid(grid, spacing) if threshold == "auto" else float(threshold)

    # 4. Surface, floaters dropped, face cap by resampling the lattice
    used_resolution = resolution
    mesh = keep_large_components(mesh_from_density_grid(grid, level, bound), min_component_fraction)
    while max_faces is not None and len(mesh.faces) > max_faces and used_resolution > 16:
        used_resolution = max(16, int(used_resolution * math.sqrt(max_faces / len(mesh.faces)) * 0.95))
        coarse = coarser_grid(grid, used_resolution)
        mesh = keep_large_components(mesh_from_density_grid(coarse, level, bound), min_component_fraction)
    _ = mesh.vertex_normals  # computed now, carried through unwrap and axis conversion
    mesh.metadata.update({"threshold": level, "resolution": used_resolution})
    return mesh


def module_device(module) -> torch.device:
    """Device of a module's parameters (the CPU for a parameter-free module)."""
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


# --------------------------------------------------------------------------- 4. colours


def albedo_fn_from_field(field, chunk: int = DEFAULT_CHUNK) -> AlbedoFn:
    """Wrap ``field(x) -> (sigma, albedo)`` as a numpy function points [N, 3] -> albedo [N, 3], no grad."""
    device = module_device(field)

    @torch.no_grad()
    def albedo(points: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(points), dtype=torch.float32)
        parts = [field(part.to(device))[1].float().cpu() for part in x.split(chunk)] or [torch.zeros(0, 3)]
        return torch.cat(parts).numpy()

    return albedo


def _rgb8(colors: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(colors, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def vertex_colors_from_albedo(mesh: "trimesh.Trimesh", albedo_fn: AlbedoFn) -> "trimesh.Trimesh":
    """A copy of ``mesh`` with RGBA uint8 vertex colours = albedo at each vertex."""
    import trimesh

    rgb = _rgb8(albedo_fn(np.asarray(mesh.vertices)))
    rgba = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)
    out = trimesh.Trimesh(
        mesh.vertices, mesh.faces, vertex_normals=mesh.vertex_normals, vertex_colors=rgba, process=False
    )
    out.metadata.update(mesh.metadata)
    return out


def _face_blocks(centroids: np.ndarray, faces_per_block: int) -> list[np.ndarray]:
    """Split face indices into spatially compact blocks (kd-split at the median of the longest axis)."""
    blocks, stack = [], [np.arange(len(centroids))]
    while stack:
        idx = stack.pop()
        if len(idx) <= faces_per_block:
            blocks.append(idx)
            continue
        pts = centroids[idx]
        axis = int(np.argmax(pts.max(0) - pts.min(0)))
        order = idx[np.argsort(pts[:, axis], kind="stable")]
        half = len(order) // 2
        stack += [order[half:], order[:half]]
    return blocks


def unwrap_uv(
    mesh: "trimesh.Trimesh", texture_size: int = 1024, padding: int = 2, faces_per_block: int = FACES_PER_UV_BLOCK
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas UV atlas -> (vertex_ids [V'], faces [F, 3] into V', uv [V', 2] in [0, 1], v up).

    Vertices are split along chart seams: new vertex ``i`` is old vertex ``vertex_ids[i]``. Face
    ``f`` of the result is face ``f`` of the input. Charts are packed ``padding`` texels apart.
    """
    import xatlas

    vertices = np.asarray(mesh.vertices, dtype=np.float32)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    blocks = _face_blocks(vertices[faces].mean(axis=1), faces_per_block)
    atlas = xatlas.Atlas()
    block_vertices = []
    for idx in blocks:
        used, local = np.unique(faces[idx], return_inverse=True)
        block_vertices.append(used)
        atlas.add_mesh(vertices[used], local.reshape(-1, 3).astype(np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution, pack.padding, pack.bilinear = int(texture_size), int(padding), True
    atlas.generate(xatlas.ChartOptions(), pack)

    vertex_ids, out_faces, uvs = [], np.empty_like(faces), []
    offset = 0
    for i, (idx, used) in enumerate(zip(blocks, block_vertices)):
        vmapping, indices, uv = atlas[i]
        vertex_ids.append(used[vmapping])
        out_faces[idx] = indices.astype(np.int64) + offset
        uvs.append(uv)
        offset += len(vmapping)
    vertex_ids, uvs = np.concatenate(vertex_ids), np.concatenate(uvs).astype(np.float64)
    return _chart_skipped_faces(vertices.astype(np.float64), vertex_ids, out_faces, uvs)


def _chart_skipped_faces(
    vertices: np.ndarray, vertex_ids: np.ndarray, faces: np.ndarray, uv: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas leaves near-zero-area triangles (marching-cubes slivers) out of every chart, their
    corners at UV (0, 0). Give each such face three fresh corners that all sit at the UV of the
    charted vertex nearest to the face in 3D: a zero-area UV triangle (never rasterized, so it
    cannot paint over other charts) that shows the colour around the sliver.

    vertices [V, 3] of the input mesh; vertex_ids [V'], faces [F, 3] into V', uv [V', 2] as from
    :func:`unwrap_uv` -> the same three arrays, unreferenced vertices dropped.
    """
    corners = uv[faces]
    e1, e2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    twice_area = np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    skipped = (twice_area == 0) & (np.abs(corners).sum(axis=(1, 2)) == 0)
    if not skipped.any() or skipped.all():
        return vertex_ids, faces, uv
    from scipy.spatial import cKDTree

    donors = np.unique(faces[~skipped])
    centroids = vertices[vertex_ids[faces[skipped]]].mean(axis=1)
    _, nearest = cKDTree(vertices[vertex_ids[donors]]).query(centroids)
    n_old, n_new = len(vertex_ids), 3 * int(skipped.sum())
    vertex_ids = np.concatenate([vertex_ids, vertex_ids[faces[skipped]].ravel()])
    uv = np.concatenate([uv, np.repeat(uv[donors[nearest]], 3, axis=0)])
    faces = faces.copy()
    faces[skipped] = np.arange(n_old, n_old + n_new).reshape(-1, 3)
    used, inverse = np.unique(faces, return_inverse=True)
    return vertex_ids[used], inverse.reshape(-1, 3), uv[used]


def rasterize_uv(uv: np.ndarray, faces: np.ndarray, size: int, max_pairs: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Which triangle covers each texel centre, and where.

    uv [V, 2] in [0, 1] (v up, OBJ/trimesh convention), faces [F, 3] -> (face_id [S, S] int64, -1
    where uncovered; bary [S, S, 3] float32). Texel (row, col) has its centre at
    ``u = (col + 0.5) / S``, ``v = 1 - (row + 0.5) / S``. Vectorised: every triangle's bounding box
    of texel centres is enumerated (in batches of about ``max_pairs`` texels) and tested with
    barycentric coordinates.
    """
    px = np.stack([uv[:, 0] * size - 0.5, (1.0 - uv[:, 1]) * size - 0.5], axis=-1)  # continuous (col, row)
    tri = px[faces]  # [F, 3, 2]
    lo = np.clip(np.ceil(tri.min(axis=1) - 1e-9), 0, size - 1).astype(np.int64)  # [F, 2]
    hi = np.clip(np.floor(tri.max(axis=1) + 1e-9), 0, size - 1).astype(np.int64)
    extent = np.maximum(hi - lo + 1, 0)
    counts = extent[:, 0] * extent[:, 1]
    face_id = np.full((size, size), -1, dtype=np.int64)
    bary_img = np.zeros((size, size, 3), dtype=np.float32)
    # denominators of the barycentric solve (twice the signed area)
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    den = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    valid = (np.abs(den) > 1e-12) & (counts > 0)
    order = np.nonzero(valid)[0]
    cum = np.cumsum(counts[order])
    start = 0
    while start < len(order):
        stop = int(np.searchsorted(cum, (cum[start - 1] if start else 0) + max_pairs, side="right"))
        stop = max(stop, start + 1)
        fids = order[start:stop]
        n = counts[fids]
        f = np.repeat(fids, n)
        local = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        col = lo[f, 0] + local % extent[f, 0]
        row = lo[f, 1] + local // extent[f, 0]
        l0 = ((b[f, 1] - c[f, 1]) * (col - c[f, 0]) + (c[f, 0] - b[f, 0]) * (row - c[f, 1])) / den[f]
        l1 = ((c[f, 1] - a[f, 1]) * (col - c[f, 0]) + (a[f, 0] - c[f, 0]) * (row - c[f, 1])) / den[f]
        l2 = 1.0 - l0 - l1
        inside = (l0 >= -1e-6) & (l1 >= -1e-6) & (l2 >= -1e-6)
        face_id[row[inside], col[inside]] = f[inside]
        bary_img[row[inside], col[inside]] = np.stack([l0, l1, l2], axis=-1)[inside]
        start = stop
    return face_id, bary_img


def dilate_texture(image: np.ndarray, mask: np.ndarray, iterations: int = 8) -> np.ndarray:
    """Grow the covered texels outward so bilinear/mip-mapped lookups at chart borders never read
    the empty background (the dark seam lines of a naive bake).

    image [S, S, C] float, mask [S, S] bool (covered) -> image where each uncovered texel within
    ``iterations`` texels of a chart takes the mean of its covered 8-neighbours (repeatedly);
    the rest takes the mean colour of the covered texels.
    """
    image = image.astype(np.float32).copy()
    mask = mask.copy()
    if not mask.any():
        return image
    for _ in range(iterations):
        total = np.zeros_like(image)
        count = np.zeros(mask.shape, dtype=np.float32)
        padded_img = np.pad(image * mask[..., None], ((1, 1), (1, 1), (0, 0)))
        padded_mask = np.pad(mask, 1).astype(np.float32)
        s0, s1 = mask.shape
        for dr in (0, 1, 2):
            for dc in (0, 1, 2):
                if dr == 1 and dc == 1:
                    continue
                total += padded_img[dr : dr + s0, dc : dc + s1]
                count += padded_mask[dr : dr + s0, dc : dc + s1]
        grow = (~mask) & (count > 0)
        if not grow.any():
            break
        image[grow] = total[grow] / count[grow][:, None]
        mask = mask | grow
    image[~mask] = image[mask].mean(axis=0)
    return image


def bake_texture(
    mesh: "trimesh.Trimesh", albedo_fn: AlbedoFn, texture_size: int = 1024, *, padding: int = 4
) -> "trimesh.Trimesh":
    """Unwrap ``mesh`` and bake the albedo into a texture.

    -> a new mesh (vertices split along UV seams, same faces in the same order, normals carried
    over from ``mesh`` so seams do not show in shading) whose ``visual`` is a
    ``TextureVisuals``: ``visual.uv [V', 2]`` and ``visual.material.baseColorTexture`` (a PIL RGB
    image, ``texture_size`` square). ``albedo_fn`` is queried once per covered texel at the 3D
    point the texel maps to.
    """
    import trimesh
    from PIL import Image

    if isinstance(texture_size, bool) or not isinstance(texture_size, int) or not 16 <= texture_size <= 8192:
        raise UserError(f"texture size must be an integer in [16, 8192], got {texture_size!r}")
    # 1. Unwrap
    vertex_ids, faces, uv = unwrap_uv(mesh, texture_size, padding=max(1, padding // 2))
    vertices = np.asarray(mesh.vertices)[vertex_ids]
    normals = np.asarray(mesh.vertex_normals)[vertex_ids]

    # 2. Rasterize the UV triangles: each covered texel's 3D point
    face_id, bary = rasterize_uv(uv, faces, texture_size)
    covered = face_id >= 0
    corners = vertices[faces[face_id[covered]]]  # [T, 3, 3]
    points = np.einsum("tk,tkd->td", bary[covered].astype(np.float64), corners)

    # 3. Albedo there, seams padded
    image = np.zeros((texture_size, texture_size, 3), dtype=np.float32)
    image[covered] = albedo_fn(points)
    image = dilate_texture(image, covered, iterations=padding + 4)

    material = trimesh.visual.material.PBRMaterial(
        name="albedo",
        baseColorTexture=Image.fromarray(_rgb8(image), mode="RGB"),
        metallicFactor=0.0,
        roughnessFactor=1.0,
    )
    out = trimesh.Trimesh(
        vertices,
        faces,
        vertex_normals=normals,
        visual=trimesh.visual.TextureVisuals(uv=uv, material=material),
        process=False,
    )
    out.metadata.update(mesh.metadata)
    return out


# --------------------------------------------------------------------------- 5. files


def _transformed(mesh: "trimesh.Trimesh", rotation: np.ndarray, center: bool) -> "trimesh.Trimesh":
    """A copy with vertices (optionally centred on the bounding-box centre) and normals rotated."""
    import trimesh

    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    if center:
        vertices = vertices - 0.5 * (vertices.min(axis=0) + vertices.max(axis=0))
    out = trimesh.Trimesh(
        vertices @ rotation.T,
        mesh.faces,
        vertex_normals=np.asarray(mesh.vertex_normals) @ rotation.T,
        visual=mesh.visual.copy(),
        process=False,
    )
    out.metadata.update(mesh.metadata)
    return out


def _texture_image(mesh: "trimesh.Trimesh"):
    material = getattr(mesh.visual, "material", None)
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    if getattr(mesh.visual, "kind", None) != "texture" or image is None:
        raise ValueError("OBJ/GLB export needs a textured mesh: call bake_texture first")
    return image


def _obj_files(mesh: "trimesh.Trimesh", stem: str) -> dict[str, bytes]:
    """OBJ text + MTL (white diffuse, no specular, so viewers show the texture as baked) + PNG."""
    import io

    from trimesh.exchange.obj import export_obj

    image = _texture_image(mesh)
    text, _ = export_obj(
        mesh, include_normals=True, include_color=False, include_texture=True, return_texture=True,
        mtl_name=f"{stem}.mtl",
    )
    text = text.replace("usemtl albedo", f"usemtl {stem}")
    mtl = (
        f"newmtl {stem}\nKa 0 0 0\nKd 1 1 1\nKs 0 0 0\nNs 1\nillum 1\nd 1\nmap_Kd {stem}.png\n"
    )
    png = io.BytesIO()
    image.convert("RGB").save(png, format="PNG")
    return {f"{stem}.png": png.getvalue(), f"{stem}.mtl": mtl.encode(), f"{stem}.obj": text.encode()}


def write_mesh(mesh: "trimesh.Trimesh", path: Path | str, format: MeshFormat | None = None, *, center: bool = True) -> list[Path]:
    """Write ``mesh`` (world units, +Z up) to ``path``; returns the files written.

    ``format`` defaults to the suffix. ``glb``: binary glTF with the baked texture embedded;
    ``obj``: ``<stem>.obj`` + ``<stem>.mtl`` + ``<stem>.png`` side by side; both +Y up, front
    +Z (module docstring). ``ply``: binary PLY with vertex colours and normals, +Z up. The mesh is
    centred on its bounding box first unless ``center=False``. Normals are always written.

    Atomic: everything is written into a temporary folder next to ``path`` and moved into place
    with ``os.replace`` only when complete (the PNG and MTL before the OBJ that names them), so a
    failure leaves no partial file and an earlier export stays until the new one is whole.
    Unwritable destinations raise :class:`UserError`.
    """
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise UserError(f"unknown mesh format {fmt!r} (choose from {', '.join(FORMATS)})")
    path = path.with_suffix(f".{fmt}")
    stem = path.stem

    # 1. Bytes, in memory (a failure here writes nothing)
    if fmt == "ply":
        from trimesh.exchange.ply import export_ply

        files = {path.name: export_ply(_transformed(mesh, np.eye(3), center), encoding="binary", vertex_normal=True)}
    elif fmt == "obj":
        files = _obj_files(_transformed(mesh, WORLD_TO_Y_UP, center), stem)
    else:
        import trimesh
        from trimesh.exchange.gltf import export_glb

        _texture_image(mesh)
        scene = trimesh.Scene()
        scene.add_geometry(_transformed(mesh, WORLD_TO_Y_UP, center), geom_name=stem, node_name=stem)
        files = {path.name: export_glb(scene, include_normals=True)}

    # 2. Temporary folder beside the target, then rename into place
    return write_files_atomically(path.parent, files)


def write_files_atomically(folder: Path, files: dict[str, bytes]) -> list[Path]:
    """Write ``{name: bytes}`` into ``folder`` (created if needed) via a temporary sibling folder
    and ``os.replace``, in the dict's order. OSErrors become :class:`UserError`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
    except OSError as exc:
        raise UserError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        written = []
        for name in files:
            os.replace(tmp / name, folder / name)
            written.append(folder / name)
        return written
    except OSError as exc:
        raise UserError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- one call


def export_field(
    field,
    out_dir: Path | str,
    *,
    format: MeshFormat = "glb",
    resolution: int = 256,
    threshold: Threshold = "auto",
    texture_size: int = 1024,
    max_faces: int | None = DEFAULT_MAX_FACES,
    occupancy=None,
    name: str = "mesh",
    chunk: int = DEFAULT_CHUNK,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Extract, colour and write the field's mesh as ``out_dir/<name>.<format>`` (OBJ: + .mtl, .png).

    Returns the paths written. Every bad input raises :class:`UserError` before anything is
    written. ``log`` receives one-line progress notes (threshold, face count) for the CLI.
    """
    # 1. Check inputs
    if format not in FORMATS:
        raise UserError(f"unknown mesh format {format!r} (choose from {', '.join(FORMATS)})")
    if format != "ply" and (isinstance(texture_size, bool) or not isinstance(texture_size, int) or not 16 <= texture_size <= 8192):
        raise UserError(f"texture size must be an integer in [16, 8192], got {texture_size!r}")
    # 2. Surface
    mesh = extract_mesh(
        field, resolution=resolution, threshold=threshold, chunk=chunk, max_faces=max_faces, occupancy=occupancy
    )
    if log is not None:
        how = "auto" if threshold == "auto" else "given"
        log(
            f"surface at density {mesh.metadata['threshold']:.4g} ({how}): {len(mesh.faces)} faces, "
            f"{len(mesh.vertices)} vertices (lattice {mesh.metadata['resolution']}^3)"
        )
    # 3. Colours
    albedo_fn = albedo_fn_from_field(field, chunk)
    if format == "ply":
        mesh = vertex_colors_from_albedo(mesh, albedo_fn)
    else:
        mesh = bake_texture(mesh, albedo_fn, texture_size)
    # 4. Files
    return write_mesh(mesh, Path(out_dir) / f"{name}.{format}", format)


def export_run(
    run_dir: Path | str,
    *,
    format: MeshFormat = "glb",
    resolution: int = 256,
    threshold: Threshold = "auto",
    texture_size: int = 1024,
    checkpoint: Path | str | None = None,
    max_faces: int | None = DEFAULT_MAX_FACES,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """``nfsd-nerf export``: load a run's checkpoint (latest by default) and write ``RUN_DIR/export/mesh.<format>``."""
    from ..checkpoint import load_run

    run = load_run(Path(run_dir), None if checkpoint is None else Path(checkpoint), device=device)
    return export_field(
        run.field,
        Path(run_dir) / "export",
        format=format,
        resolution=resolution,
        threshold=threshold,
        texture_size=texture_size,
        max_faces=max_faces,
        occupancy=run.occupancy,
        log=log,
    )
