"""Colours (export/texture.py): UV rasterisation against a brute-force reference, dilation, and a
baked texture read back against the analytic albedo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import Ellipsoid, albedo_from_points, bilinear_texture_at, texture_colors_at_faces

from nfsd_nerf.errors import UserError
from nfsd_nerf.export.extract import extract_mesh
from nfsd_nerf.export.texture import (
    bake_texture,
    dilate_texture,
    rasterize_uv,
    rgb8_from_unit,
    vertex_colors_from_albedo,
)


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


def test_rgb8_rounds_to_nearest_and_clips_for_arrays_and_tensors():
    levels = np.array([[-0.1, 0.0, 0.4 / 255], [0.6 / 255, 0.5, 1.0], [1.2, np.nextafter(1.0, 0.0), 254.5 / 255]])
    want = np.array([[0, 0, 0], [1, 128, 255], [255, 255, 254]], dtype=np.uint8)
    np.testing.assert_array_equal(rgb8_from_unit(levels), want)
    np.testing.assert_array_equal(rgb8_from_unit(levels.astype(np.float32)), want)
    np.testing.assert_array_equal(rgb8_from_unit(torch.tensor(levels, dtype=torch.float32, requires_grad=True)), want)


def test_vertex_colours_are_the_albedo_at_each_vertex():
    mesh = extract_mesh(Ellipsoid(), resolution=24, threshold=25.0)
    albedo_fn = lambda p: albedo_from_points(torch.as_tensor(p, dtype=torch.float32)).numpy()  # noqa: E731
    coloured = vertex_colors_from_albedo(mesh, albedo_fn)
    want = albedo_from_points(torch.tensor(mesh.vertices, dtype=torch.float32)).numpy()
    assert np.abs(coloured.visual.vertex_colors[:, :3] / 255.0 - want).max() <= 0.5 / 255 + 1e-6
    assert (coloured.visual.vertex_colors[:, 3] == 255).all()
    np.testing.assert_array_equal(coloured.faces, mesh.faces)


def test_bad_texture_size_is_a_user_error():
    mesh = extract_mesh(Ellipsoid(), resolution=16, threshold=25.0)
    for size in (8, 8193, 64.0):
        with pytest.raises(UserError, match=r"texture size must be an integer in \[16, 8192\]"):
            bake_texture(mesh, lambda p: np.zeros((len(p), 3)), size)
