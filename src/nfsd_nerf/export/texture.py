"""Colours for an extracted mesh, from the field's albedo: per vertex, or baked into a texture.

* :func:`vertex_colors_from_albedo`: albedo at each vertex (formats without textures, e.g. PLY).
* :func:`bake_texture` (formats with ``needs_texture``, e.g. GLB, OBJ): :func:`unwrap_uv` (xatlas,
  in spatially compact blocks of faces so it stays fast), :func:`rasterize_uv` (triangles in UV
  space on the CPU), the albedo queried at each texel's 3D point, and seams padded by
  :func:`dilate_texture` so that filtered lookups never read the empty background.

Albedo comes as a numpy function (:data:`AlbedoFn`, e.g. :func:`albedo_fn_from_field`), so the
maths here can be tested against analytic colours without a field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from ..runtime import module_device
from .extract import DEFAULT_CHUNK

if TYPE_CHECKING:  # trimesh, xatlas and PIL are imported lazily (``nfsd-nerf --help`` stays fast)
    import trimesh

AlbedoFn = Callable[[np.ndarray], np.ndarray]
"""points [N, 3] float (world) -> albedo [N, 3] float in [0, 1]."""

MIN_TEXTURE_SIZE, MAX_TEXTURE_SIZE = 16, 8192
"""Bounds of the texture's side in texels."""
FACES_PER_UV_BLOCK = 1000
"""xatlas' chart building is superlinear in a mesh's size (44k faces: ~25 s as one mesh, ~4 s in
blocks of 1000 on 2 CPU cores): the mesh is cut into spatially compact blocks of about this many
faces, unwrapped as separate meshes of one atlas, and packed together."""


def check_texture_size(texture_size: int) -> None:
    """Validate a texture side (``export_field`` calls this before any work, :func:`bake_texture` too)."""
    in_range = isinstance(texture_size, int) and MIN_TEXTURE_SIZE <= texture_size <= MAX_TEXTURE_SIZE
    if isinstance(texture_size, bool) or not in_range:
        bounds = f"[{MIN_TEXTURE_SIZE}, {MAX_TEXTURE_SIZE}]"
        raise UserError(f"texture size must be an integer in {bounds}, got {texture_size!r}")


def rgb8_from_unit(colors: np.ndarray | Tensor) -> np.ndarray:
    """Colours in [0, 1] (numpy or a tensor on any device, any shape [..., C]) -> uint8 [..., C],
    rounded to the nearest level, clipped. One rounding for vertex colours, textures and video frames."""
    array = colors.detach().cpu().numpy() if isinstance(colors, Tensor) else np.asarray(colors)
    return np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- 1. albedo, per vertex


def albedo_fn_from_field(field, chunk: int = DEFAULT_CHUNK) -> AlbedoFn:
    """Wrap ``field(x) -> (sigma, albedo)`` as a numpy function points [N, 3] -> albedo [N, 3], no grad."""
    device = module_device(field)

    @torch.no_grad()
    def albedo(points: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(points), dtype=torch.float32)
        parts = [field(part.to(device))[1].float().cpu() for part in x.split(chunk)] or [torch.zeros(0, 3)]
        return torch.cat(parts).numpy()

    return albedo


def vertex_colors_from_albedo(mesh: "trimesh.Trimesh", albedo_fn: AlbedoFn) -> "trimesh.Trimesh":
    """A copy of ``mesh`` with RGBA uint8 vertex colours = albedo at each vertex."""
    import trimesh

    rgb = rgb8_from_unit(albedo_fn(np.asarray(mesh.vertices)))
    rgba = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)
    out = trimesh.Trimesh(
        mesh.vertices, mesh.faces, vertex_normals=mesh.vertex_normals, vertex_colors=rgba, process=False
    )
    out.metadata.update(mesh.metadata)
    return out


# --------------------------------------------------------------------------- 2. UV atlas


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


# --------------------------------------------------------------------------- 3. bake


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

    check_texture_size(texture_size)
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
        baseColorTexture=Image.fromarray(rgb8_from_unit(image), mode="RGB"),
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
