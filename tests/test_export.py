"""Mesh export and turntable videos, checked against analytic shapes and read back from the files.

Analytic stand-in fields (no hash grid) give exact volumes, outlines and colours; the last tests
fit the real hash-grid NeRF to a box, save it as a checkpoint and export it through ``load_run``,
the path users take.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import trimesh

from nfsd_nerf.errors import UserError
from nfsd_nerf.export.mesh import (
    WORLD_TO_Y_UP,
    bake_texture,
    dilate_texture,
    export_field,
    extract_mesh,
    keep_large_components,
    mesh_from_density_grid,
    rasterize_uv,
    sample_density_grid,
    threshold_from_density_grid,
    write_mesh,
)
from nfsd_nerf.export.video import check_video_inputs, estimate_seconds, normals_from_depth, render_turntable


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


# --------------------------------------------------------------------------- surface


def test_mesh_is_the_level_set_in_world_units_wound_outward():
    field = Ellipsoid()
    mesh = extract_mesh(field, resolution=64, threshold=field.sigma / 2)
    cell = 2.0 / 63
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(field.volume, rel=0.02)  # exact level set: MC error only
    expected = torch.stack([field.center - field.axes, field.center + field.axes]).numpy()
    np.testing.assert_allclose(mesh.bounds, expected, atol=0.3 * cell)
    np.testing.assert_allclose(mesh.center_mass, field.center.numpy(), atol=0.005)
    # outward: every face normal points away from the centre, and so do the vertex normals
    centroids = mesh.triangles_center - field.center.numpy()
    assert (np.einsum("ij,ij->i", mesh.face_normals, centroids) > 0).all()
    assert (np.einsum("ij,ij->i", mesh.vertex_normals, mesh.vertices - field.center.numpy()) > 0).mean() > 0.999
    assert mesh.metadata["threshold"] == field.sigma / 2


def silhouette_radius(sigma_of_r, bound: float) -> float:
    """Distance from the centre of a ball-shaped field at which an axis-parallel ray through the
    whole box becomes half opaque: optical depth = ln 2 (trapezoid quadrature + bisection, float64)."""
    s = np.linspace(-bound, bound, 40001)

    def optical_depth(rho):
        return np.trapezoid(sigma_of_r(np.sqrt(rho**2 + s**2)), s)

    lo, hi = 0.0, bound
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if optical_depth(mid) >= math.log(2) else (lo, mid)
    return 0.5 * (lo + hi)


def test_auto_threshold_reproduces_the_rendered_outline():
    # a soft ball: its half-opaque outline lies well outside the S/2 level (r = 0.5)
    s, r0, w = 40.0, 0.5, 0.03
    field = Ellipsoid(center=(0, 0, 0), axes=(r0, r0, r0), sigma=s, width=w / r0)
    expected = silhouette_radius(lambda r: s / (1 + np.exp(-(r0 - r) / w)), 1.0)
    assert expected > 0.57  # ~0.586: the test can tell the outline from the S/2 level
    mesh = extract_mesh(field, resolution=96, threshold="auto")
    radius = np.linalg.norm(mesh.vertices, axis=1)
    assert radius.mean() == pytest.approx(expected, abs=0.01)  # < half a cell (0.021)


def test_auto_threshold_of_a_sharp_field_avoids_both_plateaus():
    field = Ellipsoid(width=0.0, sigma=50.0)
    grid = sample_density_grid(field.density, 1.0, 64)
    level = threshold_from_density_grid(grid, 2.0 / 63)
    assert 0.5 < level < 0.5 * 50.0  # neither the empty space nor the interior plateau
    mesh = mesh_from_density_grid(grid, level, 1.0)
    assert mesh.volume == pytest.approx(field.volume, rel=0.15)  # a step is only known to a cell


def test_no_surface_is_a_user_error_and_writes_nothing(tmp_path):
    field = Ellipsoid()
    with pytest.raises(UserError, match="no surface at density threshold 1000"):
        export_field(field, tmp_path / "export", format="ply", resolution=32, threshold=1000.0)
    empty = Ellipsoid(sigma=1e-4)
    with pytest.raises(UserError, match="no surface"):
        export_field(empty, tmp_path / "export", format="glb", resolution=32)
    assert not (tmp_path / "export").exists() or not any((tmp_path / "export").iterdir())


def test_floaters_are_dropped_and_the_face_cap_holds():
    mesh = extract_mesh(TwoBalls(), resolution=64, threshold=20.0)
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.4**3, rel=0.05)
    assert np.linalg.norm(mesh.vertices, axis=1).max() < 0.45  # the floater at (0.7, 0.7, 0.7) is gone
    kept = keep_large_components(mesh_from_density_grid(sample_density_grid(TwoBalls().density, 1.0, 64), 20.0, 1.0), 0.0)
    assert len(kept.split(only_watertight=False)) == 2  # min_fraction 0 keeps it
    field = Ellipsoid()
    capped = extract_mesh(field, resolution=96, threshold=field.sigma / 2, max_faces=4000)
    assert len(capped.faces) <= 4000 and capped.is_watertight
    assert capped.volume == pytest.approx(field.volume, rel=0.05)


def test_occupancy_grid_skips_empty_space_without_changing_the_mesh():
    field = Ellipsoid()
    full = extract_mesh(field, resolution=48, threshold=25.0)

    class Occupancy:  # cells of a 16^3 grid that hold density > 1 somewhere (sampled densely)
        edges = torch.linspace(-1, 1, 65)
        centres = torch.stack(torch.meshgrid(*(0.5 * (edges[1:] + edges[:-1]),) * 3, indexing="ij"), -1)
        binaries = (field.density(centres.reshape(-1, 3)).reshape(16, 4, 16, 4, 16, 4) > 1).amax(dim=(1, 3, 5))

    assert Occupancy.binaries.float().mean() < 0.2
    skipped = extract_mesh(field, resolution=48, threshold=25.0, occupancy=Occupancy)
    np.testing.assert_allclose(skipped.vertices, full.vertices, atol=1e-6)


# --------------------------------------------------------------------------- texture


def test_rasterize_uv_matches_brute_force_point_in_triangle():
    rng = np.random.default_rng(0)
    uv = rng.random((30, 2))
    faces = rng.integers(0, 30, (12, 3))
    size = 24
    face_id, bary = rasterize_uv(uv, faces, size, max_pairs=50)  # tiny batches: exercise the batching
    for row in range(size):
        for col in range(size):
            p = np.array([(col + 0.5) / size, 1.0 - (row + 0.5) / size])
            covering = []
            for f, (a, b, c) in enumerate(uv[faces]):
                m = np.array([b - a, c - a]).T
                if abs(np.linalg.det(m)) < 1e-12:
                    continue
                l1, l2 = np.linalg.solve(m, p - a)
                if min(l1, l2, 1 - l1 - l2) >= 1e-6:  # strictly inside: unambiguous
                    covering.append(f)
            f = face_id[row, col]
            if covering:  # strictly inside some triangle: must be covered, by one that contains it
                assert f >= 0
            if f >= 0:  # whichever triangle claims the texel contains it (up to the edge tolerance)
                l = bary[row, col]
                assert l.min() >= -1e-5 and abs(l.sum() - 1) < 1e-5
                np.testing.assert_allclose(l @ uv[faces[f]], p, atol=1e-5)
            else:
                assert not covering


def test_dilation_pads_charts_with_their_border_colour():
    image = np.zeros((16, 16, 3), np.float32)
    mask = np.zeros((16, 16), bool)
    image[4:8, 4:8] = (1.0, 0.5, 0.0)
    mask[4:8, 4:8] = True
    image[12:14, 12:14] = (0.0, 0.0, 1.0)
    mask[12:14, 12:14] = True
    out = dilate_texture(image, mask, iterations=2)
    np.testing.assert_allclose(out[2:10, 2:10], np.broadcast_to((1.0, 0.5, 0.0), (8, 8, 3)))  # 2 texels around
    assert (out.sum(-1) > 0).all()  # no black left anywhere (the rest is the mean colour)


def test_baked_texture_matches_the_albedo():
    field = Ellipsoid()
    mesh = extract_mesh(field, resolution=48, threshold=25.0)
    textured = bake_texture(mesh, lambda p: albedo_from_points(torch.as_tensor(p, dtype=torch.float32)).numpy(), 256)
    assert len(textured.faces) == len(mesh.faces)
    np.testing.assert_allclose(textured.vertices[textured.faces].mean(1), mesh.triangles_center, atol=1e-6)
    got = texture_colors_at_faces(textured)
    want = albedo_from_points(torch.tensor(textured.triangles_center, dtype=torch.float32)).numpy()
    err = np.abs(got - want)
    assert err.mean() < 0.01 and np.quantile(err, 0.99) < 0.04
    # seams: at the chart borders (every vertex UV lies on one) the bilinear filter reads padded
    # texels, not the empty background
    at_vertices = bilinear_texture_at(textured, textured.visual.uv)
    want = albedo_from_points(torch.tensor(textured.vertices, dtype=torch.float32)).numpy()
    assert np.abs(at_vertices - want).max() < 0.06


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("fmt", ["glb", "obj", "ply"])
def test_each_format_loads_back_upright_centred_and_coloured(tmp_path, fmt):
    field = Ellipsoid()  # tallest along world Z, off-centre
    paths = export_field(field, tmp_path / "export", format=fmt, resolution=40, texture_size=256, threshold=25.0)
    expected_names = {"obj": {"mesh.obj", "mesh.mtl", "mesh.png"}}.get(fmt, {f"mesh.{fmt}"})
    assert {p.name for p in paths} == expected_names
    assert {p.name for p in (tmp_path / "export").iterdir()} == expected_names  # no temp files left
    mesh = loaded_mesh(tmp_path / "export" / f"mesh.{fmt}")
    extents = mesh.bounds[1] - mesh.bounds[0]
    np.testing.assert_allclose(mesh.bounds.mean(axis=0), 0.0, atol=1e-6)  # centred
    rotation = np.eye(3) if fmt == "ply" else WORLD_TO_Y_UP
    np.testing.assert_allclose(extents, rotation @ (2 * field.axes.numpy()), atol=0.03)
    assert np.argmax(extents) == (2 if fmt == "ply" else 1)  # up: +Z for PLY, +Y for glTF/OBJ
    assert len(mesh.vertex_normals) == len(mesh.vertices)
    # back to world coordinates: undo the rotation and the centring (the ellipsoid's centre)
    world = mesh.vertices @ rotation + field.center.numpy()
    assert (np.einsum("ij,ij->i", mesh.vertex_normals @ rotation, world - field.center.numpy()) > 0).mean() > 0.99
    if fmt == "ply":
        got = mesh.visual.vertex_colors[:, :3] / 255.0
        want = albedo_from_points(torch.as_tensor(world, dtype=torch.float32)).numpy()
    else:
        assert mesh.visual.kind == "texture"
        got = texture_colors_at_faces(mesh)
        want = albedo_from_points(torch.as_tensor(world[mesh.faces].mean(1), dtype=torch.float32)).numpy()
    err = np.abs(got - want)
    assert err.mean() < 0.02 and np.quantile(err, 0.99) < 0.06


def test_glb_structure_and_up_axis(tmp_path):
    from pygltflib import GLTF2

    field = Ellipsoid()
    export_field(field, tmp_path, format="glb", resolution=32, texture_size=64, threshold=25.0)
    gltf = GLTF2().load_binary(str(tmp_path / "mesh.glb"))
    assert gltf.asset.version == "2.0"
    assert len(gltf.meshes) == 1 and len(gltf.meshes[0].primitives) == 1
    prim = gltf.meshes[0].primitives[0]
    attrs = prim.attributes
    assert attrs.POSITION is not None and attrs.NORMAL is not None and attrs.TEXCOORD_0 is not None
    count = gltf.accessors[attrs.POSITION].count
    assert gltf.accessors[attrs.NORMAL].count == count == gltf.accessors[attrs.TEXCOORD_0].count
    assert gltf.accessors[prim.indices].count % 3 == 0
    material = gltf.materials[prim.material]
    texture = gltf.textures[material.pbrMetallicRoughness.baseColorTexture.index]
    image = gltf.images[texture.source]
    assert image.mimeType == "image/png" and image.bufferView is not None  # embedded
    blob = gltf.binary_blob()
    for view in gltf.bufferViews:
        assert view.byteOffset + view.byteLength <= len(blob)
    lo, hi = np.array(gltf.accessors[attrs.POSITION].min), np.array(gltf.accessors[attrs.POSITION].max)
    assert np.argmax(hi - lo) == 1  # the object's tall (world Z) axis is glTF's up, +Y
    # the front (world +X) faces glTF +Z: the ellipsoid's x semi-axis (0.3) is along Z, y (0.25) along X
    np.testing.assert_allclose(hi - lo, [0.5, 1.0, 0.6], atol=0.06)


def test_repeated_export_replaces_only_when_complete(tmp_path, monkeypatch):
    field = Ellipsoid()
    out = tmp_path / "export"
    export_field(field, out, format="ply", resolution=24, threshold=25.0)
    before = (out / "mesh.ply").read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(UserError, match="No space left on device"):
        export_field(field, out, format="ply", resolution=32, threshold=25.0)
    assert (out / "mesh.ply").read_bytes() == before
    assert [p.name for p in out.iterdir()] == ["mesh.ply"]
    monkeypatch.undo()
    export_field(field, out, format="ply", resolution=32, threshold=25.0)
    assert (out / "mesh.ply").read_bytes() != before


def test_unwritable_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # (permissions do not stop root; a file in the path does)
    with pytest.raises(UserError, match="cannot write to"):
        export_field(Ellipsoid(), blocker / "export", format="ply", resolution=24, threshold=25.0)
    with pytest.raises(UserError, match="cannot write to"):
        render_turntable(Ellipsoid(), White(), out_dir=blocker / "video", frames=2, size=16, n_samples=32)
    with pytest.raises(UserError, match="unknown mesh format"):
        write_mesh(trimesh.creation.box(), tmp_path / "x.stl")


# --------------------------------------------------------------------------- video


def test_video_reads_back_with_frames_size_fps_and_content(tmp_path):
    import imageio.v2 as iio

    field = Ellipsoid(center=(0, 0, 0), axes=(0.5, 0.5, 0.5), width=0.02)
    calls = []
    paths = render_turntable(
        field, White(), out_dir=tmp_path / "video", frames=5, size=48, fps=12, modes=("rgb", "normal", "depth"),
        gif=True, n_samples=96, progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(i, 5) for i in range(1, 6)]
    names = {p.name for p in paths}
    assert names == {f"turntable_{m}.{ext}" for m in ("rgb", "normal", "depth") for ext in ("mp4", "gif")}
    assert {p.name for p in (tmp_path / "video").iterdir()} == names  # no temp files left
    for mode in ("rgb", "normal", "depth"):
        reader = iio.get_reader(tmp_path / "video" / f"turntable_{mode}.mp4")
        meta = reader.get_meta_data()
        assert meta["fps"] == 12 and meta["size"] == (48, 48) and meta["codec"] == "h264"
        assert reader.count_frames() == 5
        first = reader.get_data(0).astype(float) / 255.0
        reader.close()
        centre, corner = first[22:26, 22:26].mean((0, 1)), first[:4, :4].mean((0, 1))
        # first camera: azimuth 0, elevation 15 deg: the centre pixel sees the front of the ball
        front = torch.tensor([[math.cos(math.radians(15)), 0.0, math.sin(math.radians(15))]]) * 0.5
        if mode == "rgb":
            np.testing.assert_allclose(centre, albedo_from_points(front)[0].numpy(), atol=0.05)
            np.testing.assert_allclose(corner, 1.0, atol=0.03)  # white background
        elif mode == "normal":
            np.testing.assert_allclose(centre, 0.5 * F.normalize(front)[0].numpy() + 0.5, atol=0.06)
            np.testing.assert_allclose(corner, 1.0, atol=0.03)
        else:
            assert centre.mean() > 0.8 and corner.mean() < 0.03  # near is bright, background black
    gif = iio.mimread(tmp_path / "video" / "turntable_rgb.gif")
    assert len(gif) == 5 and gif[0].shape[:2] == (48, 48)


def test_normals_from_rendered_depth_match_the_surface():
    from nfsd_nerf.cameras import generate_rays, orbit_cameras

    cams = orbit_cameras(1, elevation_deg=30.0)
    rays_o, rays_d = (r[0].double() for r in generate_rays(cams, 64, 64))
    # exact first hit of the unit-radius-0.6 sphere, and its normal
    b = (rays_o * rays_d).sum(-1)
    disc = b**2 - ((rays_o**2).sum(-1) - 0.36)
    hit = disc > 0
    depth = torch.where(hit, -b - disc.clamp_min(0).sqrt(), torch.zeros_like(b))
    opacity = hit.double()
    want = F.normalize(rays_o + depth[..., None] * rays_d, dim=-1)
    got = normals_from_depth(depth, opacity, rays_o, rays_d)
    cos = (got * want).sum(-1)
    interior = hit & hit.roll(1, 0) & hit.roll(-1, 0) & hit.roll(1, 1) & hit.roll(-1, 1)
    interior &= (want * -rays_d).sum(-1) > math.cos(math.radians(70))  # not grazing
    assert cos[interior].min() > math.cos(math.radians(4))  # central differences
    assert torch.quantile(cos[hit], 0.02) > math.cos(math.radians(20))  # the rim: one-sided
    assert torch.equal(got[~hit], -rays_d[~hit])  # background: faces the camera (composited away)


def test_video_bad_inputs_are_user_errors(tmp_path):
    for kwargs, message in [
        (dict(size=31), "even number"),
        (dict(frames=0), "frames"),
        (dict(modes=("rgb", "sketch")), "'sketch'"),
        (dict(fps=0), "fps"),
    ]:
        with pytest.raises(UserError, match=message):
            render_turntable(Ellipsoid(), White(), out_dir=tmp_path / "video", **{"frames": 2, "size": 16, **kwargs})
    assert not (tmp_path / "video").exists()
    assert check_video_inputs(1, 16, 30, 15, ["depth"]) == ("depth",)


def test_estimate_scales_with_pixels_and_frames():
    field = Ellipsoid(center=(0, 0, 0), axes=(0.5, 0.5, 0.5))
    seconds = estimate_seconds(field, White(), frames=10, size=64, modes=("rgb",), n_samples=64, probe_size=32)
    assert math.isfinite(seconds) and seconds > 0


# --------------------------------------------------------------------------- the real field, through a checkpoint

BOX_CENTER = np.array([0.1, -0.05, 0.05])
BOX_HALF = np.array([0.25, 0.2, 0.4])  # tallest along world Z


@pytest.fixture(scope="module")
def box_run(tmp_path_factory) -> Path:
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
    run = tmp_path_factory.mktemp("runs") / "a-box"
    (run / "checkpoints").mkdir(parents=True)
    save_checkpoint(run / "checkpoints" / "latest.safetensors", config=cfg, scene=scene, step=150)
    return run


def test_real_field_mesh_matches_the_box(box_run):
    from nfsd_nerf.checkpoint import load_run

    loaded = load_run(box_run)
    mesh = extract_mesh(loaded.field, resolution=64, occupancy=loaded.occupancy)  # threshold "auto"
    cell = 2.0 / 63
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(8 * BOX_HALF.prod(), rel=0.15)
    np.testing.assert_allclose(mesh.bounds, [BOX_CENTER - BOX_HALF, BOX_CENTER + BOX_HALF], atol=1.2 * cell)
    np.testing.assert_allclose(mesh.center_mass, BOX_CENTER, atol=0.01)


@pytest.mark.parametrize("fmt", ["glb", "ply"])
def test_real_field_export_run_writes_upright_coloured_files(box_run, fmt):
    from nfsd_nerf.export.mesh import export_run

    notes = []
    paths = export_run(box_run, format=fmt, resolution=64, texture_size=256, log=notes.append)
    assert paths == [box_run / "export" / f"mesh.{fmt}"]
    assert len(notes) == 1 and "(auto)" in notes[0] and "faces" in notes[0]
    mesh = loaded_mesh(paths[0])
    rotation = np.eye(3) if fmt == "ply" else WORLD_TO_Y_UP
    extents = mesh.bounds[1] - mesh.bounds[0]
    np.testing.assert_allclose(mesh.bounds.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(extents, rotation @ (2 * BOX_HALF), atol=0.06)
    assert np.argmax(extents) == (2 if fmt == "ply" else 1)
    world = mesh.vertices @ rotation + BOX_CENTER  # centred on the box (within the bbox tolerance)
    if fmt == "ply":
        got = mesh.visual.vertex_colors[:, :3] / 255.0
        want = albedo_from_points(torch.tensor(world, dtype=torch.float32)).numpy()
    else:
        got = texture_colors_at_faces(mesh)
        want = albedo_from_points(torch.tensor(world[mesh.faces].mean(1), dtype=torch.float32)).numpy()
    err = np.abs(got - want)
    assert err.mean() < 0.04 and np.quantile(err, 0.95) < 0.1


def test_real_field_video_and_bad_checkpoint(box_run, tmp_path):
    import imageio.v2 as iio

    from nfsd_nerf.export.mesh import export_run
    from nfsd_nerf.export.video import render_run_video

    announced = []
    paths = render_run_video(box_run, frames=3, size=32, fps=10, modes=("rgb", "depth"), announce=announced.append)
    assert [p.name for p in paths] == ["turntable_rgb.mp4", "turntable_depth.mp4"]
    assert len(announced) == 1 and announced[0] > 0
    reader = iio.get_reader(paths[0])
    assert reader.count_frames() == 3 and reader.get_meta_data()["size"] == (32, 32) and reader.get_meta_data()["fps"] == 10
    first = reader.get_data(0).astype(float) / 255.0
    reader.close()
    # the first camera looks at the box's +X face; the centre ray meets it near (0.35, 0, 0.2)
    front = albedo_from_points(torch.tensor([[0.35, 0.0, 0.2]]))[0].numpy()
    np.testing.assert_allclose(first[15:17, 15:17].mean((0, 1)), front, atol=0.08)

    broken = tmp_path / "broken"
    (broken / "checkpoints").mkdir(parents=True)
    data = (box_run / "checkpoints" / "latest.safetensors").read_bytes()
    (broken / "checkpoints" / "latest.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        export_run(broken, format="glb", resolution=32)
    with pytest.raises(UserError, match="truncated"):
        render_run_video(broken, frames=2, size=16)
    assert sorted(p.name for p in broken.iterdir()) == ["checkpoints"]
