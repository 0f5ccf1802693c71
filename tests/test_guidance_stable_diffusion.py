"""Stable Diffusion prior: the tiny random pipeline loaded as a user's folder, shapes, dtypes and
schedule, which weight files load (fp16 variant or plain), exact v -> epsilon conversion, prompt
handling, and distillation through it.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from nfsd_nerf.config import GuidanceConfig
from nfsd_nerf.guidance import load_prior
from nfsd_nerf.guidance.distill import ScoreDistillation
from nfsd_nerf.guidance.hub import weight_variants
from nfsd_nerf.guidance.prior import eps_from_sample_prediction, eps_from_v_prediction
from nfsd_nerf.guidance.stable_diffusion import _load_components


def sd_alphas_cumprod_float64(n: int = 1000) -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


# --------------------------------------------------------------------------- the prior


def test_tiny_prior_shapes_dtypes_and_schedule(tiny_prior, tiny_sd_path):
    prior = tiny_prior
    assert prior.model_id == str(tiny_sd_path.resolve()) and prior.revision is None
    assert prior.image_size == 64 and prior.dtype == torch.float32
    assert prior.alphas_cumprod.dtype == torch.float32 and prior.alphas_cumprod.shape == (1000,)
    assert torch.allclose(prior.alphas_cumprod.double(), sd_alphas_cumprod_float64(), atol=1e-6)

    rgb = torch.rand(2, 3, 64, 64, requires_grad=True)
    z = prior.encode(rgb)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    z.sum().backward()  # the VAE encoder is differentiated
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0

    emb = prior.embed(["a cat", "", "a cat"])
    assert emb.shape == (3, 77, 32) and emb.dtype == torch.float32
    assert torch.equal(emb[0], emb[2]) and not torch.equal(emb[0], emb[1])

    eps = prior.predict_noise(torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), emb)
    assert eps.shape == (3, 4, 8, 8) and eps.dtype == torch.float32 and torch.isfinite(eps).all()

    rgb_out = prior.decode(z.detach())
    assert rgb_out.shape == (2, 3, 64, 64) and rgb_out.min() >= 0 and rgb_out.max() <= 1


PLAIN = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
         "text_encoder/model.safetensors")
FP16 = ("unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors")


@pytest.fixture(scope="module")
def marked_fp16_folder(tiny_sd_path, tmp_path_factory):
    """The tiny pipeline plus an fp16 variant whose weights are the plain ones + 1, so a load shows which it read."""
    folder = tmp_path_factory.mktemp("fp16") / "tiny-sd"
    shutil.copytree(tiny_sd_path, folder)
    unet, vae, text_encoder = _load_components(folder, "tiny", torch.float32)[:3]
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(1)
        model.half().save_pretrained(folder / name, variant="fp16")
    return folder


def _first_unet_weight(modules) -> torch.Tensor:
    return next(modules[0].parameters()).detach()


def test_fp16_runs_load_the_fp16_variant(marked_fp16_folder, tiny_sd_path):
    variants = weight_variants(marked_fp16_folder, True, "cuda")
    assert set(variants.values()) == {"fp16"}
    fp16 = _load_components(marked_fp16_folder, "tiny", torch.float16, variants)  # what a CUDA run loads, on the CPU
    plain = _load_components(tiny_sd_path, "tiny", torch.float32)
    assert _first_unet_weight(fp16).dtype == torch.float16
    assert torch.equal(_first_unet_weight(fp16), (_first_unet_weight(plain) + 1).half())  # the variant's weights
    for fp16_module, plain_module in zip(fp16[:3], plain[:3]):
        assert all(p.dtype == torch.float16 for p in fp16_module.parameters())
        assert sum(p.numel() for p in fp16_module.parameters()) == sum(p.numel() for p in plain_module.parameters())


def test_fp32_runs_and_folders_without_a_variant_load_the_plain_files(marked_fp16_folder, tiny_sd_path):
    prior = load_prior(str(marked_fp16_folder), device="cpu")  # fp32 on a CPU although an fp16 variant exists
    plain = _load_components(tiny_sd_path, "tiny", torch.float32)
    assert prior.dtype == torch.float32 and prior.weight_files == PLAIN
    assert torch.equal(next(prior.unet.parameters()), _first_unet_weight(plain))
    # No variant: an fp16 run casts the plain files.
    variants = weight_variants(tiny_sd_path, True, "cuda")
    assert set(variants.values()) == {None}
    cast = _load_components(tiny_sd_path, "tiny", torch.float16, variants)
    assert torch.equal(_first_unet_weight(cast), _first_unet_weight(plain).half())


def test_summary_records_the_weight_files_and_dtype(tiny_sd_path, tmp_path):
    from typer.testing import CliRunner

    from nfsd_nerf.cli import app

    out = tmp_path / "outputs"
    result = CliRunner().invoke(app, [
        "train", "a hamburger", "--model", str(tiny_sd_path), "--offline", "--config", "configs/cpu-tiny.yaml",
        "--steps", "1", "--size", "32", "--out", str(out), "--set", "field.n_levels=4",
        "--set", "field.log2_hashmap_size=12", "--set", "render.n_samples=16",
    ])
    assert result.exit_code == 0, result.output
    (run,) = out.iterdir()
    model = json.loads((run / "summary.json").read_text())["model"]
    assert model["dtype"] == "float32" and model["weight_files"] == list(PLAIN)


def test_encode_resizes_bilinearly_to_the_vae_resolution(tiny_prior):
    rgb = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        direct = tiny_prior.encode(rgb)
        by_hand = tiny_prior.encode(F.interpolate(rgb, (64, 64), mode="bilinear", align_corners=False))
        # Also by hand: VAE mean of 2x - 1, times the scaling factor.
        raw = tiny_prior.vae.encode(F.interpolate(rgb, (64, 64), mode="bilinear") * 2 - 1).latent_dist.mean
    assert torch.allclose(direct, by_hand, atol=1e-6)
    assert torch.allclose(direct, raw * 0.18215, atol=1e-6)


def test_embeddings_are_computed_once_per_prompt(tiny_prior):
    calls = []
    handle = tiny_prior.text_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        tiny_prior.embed(["cached once?", "cached once?", "another"])
        tiny_prior.embed(["cached once?", "another"])
    finally:
        handle.remove()
    assert calls == [2]


def test_long_prompt_warns_once_that_it_is_truncated(tiny_sd_path):
    prior = load_prior(str(tiny_sd_path))
    with pytest.warns(UserWarning, match="truncated"):
        prior.embed(["x" * 200 + ", front view"])  # the tiny tokenizer has one token per character
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prior.embed(["a short prompt", "y" * 200])  # no second warning


def test_v_prediction_is_converted_to_epsilon(tiny_sd_path, tmp_path):
    folder = tmp_path / "tiny-v"
    shutil.copytree(tiny_sd_path, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "v_prediction"
    config_path.write_text(json.dumps(config))
    prior = load_prior(str(folder))
    assert prior.prediction_type == "v_prediction"

    z_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    emb = prior.embed(["a", "b"])
    with torch.no_grad():
        v = prior.unet(z_t, t, encoder_hidden_states=emb).sample
        eps = prior.predict_noise(z_t, t, emb)
    ab = sd_alphas_cumprod_float64()[t].reshape(2, 1, 1, 1)
    expected = ab.sqrt() * v.double() + (1 - ab).sqrt() * z_t.double()
    assert torch.allclose(eps.double(), expected, atol=1e-5)


def test_v_and_sample_conversions_recover_the_noise():
    """With z_t = sqrt(ab) x + sqrt(1-ab) eps and v = sqrt(ab) eps - sqrt(1-ab) x, both recover eps."""
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, 5, generator=g,
                                                                                     dtype=torch.float64)
    ab = torch.tensor([0.999, 0.5, 0.01], dtype=torch.float64)
    a = ab.reshape(3, 1, 1, 1)
    z_t = a.sqrt() * x + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x
    assert torch.allclose(eps_from_v_prediction(v, z_t, ab), eps, atol=1e-12)
    assert torch.allclose(eps_from_sample_prediction(x, z_t, ab), eps, atol=1e-9)


def test_distillation_runs_through_the_tiny_pipeline(tiny_prior):
    guidance = ScoreDistillation(tiny_prior, GuidanceConfig(method="nfsd"))
    rgb = torch.rand(2, 3, 64, 64, requires_grad=True)
    loss, info = guidance.loss(rgb, ["a cat, front view", "a cat, back view"], None, 0.0,
                               torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.ndim == 0 and len(info["t"]) == 2 and info["grad_norm"] > 0
    assert rgb.grad.shape == rgb.shape and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_half_precision_and_text_encoder_offload(tiny_sd_path):
    prior = load_prior(str(tiny_sd_path), device="cuda", half_precision=True)
    assert prior.dtype == torch.float16 and next(prior.unet.parameters()).dtype == torch.float16
    assert prior.weight_files == PLAIN  # no fp16 variant in this folder: the plain files, cast
    assert prior.alphas_cumprod.device.type == "cuda" and prior.alphas_cumprod.dtype == torch.float32
    emb = prior.embed(["a cat", ""])
    assert emb.device.type == "cuda" and emb.dtype == torch.float16
    assert next(prior.text_encoder.parameters()).device.type == "cpu"  # released after embedding
    rgb = torch.rand(2, 3, 48, 48, device="cuda", requires_grad=True)
    guidance = ScoreDistillation(prior, GuidanceConfig())
    loss, info = guidance.loss(rgb, ["a cat", "a dog"], None, 0.0, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    cpu_prior = load_prior(str(tiny_sd_path), device="cpu")
    z_t = torch.randn(2, 4, 8, 8)
    t = torch.tensor([30, 800])
    with torch.no_grad():
        fast = prior.predict_noise(z_t.cuda(), t.cuda(), prior.embed(["a", "b"])).cpu()
        reference = cpu_prior.predict_noise(z_t, t, cpu_prior.embed(["a", "b"]))
    assert fast.dtype == torch.float32 and torch.allclose(fast, reference, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_run_reads_the_fp16_variant(marked_fp16_folder, tiny_sd_path):
    prior = load_prior(str(marked_fp16_folder), device="cuda", half_precision=True)
    assert prior.weight_files == FP16 and prior.dtype == torch.float16
    plain = _load_components(tiny_sd_path, "tiny", torch.float32)
    assert torch.equal(next(prior.unet.parameters()).cpu(), (_first_unet_weight(plain) + 1).half())
    assert load_prior(str(marked_fp16_folder), device="cuda", half_precision=False).weight_files == PLAIN
