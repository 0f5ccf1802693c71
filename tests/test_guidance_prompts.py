"""View-dependent prompts at and around the published boundaries (docs/design.md, section 1.3)."""

from __future__ import annotations

import pytest
import torch

from nfsd_nerf.cameras import orbit_cameras
from nfsd_nerf.guidance.prompts import view_dependent_prompts, view_names_from_angles

CASES = [
    # azimuth, elevation, view: front iff |az| < 45, back iff |az| > 135, overhead iff el > 60 (wins)
    (0.0, 15.0, "front"),
    (44.99, 0.0, "front"),
    (-44.99, 0.0, "front"),
    (45.0, 0.0, "side"),
    (-45.0, 0.0, "side"),
    (90.0, 30.0, "side"),
    (135.0, 0.0, "side"),
    (-135.0, 0.0, "side"),
    (135.01, 0.0, "back"),
    (-135.01, 0.0, "back"),
    (180.0, 0.0, "back"),
    (-180.0, 0.0, "back"),
    (225.0, 0.0, "side"),  # = -135
    (350.0, 0.0, "front"),  # = -10
    (0.0, 60.0, "front"),
    (0.0, 60.01, "overhead"),
    (180.0, 89.0, "overhead"),
    (90.0, -10.0, "side"),
]


@pytest.mark.parametrize("azimuth, elevation, view", CASES)
def test_view_at_boundaries(azimuth, elevation, view):
    assert view_names_from_angles(torch.tensor([azimuth]), torch.tensor([elevation])) == [view]


def test_batch_of_prompts_keeps_order_and_format():
    az = torch.tensor([c[0] for c in CASES])
    el = torch.tensor([c[1] for c in CASES], dtype=torch.float64)
    prompts = view_dependent_prompts("a DSLR photo of a hamburger", az, el)
    assert prompts == [f"a DSLR photo of a hamburger, {c[2]} view" for c in CASES]


def test_orbit_cameras_read_front_side_back_side():
    cams = orbit_cameras(8, elevation_deg=15)  # azimuths 0, 45, ..., 315
    names = view_names_from_angles(cams.azimuth, cams.elevation)
    assert names == ["front", "side", "side", "side", "back", "side", "side", "side"]


def test_thresholds_and_texts_come_from_the_prompts_section():
    from nfsd_nerf.config import PromptsConfig

    cfg = PromptsConfig(front_max_azimuth=30.0, back_min_azimuth=150.0, overhead_min_elevation=40.0,
                        back="the back of a hamburger bun")
    az, el = torch.tensor([35.0, 160.0, 140.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 45.0])
    assert view_names_from_angles(az, el, cfg) == ["side", "back", "side", "overhead"]
    assert view_dependent_prompts("a hamburger", az, el, cfg) == [
        "a hamburger, side view", "the back of a hamburger bun", "a hamburger, side view", "a hamburger, overhead view"]
