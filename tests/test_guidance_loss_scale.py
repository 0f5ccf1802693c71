"""Loss scaling of the fp16 encoder's backward: the underflow it fixes, reproduced on the CPU."""

import pytest
import torch

from nfsd_nerf.guidance.loss_scale import GradientScaler
from nfsd_nerf.guidance.stable_diffusion import StableDiffusionPrior, _load_components


def _prior(folder, dtype) -> StableDiffusionPrior:
    """The tiny pipeline in ``dtype`` on the CPU (``from_folder`` keeps fp32 on a CPU, so build it here)."""
    unet, vae, text_encoder, tokenizer, scheduler = _load_components(folder, "tiny", dtype)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    return StableDiffusionPrior(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                scheduler=scheduler, model_id="tiny", revision=None, device="cpu", dtype=dtype)


def _pixel_gradient(prior, upstream: torch.Tensor) -> torch.Tensor:
    rgb = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    (prior.encode(rgb) * upstream).sum().backward()
    return rgb.grad.double()


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def priors(tiny_sd_path):
    return _prior(tiny_sd_path, torch.float32), _prior(tiny_sd_path, torch.float16)


def test_fp16_encoder_gradient_underflows_without_scaling_and_not_with_it(priors):
    """A latent gradient of ~1e-6 (w(t) ~ 0.02 times a small guidance gradient per element) is
    mostly lost in an fp16 backward; scaled by 2^16 it comes back within 1% of fp32."""
    p32, p16 = priors
    assert p32.grad_scaler is None and p16.grad_scaler is not None
    upstream = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 1e-6
    reference = _pixel_gradient(p32, upstream)

    scaler, p16.grad_scaler = p16.grad_scaler, None
    unscaled = _pixel_gradient(p16, upstream)
    p16.grad_scaler = scaler
    assert _relative_error(unscaled, reference) > 0.5  # the underflow, reproduced
    assert (unscaled == 0).float().mean() > 0.1

    scaled = _pixel_gradient(p16, upstream)
    assert _relative_error(scaled, reference) < 0.01
    assert not bool(p16.grad_scaler.found_inf)


def test_an_overflow_is_detected_on_the_unscaled_side(priors):
    _, p16 = priors
    p16.grad_scaler.scale = 2.0**40  # far too large: the fp16 backward overflows
    try:
        _pixel_gradient(p16, torch.ones(1, 4, 8, 8))
        assert bool(p16.grad_scaler.found_inf)
    finally:
        p16.grad_scaler.scale = 2.0**16


def test_scale_halves_on_overflow_and_doubles_after_clean_steps():
    scaler = GradientScaler(init_scale=1024.0, growth_interval=3, min_scale=256.0, max_scale=2048.0)
    scaler.update(True)
    assert scaler.scale == 512.0
    for _ in range(3):
        scaler.update(False)
    assert scaler.scale == 1024.0 and scaler.clean_steps == 0
    for _ in range(7):
        scaler.update(False)
    assert scaler.scale == 2048.0  # capped
    for _ in range(5):
        scaler.update(True)
    assert scaler.scale == 256.0  # floored
    other = GradientScaler()
    other.load_state(scaler.state())
    assert other.scale == 256.0 and other.clean_steps == scaler.clean_steps


def test_gradient_through_the_pair_is_exact_in_full_precision():
    scaler = GradientScaler(init_scale=8.0)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = scaler.around(lambda v: (v * 3.0).double(), x)
    y.sum().backward()
    assert torch.allclose(x.grad.double(), torch.full((5,), 3.0, dtype=torch.float64))  # scaled by 8, unscaled by 8
