"""Where each level lives in the flat parameter vector: tcnn's host-side arithmetic.

Per level ``l``: the grid scale ``s_l`` (float32), the resolution ``r_l = ceil(s_l) + 1``, the
table size ``T_l = min(next_multiple_of_8(r_l^3), 2^log2_hashmap_size)`` and whether the level
is indexed densely or hashed, computed exactly as tcnn's ``GridEncodingTemplated`` constructor
does, so both backends read the same parameter addresses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

HASH_PRIMES = (1, 2654435761, 805459861)
"""tcnn's "CoherentPrime" hash factors for x, y, z (uint32)."""

MAX_DENSE_RESOLUTION = 1625
"""tcnn indexes a level densely only up to this resolution (1625^3 < 2^32 <= 1626^3)."""

_MAX_PARAMS_PER_LEVEL = (2**32 - 1) // 2


def level_scales(n_levels: int, base_resolution: int, per_level_scale: float) -> list[float]:
    """tcnn's ``grid_scale`` per level, in float32: ``exp2f(l * log2f(b)) * R - 1``.

    ``exp2`` and ``log2`` are evaluated in float64 and rounded once to float32 (correctly
    rounded, as glibc's float functions are on the host).
    """
    f32 = np.float32
    log2_scale = f32(math.log2(float(f32(per_level_scale))))
    scales = []
    for level in range(n_levels):
        exponent = f32(f32(level) * log2_scale)
        power = f32(2.0 ** float(exponent))
        scales.append(float(f32(power * f32(base_resolution)) - f32(1.0)))
    return scales


@dataclass(frozen=True)
class HashGridLayout:
    """Where each level lives in the flat parameter vector, and how it is indexed."""

    scales: tuple[float, ...]
    """Per level: grid scale s_l (float32 values)."""
    resolutions: tuple[int, ...]
    """Per level: vertices per axis, ceil(s_l) + 1."""
    table_sizes: tuple[int, ...]
    """Per level: table entries T_l (each entry holds F features)."""
    offsets: tuple[int, ...]
    """Entry offset of each level (length n_levels + 1; the last is the total entry count)."""
    dense: tuple[bool, ...]
    """Per level: indexed densely (True) or hashed (False)."""
    n_features_per_level: int

    @property
    def n_levels(self) -> int:
        return len(self.scales)

    @property
    def n_entries(self) -> int:
        return self.offsets[-1]

    @property
    def n_params(self) -> int:
        return self.offsets[-1] * self.n_features_per_level


def hash_grid_layout(
    n_levels: int,
    n_features_per_level: int,
    log2_hashmap_size: int,
    base_resolution: int,
    per_level_scale: float,
) -> HashGridLayout:
    """The parameter layout tcnn's ``GridEncodingTemplated`` constructor builds (3-D, Hash)."""
    scales = level_scales(n_levels, base_resolution, per_level_scale)
    resolutions, sizes, offsets, dense = [], [], [0], []
    for scale in scales:
        res = int(math.ceil(scale)) + 1
        # tcnn: pow((float)res, 3) > (float)max_params ? max_params : res^3; next_multiple(., 8)
        n_dense = _MAX_PARAMS_PER_LEVEL if float(res) ** 3 > float(np.float32(_MAX_PARAMS_PER_LEVEL)) else res**3
        size = min(-(-n_dense // 8) * 8, 1 << log2_hashmap_size)
        resolutions.append(res)
        sizes.append(size)
        offsets.append(offsets[-1] + size)
        dense.append(res <= MAX_DENSE_RESOLUTION and res**3 <= size)
    return HashGridLayout(
        scales=tuple(scales),
        resolutions=tuple(resolutions),
        table_sizes=tuple(sizes),
        offsets=tuple(offsets),
        dense=tuple(dense),
        n_features_per_level=n_features_per_level,
    )


def check_hyperparameters(
    n_levels: int, n_features_per_level: int, log2_hashmap_size: int, base_resolution: int, per_level_scale: float,
    *, prefix: str = "hash grid ",
) -> None:
    """Refuse settings tcnn does not support (or whose tables would not fit) with a :class:`UserError`.

    The one source of these limits: the encoding checks itself, and ``check_config`` calls this with
    ``prefix="field."`` so that a run refuses them, naming its settings, before its folder exists.
    """
    def bad(name: str, need: str, value) -> UserError:
        return UserError(f"{prefix}{name} must be {need}, got {value!r}")

    def integer_in(value, lo: int, hi: int) -> bool:
        return not isinstance(value, bool) and isinstance(value, int) and lo <= value <= hi

    if not integer_in(n_levels, 1, 128):
        raise bad("n_levels", "an integer in [1, 128]", n_levels)
    if isinstance(n_features_per_level, bool) or n_features_per_level not in (1, 2, 4, 8):
        raise bad("n_features_per_level", "1, 2, 4 or 8 (as in tcnn)", n_features_per_level)
    if not integer_in(log2_hashmap_size, 1, 30):
        raise bad("log2_hashmap_size", "an integer in [1, 30]", log2_hashmap_size)
    if not integer_in(base_resolution, 1, 2**20):
        raise bad("base_resolution", "an integer in [1, 2^20]", base_resolution)
    if (isinstance(per_level_scale, bool) or not isinstance(per_level_scale, (int, float))
            or not 1.0 <= per_level_scale <= 16.0):  # nan fails the comparison too
        raise bad("per_level_scale", "a number in [1, 16]", per_level_scale)
    finest = base_resolution * float(per_level_scale) ** (n_levels - 1)
    if finest > 2**22:
        raise UserError(f"{prefix}base_resolution * per_level_scale^(n_levels-1), the finest resolution, must be "
                        f"<= 2^22, got {finest:.0f}")
