"""Checkpoints: one safetensors file holding the scene, the optimizer, RNG states and the config.

Written atomically (:mod:`nfsd_nerf.files`) so a crash or a full disk never leaves a half-written
file under the final name; loaded with safetensors only, so a checkpoint can never execute code.
The format (tensor names, metadata) is described in docs/design.md, "Run folder and checkpoints".

A checkpoint is checked once, when it is read (:func:`read_checkpoint`): the container, every
metadata field (parsed into the typed fields of :class:`Checkpoint`, so later code never parses a
string) and the optimizer tensors' names against ``param_groups``. What can only be checked against
live objects is checked where they are restored: tensor shapes against the scene
(:func:`restore_scene`) and the optimizer's parameters (:func:`restore_optimizer`), RNG state sizes
against this torch (:func:`restore_rng`). Every failure is one :class:`UserError` naming the file
and the field: a tampered or damaged file never reaches a traceback.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import Config, check_config, dump_yaml, from_dict
from .errors import UserError, first_line
from .files import atomic_write_bytes
from .scene import Scene, build_scene

FORMAT = "nfsd-nerf-checkpoint"
VERSION = "1"
LATEST = "latest.safetensors"
FINAL = "final.safetensors"


@dataclass
class Checkpoint:
    """Everything read back from a checkpoint file, checked and typed, before it is put into live objects."""

    config: Config
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]
    """The metadata as stored (strings); use the typed fields below."""
    path: Path
    param_groups: list[dict[str, Any]] | None = None
    """The optimizer's parameter groups (hyperparameters, ``params`` as indices); None: no optimizer saved."""
    optimizer_state: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Per parameter index (as in ``param_groups``): Adam's ``step``, ``exp_avg``, ``exp_avg_sq``."""
    skipped_steps: int = 0
    encoder_overflow_steps: int = 0
    loss_scale: float | None = None
    """The half-precision encoder's loss scale; None where the run had none."""
    loss_scale_clean_steps: int = 0
    stamp: tuple[int, int, int] | None = None
    """(inode, size, mtime in ns) of the file when it was read."""

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors saved under ``prefix.``, with the prefix removed."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}

    def changed_on_disk(self) -> bool:
        """True if the file was replaced or removed since it was read (another process saved the run)."""
        try:
            return _stamp(os.stat(self.path)) != self.stamp
        except OSError:
            return True

    def loss_scale_state(self) -> dict[str, str]:
        """The loss scaler's own serialised form (:meth:`GradientScaler.load_state`), from the checked
        fields; empty where the run had no loss scale."""
        if self.loss_scale is None:
            return {}
        return {"loss_scale": repr(self.loss_scale), "loss_scale_clean_steps": str(self.loss_scale_clean_steps)}


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


def save_checkpoint(
    path: Path,
    *,
    config: Config,
    scene: Scene,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    extra_meta: dict[str, str] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save a checkpoint atomically; all tensors are stored fp32/contiguous on the CPU.

    ``extra_tensors``: more tensors by full name (a rule's state under ``rule.``; optional when reading)."""
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
    for name, value in (extra_tensors or {}).items():
        value = value.detach().cpu()
        tensors[name] = (value.float() if value.is_floating_point() else value).contiguous()
    meta.update(extra_meta or {})
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and check a checkpoint file; every failure is a one-line :class:`UserError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as handle:
            stamp = _stamp(os.fstat(handle.fileno()))
            data = handle.read()
        tensors = load(data)
        meta = _read_metadata(data)
    except (SafetensorError, ValueError, OSError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint {path} is truncated or not a safetensors file ({first_line(exc)})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not an nfsd-nerf checkpoint")
    if meta.get("version") != VERSION:
        raise UserError(f"{path} has checkpoint version {meta.get('version')!r}; this nfsd-nerf reads version {VERSION}")
    param_groups = _parse_param_groups(path, meta)
    return Checkpoint(
        config=_parse_config(path, meta),
        step=_parse_count(path, meta, "step", required=True),
        tensors=tensors,
        meta=meta,
        path=path,
        param_groups=param_groups,
        optimizer_state=_parse_optimizer_state(path, tensors, param_groups),
        skipped_steps=_parse_count(path, meta, "skipped_steps"),
        encoder_overflow_steps=_parse_count(path, meta, "encoder_overflow_steps"),
        loss_scale=_parse_loss_scale(path, meta),
        loss_scale_clean_steps=_parse_count(path, meta, "loss_scale_clean_steps"),
        stamp=stamp,
    )


def saved_step(path: Path) -> int | None:
    """The step a checkpoint file holds, read from its header alone (cheap: no tensors); None if the
    file is missing or unreadable."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            meta = json.loads(handle.read(min(size, 100_000_000))).get("__metadata__") or {}
        step = meta.get("step", "")
        return int(step) if isinstance(step, str) and _WHOLE.fullmatch(step) else None
    except (OSError, ValueError, AttributeError):
        return None


def _read_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__", {}) or {}


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _bad(path: Path, what: str, problem: str) -> UserError:
    """One line naming the file and the field: ``what`` is a metadata field or a tensor."""
    return UserError(f"checkpoint {path} is damaged or was edited: {what} {problem}")


def _describe(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"


_WHOLE = re.compile(r"[0-9]{1,18}")


def _parse_count(path: Path, meta: dict[str, str], key: str, required: bool = False) -> int:
    """A whole number >= 0 stored as a string; absent: 0 (fields newer than some checkpoints)."""
    if key not in meta:
        if required:
            raise _bad(path, f"metadata {key!r}", "is missing")
        return 0
    if not _WHOLE.fullmatch(meta[key]):
        raise _bad(path, f"metadata {key!r}", f"must be a whole number >= 0, got {meta[key]!r}")
    return int(meta[key])


def _parse_loss_scale(path: Path, meta: dict[str, str]) -> float | None:
    if "loss_scale" not in meta:
        return None
    try:
        value = float(meta["loss_scale"])
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise _bad(path, "metadata 'loss_scale'", f"must be a positive number, got {meta['loss_scale']!r}")
    return value


def _parse_config(path: Path, meta: dict[str, str]) -> Config:
    """The run's config, from YAML through the same checks as a config file and ``train`` (safe_load:
    no tags that construct Python objects)."""
    import yaml

    if "config" not in meta:
        raise _bad(path, "metadata 'config'", "is missing")
    try:
        data = yaml.safe_load(meta["config"])
    except yaml.YAMLError as exc:
        raise _bad(path, "metadata 'config'", f"is not plain YAML ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise _bad(path, "metadata 'config'", f"is not a mapping of config sections (got {type(data).__name__})")
    try:
        config = from_dict(data)
        check_config(config)  # values a scene cannot be built from (a run's own config always passes)
    except UserError as exc:
        raise _bad(path, "metadata 'config'", f"is invalid ({exc})") from None
    return config


def _parse_param_groups(path: Path, meta: dict[str, str]) -> list[dict[str, Any]] | None:
    """JSON list of groups, each with ``params``: distinct parameter indices. Hyperparameters are
    checked against the live optimizer in :func:`restore_optimizer`."""
    if "param_groups" not in meta:
        return None
    what = "metadata 'param_groups'"
    try:
        groups = json.loads(meta["param_groups"])
    except ValueError as exc:
        raise _bad(path, what, f"is not JSON ({first_line(exc)})") from None
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        raise _bad(path, what, "must be a list of parameter groups")
    seen: set[int] = set()
    for i, group in enumerate(groups):
        params = group.get("params")
        if not isinstance(params, list) or not all(type(p) is int and p >= 0 for p in params):
            raise _bad(path, f"{what} group {i}", f"must list its parameters as indices, got params={params!r}")
        if len(set(params)) != len(params) or seen & set(params):
            raise _bad(path, f"{what} group {i}", "repeats a parameter index")
        seen |= set(params)
    return groups


def _parse_optimizer_state(path: Path, tensors: dict[str, torch.Tensor],
                           param_groups: list[dict[str, Any]] | None) -> dict[int, dict[str, torch.Tensor]]:
    """``optimizer.state.<index>.<name>`` tensors by index; every index must be in ``param_groups``."""
    prefix = "optimizer.state."
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        index, _, name = key[len(prefix):].partition(".")
        if not _WHOLE.fullmatch(index) or not name:
            raise _bad(path, f"tensor {key!r}", "is not named optimizer.state.<index>.<name>")
        state.setdefault(int(index), {})[name] = value
    if state and param_groups is None:
        raise _bad(path, "metadata 'param_groups'", "is missing while the file holds optimizer state")
    known = {i for group in param_groups or () for i in group["params"]}
    stray = sorted(set(state) - known)
    if stray:
        raise _bad(path, f"tensor 'optimizer.state.{stray[0]}.*'", "belongs to no parameter in param_groups")
    return state


def restore_scene(scene: Scene, ckpt: Checkpoint) -> None:
    """Load the saved field, background and occupancy state into ``scene`` (any device)."""
    for name, module in scene.modules().items():
        state = ckpt.section(name)
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise UserError(f"checkpoint {ckpt.path} does not match this {name} ({str(exc).splitlines()[0]})") from None


_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def restore_optimizer(optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    """Load the saved optimizer state after checking it against ``optimizer``: the same groups of
    parameters, hyperparameters of the same kinds (a key the file lacks keeps the optimizer's value),
    state tensors of the parameters' shapes, and Adam's three per-parameter entries."""
    path, saved = ckpt.path, ckpt.param_groups
    if saved is None:
        raise _bad(path, "metadata 'param_groups'", "is missing: the file holds no optimizer state to resume from")
    live = optimizer.state_dict()["param_groups"]
    saved_sizes, live_sizes = [len(g["params"]) for g in saved], [len(g["params"]) for g in live]
    if saved_sizes != live_sizes:
        raise _bad(path, "metadata 'param_groups'", f"has groups of {saved_sizes} parameters; this run's "
                   f"optimizer has {live_sizes}")
    groups = []
    for i, (old, new) in enumerate(zip(saved, live)):
        group = {}
        for key, value in new.items():
            if key != "params" and key in old and not _same_kind(old[key], value):
                raise _bad(path, f"metadata 'param_groups' group {i}",
                           f"has {key}={old[key]!r}, expected a value like {value!r}")
            group[key] = old.get(key, value)
        groups.append(group)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = _ADAM_STATE + (("max_exp_avg_sq",) if any(g.get("amsgrad") for g in groups) else ())
    for index, param in zip((i for g in saved for i in g["params"]), params):
        entry = ckpt.optimizer_state.get(index)
        if entry is None:
            continue  # a parameter that never had a gradient has no state
        for name in names if isinstance(optimizer, torch.optim.Adam) else entry:
            tensor, what = entry.get(name), f"tensor 'optimizer.state.{index}.{name}'"
            if tensor is None:
                raise _bad(path, what, "is missing")
            if name == "step":
                ok, expected = tensor.numel() == 1, "one number"
            else:
                ok, expected = list(tensor.shape) == list(param.shape), f"the parameter's shape {list(param.shape)}"
            if not (ok and tensor.is_floating_point()):
                raise _bad(path, what, f"is {_describe(tensor)}; expected floats, {expected}")
    optimizer.load_state_dict({"state": ckpt.optimizer_state, "param_groups": groups})


def _same_kind(value: Any, like: Any) -> bool:
    """Whether a saved hyperparameter can stand where the optimizer has ``like``."""
    if isinstance(like, bool) or like is None:
        return value is None or isinstance(value, bool)
    if isinstance(like, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(like, (list, tuple)):
        return isinstance(value, (list, tuple)) and len(value) == len(like) and all(map(_same_kind, value, like))
    return type(value) is type(like)


def restore_rng(ckpt: Checkpoint, generator: torch.Generator, device: torch.device) -> None:
    """Set the run's generator, the global CPU RNG and (CUDA runs on CUDA) the device's RNG from the
    checkpoint, after checking every saved state has the size this torch uses (all or nothing)."""
    saved = ckpt.section("rng")
    targets = [("generator", generator.get_state(), generator.set_state),
               ("torch", torch.get_rng_state(), torch.set_rng_state)]
    if device.type == "cuda" and "cuda" in saved:
        targets.append(("cuda", torch.cuda.get_rng_state(device), lambda s: torch.cuda.set_rng_state(s, device)))
    for name, like, _ in targets:
        value, what = saved.get(name), f"tensor 'rng.{name}'"
        if value is None:
            raise _bad(ckpt.path, what, "is missing: a run cannot continue without its random state")
        if value.dtype != like.dtype or value.shape != like.shape:
            raise _bad(ckpt.path, what, f"is {_describe(value)}; this torch's RNG state is {_describe(like)}")
    for name, _, set_state in targets:
        try:
            set_state(saved[name])
        except (RuntimeError, ValueError) as exc:
            raise _bad(ckpt.path, f"tensor 'rng.{name}'", f"is not a valid RNG state ({first_line(exc)})") from None


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
