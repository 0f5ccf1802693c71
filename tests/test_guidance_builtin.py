"""The built-in prior: the exact denoiser, its camera-selected and degraded sets, prompt codes.

Every check is against an independent value: a brute-force denoiser over materialized images,
a hand-computed softmax, the true object rendered at a reference camera.
"""

from __future__ import annotations

import math

import pytest
import torch
from guidance_helpers import SIZE

from nfsd_nerf.cameras import orbit_cameras
from nfsd_nerf.errors import UserError
from nfsd_nerf.guidance.builtin import (
    NEGATIVE,
    NEGATIVE_BLUR_SIGMA,
    UNCONDITIONAL,
    BuiltinPrior,
    alphas_cumprod_scaled_linear,
    blur_matrix,
    degrade,
    x0_from_noisy_exact,
    x0_from_noisy_tinted,
)
from nfsd_nerf.guidance.rules import PAPER_NEGATIVE_PROMPT
from nfsd_nerf.guidance.shapes import BACKGROUND_RGB, COLOURS, SHAPES, render_object


@pytest.fixture(scope="module")
def prior(tmp_path_factory) -> BuiltinPrior:
    """A small prior (60 references per object at 16x16) with its own cache folder."""
    return BuiltinPrior(image_size=SIZE, n_references=60, cache_dir=tmp_path_factory.mktemp("refs"))


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
    blur = blur_matrix(SIZE, NEGATIVE_BLUR_SIGMA * SIZE / 32)
    torch.testing.assert_close(negative, degrade(uncond, blur), atol=1e-5, rtol=0)
    # blurrier: less energy in the differences of neighbouring pixels, the same mean colour
    sharpness = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean()  # noqa: E731
    assert sharpness(negative) < sharpness(uncond)
    torch.testing.assert_close(negative.mean(dim=(2, 3)), uncond.mean(dim=(2, 3)), atol=0.02, rtol=0)


def test_blur_keeps_constants_and_the_negative_look_is_blurry():
    blur = blur_matrix(16, 1.5)
    torch.testing.assert_close(blur.sum(1), torch.ones(16))
    flat = torch.full((1, 3, 16, 16), 0.7)
    torch.testing.assert_close(blur @ flat @ blur.T, flat)
    edge = torch.zeros(1, 3, 16, 16)
    edge[..., 8:] = 1.0
    blurred = blur @ edge @ blur.T
    assert 0.05 < blurred[0, 0, 0, 7] < 0.5 < blurred[0, 0, 0, 8] < 0.95


# --------------------------------------------------------------------------- prompts and images


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


def test_without_alignment_predictions_use_the_neighbours_as_they_are(tmp_path):
    """``align=False`` (neighbours chosen by view and size, not warped) predicts noise with cameras too."""
    plain = BuiltinPrior(image_size=SIZE, n_references=60, cache_dir=tmp_path, align=False)
    cams = orbit_cameras(2, distance=1.8, fovy_deg=50)
    z_t = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    eps = plain.predict_noise(z_t, torch.tensor([100, 800]), plain.embed(["a red cube"] * 2), cams)
    assert eps.shape == z_t.shape and torch.isfinite(eps).all()
