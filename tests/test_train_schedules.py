"""The step schedules, against hand-computed values."""

import pytest
import torch

from nfsd_nerf.config import Config, LossConfig, RenderConfig, TrainConfig, merge
from nfsd_nerf.train.schedules import (
    active_levels, choose_shading, occupancy_refresh_due, orientation_weight, training_progress,
)


def test_coarse_to_fine_levels_follow_threestudios_schedule():
    """threestudio: min(8 + max(step - 2000, 0) // 500, 16), by hand at the boundaries."""
    cfg = merge(Config(), {"train": {"start_levels": 8}})
    steps = (0, 1999, 2000, 2499, 2500, 2999, 3000, 5499, 5500, 5999, 6000, 9999)
    assert [active_levels(s, cfg.train, 16) for s in steps] == [8, 8, 8, 8, 9, 9, 10, 14, 15, 15, 16, 16]
    other = TrainConfig(start_levels=2, level_growth_start=10, level_growth_every=3)
    assert [active_levels(s, other, 5) for s in (0, 10, 12, 13, 15, 16, 19, 100)] == [2, 2, 2, 3, 3, 4, 5, 5]
    assert active_levels(0, TrainConfig(), 16) == 16
    assert active_levels(10**6, TrainConfig(start_levels=2), 5) == 5  # never more than the grid has


def test_shading_is_albedo_during_warm_up_without_drawing():
    render = RenderConfig(ambient_only_steps=10)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert choose_shading(9, render, gen) == "albedo"
    assert torch.equal(gen.get_state(), state), "the warm-up draws nothing (resume depends on the draw order)"


def test_shading_follows_its_probabilities():
    render = RenderConfig(ambient_only_steps=0, albedo_prob=0.2, lambertian_prob=0.3, textureless_prob=0.5)
    gen = torch.Generator().manual_seed(0)
    counts = {"albedo": 0, "lambertian": 0, "textureless": 0}
    for _ in range(4000):
        counts[choose_shading(5, render, gen)] += 1
    assert counts["albedo"] / 4000 == pytest.approx(0.2, abs=0.03)
    assert counts["lambertian"] / 4000 == pytest.approx(0.3, abs=0.03)
    only = RenderConfig(ambient_only_steps=0, albedo_prob=0.0, lambertian_prob=0.0, textureless_prob=1.0)
    assert {choose_shading(1, only, gen) for _ in range(50)} == {"textureless"}


def test_orientation_weight_ramps_linearly_then_holds():
    loss = LossConfig(orientation_start=10.0, orientation_end=1000.0, orientation_ramp_steps=5000)
    assert orientation_weight(0, loss) == 10.0
    assert orientation_weight(2500, loss) == pytest.approx(505.0)
    assert orientation_weight(5000, loss) == orientation_weight(9000, loss) == 1000.0
    assert orientation_weight(0, LossConfig(orientation_ramp_steps=0)) == LossConfig().orientation_end


def test_occupancy_refresh_and_progress():
    render = RenderConfig(occupancy_update_every=16)
    assert [s for s in range(40) if occupancy_refresh_due(s, render)] == [15, 31]
    assert training_progress(0, 100) == 0.0 and training_progress(50, 100) == 0.5
    assert training_progress(3, 0) == 3.0  # no division by zero
