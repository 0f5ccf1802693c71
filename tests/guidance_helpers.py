"""A stub prior with known predictions and Stable Diffusion's schedule in float64, shared by the
guidance tests (tests/test_guidance_*.py)."""

from __future__ import annotations

import torch

from nfsd_nerf.cameras import Cameras, look_at
from nfsd_nerf.guidance.prior import DiffusionPrior

C, H, W = 4, 3, 2
"""Latent shape of the stub prior's samples."""

SIZE = 16
"""Image size of the small built-in prior."""


def sd_alphas_cumprod_float64(n: int = 1000) -> torch.Tensor:
    """Stable Diffusion's scaled-linear schedule, written out: ab_t = prod_{i <= t} (1 - beta_i)."""
    betas = [(0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * i / (n - 1)) ** 2 for i in range(n)]
    out, running = [], 1.0
    for beta in betas:
        running *= 1.0 - beta
        out.append(running)
    return torch.tensor(out, dtype=torch.float64)


class StubPrior(DiffusionPrior):
    """encode = identity; e(z_t, t, prompt) = table[prompt] (a fixed random tensor per prompt)."""

    def __init__(self, num_train_timesteps: int = 1000):
        self.alphas_cumprod = sd_alphas_cumprod_float64(num_train_timesteps).float()
        self.model_id, self.revision = "stub", None
        self.ids: dict[str, int] = {}
        self.table = torch.randn(16, C, H, W, generator=torch.Generator().manual_seed(123))
        self.calls: list[dict] = []

    def encode(self, rgb):
        return rgb

    def decode(self, z):
        return z

    def embed(self, prompts):
        return torch.tensor([[float(self.ids.setdefault(p, len(self.ids)))] for p in prompts])

    def prompt_of(self, embedding) -> str:
        index = int(embedding[0])
        return next(p for p, i in self.ids.items() if i == index)

    def predict_noise(self, z_t, t, embeddings, cameras=None):
        prompts = [self.prompt_of(e) for e in embeddings]
        self.calls.append({"z_t": z_t.clone(), "t": t.clone(), "prompts": prompts, "cameras": cameras})
        return torch.stack([self.table[self.ids[p]] for p in prompts])

    def e(self, prompt: str) -> torch.Tensor:
        return self.table[self.ids[prompt]]


def cameras_looking_at(eye: torch.Tensor, target: torch.Tensor, fovy_deg: float | torch.Tensor) -> Cameras:
    """Cameras at eye [B, 3] looking at target [B, 3], Z up."""
    b = eye.shape[0]
    fovy = torch.deg2rad(torch.as_tensor(fovy_deg, dtype=torch.float32).expand(b))
    c2w = look_at(eye, target, torch.tensor([0.0, 0.0, 1.0]).expand(b, 3))
    zeros = torch.zeros(b)
    return Cameras(c2w, fovy, zeros, zeros, eye.norm(dim=-1), eye.clone())


class LinearStubPrior(StubPrior):
    """Embeddings are one-hot vectors [N, 16] and e(z_t, t, emb) = emb @ table: a prediction is linear
    in its embedding, so interpolated embeddings (Perp-Neg) have hand-computable predictions."""

    def embed(self, prompts):
        ids = [self.ids.setdefault(p, len(self.ids)) for p in prompts]
        return torch.nn.functional.one_hot(torch.tensor(ids), 16).float()

    def prompt_of(self, embedding) -> str:
        hot = (embedding == 1).nonzero().flatten()
        if len(hot) == 1 and embedding.sum() == 1:
            return next(p for p, i in self.ids.items() if i == int(hot[0]))
        return "mixed"

    def predict_noise(self, z_t, t, embeddings, cameras=None):
        self.calls.append({"z_t": z_t.clone(), "t": t.clone(), "prompts": [self.prompt_of(e) for e in embeddings],
                           "embeddings": embeddings.clone(), "cameras": cameras})
        return torch.einsum("nk,kchw->nchw", embeddings, self.table)
