"""The built-in prior's world: prompt parsing, and the sphere tracer's coverage and shading.

Every check is against an independent value: the projected area of a sphere, the shading of a
face lit by the camera-attached light (computed by hand), the fixed background.
"""

from __future__ import annotations

import math

import pytest
import torch
from guidance_helpers import cameras_looking_at

from nfsd_nerf.cameras import orbit_cameras, position_from_spherical
from nfsd_nerf.errors import UserError
from nfsd_nerf.guidance.rules import PAPER_NEGATIVE_PROMPT
from nfsd_nerf.guidance.shapes import (
    BACKGROUND_RGB,
    COLOURS,
    SHAPES,
    parse_prompt,
    render_object,
    shade_and_coverage,
)


# --------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    "prompt, shape, colour",
    [
        ("a red cube", "cube", "red"),
        ("a DSLR photo of a blue torus, front view", "torus", "blue"),
        ("A Yellow Cone, overhead view", "cone", "yellow"),
        ("a gray box, back view", "cube", "grey"),
        ("two green donuts", "torus", "green"),
        ("an orange pill, side view", "capsule", "orange"),
    ],
)
def test_prompts_name_one_shape_and_one_colour(prompt, shape, colour):
    parsed = parse_prompt(prompt)
    assert (parsed.kind, parsed.shape, parsed.colour) == ("object", shape, colour)


def test_empty_and_negative_prompts():
    assert parse_prompt("").kind == "unconditional"
    assert parse_prompt("  , ").kind == "unconditional"
    assert parse_prompt(PAPER_NEGATIVE_PROMPT).kind == "negative"
    assert parse_prompt("blurry, low quality").kind == "negative"


@pytest.mark.parametrize("prompt", ["a hamburger", "a cube", "a red thing", "a red cube on a blue sphere", "a red blue cube"])
def test_unknown_prompts_are_refused_with_the_vocabulary(prompt):
    with pytest.raises(UserError) as err:
        parse_prompt(prompt)
    message = str(err.value)
    assert repr(prompt) in message and "\n" not in message
    assert all(name in message for name in list(SHAPES) + list(COLOURS))


# --------------------------------------------------------------------------- renderer


def test_sphere_mask_has_the_area_of_its_projected_disc():
    size, fovy, distance, radius = 64, 50.0, 1.8, 0.5
    cams = orbit_cameras(2, distance=distance, fovy_deg=fovy, elevation_deg=10.0)
    _, coverage = shade_and_coverage(SHAPES["sphere"], cams, size, supersample=4)
    focal = 0.5 * size / math.tan(math.radians(fovy / 2))
    disc = math.pi * (focal * math.tan(math.asin(radius / distance))) ** 2
    for view in coverage:
        assert view.sum().item() == pytest.approx(disc, rel=0.01)


def test_shading_is_lambert_with_the_camera_attached_light():
    """The cube's +X face seen head-on from (1.8, 0, 0): the light sits at the camera plus 1.8 *
    (0.35 right + 0.5 up) = (1.8, 0.63, 0.9), so at the face centre n . l = 1.44 / |(1.44, 0.63, 0.9)|
    and the shade is 0.3 + 0.7 n . l; from 35 degrees to the side the light moves with the camera."""
    eyes = torch.stack([position_from_spherical(torch.tensor(a), torch.tensor(0.0), torch.tensor(1.8)) for a in (0.0, 35.0)])
    targets = torch.tensor([[0.36, 0.0, 0.0], [0.36, 0.0, 0.0]])
    rgb, coverage = render_object("cube", "blue", cameras_looking_at(eyes, targets, 10.0), 8)
    assert coverage[:, 3:5, 3:5].min() == 1.0
    n_dot_l = 1.44 / math.sqrt(1.44**2 + 0.63**2 + 0.9**2)
    expected = torch.tensor(COLOURS["blue"]) * (0.3 + 0.7 * n_dot_l)
    torch.testing.assert_close(rgb[0, 3:5, 3:5], expected.expand(2, 2, 3), atol=5e-3, rtol=0)
    side = rgb[1, 3:5, 3:5].mean(dim=(0, 1))
    assert (side - expected).abs().max() > 0.02  # not view-independent any more: the light followed the camera


def test_background_and_coverage_are_consistent():
    cams = orbit_cameras(3, distance=2.0, fovy_deg=60.0)
    for name in SHAPES:
        rgb, coverage = render_object(name, "red", cams, 16)
        assert 0.1 < coverage.mean() < 0.5, name  # about a third of the frame
        assert coverage[:, 0, :].max() == 0 and coverage[:, :, 0].max() == 0, name  # whole object in frame
        torch.testing.assert_close(rgb[coverage == 0], torch.tensor(BACKGROUND_RGB).expand(int((coverage == 0).sum()), 3))
