"""What a run writes besides checkpoints: ``config.yaml``, ``metrics.jsonl``, ``previews/``, ``summary.json``.

Layout of a run folder (docs/design.md, "Run folder and checkpoints")::

    OUT/<prompt slug>-<YYYYmmdd-HHMMSS>/
        config.yaml          the resolved config (rule defaults filled in)
        metrics.jsonl        one JSON line every train.log_every steps
        previews/stepNNNNNN.png
        checkpoints/latest.safetensors, final.safetensors
        summary.json         written when training ends
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..cameras import orbit_cameras
from ..config import Config, dump_yaml
from ..files import atomic_write_bytes, write_png
from ..render import render_image
from ..runtime import module_device
from ..scene import Scene

PREVIEW_MIN_SIZE = 64
"""Previews are rendered at the training size, but never smaller than this."""


def write_config(run_dir: Path, cfg: Config) -> Path:
    return atomic_write_bytes(Path(run_dir) / "config.yaml", dump_yaml(cfg).encode())


def write_summary(run_dir: Path, summary: dict) -> Path:
    return atomic_write_bytes(Path(run_dir) / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step, flushed as it is written."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def drop_after(self, step: int) -> None:
        """Keep only the lines up to ``step`` (a resumed run logs the later steps again)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_bytes(self.path, "".join(kept).encode())

    def __enter__(self) -> "MetricsLog":
        self._handle = self.path.open("a")
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()

    def write(self, line: dict) -> None:
        self._handle.write(json.dumps(line) + "\n")
        self._handle.flush()


def preview_panel(images: dict[str, torch.Tensor]) -> np.ndarray:
    """rgb | normal | opacity side by side, uint8 [H, 3W, 3], from one view of ``render_image``."""
    rgb = images["rgb"][0].clamp(0, 1)
    opacity = images["opacity"][0].clamp(0, 1)[..., None]
    normal = (images["normal"][0] * 0.5 + 0.5) * opacity + (1 - opacity)
    panel = torch.cat([rgb, normal.clamp(0, 1), opacity.expand_as(rgb)], dim=1)
    return (panel.cpu().numpy() * 255 + 0.5).astype(np.uint8)


@torch.no_grad()
def write_preview(run_dir: Path, scene: Scene, cfg: Config, step: int) -> Path:
    """``previews/step<N>.png``: one view from the middle of the training distribution, 30 deg off the front."""
    scene.field.eval()
    device = module_device(scene.field)
    cams = orbit_cameras(1, distance=float(sum(cfg.cameras.distance_range) / 2),
                         fovy_deg=float(sum(cfg.cameras.fovy_range) / 2), elevation_deg=15.0,
                         start_azimuth_deg=30.0, device=device)
    size = max(PREVIEW_MIN_SIZE, cfg.render.size)
    images = render_image(scene.field, scene.background, cams, size, size,
                          occupancy=scene.occupancy, n_samples=cfg.render.n_samples, need_normals=True)
    path = Path(run_dir) / "previews" / f"step{step:06d}.png"
    path.parent.mkdir(exist_ok=True)
    return write_png(path, preview_panel(images))
