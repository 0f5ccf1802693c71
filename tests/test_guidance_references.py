"""The built-in prior's references: camera nearness, re-projection into a render's camera, the cache.

Every check is against an independent value: hand-derived camera geometry, the true object
rendered at the query camera, the names, contents and modes of the cache's files.
"""

from __future__ import annotations

import math
import os
import stat

import pytest
import torch
from guidance_helpers import SIZE, cameras_looking_at

from nfsd_nerf.cameras import look_at, orbit_cameras
from nfsd_nerf.guidance.builtin import BuiltinPrior
from nfsd_nerf.guidance.references import (
    align_maps,
    alignment_grid,
    camera_distance,
    load_or_build_references,
    nearest_references,
    view_features,
)
from nfsd_nerf.guidance.shapes import SHAPES, render_object, shade_and_coverage


@pytest.fixture(scope="module")
def prior(tmp_path_factory) -> BuiltinPrior:
    """A small prior (60 references per object at 16x16) with its own cache folder."""
    return BuiltinPrior(image_size=SIZE, n_references=60, cache_dir=tmp_path_factory.mktemp("refs"))


# --------------------------------------------------------------------------- camera nearness


def test_a_reference_camera_finds_itself_first(prior):
    feats = view_features(prior.cameras)
    idx = nearest_references(feats[[0, 7, 42]], feats, k=4)
    assert idx[:, 0].tolist() == [0, 7, 42]
    assert camera_distance(feats[[7]], feats[[7]]).item() == pytest.approx(0.0, abs=1e-6)


def test_same_direction_other_distance_ranks_by_distance_or_apparent_size():
    direction = torch.nn.functional.normalize(torch.tensor([1.0, 0.5, 0.4]), dim=0)
    distances = torch.tensor([1.5, 1.7, 2.0, 1.65])
    eyes = direction * distances[:, None]
    eyes[3] = torch.nn.functional.normalize(torch.tensor([-1.0, 0.5, 0.4]), dim=0) * 1.65  # another side, same distance
    refs = view_features(cameras_looking_at(eyes, torch.zeros(4, 3), 55.0))
    query = view_features(cameras_looking_at(direction[None] * 1.65, torch.zeros(1, 3), 55.0))
    log_ratio = (torch.tensor([1.5, 1.7, 2.0]) / 1.65).log().abs().double()
    size_rule = {"distance_weight": 0.0, "size_weight": 1.0}  # the plain rule (docs/design.md, section 6)
    for weights, expected in [({}, 0.3 * log_ratio), (size_rule, log_ratio)]:
        assert nearest_references(query, refs, k=4, **weights)[0].tolist() == [1, 0, 2, 3]
        torch.testing.assert_close(camera_distance(query, refs, **weights)[0, :3], expected, atol=1e-6, rtol=0)
    # a wider field of view at the same distance shrinks the object by tan(fov / 2)
    wide = view_features(cameras_looking_at(direction[None] * 1.65, torch.zeros(1, 3), 70.0))
    assert camera_distance(query, wide, **size_rule).item() == pytest.approx(
        math.log(math.tan(math.radians(35)) / math.tan(math.radians(27.5))), abs=1e-6)
    assert camera_distance(query, wide).item() == pytest.approx(0.0, abs=1e-6)  # aligned: the warp handles fov


# --------------------------------------------------------------------------- alignment


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10((a - b).pow(2).mean()))


def test_alignment_is_the_identity_for_a_reference_camera(prior):
    cams = prior.cameras[[2, 5]]
    grid = alignment_grid(cams, cams.fovy[:, None], cams.c2w[:, :3, 3].norm(dim=-1)[:, None], SIZE)
    maps = torch.rand(2, 1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(align_maps(maps, grid), maps, atol=1e-5, rtol=0)


def test_alignment_reprojects_a_reference_into_a_jittered_zoomed_camera():
    size = 32
    ref = cameras_looking_at(torch.tensor([[1.2, 0.9, 0.6]]), torch.zeros(1, 3), 60.0)  # canonical: looks at the origin
    eye = ref.c2w[:, :3, 3]
    query = cameras_looking_at(eye * 1.2, torch.tensor([[0.1, -0.15, 0.1]]), 45.0)  # farther, off-centre, narrower
    query.c2w = look_at(query.c2w[:, :3, 3], torch.tensor([[0.1, -0.15, 0.1]]), torch.tensor([[0.05, 0.0, 1.0]]))
    shade, coverage = shade_and_coverage(SHAPES["cube"], ref, size)
    grid = alignment_grid(query, ref.fovy[:, None], eye.norm(dim=-1)[:, None], size)
    warped = align_maps(torch.stack([shade, coverage], 1)[:, None], grid)[:, 0]
    true_shade, true_coverage = shade_and_coverage(SHAPES["cube"], query, size)
    unaligned = _psnr(coverage, true_coverage)
    assert _psnr(warped[:, 1], true_coverage) > 20 > unaligned + 8
    assert _psnr(warped[:, 0], true_shade) > 24
    assert warped[:, 1].sum().item() == pytest.approx(true_coverage.sum().item(), rel=0.03)  # the dolly zoom


def test_aligned_neighbours_look_more_like_the_true_object(prior):
    cams = orbit_cameras(4, distance=1.7, fovy_deg=50.0, elevation_deg=20.0)
    truth = render_object("torus", "blue", cams, SIZE)[0].permute(0, 3, 1, 2)
    code = int(prior.embed(["a blue torus"])[0])
    aligned = prior.references(code, cams)[:, 0]  # [4, 3, S, S], nearest reference, re-projected
    plain = BuiltinPrior(image_size=SIZE, n_references=60, cache_dir=prior.build_info["path"].rsplit("/", 1)[0],
                         align=False).references(code, cams)[:, 0]
    assert _psnr(aligned, truth) > max(17.0, _psnr(plain, truth) + 2)  # measured 18.6 vs 14.4 (60 references)


# --------------------------------------------------------------------------- reference cache


def test_references_are_cached_on_disk(tmp_path):
    cams = BuiltinPrior.reference_cameras(6)
    shade, coverage, info = load_or_build_references(cams, 12, cache_dir=tmp_path)
    assert not info["cache_hit"] and shade.shape == coverage.shape == (len(SHAPES), 6, 12, 12)
    again, again_cov, info2 = load_or_build_references(cams, 12, cache_dir=tmp_path)
    assert info2["cache_hit"] and info2["path"] == info["path"]
    assert torch.equal(again, shade) and torch.equal(again_cov, coverage)
    assert [p.name for p in tmp_path.iterdir()] == [f"builtin-refs-{info['key']}.safetensors"]  # no temporary left
    _, _, other = load_or_build_references(cams, 10, cache_dir=tmp_path)
    assert other["key"] != info["key"] and not other["cache_hit"]


def test_the_cache_file_is_as_readable_as_any_other_file(tmp_path):
    old = os.umask(0o022)
    try:
        _, _, info = load_or_build_references(BuiltinPrior.reference_cameras(2), 8, cache_dir=tmp_path / "a" / "b")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(info["path"]).st_mode) == 0o644  # the umask's mode, not a private temporary's


def test_a_damaged_cache_file_is_rebuilt(tmp_path):
    cams = BuiltinPrior.reference_cameras(3)
    _, _, info = load_or_build_references(cams, 8, cache_dir=tmp_path)
    with open(info["path"], "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        shade, _, info2 = load_or_build_references(cams, 8, cache_dir=tmp_path)
    assert not info2["cache_hit"] and shade.shape == (len(SHAPES), 3, 8, 8)
