"""The hash grid's parameter layout against tiny-cuda-nn's host-side arithmetic, restated.

The reference below is written from tcnn's ``grid.h`` (``grid_scale``) and the offset table of
``GridEncodingTemplated``'s constructor, in float32 and integer arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from nfsd_nerf.encoding import MAX_DENSE_RESOLUTION, hash_grid_layout, level_scales
from nfsd_nerf.encoding.layout import check_hyperparameters
from nfsd_nerf.errors import UserError

# ------------------------------------------------------------------ reference (tcnn, restated)


def ref_scale(level: int, base_resolution: int, per_level_scale: float) -> np.float32:
    """grid_scale: exp2f(level * log2f(per_level_scale)) * base_resolution - 1.0f (float32)."""
    f32 = np.float32
    log2_scale = f32(math.log2(float(f32(per_level_scale))))  # std::log2(float)
    power = f32(2.0 ** float(f32(level) * log2_scale))  # exp2f
    return f32(power * f32(base_resolution)) - f32(1.0)


def ref_table_sizes(n_levels, log2_hashmap_size, base_resolution, per_level_scale):
    sizes = []
    for level in range(n_levels):
        res = int(np.ceil(ref_scale(level, base_resolution, per_level_scale))) + 1
        params_in_level = res**3
        params_in_level = (params_in_level + 7) // 8 * 8  # next_multiple(., 8)
        sizes.append(min(params_in_level, 1 << log2_hashmap_size))
    return sizes


CONFIGS = [
    # n_levels, F, log2_hashmap_size, base_resolution, per_level_scale
    pytest.param(16, 2, 19, 16, 1.447269, id="default"),
    pytest.param(4, 2, 10, 4, 2.0, id="pls2-mixed"),
    pytest.param(4, 2, 12, 13, 1.37, id="base13"),
    pytest.param(3, 4, 9, 3, 3.0, id="F4"),
    pytest.param(2, 2, 6, 600, 2.0, id="fine-hashed"),
]


# ------------------------------------------------------------------ layout


def test_layout_default_config():
    """16 levels x 2 features, 2^19 tables, base 16, scale 1.447269 (threestudio / Instant-NGP)."""
    layout = hash_grid_layout(16, 2, 19, 16, 1.447269)
    assert layout.resolutions == (16, 24, 34, 49, 71, 102, 148, 213, 308, 446, 646, 934, 1352, 1956, 2831, 4096)
    dense_sizes = [16**3, 24**3, 34**3, 117656, 357912]  # 49^3 = 117649 and 71^3 = 357911 rounded up to 8
    assert layout.table_sizes == tuple(dense_sizes + [2**19] * 11)
    assert layout.dense == (True,) * 5 + (False,) * 11
    assert layout.offsets[1:6] == tuple(np.cumsum(dense_sizes))
    assert layout.n_params == 2 * (sum(dense_sizes) + 11 * 2**19) == 12_599_920
    assert layout.n_levels == 16 and layout.n_entries == layout.n_params // 2


def test_level_scales_are_float32_formula():
    assert level_scales(4, 16, 2.0) == [15.0, 31.0, 63.0, 127.0]
    scales = level_scales(16, 16, 1.447269)
    for level, s in enumerate(scales):
        assert s == float(ref_scale(level, 16, 1.447269))
        assert abs(s - (16 * 1.447269**level - 1)) < 1e-3 * s
    assert ref_table_sizes(16, 19, 16, 1.447269) == list(hash_grid_layout(16, 2, 19, 16, 1.447269).table_sizes)


@pytest.mark.parametrize("n_levels, n_features, log2_size, base, pls", CONFIGS)
def test_layout_matches_tcnn_reference(n_levels, n_features, log2_size, base, pls):
    layout = hash_grid_layout(n_levels, n_features, log2_size, base, pls)
    sizes = ref_table_sizes(n_levels, log2_size, base, pls)
    resolutions = [int(np.ceil(ref_scale(level, base, pls))) + 1 for level in range(n_levels)]
    assert list(layout.table_sizes) == sizes
    assert list(layout.resolutions) == resolutions
    assert list(layout.offsets) == [0, *np.cumsum(sizes).tolist()]
    # grid_index: dense while the stride r^3 fits uint32 (r <= 0x659) and the level's table
    assert list(layout.dense) == [r <= MAX_DENSE_RESOLUTION and r**3 <= t for r, t in zip(resolutions, sizes)]
    assert layout.n_params == sum(sizes) * n_features


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_levels=0), "n_levels"),
        (dict(n_features_per_level=3), "n_features_per_level"),
        (dict(log2_hashmap_size=31), "log2_hashmap_size"),
        (dict(base_resolution=0), "base_resolution"),
        (dict(per_level_scale=0.5), "per_level_scale"),
        (dict(n_levels=64, per_level_scale=2.0), "finest resolution"),
    ],
)
def test_bad_hyperparameters_raise_user_error(kwargs, match):
    settings = dict(n_levels=16, n_features_per_level=2, log2_hashmap_size=19, base_resolution=16, per_level_scale=1.447269)
    check_hyperparameters(**settings)
    with pytest.raises(UserError, match=match):
        check_hyperparameters(**{**settings, **kwargs})
