"""What a run writes besides checkpoints: metrics lines, previews, config and summary."""

import json

import imageio.v3 as iio
import numpy as np
import torch
import yaml

from nfsd_nerf.config import Config, merge
from nfsd_nerf.scene import build_scene
from nfsd_nerf.train.run_folder import MetricsLog, preview_panel, write_config, write_preview, write_summary


def test_metrics_are_appended_and_dropped_after_a_step(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.drop_after(3)  # no file yet: nothing to do
    with log:
        for step in range(1, 6):
            log.write({"step": step, "loss": 0.1 * step})
    log.drop_after(3)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2, 3]
    with log:
        log.write({"step": 4, "loss": 1.0})
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2, 3, 4]


def test_preview_panel_is_rgb_normal_opacity():
    rgb = torch.full((1, 2, 2, 3), 0.5)
    opacity = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    normal = torch.tensor([0.0, 0.0, 1.0]).expand(1, 2, 2, 3)
    panel = preview_panel({"rgb": rgb, "opacity": opacity, "normal": normal})
    assert panel.shape == (2, 6, 3) and panel.dtype == np.uint8
    assert panel[0, 0].tolist() == [128, 128, 128]  # rgb
    assert panel[0, 2].tolist() == [128, 128, 255] and panel[0, 3].tolist() == [255, 255, 255]  # normal, empty = white
    assert panel[0, 4].tolist() == [255, 255, 255] and panel[0, 5].tolist() == [0, 0, 0]  # opacity


def test_preview_config_and_summary_files(tmp_path):
    cfg = merge(Config(prompt="a red cube"), {"field": {"n_levels": 2, "log2_hashmap_size": 8, "hidden_dim": 8},
                                               "render": {"size": 16, "n_samples": 16}})
    path = write_preview(tmp_path, build_scene(cfg), cfg, 12)
    assert path == tmp_path / "previews" / "step000012.png"
    assert iio.imread(path).shape == (64, 3 * 64, 3)  # never smaller than 64 px
    assert yaml.safe_load(write_config(tmp_path, cfg).read_text())["render"]["size"] == 16
    assert json.loads(write_summary(tmp_path, {"steps": 3}).read_text()) == {"steps": 3}
