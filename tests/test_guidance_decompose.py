"""The score decomposition (nfsd-nerf decompose): formulas by hand, the built-in prior's exact noise
direction, one model call per t, the files, and bad input refused before anything is written."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from guidance_helpers import StubPrior
from nfsd_nerf.cli import app
from nfsd_nerf.errors import UserError

runner = CliRunner()


# --------------------------------------------------------------------------- pure maths


def test_timesteps_are_parsed_and_checked_against_the_schedule():
    from nfsd_nerf.guidance.decompose import check_timesteps, parse_timesteps

    assert parse_timesteps("100, 200,400 ,") == [100, 200, 400]
    for bad, message in [("", "empty"), (" , ", "empty"), ("100,abc", "integers"), ("1.5", "integers"),
                         ("100,100", "repeated")]:
        with pytest.raises(UserError, match=message):
            parse_timesteps(bad)
    check_timesteps([0, 999], 1000)
    with pytest.raises(UserError, match="outside the model's schedule"):
        check_timesteps([100, 1000], 1000)
    with pytest.raises(UserError, match="-1"):
        check_timesteps([-1], 1000)


def test_components_by_hand_below_and_above_the_nfsd_switch():
    from nfsd_nerf.guidance.decompose import decompose_predictions

    e_id, e_ood = torch.tensor([[[[1.0, 2.0]]]]), torch.tensor([[[[4.0, -1.0]]]])
    e_cond, e_neg = torch.tensor([[[[5.0, 0.0]]]]), torch.tensor([[[[3.0, 3.0]]]])
    low = decompose_predictions(e_id, e_ood, e_cond, torch.full_like(e_neg, float("nan")), t=199, threshold=200)
    assert low.dN.flatten().tolist() == [1.0, 2.0]
    assert low.dD.flatten().tolist() == [3.0, -3.0]  # e_ood - e_id
    assert low.dD_nfsd.flatten().tolist() == [4.0, -1.0]  # e(0) below the switch; e(neg) never read
    assert low.dC.flatten().tolist() == [1.0, 1.0]  # e_cond - e_ood
    high = decompose_predictions(e_id, e_ood, e_cond, e_neg, t=200, threshold=200)
    assert high.dD_nfsd.flatten().tolist() == [1.0, -4.0]  # e(0) - e(neg)
    with pytest.raises(ValueError, match="negative"):
        decompose_predictions(e_id, e_ood, e_cond, None, t=200, threshold=200)


def test_noising_moving_cosine_and_rms_by_hand():
    from nfsd_nerf.guidance.decompose import cosine, move_along, noised, rms

    z, noise = torch.tensor([2.0, -2.0]), torch.tensor([1.0, 1.0])
    assert torch.allclose(noised(z, noise, 0.64), torch.tensor([0.8 * 2 + 0.6, -0.8 * 2 + 0.6]))
    # x - sqrt((1 - ab) / ab) d: ab = 0.8 -> factor 0.5; ab = 0.2 -> factor 2
    assert torch.allclose(move_along(torch.tensor([1.0]), torch.tensor([2.0]), 0.8), torch.tensor([0.0]))
    assert torch.allclose(move_along(torch.tensor([1.0]), torch.tensor([2.0]), 0.2), torch.tensor([-3.0]))
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert cosine(torch.tensor([1.0, 0.0]), torch.zeros(2)) == 0.0
    assert rms(torch.tensor([3.0, -4.0, 0.0, 0.0])) == pytest.approx(2.5)


def test_moving_the_ood_image_along_dD_is_the_denoisers_estimate_when_dN_is_the_noise():
    """x_OOD - k dD with dD = e_ood - eps equals (z_t - sqrt(1 - ab) e_ood) / sqrt(ab)."""
    from nfsd_nerf.guidance.decompose import move_along, noised

    g = torch.Generator().manual_seed(0)
    x, eps, e_ood = (torch.randn(1, 4, 3, 3, generator=g) for _ in range(3))
    ab = 0.3
    one_step = (noised(x, eps, ab) - math.sqrt(1 - ab) * e_ood) / math.sqrt(ab)
    assert torch.allclose(move_along(x, e_ood - eps, ab), one_step, atol=1e-5)


def test_the_default_ood_image_is_the_builtin_negative_look_then_desaturated():
    from nfsd_nerf.guidance.builtin import NEGATIVE_BLUR_SIGMA, NEGATIVE_CONTRAST, blur_matrix, degrade
    from nfsd_nerf.guidance.decompose import degrade_to_ood

    # a constant colour stays constant under blur and contrast; desaturation by hand (luma 0.299)
    red = torch.tensor([1.0, 0.0, 0.0])[None, :, None, None].expand(1, 3, 8, 12)
    out = degrade_to_ood(red)
    assert out.shape == (1, 3, 8, 12)
    assert torch.allclose(out[0, :, 3, 5], torch.tensor([0.299 + 0.5 * 0.701, 0.299 * 0.5, 0.299 * 0.5]), atol=1e-6)
    # on a square image, at saturation 1, it is exactly the built-in prior's degrade()
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = degrade(image, blur_matrix(16, NEGATIVE_BLUR_SIGMA * 16 / 32), NEGATIVE_CONTRAST, 1.0).clamp(0, 1)
    assert torch.allclose(degrade_to_ood(image, saturation=1.0), expected, atol=1e-6)


def test_directions_map_zero_to_grey():
    from nfsd_nerf.guidance.decompose import direction_to_rgb

    d = torch.zeros(2, 3, 4, 4)
    d[0, 0, 0, 0], d[0, 1, 0, 0] = 2.0, -2.0
    rgb = direction_to_rgb(d, quantile=1.0)
    assert rgb[0, 0, 0, 0] == 1.0 and rgb[0, 1, 0, 0] == 0.0 and rgb[0, 2, 1, 1] == 0.5
    assert (rgb[1] == 0.5).all()  # an all-zero direction stays grey


# --------------------------------------------------------------------------- with priors


def test_one_batched_model_call_per_t_with_negative_rows_only_above_the_switch(tmp_path):
    from nfsd_nerf.guidance.decompose import decompose

    prior = StubPrior()
    x_id = torch.rand(1, 4, 3, 2, generator=torch.Generator().manual_seed(0))
    records, rows = decompose(prior, "a hamburger", x_id, x_id * 0.5, [100, 300], negative_prompt="blurry")
    assert [c["prompts"] for c in prior.calls] == [["", "", "a hamburger"], ["", "", "a hamburger", "blurry"]]
    call = prior.calls[1]
    ab = float(prior.alphas_cumprod[300])
    eps = (call["z_t"][0] - math.sqrt(ab) * x_id[0]) / math.sqrt(1 - ab)
    assert torch.allclose(call["z_t"][1], math.sqrt(ab) * x_id[0] * 0.5 + math.sqrt(1 - ab) * eps, atol=1e-5)  # same noise
    assert torch.equal(call["z_t"][1], call["z_t"][2]) and torch.equal(call["t"], torch.tensor([300] * 4))
    # the stub predicts per prompt: dD = 0 (both unconditional), NFSD's estimate = e("") - e("blurry")
    assert records[1]["rms"]["dD"] == 0.0 and records[0]["nfsd_estimate"] == "e(0)"
    assert records[1]["nfsd_estimate"] == "e(0) - e(neg)"
    assert records[1]["rms"]["dD_nfsd"] == pytest.approx(float((prior.e("") - prior.e("blurry")).pow(2).mean().sqrt()))
    assert len(rows) == 2 and rows[0].shape[0] == 7


@pytest.fixture(scope="module")
def small_builtin(tmp_path_factory):
    from nfsd_nerf.guidance.builtin import BuiltinPrior

    return BuiltinPrior(image_size=32, n_references=60, cache_dir=tmp_path_factory.mktemp("refs"))


def test_builtin_in_domain_prediction_is_the_added_noise_at_small_t(small_builtin):
    """The true object from the reference camera nearest to the front is in the prior's set, so the
    optimal denoiser returns it and e(z_t(x_ID); 0) = eps. The residual (measured ~3e-4 at t = 20)
    is the references' float16 cache against the float32 render, amplified by sqrt(ab / (1 - ab)) <= 7.2
    for t >= 20: 1e-3 leaves a factor 3. From the front camera itself (not a reference view) the same
    error is ~0.15 at t = 100, which is why the reference camera is used."""
    from nfsd_nerf.cameras import orbit_cameras
    from nfsd_nerf.guidance.decompose import builtin_in_domain, decompose
    from nfsd_nerf.guidance.shapes import render_object

    x_id, camera, info = builtin_in_domain(small_builtin, "a red cube")
    assert x_id.shape == (1, 3, 32, 32) and info["reference_camera"] == int(small_builtin.neighbours(orbit_cameras(1))[0, 0])
    times = [20, 50, 100, 200]
    records, _ = decompose(small_builtin, "a red cube", x_id, x_id.flip(-1), times, cameras=camera)
    errors = [r["noise_error_in_domain"] for r in records]
    assert max(errors) < 1e-3, errors
    front, _ = render_object("cube", "red", orbit_cameras(1), 32)
    records, _ = decompose(small_builtin, "a red cube", front.permute(0, 3, 1, 2), x_id, [100], cameras=orbit_cameras(1))
    assert records[0]["noise_error_in_domain"] > 0.05


def test_run_writes_the_figure_and_the_report(small_builtin, tmp_path):
    import imageio.v3 as iio

    from nfsd_nerf.guidance.decompose import COLUMNS, run_decomposition

    png, report = run_decomposition(small_builtin, "a blue torus", out_dir=tmp_path / "out", timesteps=[100, 400])
    assert png == tmp_path / "out" / "decomposition.png" and report == tmp_path / "out" / "decomposition.json"
    picture = iio.imread(png)
    assert picture.shape[2] == 3 and picture.shape[1] > len(COLUMNS) * 128 and 2 * 128 < picture.shape[0] < 3 * 128
    data = json.loads(report.read_text())
    assert data["sources"]["in_domain"]["source"] == "built-in truth: blue torus"
    assert "blur" in data["sources"]["ood"] and data["nfsd_threshold"] == 200
    assert [r["t"] for r in data["timesteps"]] == [100, 400]
    for r in data["timesteps"]:
        assert set(r["rms"]) == {"eps", "dN", "dD", "dD_nfsd", "dC"} and -1 <= r["cosine_dD_dD_nfsd"] <= 1
        assert r["noise_error_in_domain"] < 1e-3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["decomposition.json", "decomposition.png"]


def test_decompose_command_with_a_latent_model(tiny_sd_path, tmp_path):
    import imageio.v3 as iio

    pixels = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    iio.imwrite(tmp_path / "id.png", pixels)
    iio.imwrite(tmp_path / "ood.png", pixels // 2)
    result = runner.invoke(app, ["decompose", "a hamburger", "--image", str(tmp_path / "id.png"), "--ood",
                                 str(tmp_path / "ood.png"), "--t", "150,500", "--model", str(tiny_sd_path), "--offline",
                                 "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "a-hamburger" / "decomposition.json").read_text())
    assert data["sources"] == {"in_domain": str(tmp_path / "id.png"), "ood": str(tmp_path / "ood.png")}
    assert [r["nfsd_estimate"] for r in data["timesteps"]] == ["e(0)", "e(0) - e(neg)"]
    picture = iio.imread(tmp_path / "out" / "a-hamburger" / "decomposition.png")
    assert picture.shape[0] > 2 * 64  # two rows of decoded 64 px tiles, enlarged


@pytest.mark.parametrize(
    "args, message",
    [
        (["a red cube", "--model", "builtin", "--t", ""], "--t is empty"),
        (["a red cube", "--model", "builtin", "--t", "100,x"], "integers"),
        (["a red cube", "--model", "builtin", "--t", "100,1000"], "outside the model's schedule"),
        (["a red cube"], "--image is needed"),
        (["", "--model", "builtin"], "prompt is empty"),
        (["blurry, low quality", "--model", "builtin"], "naming one object"),
        (["a hamburger", "--model", "builtin"], "known shape"),
        (["a red cube", "--image", "{tmp}/missing.png"], "file not found"),
        (["a red cube", "--image", "{tmp}/text.png"], "cannot read it as an image"),
        (["a red cube", "--image", "{tmp}/a.png", "--ood", "{tmp}/b.png"], "differ in size"),
        (["a red cube", "--model", "builtin", "--ood", "{tmp}/tiny.png"], "too small"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, tmp_path):
    import imageio.v3 as iio

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    iio.imwrite(inputs / "a.png", np.zeros((32, 32, 3), np.uint8))
    iio.imwrite(inputs / "b.png", np.zeros((32, 16, 3), np.uint8))
    iio.imwrite(inputs / "tiny.png", np.zeros((4, 4, 3), np.uint8))
    (inputs / "text.png").write_text("not a picture")
    out = tmp_path / "out"
    result = runner.invoke(app, ["decompose", *[a.format(tmp=inputs) for a in args], "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()
