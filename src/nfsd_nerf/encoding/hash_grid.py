"""The hash-grid module: one parameter vector, two backends (tinycudann on CUDA, PyTorch anywhere).

The settings have no defaults here: :class:`~nfsd_nerf.config.FieldConfig` is their one source
(:meth:`HashGridEncoding.from_config`), and tests and benchmarks pass explicit values.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .layout import check_hyperparameters, hash_grid_layout
from .torch_backend import Grid, HashGridFunction, run_levels

if TYPE_CHECKING:
    from ..config import FieldConfig

Backend = Literal["auto", "tcnn", "torch"]

_warned_tcnn_fallback = False


def tcnn_available() -> bool:
    """True when CUDA works and ``import tinycudann`` succeeds (it refuses to import without CUDA)."""
    if not torch.cuda.is_available():
        return False
    try:
        import tinycudann  # noqa: F401
    except Exception:  # ImportError, or EnvironmentError from its compute-capability probe
        return False
    return True


def _resolve_backend(backend: str) -> str:
    """The backend that will run: "tcnn" for "auto" or "tcnn" when usable, else "torch".

    Asking for "tcnn" where it cannot run warns once per process, then falls back (same function).
    """
    global _warned_tcnn_fallback
    if backend not in ("auto", "tcnn", "torch"):
        raise UserError(f"hash grid backend must be 'auto', 'tcnn' or 'torch', got {backend!r}")
    if backend == "torch":
        return "torch"
    if tcnn_available():
        return "tcnn"
    if backend == "tcnn" and not _warned_tcnn_fallback:
        warnings.warn("backend='tcnn' was asked for but CUDA or tinycudann is unavailable; using the PyTorch hash grid (same function)", stacklevel=3)
        _warned_tcnn_fallback = True
    return "torch"


class HashGridEncoding(nn.Module):
    """Instant-NGP hash grid, x [N, 3] in [0, 1] -> features [N, n_levels * n_features_per_level].

    ``params`` is one flat float32 vector in tcnn's layout and the only ``state_dict`` entry,
    identical for both backends. ``backend`` tells the resolved backend ("tcnn" or "torch");
    the tcnn module is used for CUDA inputs only, CPU inputs always take the PyTorch path.
    ``active_levels`` (default: all) zeroes the output columns of finer levels, for
    coarse-to-fine training; the PyTorch path then skips their work.

    Examples:
        >>> enc = HashGridEncoding(n_levels=4, n_features_per_level=2, log2_hashmap_size=12,
        ...                        base_resolution=16, per_level_scale=1.5, backend="torch")
        >>> enc(torch.rand(5, 3)).shape
        torch.Size([5, 8])
    """

    def __init__(
        self,
        *,
        n_levels: int,
        n_features_per_level: int,
        log2_hashmap_size: int,
        base_resolution: int,
        per_level_scale: float,
        backend: Backend,
    ):
        super().__init__()
        check_hyperparameters(n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale)
        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.log2_hashmap_size = log2_hashmap_size
        self.base_resolution = base_resolution
        self.per_level_scale = float(per_level_scale)
        self.n_input_dims = 3
        self.n_output_dims = n_levels * n_features_per_level
        self.active_levels = n_levels
        self.layout = hash_grid_layout(n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale)
        assert all(d or t == 1 << log2_hashmap_size for d, t in zip(self.layout.dense, self.layout.table_sizes))
        self._runs = run_levels(self.layout.dense)

        self.params = nn.Parameter(torch.empty(self.layout.n_params, dtype=torch.float32).uniform_(-1e-4, 1e-4))
        self.register_buffer("level_scales", torch.tensor(self.layout.scales, dtype=torch.float64), persistent=False)
        self.register_buffer("level_resolutions", torch.tensor(self.layout.resolutions, dtype=torch.int64), persistent=False)
        self.register_buffer("level_table_sizes", torch.tensor(self.layout.table_sizes, dtype=torch.int64), persistent=False)

        self.backend = _resolve_backend(backend)
        self._tcnn: tuple = ()  # the tinycudann module, deliberately not a registered submodule
        if self.backend == "tcnn":
            self._tcnn = (self._build_tcnn(),)

    @classmethod
    def from_config(cls, cfg: FieldConfig) -> HashGridEncoding:
        """The hash grid a :class:`~nfsd_nerf.config.FieldConfig` describes (its MLP settings are not read)."""
        return cls(
            n_levels=cfg.n_levels,
            n_features_per_level=cfg.n_features_per_level,
            log2_hashmap_size=cfg.log2_hashmap_size,
            base_resolution=cfg.base_resolution,
            per_level_scale=cfg.per_level_scale,
            backend=cfg.backend,
        )

    def tcnn_encoding_config(self) -> dict:
        """The ``encoding_config`` dict for ``tinycudann.Encoding``."""
        return {
            "otype": "HashGrid",
            "n_levels": self.n_levels,
            "n_features_per_level": self.n_features_per_level,
            "log2_hashmap_size": self.log2_hashmap_size,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.per_level_scale,
        }

    def _build_tcnn(self) -> nn.Module:
        import tinycudann as tcnn

        module = tcnn.Encoding(3, self.tcnn_encoding_config(), dtype=torch.float32)
        if module.n_output_dims != self.n_output_dims or module.params.numel() != self.params.numel():
            raise RuntimeError(
                f"tinycudann HashGrid disagrees with our layout: {module.n_output_dims} outputs and "
                f"{module.params.numel()} params, expected {self.n_output_dims} and {self.params.numel()}"
            )
        module.params = self.params  # one Parameter read by both backends
        return module

    def _grid(self) -> Grid:
        """The PyTorch backend's per-level constants, on the buffers' device."""
        scales = self.level_scales
        if scales.dtype != torch.float64:  # e.g. after module.half(): rebuild exactly
            scales = torch.tensor(self.layout.scales, dtype=torch.float64, device=scales.device)
        return Grid(
            scales=scales,
            resolutions=self.level_resolutions,
            table_sizes=self.level_table_sizes,
            offsets=self.layout.offsets,
            runs=self._runs,
            hash_mask=(1 << self.log2_hashmap_size) - 1,
            n_features=self.n_features_per_level,
        )

    def forward(self, x: Tensor) -> Tensor:
        """x [N, 3] in [0, 1] (clamped) -> [N, n_output_dims] float32 (float64 after ``.double()``)."""
        if x.dim() != 2 or x.shape[1] != 3:
            raise ValueError(f"HashGridEncoding expects x of shape [N, 3], got {tuple(x.shape)}")
        n_active = max(0, min(int(self.active_levels), self.n_levels))
        x = torch.nan_to_num(x, nan=0.0).clamp(0.0, 1.0)
        n_features = self.n_features_per_level
        if n_active == 0 or x.shape[0] == 0:
            return x.new_zeros(x.shape[0], self.n_output_dims, dtype=self._compute_dtype()) + 0 * self.params[0]

        if self.backend == "tcnn" and x.is_cuda and self.params.is_cuda:
            module = self._tcnn[0]
            if module.params is not self.params:  # e.g. the module's parameters were swapped by .to()
                module.params = self.params
            out = module(x).float()
            if n_active < self.n_levels:
                out = F.pad(out[:, : n_active * n_features], (0, (self.n_levels - n_active) * n_features))
            return out

        params = self.params
        if params.dtype not in (torch.float32, torch.float64):
            params = params.float()
        out = HashGridFunction.apply(x, params, self._grid(), n_active)
        if n_active < self.n_levels:
            out = F.pad(out, (0, (self.n_levels - n_active) * n_features))
        return out

    def _compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.params.dtype == torch.float64 else torch.float32

    def extra_repr(self) -> str:
        return (
            f"n_levels={self.n_levels}, n_features_per_level={self.n_features_per_level}, "
            f"log2_hashmap_size={self.log2_hashmap_size}, base_resolution={self.base_resolution}, "
            f"per_level_scale={self.per_level_scale}, n_params={self.params.numel()}, backend={self.backend!r}"
        )
