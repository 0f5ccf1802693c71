"""The training step's camera-attached light (``render.light: camera``, the built-in preset)."""

import torch

from nfsd_nerf.config import Config, merge
from nfsd_nerf.train.step import sample_views

SMALL = {
    "field": {"n_levels": 2, "log2_hashmap_size": 8, "hidden_dim": 8},
    "render": {"size": 8, "n_samples": 16, "occupancy_resolution": 8, "ambient_only_steps": 0},
}


def test_camera_light_follows_each_camera():
    """``render.light: camera`` (the built-in preset): the Lambertian light is the camera-attached one
    of each view's camera, so renders are lit as the built-in prior's references are."""
    from nfsd_nerf.render.shading import camera_light_positions

    cfg = merge(merge(Config(prompt="x"), SMALL), {"render": {"batch_size": 2, "light": "camera"}})
    views = sample_views(0, cfg, torch.Generator().manual_seed(3), torch.device("cpu"))
    expected = camera_light_positions(views.cameras.c2w[:, :3, 3]).repeat_interleave(8 * 8, dim=0)
    torch.testing.assert_close(views.lights, expected)
    random = sample_views(0, merge(cfg, {"render": {"light": "random"}}), torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(random.rays_o, views.rays_o) and not torch.allclose(random.lights, views.lights)
