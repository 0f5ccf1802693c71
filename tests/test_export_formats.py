"""Mesh files (export/formats.py): every format read back from disk, the GLB's structure, one
contract over every entry of the format table, and a format added in a test only."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import trimesh
from export_helpers import (
    BOX_CENTER,
    BOX_HALF,
    Ellipsoid,
    albedo_from_points,
    loaded_mesh,
    texture_colors_at_faces,
)
from typer.testing import CliRunner

from nfsd_nerf.errors import UserError
from nfsd_nerf.export.extract import extract_mesh
from nfsd_nerf.export.formats import FORMATS, UP_AXES, WORLD_TO_Y_UP, MeshFormat, write_mesh
from nfsd_nerf.export.pipeline import export_field
from nfsd_nerf.export.texture import bake_texture, vertex_colors_from_albedo


def albedo_fn(points: np.ndarray) -> np.ndarray:
    return albedo_from_points(torch.as_tensor(points, dtype=torch.float32)).numpy()


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
    rotation = WORLD_TO_Y_UP  # one frame for every format by default: glTF's
    np.testing.assert_allclose(extents, rotation @ (2 * field.axes.numpy()), atol=0.03)
    assert np.argmax(extents) == 1  # up: +Y
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


def test_unknown_format_is_a_user_error_listing_the_table(tmp_path):
    with pytest.raises(UserError, match="unknown mesh format"):
        write_mesh(trimesh.creation.box(), tmp_path / "x.stl")
    with pytest.raises(UserError, match=r"unknown mesh format 'stl' \(choose from glb, obj, ply\)"):
        write_mesh(trimesh.creation.box(), tmp_path / "x.ply", "stl")
    with pytest.raises(UserError, match="unknown mesh format"):
        export_field(Ellipsoid(), tmp_path / "export", format="stl", resolution=24, threshold=25.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the table's contract


@pytest.fixture(scope="module")
def ellipsoid_mesh() -> trimesh.Trimesh:
    """A small off-centre, axis-distinct surface (world units, +Z up), uncoloured."""
    return extract_mesh(Ellipsoid(), resolution=24, threshold=25.0)


@pytest.mark.parametrize("up", sorted(UP_AXES))
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_writes_its_files_and_the_mesh_in_its_frame(tmp_path, ellipsoid_mesh, name, up):
    spec = FORMATS[name]
    assert spec.description and "\n" not in spec.description
    # the frame by its definition: where world up (+Z) and the world front (+X) land in the file
    up_axis, front = {"y": ([0, 1, 0], [0, 0, 1]), "z": ([0, 0, 1], [0, -1, 0])}[up]
    rotation = np.asarray(UP_AXES[up])
    np.testing.assert_allclose(rotation @ [0, 0, 1], up_axis)
    np.testing.assert_allclose(rotation @ [1, 0, 0], front)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    if spec.needs_texture:
        mesh = bake_texture(ellipsoid_mesh, albedo_fn, 64)
    else:
        mesh = vertex_colors_from_albedo(ellipsoid_mesh, albedo_fn)

    paths = write_mesh(mesh, tmp_path / "out" / f"thing.{name}", up=up)
    assert [p.name for p in paths] == spec.files("thing")  # in landing order
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(spec.files("thing"))  # nothing else
    assert all(p.stat().st_size > 0 for p in paths)
    loaded = loaded_mesh(tmp_path / "out" / f"thing.{name}")
    assert len(loaded.vertices) == len(mesh.vertices) and len(loaded.faces) == len(mesh.faces)
    vertices = np.asarray(mesh.vertices)
    centred = vertices - 0.5 * (vertices.min(axis=0) + vertices.max(axis=0))
    np.testing.assert_allclose(loaded.vertices, centred @ rotation.T, atol=1e-5)  # float32 in some files
    np.testing.assert_array_equal(loaded.faces, mesh.faces)

    uncentred = write_mesh(mesh, tmp_path / "raw" / f"thing.{name}", center=False, up=up)
    assert [p.name for p in uncentred] == spec.files("thing")
    raw = loaded_mesh(tmp_path / "raw" / f"thing.{name}")
    np.testing.assert_allclose(raw.vertices, vertices @ rotation.T, atol=1e-5)


def test_unknown_up_is_a_user_error(tmp_path, ellipsoid_mesh):
    mesh = vertex_colors_from_albedo(ellipsoid_mesh, albedo_fn)
    with pytest.raises(UserError, match=r"--up 'x': expected one of y, z"):
        write_mesh(mesh, tmp_path / "thing.ply", up="x")
    assert list(tmp_path.iterdir()) == []


def test_the_cli_help_lists_the_table():
    import typer.main

    from nfsd_nerf.cli import app

    export = typer.main.get_command(app).commands["export"]
    help_of = {param.name: param.help for param in export.params}
    for name, spec in FORMATS.items():
        assert f"{name}: {spec.description}" in help_of["format"]
    textured = [name for name, spec in FORMATS.items() if spec.needs_texture]
    assert f"({', '.join(textured)})" in help_of["texture_size"]


def _write_stl(mesh: trimesh.Trimesh, stem: str, center: bool, rotation: np.ndarray) -> dict[str, bytes]:
    """A writer of this test only: binary STL in the world's axes (it ignores ``center`` and ``rotation``)."""
    from trimesh.exchange.stl import export_stl

    return {f"{stem}.stl": export_stl(mesh)}


def test_a_format_added_to_the_table_exports_through_the_cli(box_run, tmp_path, monkeypatch):
    from nfsd_nerf.cli import app

    stl = MeshFormat("binary STL", needs_texture=False, files=lambda stem: [f"{stem}.stl"], write=_write_stl)
    monkeypatch.setitem(FORMATS, "stl", stl)  # this test only
    run = tmp_path / "a-box"
    shutil.copytree(box_run / "checkpoints", run / "checkpoints")

    result = CliRunner().invoke(app, ["export", str(run), "--format", "STL", "--resolution", "48"])
    assert result.exit_code == 0, result.output
    assert "mesh.stl" in result.output
    assert sorted(p.name for p in (run / "export").iterdir()) == ["mesh.stl"]
    mesh = trimesh.load(run / "export" / "mesh.stl")
    assert len(mesh.faces) > 100 and mesh.is_watertight
    box = [BOX_CENTER - BOX_HALF, BOX_CENTER + BOX_HALF]
    np.testing.assert_allclose(mesh.bounds, box, atol=0.1)  # world axes, not centred: as _write_stl does
