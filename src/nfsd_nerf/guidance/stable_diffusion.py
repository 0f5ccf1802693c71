"""Stable Diffusion (1.x / 2.x) as a :class:`~nfsd_nerf.guidance.prior.DiffusionPrior`, via diffusers.

:func:`load_stable_diffusion` finds the model's files with :func:`.hub.resolve_model_folder`
(a local folder, the Hugging Face cache, then the hub under a hard deadline; never waiting on a
silent network) and loads its five components from that folder, refusing pipelines this prior
cannot drive. fp16 runs read the ``*.fp16.safetensors`` variant where there is one
(:func:`.hub.weight_variants`); the prior records the files it read in ``weight_files``. Every
failure is a one-line :class:`~nfsd_nerf.errors.UserError`.

diffusers, transformers and huggingface_hub are imported inside functions: importing this module
is cheap.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .hub import Variants, first_line, resolve_model_folder, weight_files, weight_variants
from .loss_scale import GradientScaler
from .prior import DiffusionPrior, eps_from_sample_prediction, eps_from_v_prediction

if TYPE_CHECKING:
    from ..cameras import Cameras


# --------------------------------------------------------------------------- the prior

LORA_ADAPTER = "vsd"
"""Name of the peft adapter :meth:`StableDiffusionPrior.add_lora` puts on the UNet."""


class StableDiffusionPrior(DiffusionPrior):
    """Latent-space prior: VAE latents [B, 4, S/8, S/8], CLIP text embeddings, UNet noise prediction.

    ``S`` (the VAE's input size) is implied by the pipeline's own config: ``unet.sample_size *
    vae_scale_factor`` (512 for SD 2.1-base). Text embeddings are cached per prompt; on CUDA the
    text encoder is moved back to CPU memory after each embedding (and returns, once, for each
    batch of new prompts), so it holds no GPU memory during training.
    """

    weight_files: tuple[str, ...] = ()
    """The weight files loaded (``unet/diffusion_pytorch_model.fp16.safetensors``, ...), for the summary;
    empty for pipelines built in memory."""

    def __init__(self, *, unet, vae, text_encoder, tokenizer, scheduler, model_id: str, revision: str | None,
                 device: torch.device | str, dtype: torch.dtype):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.model_id, self.revision = model_id, revision
        self.device, self.dtype = torch.device(device), dtype
        self.prediction_type: str = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise UserError(f"model {model_id!r}: unsupported scheduler prediction_type {self.prediction_type!r}")
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_size = int(unet.config.sample_size) * self.vae_scale_factor
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self._embeddings: dict[str, Tensor] = {}
        self._warned_truncation = False
        self._offload_text_encoder = self.device.type == "cuda"
        self._memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.grad_scaler = GradientScaler() if dtype == torch.float16 else None
        self._lora_layers: list[torch.nn.Module] = []

    @classmethod
    def from_folder(cls, folder: Path, *, model_id: str, revision: str | None, device: torch.device | str = "cpu",
                    half_precision: bool = True) -> "StableDiffusionPrior":
        """Load the five components from a diffusers folder (no network); fp16 only on CUDA, from the
        fp16 weight files where the folder has them."""
        device, folder = torch.device(device), Path(folder)
        dtype = torch.float16 if (device.type == "cuda" and half_precision) else torch.float32
        variants = weight_variants(folder, half_precision, device)
        unet, vae, text_encoder, tokenizer, scheduler = _load_components(folder, model_id, dtype, variants)
        _check_compatible(unet, vae, text_encoder, model_id)
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False).eval()
        # SDPA is diffusers' default attention on torch 2; channels-last helps convolutions on GPUs.
        memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        unet.to(device, memory_format=memory_format)
        vae.to(device, memory_format=memory_format)
        text_encoder.to("cpu" if device.type == "cuda" else device)  # joins the GPU only to embed
        prior = cls(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                    model_id=model_id, revision=revision, device=device, dtype=dtype)
        prior.weight_files = tuple(weight_files(folder, variants))
        return prior

    # ---- DiffusionPrior

    def encode(self, rgb: Tensor) -> Tensor:
        """rgb [B, 3, H, W] in [0, 1] -> latents [B, 4, S/8, S/8] float32 (bilinear resize to S first).

        Uses the posterior's mean, not a sample: deterministic, so runs are reproducible from the seed.
        """
        size = (self.image_size, self.image_size)
        x = rgb if tuple(rgb.shape[-2:]) == size else F.interpolate(rgb, size, mode="bilinear", align_corners=False)
        x = (x * 2.0 - 1.0).to(self.device)
        if self.grad_scaler is not None and torch.is_grad_enabled() and x.requires_grad:
            return self.grad_scaler.around(self._encode, x)  # fp16: keep the small gradient representable
        return self._encode(x)

    def _encode(self, x: Tensor) -> Tensor:
        """x [B, 3, S, S] in [-1, 1] -> scaled latents float32, through the VAE in the model's dtype."""
        x = x.to(self.dtype).contiguous(memory_format=self._memory_format)
        z = self.vae.encode(x).latent_dist.mean
        return ((z.float() - self.shift_factor) * self.scaling_factor).contiguous()

    def decode(self, z: Tensor) -> Tensor:
        """latents [B, 4, h, w] -> rgb [B, 3, 8h, 8w] float32 in [0, 1]."""
        z = (z.float() / self.scaling_factor + self.shift_factor).to(self.device, self.dtype)
        x = self.vae.decode(z).sample
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def embed(self, prompts: Sequence[str]) -> Tensor:
        """N prompts -> CLIP hidden states [N, 77, D] in the model's dtype; each prompt is encoded once."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._embeddings]
        if new:
            self._embed_new(new)
        return torch.stack([self._embeddings[p] for p in prompts])

    def predict_noise(self, z_t: Tensor, t: Tensor, embeddings: Tensor, cameras: "Cameras | None" = None) -> Tensor:
        """eps [N, 4, h, w] float32 for ``z_t`` [N, 4, h, w] and integer ``t`` [N]; ``cameras`` is ignored.

        v- and sample-prediction models are converted to epsilon exactly.
        """
        return self.eps_from_output(self.model_output(z_t, t, embeddings), z_t, t)

    # ---- LoRA hooks (VSD, guidance/vsd.py): the raw UNet, adapters, a class embedding

    def model_output(self, z_t: Tensor, t: Tensor, embeddings: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """The UNet's raw output [N, 4, h, w] float32 (epsilon, v or sample: ``prediction_type``) for
        ``z_t`` [N, 4, h, w], integer ``t`` [N]; differentiable in trainable weights when grad is on.
        ``class_labels`` [N, D] feed a class embedding set by :meth:`lora` (VSD's camera condition)."""
        t = t.to(self.device)
        z_in = z_t.to(self.device, self.dtype).contiguous(memory_format=self._memory_format)
        extra = {} if class_labels is None else {"class_labels": class_labels.to(self.device)}
        return self.unet(z_in, t, encoder_hidden_states=embeddings.to(self.device, self.dtype), **extra).sample.float()

    def eps_from_output(self, out: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """:meth:`model_output` [N, 4, h, w] -> epsilon [N, 4, h, w] float32 (exact conversions)."""
        t = t.to(self.device)
        if self.prediction_type == "v_prediction":
            return eps_from_v_prediction(out, z_t.float(), self.alphas_cumprod[t])
        if self.prediction_type == "sample":
            return eps_from_sample_prediction(out, z_t.float(), self.alphas_cumprod[t])
        return out

    def add_lora(self, rank: int) -> dict[str, torch.nn.Parameter]:
        """Fresh LoRA adapters of rank ``rank`` on every attention projection (to_q, to_k, to_v,
        to_out.0) of the UNet, replacing earlier ones (a batch worker reuses its prior); returns
        {name: parameter}, fp32 even on an fp16 UNet (Adam's small steps survive).

        Scale 1 (alpha = rank) and A ~ N(0, 1/rank^2), B = 0, as diffusers' LoRA attention processors
        that threestudio's VSD uses: the adapted UNet starts equal to the pretrained one. Adapters
        stay off outside :meth:`lora`, so :meth:`predict_noise` is always the pretrained model.
        """
        from peft import LoraConfig
        from peft.tuners.tuners_utils import BaseTunerLayer, cast_adapter_dtype

        unet = self.unet
        if LORA_ADAPTER in (getattr(unet, "peft_config", None) or {}):
            unet.delete_adapters(LORA_ADAPTER)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=LORA_ADAPTER)
        cast_adapter_dtype(unet, LORA_ADAPTER)
        # unet.enable_adapters() walks every module; toggling the adapted layers alone is 3x cheaper
        self._lora_layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        self._toggle_lora(False)
        return {name: p for name, p in unet.named_parameters() if f".{LORA_ADAPTER}." in name}

    @contextmanager
    def lora(self, class_embedding: torch.nn.Module):
        """Within: the UNet runs with the adapters of :meth:`add_lora` and ``class_embedding`` (its
        ``class_labels`` input); outside, the pretrained UNet, whatever happens inside."""
        if not self._lora_layers:
            raise RuntimeError("no LoRA adapters: call add_lora first")
        unet, previous = self.unet, self.unet.class_embedding
        self._toggle_lora(True)
        unet.class_embedding = class_embedding
        try:
            yield
        finally:
            unet.class_embedding = previous
            self._toggle_lora(False)

    def _toggle_lora(self, enabled: bool) -> None:
        """What ``unet.enable_adapters()`` / ``disable_adapters()`` do, on the adapted layers only."""
        for layer in self._lora_layers:
            layer.enable_adapters(enabled)

    # ---- text

    @torch.no_grad()
    def _embed_new(self, prompts: list[str]) -> None:
        max_length = self.tokenizer.model_max_length
        tokens = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="pt")
        if not self._warned_truncation:
            lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False, verbose=False).input_ids]
            too_long = [p for p, n in zip(prompts, lengths) if n > max_length]
            if too_long:
                self._warned_truncation = True
                warnings.warn(
                    f"prompt {too_long[0]!r} is longer than the text encoder's {max_length} tokens and is "
                    "truncated (so is any view suffix after the cut); shorten it", stacklevel=3)
        if self._offload_text_encoder:
            self.text_encoder.to(self.device)
        try:
            hidden = self.text_encoder(tokens.input_ids.to(self.device))[0].to(self.dtype)
        finally:
            if self._offload_text_encoder:
                self.text_encoder.to("cpu")
        for prompt, h in zip(prompts, hidden):
            self._embeddings[prompt] = h


def _load_components(folder: Path, model_id: str, dtype: torch.dtype, variants: Variants | None = None):
    """UNet, VAE, text encoder, tokenizer and scheduler from a complete local folder; ``variants`` names
    each component's weight files (None: the plain ones)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.utils import is_accelerate_available
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    # accelerate is optional: loading the full-size folder peaks at the same RSS with and without it
    # (README, "Which model"); asking for low_cpu_mem_usage without it only makes diffusers warn.
    low_mem = is_accelerate_available()
    variant = (variants or {}).get
    loaders: dict[str, Callable[[], Any]] = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", torch_dtype=dtype, use_safetensors=True, local_files_only=True,
            variant=variant("unet"), low_cpu_mem_usage=low_mem),
        "vae": lambda: AutoencoderKL.from_pretrained(
            folder, subfolder="vae", torch_dtype=dtype, use_safetensors=True, local_files_only=True,
            variant=variant("vae"), low_cpu_mem_usage=low_mem),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(
            folder, subfolder="text_encoder", dtype=dtype, use_safetensors=True, local_files_only=True,
            variant=variant("text_encoder")),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
        # DDPMScheduler reads any DDPM-family config (PNDM, DDIM, ...): only the training schedule is used.
        "scheduler": lambda: DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True),
    }
    loaded = []
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a local load takes seconds: no per-tensor progress bar
    try:
        for name, load in loaders.items():
            try:
                loaded.append(load())
            except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
                raise UserError(f"model {model_id!r}: cannot load its {name} from {folder}: "
                                f"{first_line(exc)}") from None
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    return loaded


def _check_compatible(unet, vae, text_encoder, model_id: str) -> None:
    """Refuse pipelines this prior cannot drive (SDXL extra conditioning, inpainting UNets...)."""
    if getattr(unet.config, "addition_embed_type", None) is not None:
        raise UserError(f"model {model_id!r} needs extra UNet conditioning "
                        f"({unet.config.addition_embed_type!r}, e.g. SDXL); use a Stable Diffusion 1.x/2.x model")
    if unet.config.in_channels != vae.config.latent_channels:
        raise UserError(f"model {model_id!r}: its UNet takes {unet.config.in_channels} channels but the VAE makes "
                        f"{vae.config.latent_channels} (an inpainting or depth model?); use a text-to-image model")
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise UserError(f"model {model_id!r}: UNet cross-attention width {unet.config.cross_attention_dim} does "
                        f"not match the text encoder's {text_encoder.config.hidden_size}")


# --------------------------------------------------------------------------- loading


def load_stable_diffusion(model: str, *, revision: str | None = None, device: torch.device | str = "cpu",
                          half_precision: bool = True, offline: bool = False) -> StableDiffusionPrior:
    """Find ``model`` (folder, cache, then hub; see :mod:`.hub`) and load it on ``device``."""
    resolved = resolve_model_folder(model, revision=revision, offline=offline, half_precision=half_precision,
                                    device=device)
    return StableDiffusionPrior.from_folder(resolved.folder, model_id=resolved.model_id, revision=resolved.revision,
                                            device=device, half_precision=half_precision)
