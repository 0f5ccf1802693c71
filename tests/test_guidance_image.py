"""The 2D experiment: optimizing one image with a prior, through the tiny Stable Diffusion pipeline."""

from __future__ import annotations

import json


def test_optimize_image_writes_png_grid_and_settings(tiny_prior, tmp_path):
    import imageio.v3 as iio

    from nfsd_nerf.config import GuidanceConfig
    from nfsd_nerf.guidance.image import optimize_image

    seen = []
    path = optimize_image(tiny_prior, "a red ball", GuidanceConfig(method="sds", scale=7.5), steps=3, lr=0.1, seed=0,
                          out_dir=tmp_path / "out", n_snapshots=4, callback=lambda step, info: seen.append(step))
    assert path == tmp_path / "out" / "sds-s7.5.png"
    assert seen == [0, 1, 2]
    image = iio.imread(path)
    assert image.shape == (64, 64, 3) and image.dtype.name == "uint8"
    grid = iio.imread(tmp_path / "out" / "sds-s7.5-steps.png")
    assert grid.shape == (256, 4 * 256, 3)  # 4 snapshots in a row, 64 px enlarged 4x
    assert (grid[:256:4, -256::4] == image).all()  # the last tile is the final image
    assert not (grid[:256:4, :256:4] == image).all()  # ... and it moved away from the start
    settings = json.loads((tmp_path / "out" / "sds-s7.5.json").read_text())
    assert settings["scale"] == 7.5 and settings["model"] == tiny_prior.model_id and settings["negative_prompt"] == ""


def test_image_grid_enlarges_small_tiles_and_shrinks_large_ones():
    import torch

    from nfsd_nerf.guidance.image import image_grid

    small = torch.rand(3, 3, 8, 8)
    grid = image_grid(small, columns=2, tile=32)
    assert grid.shape == (3, 2 * 32, 2 * 32)
    assert torch.equal(grid[:, :32:4, :32:4], small[0])  # nearest-neighbour x4: pixels stay visible
    assert (grid[:, 32:, 32:] == 1).all()  # the empty fourth tile stays white
    assert image_grid(torch.rand(1, 3, 512, 256), tile=256).shape == (3, 256, 128)


# --------------------------------------------------------------------------- DDS editing


def test_dds_gradient_by_hand():
    import torch

    from nfsd_nerf.guidance.dds import dds_grad

    cond, uncond = torch.tensor([[[[3.0, 1.0]]]]), torch.tensor([[[[1.0, 1.0]]]])
    source_cond, source_uncond = torch.tensor([[[[2.0, 0.0]]]]), torch.tensor([[[[0.5, 1.0]]]])
    # w ((e0 - es0) + s ((ey - e0) - (esy - es0))) = 0.5 ((0.5, 0) + 2 ((2, 0) - (1.5, -1))) = 0.5 (1.5, 2)
    grad = dds_grad(cond, uncond, source_cond, source_uncond, torch.tensor([0.5]), 2.0)
    assert grad.flatten().tolist() == [0.75, 1.0]
    # the same as the difference of the two CFG predictions (no - eps term)
    cfg = lambda c, u: u + 2.0 * (c - u)  # noqa: E731
    assert torch.allclose(grad, 0.5 * (cfg(cond, uncond) - cfg(source_cond, source_uncond)))


def test_dds_is_a_2d_edit_rule_with_the_dds_papers_scale():
    from nfsd_nerf.guidance.dds import EDIT_RULES, edit_rules_help
    from nfsd_nerf.guidance.rules import RULES

    assert "dds" in EDIT_RULES and "dds" not in RULES  # a rule of RULES sees one latent; DDS needs the source too
    assert EDIT_RULES["dds"].default_scale == 7.5
    assert edit_rules_help().startswith("dds: ") and "(scale 7.5)" in edit_rules_help()


def test_edit_step_makes_one_call_with_shared_noise_and_t():
    import math

    import torch

    from guidance_helpers import StubPrior
    from nfsd_nerf.config import GuidanceConfig
    from nfsd_nerf.guidance.image import EditDistillation

    prior = StubPrior()
    g = torch.Generator().manual_seed(0)
    source, z = torch.randn(1, 4, 3, 2, generator=g), torch.randn(1, 4, 3, 2, generator=g).requires_grad_(True)
    distill = EditDistillation(prior, GuidanceConfig(method="dds", weighting="uniform"), source, "a red cube")
    assert distill.cfg.scale == 7.5 and distill.cfg.negative_prompt == ""
    loss, info = distill.loss_from_latents(z, ["a blue cube"], None, 0.0, torch.Generator().manual_seed(1))
    (call,) = prior.calls
    assert call["prompts"] == ["a blue cube", "", "a red cube", ""]
    t = info["t"][0]
    assert call["t"].tolist() == [t] * 4
    ab = float(prior.alphas_cumprod[t])
    noise = (call["z_t"][0] - math.sqrt(ab) * z.detach()[0]) / math.sqrt(1 - ab)
    assert torch.allclose(call["z_t"][2], math.sqrt(ab) * source[0] + math.sqrt(1 - ab) * noise, atol=1e-5)
    loss.backward()
    # stub predictions depend on the prompt only: w = 1, grad = s (e(blue) - e(red))
    assert torch.allclose(z.grad, 7.5 * (prior.e("a blue cube") - prior.e("a red cube"))[None], atol=1e-5)


def test_image_request_checks(tmp_path):
    import imageio.v3 as iio
    import numpy as np
    import pytest

    from nfsd_nerf.config import GuidanceConfig
    from nfsd_nerf.errors import UserError
    from nfsd_nerf.guidance.image import check_image_request

    iio.imwrite(tmp_path / "src.png", np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "bad.png").write_text("no")
    source = check_image_request(GuidanceConfig(method="dds"), tmp_path / "src.png", "a red cube")
    assert source.rgb.shape == (1, 3, 16, 16) and source.prompt == "a red cube"
    assert check_image_request(GuidanceConfig(method="nfsd"), None, None) is None
    for method, edit, prompt, message in [
        ("dds", None, None, "--guidance dds edits an image"),
        ("dds", tmp_path / "src.png", None, "--edit needs --source-prompt"),
        ("dds", None, "a red cube", "--source-prompt needs --edit"),
        ("nfsd", tmp_path / "src.png", "a red cube", "--edit needs an editing rule"),
        ("dds", tmp_path / "bad.png", "a red cube", "cannot read it as an image"),
        ("dds", tmp_path / "none.png", "a red cube", "file not found"),
        ("dds", tmp_path / "src.png", " ", "--source-prompt is empty"),
        ("sjc", None, None, "known: nfsd, sds, vsd, dds"),
    ]:
        with pytest.raises(UserError, match=message):
            check_image_request(GuidanceConfig(method=method), edit, prompt)
    with pytest.raises(UserError, match="does not apply"):
        check_image_request(GuidanceConfig(method="dds", negative_prompt="blurry"), tmp_path / "src.png", "a")
    with pytest.raises(UserError, match="t_min"):
        check_image_request(GuidanceConfig(method="dds", t_min=0.9, t_max=0.5), tmp_path / "src.png", "a")


def test_read_rgb_grey_alpha_and_16_bit(tmp_path):
    import imageio.v3 as iio
    import numpy as np
    import torch

    from nfsd_nerf.guidance.image import read_rgb

    iio.imwrite(tmp_path / "grey16.png", np.full((8, 8), 65535, np.uint16))
    assert torch.equal(read_rgb(tmp_path / "grey16.png"), torch.ones(1, 3, 8, 8))
    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[..., 0], rgba[:, :5, 3] = 255, 255  # red, opaque on the left, transparent on the right
    iio.imwrite(tmp_path / "rgba.png", rgba)
    rgb = read_rgb(tmp_path / "rgba.png")
    assert rgb.shape == (1, 3, 8, 10)
    assert rgb[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0] and rgb[0, :, 0, 9].tolist() == [1.0, 1.0, 1.0]  # over white


def test_dds_edits_a_red_cube_into_a_blue_one_on_the_builtin_prior(tmp_path):
    """Editing "a red cube" into "a blue cube" (DDS 7.5, 100 Adam steps of lr 0.05, front camera,
    32 px) turns the cube blue and leaves the white background. Measured: inside the silhouette the
    source's mean rgb (0.49, 0.07, 0.06) becomes (0.00, 0.19, 0.70) (the true blue cube: 0.07, 0.17, 0.49,
    so bluer than the truth); outside it stays (1.00, 1.00, 1.00) to two decimals."""
    import imageio.v3 as iio
    import torch

    from nfsd_nerf.cameras import orbit_cameras
    from nfsd_nerf.config import GuidanceConfig
    from nfsd_nerf.guidance.builtin import BuiltinPrior
    from nfsd_nerf.guidance.image import EditSource, optimize_image
    from nfsd_nerf.guidance.shapes import render_object

    prior = BuiltinPrior(image_size=32, n_references=60, cache_dir=tmp_path / "refs")
    red, coverage = render_object("cube", "red", orbit_cameras(1), 32)
    path = optimize_image(prior, "a blue cube", GuidanceConfig(method="dds"), steps=100, lr=0.05, seed=0,
                          out_dir=tmp_path / "out", edit=EditSource(red.permute(0, 3, 1, 2), "a red cube", "red.png"))
    assert path.name == "dds-s7.5.png"
    result = torch.from_numpy(iio.imread(path)).float() / 255.0  # [32, 32, 3]
    inside, outside = coverage[0] > 0.5, coverage[0] == 0
    r, g, b = result[inside].mean(0).tolist()
    assert b > 0.55 and b > r + 0.4 and b > g + 0.3, (r, g, b)  # blue now
    assert red[0][inside].mean(0)[0] > 0.4  # ... where it was red
    assert result[outside].mean(0).min() > 0.98  # the background stays white
    settings = json.loads((tmp_path / "out" / "dds-s7.5.json").read_text())
    assert settings["source_prompt"] == "a red cube" and settings["edit"] == "red.png" and settings["scale"] == 7.5


def test_image_command_edits_with_dds(tiny_sd_path, tmp_path):
    import imageio.v3 as iio
    import numpy as np
    from typer.testing import CliRunner

    from nfsd_nerf.cli import app

    iio.imwrite(tmp_path / "src.png", (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    result = CliRunner().invoke(app, ["image", "a blue hamburger", "--guidance", "dds", "--edit", str(tmp_path / "src.png"),
                                      "--source-prompt", "a hamburger", "--model", str(tiny_sd_path), "--offline",
                                      "--steps", "2", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "out" / "a-blue-hamburger" / "dds-s7.5.json").read_text())
    assert settings["method"] == "dds" and settings["source_prompt"] == "a hamburger"
    for args in (["--guidance", "dds"], ["--edit", str(tmp_path / "src.png")], ["--source-prompt", "x"]):
        result = CliRunner().invoke(app, ["image", "a blue hamburger", *args, "--out", str(tmp_path / "refused")])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "refused").exists()
