"""Checkpoints: one safetensors file holding the scene, the optimizer, RNG states and the config.

Written atomically (:mod:`nfsd_nerf.files`) so a crash or a full disk never leaves a half-written
file under the final name; loaded with safetensors only, so a checkpoint can never execute code.
The format (tensor names, metadata) is described in docs/design.md, "Run folder and checkpoints".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config, dump_yaml, from_dict
from .errors import UserError
from .files import atomic_write_bytes
from .scene import Scene, build_scene

FORMAT = "nfsd-nerf-checkpoint"
VERSION = "1"
LATEST = "latest.safetensors"
FINAL = "final.safetensors"


@dataclass
class Checkpoint:
    """Everything read back from a checkpoint file, before it is put into live objects."""

    config: Config
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors saved under ``prefix.``, with the prefix removed."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


@dataclass
class LoadedRun:
    """A run ready to render or export."""

    config: Config
    scene: Scene
    step: int
    path: Path

    @property
    def field(self):
        return self.scene.field

    @property
    def background(self):
        return self.scene.background

    @property
    def occupancy(self):
        return self.scene.occupancy


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], str]:
    tensors = {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            tensors[f"optimizer.state.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, json.dumps(state["param_groups"])


def _unflatten_optimizer(ckpt: Checkpoint) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in ckpt.section("optimizer.state").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": json.loads(ckpt.meta["param_groups"])}


def save_checkpoint(
    path: Path,
    *,
    config: Config,
    scene: Scene,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    extra_meta: dict[str, str] | None = None,
) -> Path:
    """Save a checkpoint atomically; all tensors are stored fp32/contiguous on the CPU."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for name, module in scene.modules().items():
        for key, value in module.state_dict().items():
            value = value.detach().cpu()
            tensors[f"{name}.{key}"] = (value.float() if value.is_floating_point() else value).contiguous()
    meta = {"format": FORMAT, "version": VERSION, "step": str(step), "config": dump_yaml(config)}
    if optimizer is not None:
        optim_tensors, meta["param_groups"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update(optim_tensors)
    for name, value in (rng or {}).items():
        tensors[f"rng.{name}"] = value.detach().cpu().contiguous()
    meta.update(extra_meta or {})
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and validate a checkpoint file; every failure is a one-line :class:`UserError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        data = path.read_bytes()
        tensors = load(data)
        meta = _read_metadata(data)
    except (SafetensorError, ValueError, OSError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint {path} is truncated or not a safetensors file ({str(exc).splitlines()[0]})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not an nfsd-nerf checkpoint")
    if meta.get("version") != VERSION:
        raise UserError(f"{path} has checkpoint version {meta.get('version')!r}; this nfsd-nerf reads version {VERSION}")
    import yaml

    config = from_dict(yaml.safe_load(meta["config"]))
    return Checkpoint(config=config, step=int(meta["step"]), tensors=tensors, meta=meta, path=path)


def _read_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__", {}) or {}


def restore_scene(scene: Scene, ckpt: Checkpoint) -> None:
    """Load the saved field, background and occupancy state into ``scene`` (any device)."""
    for name, module in scene.modules().items():
        state = ckpt.section(name)
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise UserError(f"checkpoint {ckpt.path} does not match this {name} ({str(exc).splitlines()[0]})") from None


def restore_optimizer(optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    optimizer.load_state_dict(_unflatten_optimizer(ckpt))


def find_checkpoint(run_dir: Path, checkpoint: Path | None = None) -> Path:
    """The checkpoint to use for a run: an explicit one, else ``latest`` (always the newest), else ``final``."""
    if checkpoint is not None:
        return Path(checkpoint)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    for name in (LATEST, FINAL):
        candidate = run_dir / "checkpoints" / name
        if candidate.is_file():
            return candidate
    raise UserError(f"no checkpoint in {run_dir / 'checkpoints'} (expected {FINAL} or {LATEST})")


def load_run(run_dir: Path, checkpoint: Path | None = None, device: torch.device | str = "cpu") -> LoadedRun:
    """Rebuild a trained scene for rendering or export; needs no diffusion model."""
    ckpt = read_checkpoint(find_checkpoint(run_dir, checkpoint))
    scene = build_scene(ckpt.config, device)
    restore_scene(scene, ckpt)
    for module in scene.modules().values():
        module.eval()
    return LoadedRun(config=ckpt.config, scene=scene, step=ckpt.step, path=ckpt.path)
