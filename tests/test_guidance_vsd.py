"""VSD (ProlificDreamer): the formulas by hand, the LoRA state on the tiny random Stable Diffusion, and
runs through the command line (checkpoint, bitwise resume, export, refusal with the built-in prior).

The distillation contract over every rule (tests/test_guidance_distill.py) gives VSD a stub state;
here the real one, peft adapters on the tiny UNet, is checked.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from test_train_run import FAST, only_run

from nfsd_nerf.cameras import orbit_cameras
from nfsd_nerf.cli import app
from nfsd_nerf.config import GuidanceConfig, PromptsConfig
from nfsd_nerf.errors import UserError
from nfsd_nerf.guidance.distill import ScoreDistillation, stepped_t_max
from nfsd_nerf.guidance.rules import RULES, vsd_grad
from nfsd_nerf.guidance.vsd import CAMERA_DROPOUT, VSDState, camera_condition, diffusion_target

runner = CliRunner()
PROMPT = "a hamburger"


# --------------------------------------------------------------------------- formulas, by hand


def test_vsd_gradient_by_hand():
    """w (e0 + s (ey - e0) - e_lora) per sample, with numbers small enough to check mentally."""
    e_y = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]])  # [2, 1, 1, 2]
    e_0 = torch.tensor([[[[0.5, 1.0]]], [[[0.0, 0.0]]]])
    e_lora = torch.tensor([[[[0.25, 0.0]]], [[[1.0, 1.0]]]])
    weight = torch.tensor([0.5, 2.0])
    # sample 0: e0 + 2 (ey - e0) = [1.5, 3.0]; minus e_lora = [1.25, 3.0]; times 0.5
    # sample 1: [0, -2] - [1, 1] = [-1, -3]; times 2
    expected = torch.tensor([[[[0.625, 1.5]]], [[[-2.0, -6.0]]]])
    assert torch.equal(vsd_grad(e_y, e_0, e_lora, weight, 2.0), expected)
    rule = RULES["vsd"]
    assert rule.needs_unet and rule.state is not None and rule.negative_mask is None
    assert rule.default_scale == 7.5 and rule.default_negative_prompt == "" and rule.negative_replaces_uncond


def test_diffusion_targets_by_hand():
    z0, noise, ab = torch.tensor([[[[2.0]]]]), torch.tensor([[[[1.0]]]]), torch.tensor([0.64])
    assert diffusion_target("epsilon", z0, noise, ab) is noise
    assert torch.allclose(diffusion_target("v_prediction", z0, noise, ab), torch.tensor([[[[0.8 - 0.6 * 2.0]]]]))
    assert diffusion_target("sample", z0, noise, ab) is z0
    with pytest.raises(ValueError, match="flow"):
        diffusion_target("flow", z0, noise, ab)


def test_camera_condition_is_the_camera_to_world_matrix_row_major():
    cams = orbit_cameras(3)
    condition = camera_condition(cams, 3)
    assert condition.shape == (3, 16) and condition.dtype == torch.float32
    assert torch.equal(condition[1, 4:8], cams.c2w[1, 1].float())  # second row of the second camera
    assert torch.equal(camera_condition(cams, 3, drop=True), torch.zeros(3, 16))
    assert torch.equal(camera_condition(None, 2), torch.zeros(2, 16))


def test_t_max_drops_after_the_step():
    assert stepped_t_max(0.98, 0.02, None, 5000, 9000) == 0.98  # off
    assert stepped_t_max(0.98, 0.02, 0.5, 5000, 5000) == 0.98  # threestudio: after, not at
    assert stepped_t_max(0.98, 0.02, 0.5, 5000, 5001) == 0.5
    assert stepped_t_max(0.98, 0.6, 0.5, 5000, 5001) == 0.6  # never below t_min
    assert stepped_t_max(0.98, 0.02, 0.5, 5000, None) == 0.98  # no step (the 2D experiment)


# --------------------------------------------------------------------------- the LoRA state on the tiny SD


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def sd_prior(request, tiny_sd_path, tmp_path_factory):
    """The tiny pipeline (a v-prediction copy for the second parameter), loaded for this module alone:
    VSD puts adapters on its UNet."""
    from nfsd_nerf.guidance import load_prior
    from nfsd_nerf.testing import build_tiny_sd

    path = tiny_sd_path
    if request.param != "epsilon":
        path = build_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v"), prediction_type=request.param)
    prior = load_prior(str(path), device="cpu")
    assert prior.prediction_type == request.param
    return prior


def vsd_settings(prior, **kwargs) -> GuidanceConfig:
    return GuidanceConfig(model=prior.model_id, method="vsd", **kwargs)


def latents(batch: int, seed: int = 99) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_vsd_gradient_is_the_formula_from_separate_predictions(sd_prior, monkeypatch):
    """z.grad * B = w (e0 + 7.5 (ey - e0) - e_lora), each prediction computed again here; three UNet calls
    a step: pretrained (cond + uncond rows), LoRA (cond rows, camera), LoRA training (with a graph)."""
    prior = sd_prior
    guidance = ScoreDistillation(prior, vsd_settings(prior), PromptsConfig(), PROMPT)
    with torch.no_grad():  # a LoRA model that differs from the pretrained one
        generator = torch.Generator().manual_seed(1)
        for p in guidance.state.lora.values():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    before = {k: v.clone() for k, v in guidance.state.state_dict().items()}
    calls, model_output = [], prior.model_output
    monkeypatch.setattr(prior, "model_output", lambda z_t, t, emb, labels=None: calls.append(
        (z_t.clone(), t.clone(), labels, torch.is_grad_enabled())) or model_output(z_t, t, emb, labels))
    cams = orbit_cameras(2)
    z = latents(2).requires_grad_(True)
    prompts = [f"{PROMPT}, front view", f"{PROMPT}, back view"]
    loss, info = guidance.loss_from_latents(z, prompts, cams, 0.0, torch.Generator().manual_seed(3))
    loss.backward()
    monkeypatch.undo()

    assert [len(c[1]) for c in calls] == [4, 2, 2] and [c[3] for c in calls] == [False, False, True]
    assert calls[0][2] is None and torch.equal(calls[1][2], camera_condition(cams, 2))
    z_t, t = calls[0][0][:2], calls[0][1][:2]
    assert torch.equal(calls[1][0], z_t) and torch.equal(calls[1][1], t)
    assert set(info["state_losses"]) == {"lora"} and math.isfinite(float(info["state_losses"]["lora"]))
    trained = guidance.state.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before), "the LoRA model took a step"

    guidance.state.load_state_dict(before)  # the prediction the rule used came before that step
    with torch.no_grad():
        e_y = prior.predict_noise(z_t, t, prior.embed(prompts))
        e_0 = prior.predict_noise(z_t, t, prior.embed(["", ""]))
        with prior.lora(guidance.state.camera_embedding):
            out = prior.unet(z_t, t, encoder_hidden_states=prior.embed([PROMPT] * 2),
                             class_labels=cams.c2w.reshape(2, 16)).sample
    ab = prior.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    e_lora = ab.sqrt() * out + (1 - ab).sqrt() * z_t if prior.prediction_type == "v_prediction" else out
    assert not torch.allclose(e_lora, e_y, atol=1e-3)
    expected = (1 - ab) * (e_0 + 7.5 * (e_y - e_0) - e_lora)
    assert torch.allclose(z.grad * 2, expected, atol=1e-5, rtol=1e-4)


def test_the_pretrained_side_stays_pretrained(tiny_sd_path):
    """Adapters and camera embedding act only inside the LoRA context, even after training."""
    from nfsd_nerf.guidance import load_prior

    prior, z_t, t = load_prior(str(tiny_sd_path), device="cpu"), latents(2), torch.tensor([100, 700])
    assert not getattr(prior.unet, "peft_config", None), "a UNet without adapters to compare with"
    embeddings = prior.embed([PROMPT, ""])
    with torch.no_grad():
        pretrained = prior.predict_noise(z_t, t, embeddings)
        state = VSDState(prior, vsd_settings(prior, lora_lr=1e-2))
        for _ in range(3):
            state.train(z_t, [PROMPT] * 2, orbit_cameras(2), torch.Generator().manual_seed(0))
        assert torch.equal(prior.predict_noise(z_t, t, embeddings), pretrained)
        assert prior.unet.class_embedding is None
        assert not torch.allclose(state.predict(z_t, t, [PROMPT, ""], orbit_cameras(2)), pretrained, atol=1e-4)


def test_lora_loss_decreases_on_a_fixed_latent(sd_prior):
    """The same draws each step (re-seeded generator): the diffusion loss of that sample falls."""
    state = VSDState(sd_prior, vsd_settings(sd_prior, lora_lr=1e-2))
    z, cams = latents(1), orbit_cameras(1)
    losses = [float(state.train(z, [PROMPT], cams, torch.Generator().manual_seed(0))["lora"]) for _ in range(6)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses


def test_camera_condition_is_dropped_about_one_step_in_ten(tiny_prior, monkeypatch):
    """One draw per training step from the run's generator: seeded, so the count is fixed. The UNet is
    replaced by a cheap stand-in that records its camera condition (the count is under test)."""
    state = VSDState(tiny_prior, vsd_settings(tiny_prior))
    labels = []
    monkeypatch.setattr(tiny_prior, "model_output", lambda z_t, t, emb, c=None: labels.append(c) or (
        z_t + 0.0 * state.camera_embedding(c).sum()))
    cams, generator, steps = orbit_cameras(2), torch.Generator().manual_seed(0), 400
    for _ in range(steps):
        state.train(latents(2), [PROMPT] * 2, cams, generator)
    dropped = [bool((c == 0).all()) for c in labels]
    assert len(labels) == steps
    assert all(torch.equal(c, camera_condition(cams, 2)) for c, d in zip(labels, dropped) if not d)
    assert abs(sum(dropped) / steps - CAMERA_DROPOUT) < 0.03, sum(dropped)


def test_saved_state_must_match(tiny_prior):
    state = VSDState(tiny_prior, vsd_settings(tiny_prior))
    state.train(latents(1), [PROMPT], orbit_cameras(1), torch.Generator().manual_seed(0))
    saved = state.state_dict()
    assert {k.split(".")[0] for k in saved} == {"lora", "camera_embedding", "optimizer"}
    other = VSDState(tiny_prior, vsd_settings(tiny_prior, lora_rank=2))
    with pytest.raises(UserError, match="lora_rank"):
        other.load_state_dict(saved)
    with pytest.raises(RuntimeError, match="newer VSD state"):  # `other` replaced its adapters
        state.predict(latents(1), torch.tensor([10]), [PROMPT], None)


def test_the_2d_experiment_runs_vsd(tiny_prior, tmp_path):
    """The LoRA model learns the one optimised latent, from the front camera."""
    from nfsd_nerf.guidance.image import optimize_image

    path = optimize_image(tiny_prior, PROMPT, vsd_settings(tiny_prior), steps=3, out_dir=tmp_path, n_snapshots=2)
    assert path.name == "vsd-s7.5.png" and path.is_file()
    assert json.loads(path.with_suffix(".json").read_text())["method"] == "vsd"


def test_vsd_needs_a_unet():
    from guidance_helpers import StubPrior

    with pytest.raises(UserError, match="has none"):
        ScoreDistillation(StubPrior(), GuidanceConfig(method="vsd"))
    with pytest.raises(UserError, match="built-in prior has none"):
        ScoreDistillation(StubPrior(), GuidanceConfig(method="vsd", model="builtin"))


# --------------------------------------------------------------------------- through the command line


def vsd_args(tiny_sd_path, out, steps):
    return ["train", PROMPT, "--model", str(tiny_sd_path), "--offline", "--guidance", "vsd",
            "--config", "configs/cpu-tiny.yaml", "--size", "32", "--steps", str(steps), "--out", str(out),
            "--set", "train.log_every=1", "--set", "train.preview_every=0", *FAST]


def test_vsd_run_checkpoints_its_state_resumes_bitwise_and_exports(tiny_sd_path, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    result = runner.invoke(app, vsd_args(tiny_sd_path, straight, 4))
    assert result.exit_code == 0, result.output
    run = only_run(straight)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["guidance"] == "vsd" and summary["scale"] == 7.5 and summary["skipped_steps"] == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())["guidance"]
    assert cfg["lora_rank"] == 4 and cfg["lora_lr"] == 1e-4 and cfg["negative_prompt"] == ""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(line["loss_lora"]) for line in lines) and len(lines) == 4
    a = load_file(run / "checkpoints" / "final.safetensors")
    rule = {k for k in a if k.startswith("rule.")}
    assert {k.split(".")[1] for k in rule} == {"lora", "camera_embedding", "optimizer"}
    assert "rule.optimizer.0.step" in rule and float(a["rule.optimizer.0.step"]) == 4

    assert runner.invoke(app, vsd_args(tiny_sd_path, split, 2)).exit_code == 0
    resumed = only_run(split)
    result = runner.invoke(app, ["train", "--resume", str(resumed), "--steps", "4"])
    assert result.exit_code == 0, result.output
    b = load_file(resumed / "checkpoints" / "final.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    result = runner.invoke(app, ["export", str(run), "--format", "ply", "--resolution", "32", "--threshold", "0.5"])
    assert result.exit_code == 0, result.output
    assert (run / "export" / "mesh.ply").is_file()


def test_a_vsd_checkpoint_without_its_state_is_refused(tiny_sd_path, tmp_path):
    from safetensors.torch import save_file

    assert runner.invoke(app, vsd_args(tiny_sd_path, tmp_path, 1)).exit_code == 0
    run = only_run(tmp_path)
    latest = run / "checkpoints" / "latest.safetensors"
    from nfsd_nerf.checkpoint import read_checkpoint

    ckpt = read_checkpoint(latest)
    save_file({k: v for k, v in ckpt.tensors.items() if not k.startswith("rule.")}, latest, metadata=ckpt.meta)
    result = runner.invoke(app, ["train", "--resume", str(run), "--steps", "2"])
    assert result.exit_code == 2 and "no rule.* tensors" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", ["train", "image"])
def test_vsd_with_the_builtin_prior_is_refused_before_a_folder_exists(command, tmp_path):
    result = runner.invoke(app, [command, "a red cube", "--model", "builtin", "--guidance", "vsd",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "built-in prior has none" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vsd_on_cuda_keeps_fp32_adapters_on_the_fp16_unet(tiny_sd_path):
    from nfsd_nerf.guidance import load_prior

    prior = load_prior(str(tiny_sd_path), device="cuda")
    assert prior.dtype == torch.float16
    guidance = ScoreDistillation(prior, vsd_settings(prior), PromptsConfig(), PROMPT)
    assert all(p.dtype == torch.float32 and p.is_cuda for p in guidance.state.parameters)
    z = latents(2).cuda().requires_grad_(True)
    for step in range(3):
        loss, info = guidance.loss_from_latents(z, [PROMPT] * 2, orbit_cameras(2, device="cuda"), 0.0,
                                                torch.Generator().manual_seed(step))
        loss.backward()
        assert torch.isfinite(z.grad).all() and math.isfinite(float(info["state_losses"]["lora"]))
    assert float(guidance.state.optimizer.state_dict()["state"][0]["step"]) == 3
