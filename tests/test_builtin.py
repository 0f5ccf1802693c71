"""The built-in prior: exact denoiser, camera nearness, prompts, the sphere tracer, the cache, evaluation.

Every check is against an independent value: a brute-force denoiser over materialized images,
hand-derived camera geometry and shading, the projected area of a sphere, a field that *is*
the true object.
"""

from __future__ import annotations

import math

import pytest
import torch

from nfsd_nerf.cameras import Cameras, look_at, orbit_cameras, position_from_spherical
from nfsd_nerf.errors import UserError
from nfsd_nerf.evaluate import evaluation_cameras, image_metrics
from nfsd_nerf.guidance.builtin import (
    NEGATIVE,
    align_maps,
    alignment_grid,
    UNCONDITIONAL,
    BuiltinPrior,
    alphas_cumprod_scaled_linear,
    blur_matrix,
    camera_distance,
    degrade,
    load_or_build_references,
    nearest_references,
    view_features,
    x0_from_noisy_exact,
    x0_from_noisy_tinted,
)
from nfsd_nerf.guidance.rules import PAPER_NEGATIVE_PROMPT
from nfsd_nerf.guidance.shapes import (
    AMBIENT,
    BACKGROUND_RGB,
    COLOURS,
    LIGHTS,
    SHAPES,
    parse_prompt,
    render_object,
    shade_and_coverage,
)

SIZE = 16


@pytest.fixture(scope="module")
def prior(tmp_path_factory) -> BuiltinPrior:
    """A small prior (60 references per object at 16x16) with its own cache folder."""
    return BuiltinPrior(image_size=SIZE, n_references=60, cache_dir=tmp_path_factory.mktemp("refs"))


def _cameras(eye: torch.Tensor, target: torch.Tensor, fovy_deg: float | torch.Tensor) -> Cameras:
    """Cameras at eye [B, 3] looking at target [B, 3], Z up."""
    b = eye.shape[0]
    fovy = torch.deg2rad(torch.as_tensor(fovy_deg, dtype=torch.float32).expand(b))
    c2w = look_at(eye, target, torch.tensor([0.0, 0.0, 1.0]).expand(b, 3))
    zeros = torch.zeros(b)
    return Cameras(c2w, fovy, zeros, zeros, eye.norm(dim=-1), eye.clone())


# --------------------------------------------------------------------------- schedule and denoiser


def test_schedule_is_stable_diffusions_scaled_linear():
    ab = alphas_cumprod_scaled_linear()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert ab.shape == (1000,)
    assert ab[0].item() == pytest.approx(1 - 0.00085)
    assert ab[-1].item() == pytest.approx(math.prod(1 - b for b in betas.tolist()), rel=1e-9)
    assert ab[-1].item() == pytest.approx(0.0047, abs=2e-4)  # the value diffusers' SD schedulers end on


def test_denoiser_recovers_the_noise_of_a_noised_reference_at_small_t(prior):
    cams = prior.cameras[[3, 17]]  # rendered from two reference cameras: those references are in the sets
    codes = prior.embed(["a red cube", "a blue torus, side view"])
    x = prior.encode(torch.cat([prior.references(int(codes[0]), cams[[0]])[:, 0],
                                prior.references(int(codes[1]), cams[[1]])[:, 0]]))  # [2, 3, S, S]
    t = torch.tensor([20, 20])
    ab = prior.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    z_t = ab.sqrt() * x + (1 - ab).sqrt() * noise
    eps = prior.predict_noise(z_t, t, codes, cams)
    assert eps.shape == z_t.shape and eps.dtype == torch.float32
    assert (eps - noise).abs().max() < 1e-3


def test_denoiser_predicts_the_set_mean_when_the_signal_vanishes():
    refs = torch.rand(5, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z_t = torch.randn(3, 48, generator=torch.Generator().manual_seed(2))
    x0 = x0_from_noisy_exact(z_t, torch.full((3,), 1e-14), refs)
    torch.testing.assert_close(x0, refs.double().mean(0).expand(3, 48), atol=1e-5, rtol=0)
    # and the weights really are a softmax of the distances: two references, hand-computed
    two = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    ab = torch.tensor([0.5], dtype=torch.float64)
    z = torch.tensor([[0.3, 0.0]], dtype=torch.float64)
    # |z - a x|^2 = (0.3 -+ sqrt(0.5))^2, divided by 2 (1 - ab) = 1
    w0 = 1 / (1 + math.exp((0.3 - math.sqrt(0.5)) ** 2 - (0.3 + math.sqrt(0.5)) ** 2))
    assert x0_from_noisy_exact(z, ab, two)[0, 0].item() == pytest.approx(w0 - (1 - w0), abs=1e-12)


def test_denoiser_is_stable_at_the_smallest_noise_level():
    refs = torch.randn(4, 3000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ab = torch.tensor([1 - 1e-4])
    z = ab.sqrt() * refs[2:3] + 1e-2 * torch.randn(1, 3000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x0 = x0_from_noisy_exact(z, ab, refs)
    assert torch.isfinite(x0).all()
    torch.testing.assert_close(x0, refs[2:3])


@pytest.mark.parametrize("code", ["object", UNCONDITIONAL, NEGATIVE])
@pytest.mark.parametrize("t", [0, 150, 600, 999])
def test_factored_denoiser_matches_brute_force_over_materialized_sets(prior, code, t):
    code = int(prior.embed(["a green cone"])[0]) if code == "object" else code
    cams = orbit_cameras(2, distance=1.8, fovy_deg=50)
    images = 2 * prior.references(code, cams).flatten(2) - 1  # [2, K, D]
    ab = prior.alphas_cumprod.double()[torch.tensor([t, t])]
    gen = torch.Generator().manual_seed(t)
    x = images[:, 1]
    z = ab.sqrt()[:, None] * x + (1 - ab).sqrt()[:, None] * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    expected = x0_from_noisy_exact(z, ab, images)
    albedo_maps, background_maps, albedos = prior.reference_maps(code, cams)
    fast = x0_from_noisy_tinted(z.reshape(2, 3, -1), ab, albedo_maps.flatten(-2), background_maps.flatten(-2), albedos,
                                torch.tensor(BACKGROUND_RGB))
    torch.testing.assert_close(fast.flatten(1), expected, atol=1e-5, rtol=0)


def test_without_cameras_the_sets_are_every_reference(prior):
    codes = prior.embed(["a purple octahedron", ""])
    t = torch.tensor([400, 400])
    z_t = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    eps = prior.predict_noise(z_t, t, codes, None).double()
    ab = prior.alphas_cumprod.double()[t]
    for row in range(2):
        images = 2 * prior.references(int(codes[row]))[0].flatten(1) - 1  # [M * K, D]
        assert images.shape[0] == 60 * (1 if row == 0 else len(SHAPES) * len(COLOURS))
        x0 = x0_from_noisy_exact(z_t[row : row + 1].flatten(1), ab[row : row + 1], images)
        expected = (z_t[row].flatten().double() - ab[row].sqrt() * x0[0]) / (1 - ab[row]).sqrt()
        torch.testing.assert_close(eps[row].flatten(), expected, atol=1e-4, rtol=0)


def test_sets_hold_the_neighbours_of_every_object_and_degraded_copies(prior):
    cams = prior.cameras[[4]]
    red_cube = int(prior.embed(["a red cube"])[0])
    cond = prior.references(red_cube, cams)[0]  # [4, 3, S, S]
    uncond = prior.references(UNCONDITIONAL, cams)[0]
    negative = prior.references(NEGATIVE, cams)[0]
    assert cond.shape[0] == 4 and uncond.shape[0] == 4 * len(SHAPES) * len(COLOURS) == negative.shape[0]
    rgb, _ = render_object("cube", "red", cams, SIZE)
    torch.testing.assert_close(cond[0], rgb[0].permute(2, 0, 1), atol=2e-3, rtol=0)  # itself first; float16 cache
    # every conditional image is in the unconditional set
    assert all(((uncond - image).abs().amax(dim=(1, 2, 3)) < 1e-6).any() for image in cond)
    torch.testing.assert_close(negative, degrade(uncond, blur_matrix(SIZE, 1.5 * SIZE / 32)), atol=1e-5, rtol=0)
    assert negative.std(dim=(2, 3)).mean() < 0.8 * uncond.std(dim=(2, 3)).mean()  # lower contrast


def test_blur_keeps_constants_and_the_negative_look_is_blurry():
    blur = blur_matrix(16, 1.5)
    torch.testing.assert_close(blur.sum(1), torch.ones(16))
    flat = torch.full((1, 3, 16, 16), 0.7)
    torch.testing.assert_close(blur @ flat @ blur.T, flat)
    edge = torch.zeros(1, 3, 16, 16)
    edge[..., 8:] = 1.0
    blurred = blur @ edge @ blur.T
    assert 0.05 < blurred[0, 0, 0, 7] < 0.5 < blurred[0, 0, 0, 8] < 0.95


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
    refs = view_features(_cameras(eyes, torch.zeros(4, 3), 55.0))
    query = view_features(_cameras(direction[None] * 1.65, torch.zeros(1, 3), 55.0))
    log_ratio = (torch.tensor([1.5, 1.7, 2.0]) / 1.65).log().abs().double()
    size_rule = {"distance_weight": 0.0, "size_weight": 1.0}  # DESIGN.md's plain rule
    for weights, expected in [({}, 0.3 * log_ratio), (size_rule, log_ratio)]:
        assert nearest_references(query, refs, k=4, **weights)[0].tolist() == [1, 0, 2, 3]
        torch.testing.assert_close(camera_distance(query, refs, **weights)[0, :3], expected, atol=1e-6, rtol=0)
    # a wider field of view at the same distance shrinks the object by tan(fov / 2)
    wide = view_features(_cameras(direction[None] * 1.65, torch.zeros(1, 3), 70.0))
    assert camera_distance(query, wide, **size_rule).item() == pytest.approx(
        math.log(math.tan(math.radians(35)) / math.tan(math.radians(27.5))), abs=1e-6)
    assert camera_distance(query, wide).item() == pytest.approx(0.0, abs=1e-6)  # aligned: the warp handles fov


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10((a - b).pow(2).mean()))


def test_alignment_is_the_identity_for_a_reference_camera(prior):
    cams = prior.cameras[[2, 5]]
    grid = alignment_grid(cams, cams.fovy[:, None], cams.c2w[:, :3, 3].norm(dim=-1)[:, None], SIZE)
    maps = torch.rand(2, 1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(align_maps(maps, grid), maps, atol=1e-5, rtol=0)


def test_alignment_reprojects_a_reference_into_a_jittered_zoomed_camera():
    size = 32
    ref = _cameras(torch.tensor([[1.2, 0.9, 0.6]]), torch.zeros(1, 3), 60.0)  # canonical: looks at the origin
    eye = ref.c2w[:, :3, 3]
    query = _cameras(eye * 1.2, torch.tensor([[0.1, -0.15, 0.1]]), 45.0)  # farther, off-centre, narrower
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


def test_evaluation_cameras_are_not_reference_cameras(prior):
    full = view_features(BuiltinPrior.reference_cameras(500))
    dist = camera_distance(view_features(evaluation_cameras()), full)
    assert dist.min() > 1e-3


# --------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    "prompt, shape, colour",
    [
        ("a red cube", "cube", "red"),
        ("a DSLR photo of a blue torus, front view", "torus", "blue"),
        ("A Yellow Cone, overhead view", "cone", "yellow"),
        ("a gray box, back view", "cube", "grey"),
        ("two green donuts", "torus", "green"),
        ("an orange pill, side view", "capsule", "orange"),
    ],
)
def test_prompts_name_one_shape_and_one_colour(prompt, shape, colour):
    parsed = parse_prompt(prompt)
    assert (parsed.kind, parsed.shape, parsed.colour) == ("object", shape, colour)


def test_empty_and_negative_prompts():
    assert parse_prompt("").kind == "unconditional"
    assert parse_prompt("  , ").kind == "unconditional"
    assert parse_prompt(PAPER_NEGATIVE_PROMPT).kind == "negative"
    assert parse_prompt("blurry, low quality").kind == "negative"


@pytest.mark.parametrize("prompt", ["a hamburger", "a cube", "a red thing", "a red cube on a blue sphere", "a red blue cube"])
def test_unknown_prompts_are_refused_with_the_vocabulary(prompt):
    with pytest.raises(UserError) as err:
        parse_prompt(prompt)
    message = str(err.value)
    assert repr(prompt) in message and "\n" not in message
    assert all(name in message for name in list(SHAPES) + list(COLOURS))


def test_embed_codes_and_cache(prior):
    codes = prior.embed(["a red cube", "", PAPER_NEGATIVE_PROMPT, "a red cube, back view", "a blue cube"])
    assert codes.dtype == torch.long and codes.shape == (5,)
    assert codes[0] == codes[3] >= 0 and codes[4] != codes[0]
    assert codes[1:3].tolist() == [UNCONDITIONAL, NEGATIVE]
    assert "a red cube" in prior._codes
    with pytest.raises(UserError):
        prior.embed(["a teapot"])


def test_encode_decode_and_rows(prior):
    rgb = torch.rand(2, 3, 2 * SIZE, 2 * SIZE, generator=torch.Generator().manual_seed(6))
    z = prior.encode(rgb)
    assert z.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(z, 2 * torch.nn.functional.avg_pool2d(rgb, 2) - 1, atol=1e-5, rtol=0)
    torch.testing.assert_close(prior.decode(prior.encode(rgb[..., :SIZE, :SIZE])), rgb[..., :SIZE, :SIZE])
    with pytest.raises(ValueError, match="cameras"):
        prior.predict_noise(z, torch.tensor([5, 5]), prior.embed(["a red cube"] * 2), prior.cameras[[0]])


# --------------------------------------------------------------------------- renderer


def test_sphere_mask_has_the_area_of_its_projected_disc():
    size, fovy, distance, radius = 64, 50.0, 1.8, 0.5
    cams = orbit_cameras(2, distance=distance, fovy_deg=fovy, elevation_deg=10.0)
    _, coverage = shade_and_coverage(SHAPES["sphere"], cams, size, supersample=4)
    focal = 0.5 * size / math.tan(math.radians(fovy / 2))
    disc = math.pi * (focal * math.tan(math.asin(radius / distance))) ** 2
    for view in coverage:
        assert view.sum().item() == pytest.approx(disc, rel=0.01)


def test_shading_uses_world_fixed_lights_so_colour_is_view_independent():
    # the cube's +X face, seen head-on and from 35 degrees to the side: same colour
    eyes = torch.stack([position_from_spherical(torch.tensor(a), torch.tensor(0.0), torch.tensor(1.8)) for a in (0.0, 35.0)])
    targets = torch.tensor([[0.36, 0.0, 0.0], [0.36, 0.0, 0.0]])
    rgb, coverage = render_object("cube", "blue", _cameras(eyes, targets, 20.0), 8)
    assert coverage[:, 3:5, 3:5].min() == 1.0
    key = torch.nn.functional.normalize(torch.tensor(LIGHTS[0][0]), dim=0)
    shade = AMBIENT + LIGHTS[0][1] * key[0].item()  # the fill light is behind the face
    expected = torch.tensor(COLOURS["blue"]) * shade
    for view in rgb:
        torch.testing.assert_close(view[3:5, 3:5], expected.expand(2, 2, 3), atol=1e-4, rtol=0)


def test_background_and_coverage_are_consistent():
    cams = orbit_cameras(3, distance=2.0, fovy_deg=60.0)
    for name in SHAPES:
        rgb, coverage = render_object(name, "red", cams, 16)
        assert 0.1 < coverage.mean() < 0.5, name  # about a third of the frame
        assert coverage[:, 0, :].max() == 0 and coverage[:, :, 0].max() == 0, name  # whole object in frame
        torch.testing.assert_close(rgb[coverage == 0], torch.tensor(BACKGROUND_RGB).expand(int((coverage == 0).sum()), 3))


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


def test_a_damaged_cache_file_is_rebuilt(tmp_path):
    cams = BuiltinPrior.reference_cameras(3)
    _, _, info = load_or_build_references(cams, 8, cache_dir=tmp_path)
    with open(info["path"], "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        shade, _, info2 = load_or_build_references(cams, 8, cache_dir=tmp_path)
    assert not info2["cache_hit"] and shade.shape == (len(SHAPES), 3, 8, 8)


# --------------------------------------------------------------------------- evaluation


def test_image_metrics_by_hand():
    true_rgb = torch.ones(1, 4, 4, 3)
    true_cov = torch.zeros(1, 4, 4)
    true_cov[0, 1:3, 1:3] = 1.0
    rgb, opacity = true_rgb.clone(), true_cov.clone()
    rgb[0, 0, 0] = 0.0  # one wrong pixel outside both silhouettes: full-frame MSE 1/16
    opacity[0, 1, 1] = 0.0
    opacity[0, 0, 3] = 1.0
    rgb[0, 1, 1] = 0.5  # a wrong pixel inside the union: err 0.25, union 5 pixels
    m = image_metrics(rgb, opacity, true_rgb, true_cov)
    assert m["psnr"].item() == pytest.approx(-10 * math.log10((1.0 + 0.25) / 16), abs=1e-4)
    assert m["psnr_masked"].item() == pytest.approx(-10 * math.log10(0.25 / 5), abs=1e-4)
    assert m["silhouette_iou"].item() == pytest.approx(3 / 5)


class _TrueSphere(torch.nn.Module):
    """A 'NeRF' that is the red sphere: opaque inside, coloured by the references' shading."""

    bound = 1.0

    def density(self, x):
        return 2000.0 * torch.sigmoid((0.5 - x.norm(dim=-1)) * 5000.0)

    def forward(self, x):
        from nfsd_nerf.guidance.shapes import shade_from_normals

        shade = shade_from_normals(torch.nn.functional.normalize(x, dim=-1))
        return self.density(x), torch.tensor(COLOURS["red"]) * shade[:, None]

    def normals(self, x):
        return torch.nn.functional.normalize(x, dim=-1)


class _White(torch.nn.Module):
    def forward(self, dirs):
        return torch.ones_like(dirs)


def test_a_field_that_is_the_true_object_scores_high_and_a_wrong_one_low():
    from nfsd_nerf.evaluate import evaluate_against_truth

    right = evaluate_against_truth(_TrueSphere(), _White(), "a red sphere", size=32, n_samples=128)
    # exact geometry and colour; only the renderer's missing antialiasing costs anything
    assert right["silhouette_iou"] > 0.97 and right["psnr"] > 24 and right["psnr_masked"] > 26
    wrong = evaluate_against_truth(_TrueSphere(), _White(), "a blue cube", size=32, n_samples=128)
    assert wrong["psnr"] < right["psnr"] - 10 and wrong["silhouette_iou"] < right["silhouette_iou"]
    with pytest.raises(UserError):
        evaluate_against_truth(_TrueSphere(), _White(), "", size=32)
