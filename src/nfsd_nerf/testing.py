"""Random-weight Stable Diffusion pipelines for tests and benchmarks (no download needed).

* :func:`build_tiny_sd` saves a tiny pipeline with the real layout (docs/design.md, section 6), ~4.5 MB,
  that loads through the same path as a user's folder.
* :func:`build_full_size_sd_prior` builds the full SD 2.1-base architecture with random weights
  directly on a device: the same arithmetic as the real model, for speed and memory benchmarks;
  :func:`save_full_size_sd` saves it as a folder, to exercise loading (fp16 variant files included).
* :func:`save_fp16_variant` adds ``*.fp16.safetensors`` to a saved pipeline, as hub repositories ship them.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch

from .guidance.rules import PAPER_NEGATIVE_PROMPT


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-character table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_byte_level_clip_vocab(folder: Path, words: list[str] = ()) -> tuple[Path, Path]:
    """A CLIP BPE vocabulary where every byte is a token (ids 0-511), plus BOS 512 / EOS 513.

    ``words`` get merges (and tokens) that join their letters, so text made of them takes a few
    tokens per word as with the real tokenizer instead of one per character. transformers 5
    ignores ``CLIPTokenizer(vocab_file=..., merges_file=...)`` keywords: pass the paths positionally.
    """
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    merges: dict[str, None] = {}
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        joined = symbols[0]
        for symbol in symbols[1:]:
            merges[f"{joined} {symbol}"] = None
            joined += symbol
            vocab.setdefault(joined, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges))
    return folder / "vocab.json", folder / "merges.txt"


def build_tiny_sd(folder: Path, *, prediction_type: str = "epsilon") -> Path:
    """Save a tiny random Stable Diffusion pipeline (unet, vae, text_encoder, tokenizer, scheduler) to ``folder``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, latent_channels=4, sample_size=64, scaling_factor=0.18215,
    )
    # The paper's negative prompt must fit in 77 tokens, as it does with CLIP's real vocabulary.
    words = re.findall(r"[a-z]+", PAPER_NEGATIVE_PROMPT)
    vocab, merges = write_byte_level_clip_vocab(folder / "_vocab", words)
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, projection_dim=32, bos_token_id=512, eos_token_id=513, pad_token_id=513,
    ))
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, clip_sample=False, prediction_type=prediction_type,
    )
    _save_pipeline(folder, {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                            "scheduler": scheduler})
    return folder


def _full_size_components() -> dict:
    """SD 2.1-base's five components with random weights, fp32 on the CPU (~1.3 G parameters)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
        norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, sample_size=512, scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
    ))
    folder = Path(tempfile.mkdtemp(prefix="nfsd-vocab-"))
    words = re.findall(r"[a-z]+", PAPER_NEGATIVE_PROMPT + " a dslr photo of hamburger front side back overhead view")
    vocab, merges = write_byte_level_clip_vocab(folder, words)
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=77)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                              prediction_type="epsilon")
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def build_full_size_sd_prior(device: torch.device | str, half_precision: bool = True):
    """SD 2.1-base's UNet, VAE and text encoder with random weights on ``device`` (fp16 on CUDA)."""
    from .guidance.stable_diffusion import StableDiffusionPrior

    device = torch.device(device)
    dtype = torch.float16 if (device.type == "cuda" and half_precision) else torch.float32
    parts = _full_size_components()
    unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    unet.to(device, dtype=dtype, memory_format=memory_format)
    vae.to(device, dtype=dtype, memory_format=memory_format)
    text_encoder.to("cpu" if device.type == "cuda" else device, dtype=dtype)
    return StableDiffusionPrior(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=parts["tokenizer"],
                                scheduler=parts["scheduler"], model_id="random-weight SD 2.1-base architecture",
                                revision=None, device=device, dtype=dtype)


def save_full_size_sd(folder: Path, *, variants: tuple[str | None, ...] = (None, "fp16")) -> Path:
    """Save the full SD 2.1-base architecture with random weights as a diffusers folder.

    ``variants``: which weight files to write, None for the plain fp32 files (~5.2 GB), ``"fp16"`` for
    ``*.fp16.safetensors`` (~2.6 GB); a GPU run needs only the latter. Loads as a user's folder does.
    """
    torch.manual_seed(0)
    parts = _full_size_components()
    _save_pipeline(Path(folder), parts, variants)
    return Path(folder)


def save_fp16_variant(folder: Path) -> Path:
    """Write ``*.fp16.safetensors`` next to the plain weights of a saved pipeline (as hub repos ship them)."""
    from .guidance.stable_diffusion import _load_components

    folder = Path(folder)
    unet, vae, text_encoder = _load_components(folder, str(folder), torch.float32)[:3]
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        model.half().save_pretrained(folder / name, variant="fp16")
    return folder


def _save_pipeline(folder: Path, parts: dict, variants: tuple[str | None, ...] = (None,)) -> None:
    """Each component's ``save_pretrained`` (weights once per variant) plus ``model_index.json``."""
    for name in ("tokenizer", "scheduler"):
        parts[name].save_pretrained(folder / name)
    for name in ("unet", "vae", "text_encoder"):
        for variant in sorted(variants, key=lambda v: v is not None):  # fp32 first: .to() casts in place
            module = parts[name] if variant is None else parts[name].to(torch.float16)
            module.save_pretrained(folder / name, variant=variant)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
