"""Mesh figures against the true object (export/measure.py): each against analytic meshes with
known volume, topology, distances and colours, and ``metrics.json`` from a built-in export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from nfsd_nerf.export.measure import (
    TRUE_VOLUMES,
    measure_for_prompt,
    measure_mesh,
    sdf_volume,
    topology,
    weld,
)
from nfsd_nerf.export.pipeline import export_field
from nfsd_nerf.guidance.shapes import _TORUS_AXIS, SHAPES

HALF = 0.36  # the built-in cube's half side


def split_along_seams(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Every face with its own three vertices, as a UV unwrap with seams everywhere would leave it."""
    vertices = np.asarray(mesh.vertices)[np.asarray(mesh.faces).reshape(-1)]
    return trimesh.Trimesh(vertices, np.arange(len(vertices)).reshape(-1, 3), process=False)


def test_weld_restores_topology_of_split_meshes():
    box = trimesh.creation.box(extents=(0.72,) * 3)
    split = split_along_seams(box)
    assert topology(np.asarray(split.vertices), np.asarray(split.faces))["pieces"] == 12  # unwelded: every face apart
    vertices, faces = weld(split)
    assert len(vertices) == 8 and len(faces) == 12
    assert topology(vertices, faces) == {"pieces": 1, "euler": 2, "closed": True, "genus": 0}


def test_topology_of_torus_two_pieces_and_open_surface():
    torus = trimesh.creation.torus(0.46, 0.185, major_sections=24, minor_sections=12)
    assert topology(*weld(torus)) == {"pieces": 1, "euler": 0, "closed": True, "genus": 1}
    two = trimesh.util.concatenate([trimesh.creation.icosphere(2), trimesh.creation.icosphere(2).apply_translation((3, 0, 0))])
    assert topology(*weld(two)) == {"pieces": 2, "euler": 4, "closed": True, "genus": 0}
    open_box = trimesh.creation.box()
    open_box = trimesh.Trimesh(open_box.vertices, open_box.faces[:-1], process=False)
    figures = topology(*weld(open_box))
    assert figures["closed"] is False and figures["genus"] is None and figures["euler"] == 8 - 18 + 11


def test_true_volumes_match_the_sdfs():
    """The analytic volumes against an independent lattice estimate of each SDF."""
    for name in ("cube", "torus", "cone", "capsule"):
        shape = SHAPES[name]
        estimate = sdf_volume(shape.sdf, shape.radius * 1.05, resolution=64)
        assert estimate == pytest.approx(TRUE_VOLUMES[name], rel=0.01), name
    assert TRUE_VOLUMES["torus"] == pytest.approx(2 * math.pi**2 * 0.46 * 0.185**2)


def test_exact_cube_scores_zero_and_a_larger_one_its_offset():
    exact = split_along_seams(trimesh.creation.box(extents=(2 * HALF,) * 3).subdivide().subdivide())
    figures = measure_mesh(exact, "cube", n_samples=4000)
    assert figures["pieces"] == 1 and figures["euler"] == 2
    assert abs(figures["volume_error"]) < 1e-9
    assert figures["surface_distance_median"] < 1e-9 and figures["normal_error_median_deg"] < 1e-3
    assert "colour_mean" not in figures  # no colours on the mesh
    big = trimesh.creation.box(extents=(2 * HALF + 0.04,) * 3).subdivide().subdivide()
    figures = measure_mesh(big, "cube", n_samples=4000)
    assert figures["volume_error"] == pytest.approx((0.76 / 0.72) ** 3 - 1, rel=1e-6)
    assert figures["surface_distance_median"] == pytest.approx(0.02, abs=2e-3)  # faces 0.02 out, corners more


def test_normal_error_of_a_sphere_mesh_rotated_against_the_torus():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    figures = measure_mesh(sphere, "sphere", n_samples=4000)
    assert figures["surface_distance_median"] < 0.005 and figures["normal_error_median_deg"] < 3.0
    torus = trimesh.creation.torus(0.46, 0.185, major_sections=96, minor_sections=48)
    torus.apply_transform(np.block([[_TORUS_AXIS.numpy(), np.zeros((3, 1))], [np.zeros((1, 3)), np.ones((1, 1))]]))
    figures = measure_mesh(torus, "torus", n_samples=4000)
    assert figures["genus"] == 1 and abs(figures["volume_error"]) < 0.01
    assert figures["surface_distance_median"] < 0.002 and figures["normal_error_median_deg"] < 3.5  # facets: 3.75 deg at most
    inside_out = trimesh.Trimesh(sphere.vertices, sphere.faces[:, ::-1], process=False)  # inward faces: 180 degrees
    assert measure_mesh(inside_out, "sphere", n_samples=1000)["normal_error_median_deg"] > 175


def test_colour_from_texture_and_from_vertex_colours():
    box = trimesh.creation.box(extents=(2 * HALF,) * 3)
    # texture: left half (u < 0.5) red, right half black (clipped); faces mapped to either half by their centroid's x
    texture = np.zeros((8, 8, 3), dtype=np.uint8)
    texture[:, :4] = (200, 40, 20)
    split = split_along_seams(box)
    left = (split.vertices[split.faces].mean(axis=1)[:, 0] < 0).repeat(3)
    uv = np.where(left[:, None], [0.25, 0.5], [0.75, 0.5])
    split.visual = trimesh.visual.TextureVisuals(uv=uv, material=trimesh.visual.material.PBRMaterial(
        baseColorTexture=Image.fromarray(texture)))
    figures = measure_mesh(split, "cube", (0.85, 0.12, 0.10), n_samples=6000)
    area_left = float(left.reshape(-1, 3)[:, 0].mean())
    np.testing.assert_allclose(figures["colour_mean"], np.array([200, 40, 20]) / 255 * area_left, atol=0.02)
    np.testing.assert_allclose(figures["colour_clipped_fraction"], [1 - area_left] * 3, atol=0.02)
    assert figures["colour_error"] == pytest.approx(max(abs(np.array([200, 40, 20]) / 255 * area_left - (0.85, 0.12, 0.10))), abs=0.02)
    painted = trimesh.creation.box(extents=(2 * HALF,) * 3)
    painted.visual.vertex_colors = np.tile([217, 31, 26, 255], (8, 1))
    figures = measure_mesh(painted, "cube", (0.85, 0.12, 0.10), n_samples=1000)
    np.testing.assert_allclose(figures["colour_mean"], np.array([217, 31, 26]) / 255, atol=1e-9)
    assert figures["colour_error"] < 0.003 and figures["colour_std"] == pytest.approx([0, 0, 0], abs=1e-9)


def test_only_builtin_prompts_are_measured():
    box = trimesh.creation.box(extents=(2 * HALF,) * 3)
    assert measure_for_prompt(box, "a DSLR photo of a hamburger") is None
    assert measure_for_prompt(box, "a red cube")["prompt"] == "a red cube"


class RedCube:
    """A solid box of the built-in cube's size, albedo the built-in red: the perfect run."""

    bound = 1.0

    def density(self, x):
        inside = (x.abs() <= HALF).all(-1)
        return torch.where(inside, torch.full(x.shape[:1], 50.0), torch.zeros(x.shape[:1]))

    def __call__(self, x):
        return self.density(x), torch.tensor([0.85, 0.12, 0.10]).expand(len(x), 3)

    def parameters(self):
        return iter([torch.zeros(1)])


def test_export_of_a_builtin_prompt_writes_metrics_json(tmp_path):
    notes = []
    paths = export_field(RedCube(), tmp_path, format="glb", resolution=40, texture_size=64, threshold=25.0,
                         measure_prompt="a red cube", log=notes.append)
    assert [p.name for p in paths] == ["mesh.glb", "metrics.json"]
    figures = json.loads((tmp_path / "metrics.json").read_text())
    assert figures["pieces"] == 1 and figures["euler"] == 2 and figures["genus"] == 0
    spacing = 2.0 / 39
    assert abs(figures["volume_error"]) < 0.1 and figures["surface_distance_median"] < spacing
    assert figures["colour_error"] < 0.01 and max(figures["colour_clipped_fraction"]) == 0
    assert "against the true cube: 1 piece(s), Euler number 2" in notes[-1]
    assert export_field(RedCube(), tmp_path / "b", format="ply", resolution=24, threshold=25.0,
                        measure_prompt="a photo of a hamburger")[-1].name == "mesh.ply"


def test_with_a_coloured_copy_topology_is_by_index_and_colours_from_the_copy():
    """Marching cubes can put two vertices at one point; the pipeline measures its unsplit mesh by
    index (welding by position would join them) and reads colours from the baked copy."""
    box = trimesh.creation.box(extents=(2 * HALF,) * 3)
    painted = box.copy()
    painted.visual.vertex_colors = np.tile([217, 31, 26, 255], (8, 1))
    split = split_along_seams(box)
    figures = measure_mesh(split, "cube", (0.85, 0.12, 0.10), coloured=painted, n_samples=500)
    assert figures["pieces"] == 12 and figures["closed"] is False  # by index: nothing welded
    np.testing.assert_allclose(figures["colour_mean"], np.array([217, 31, 26]) / 255, atol=1e-9)
    with pytest.raises(ValueError, match="faces"):
        measure_mesh(box, "cube", coloured=trimesh.creation.icosphere(1))
