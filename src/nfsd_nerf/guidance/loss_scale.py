"""Loss scaling for the gradient through a half-precision encoder (Stable Diffusion's VAE in fp16).

The guidance gradient that reaches the VAE is small: ``w(t) = 1 - ab_t`` is about 0.02 at small
``t``, and spread over a 512x512 encode each pixel's share falls below fp16's smallest normal
(6e-5) and then its smallest subnormal (6e-8): in fp16 it is lost silently, with no NaN. As in
mixed-precision training, the gradient entering the fp16 backward is multiplied by ``scale`` and
divided again in fp32 once out of it. The scale is dynamic: a step whose unscaled gradient is not
finite *overflowed* (the caller skips its update and counts it apart from other non-finite steps),
and the scale halves; after ``growth_interval`` clean steps it doubles.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


class _UnscaleGradient(torch.autograd.Function):
    """Identity forward; backward divides by the scaler's scale (in fp32) and records overflow."""

    @staticmethod
    def forward(ctx, x: Tensor, scaler: "GradientScaler") -> Tensor:
        ctx.scaler = scaler
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.float() / ctx.scaler.scale
        ctx.scaler.found_inf = ctx.scaler.found_inf | ~torch.isfinite(grad).all()  # stays on the device
        return grad, None


class GradientScaler:
    """Dynamic scale of the gradient through a half-precision function (see the module docstring)."""

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000, min_scale: float = 1.0,
                 max_scale: float = 2.0**24):
        self.scale = float(init_scale)
        self.growth_interval = int(growth_interval)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.clean_steps = 0
        self.found_inf = torch.zeros((), dtype=torch.bool)

    def around(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``fn(x)`` with its backward run on the gradient times ``scale``; x's gradient comes out unscaled, fp32."""
        self.found_inf = torch.zeros((), dtype=torch.bool, device=x.device)
        return _ScaleGradient.apply(fn(_UnscaleGradient.apply(x, self)), self.scale)

    def update(self, overflowed: bool) -> None:
        """After each step's backward: halve on overflow, double after ``growth_interval`` clean steps."""
        if overflowed:
            self.scale = max(self.min_scale, self.scale / 2.0)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale = min(self.max_scale, self.scale * 2.0)
            self.clean_steps = 0

    def state(self) -> dict[str, str]:
        """For checkpoints (strings: safetensors metadata)."""
        return {"loss_scale": repr(self.scale), "loss_scale_clean_steps": str(self.clean_steps)}

    def load_state(self, meta: dict[str, str]) -> None:
        if "loss_scale" in meta:
            self.scale = float(meta["loss_scale"])
            self.clean_steps = int(meta.get("loss_scale_clean_steps", 0))
