"""The 2D experiment: optimizing one image with a prior, through the tiny Stable Diffusion pipeline."""

from __future__ import annotations

import json


def test_optimize_image_writes_png_grid_and_settings(tiny_prior, tmp_path):
    import imageio.v3 as iio

    from nfsd_nerf.config import GuidanceConfig
    from nfsd_nerf.guidance.image import optimize_image

    seen = []
    path = optimize_image(tiny_prior, "a red ball", GuidanceConfig(method="sds", scale=7.5), steps=3, lr=0.1, seed=0,
                          out_dir=tmp_path / "out", n_snapshots=4, callback=lambda step, info: seen.append(step))
    assert path == tmp_path / "out" / "sds-s7.5.png"
    assert seen == [0, 1, 2]
    image = iio.imread(path)
    assert image.shape == (64, 64, 3) and image.dtype.name == "uint8"
    grid = iio.imread(tmp_path / "out" / "sds-s7.5-steps.png")
    assert grid.shape == (256, 4 * 256, 3)  # 4 snapshots in a row, 64 px enlarged 4x
    assert (grid[:256:4, -256::4] == image).all()  # the last tile is the final image
    assert not (grid[:256:4, :256:4] == image).all()  # ... and it moved away from the start
    settings = json.loads((tmp_path / "out" / "sds-s7.5.json").read_text())
    assert settings["scale"] == 7.5 and settings["model"] == tiny_prior.model_id and settings["negative_prompt"] == ""


def test_image_grid_enlarges_small_tiles_and_shrinks_large_ones():
    import torch

    from nfsd_nerf.guidance.image import image_grid

    small = torch.rand(3, 3, 8, 8)
    grid = image_grid(small, columns=2, tile=32)
    assert grid.shape == (3, 2 * 32, 2 * 32)
    assert torch.equal(grid[:, :32:4, :32:4], small[0])  # nearest-neighbour x4: pixels stay visible
    assert (grid[:, 32:, 32:] == 1).all()  # the empty fourth tile stays white
    assert image_grid(torch.rand(1, 3, 512, 256), tile=256).shape == (3, 256, 128)
