"""What a planned run's folder already holds: nothing, a finished run, an interrupted one, or a
run of a different config (stale). Read by the driver before it starts anything, so a rerun of a
finished plan decides everything from the files, within seconds.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import from_dict, to_dict
from ..errors import UserError
from ..files import RUN_LOCK, exclusive_lock
from .plan import RunSpec

RESUME_MAY_CHANGE = ("train.steps", "train.device", "guidance.offline")
"""Keys a run keeps its folder through (those ``train --resume`` accepts); a higher ``train.steps``
extends a run, a lower one makes it stale."""


@dataclass(frozen=True)
class FolderState:
    """``new``: train from scratch (no checkpoint yet); ``resume``: continue from the latest checkpoint;
    ``done``: finished with the planned config; ``stale``: trained with another config (``reason``)."""

    kind: Literal["new", "resume", "done", "stale"]
    reason: str = ""
    summary: dict | None = None


def inspect_run(spec: RunSpec) -> FolderState:
    """Compare the folder of ``spec`` with its planned config."""
    from ..checkpoint import LATEST  # imports torch: only once a batch runs

    run_dir = spec.run_dir
    latest = run_dir / "checkpoints" / LATEST
    summary = read_summary(run_dir)
    if summary is None and not any((run_dir / "checkpoints").glob("*.safetensors")):
        return FolderState("new")  # at most a config.yaml and early metrics: nothing worth keeping
    try:
        saved = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError, UserError) as exc:
        return FolderState("stale", f"its config.yaml cannot be read ({str(exc).splitlines()[0]})")
    changed = config_differences(to_dict(saved), to_dict(spec.config))
    if changed:
        listed = ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
        return FolderState("stale", f"the plan changed {listed}")
    planned, trained = spec.config.train.steps, saved.train.steps
    if planned < trained:
        return FolderState("stale", f"the plan asks for {planned} steps, the run was started for {trained}")
    if summary is not None and summary.get("steps") == planned == trained:
        return FolderState("done", summary=summary)
    if not latest.is_file():
        return FolderState("stale", f"there is no checkpoints/{LATEST} to resume from")
    return FolderState("resume")


def config_differences(saved: dict, planned: dict) -> list[str]:
    """Dotted keys whose values differ, apart from those a resume may change."""
    a, b = _flatten(saved), _flatten(planned)
    return [k for k in sorted(set(a) | set(b)) if k not in RESUME_MAY_CHANGE and a.get(k) != b.get(k)]


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_summary(run_dir: Path) -> dict | None:
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def last_metrics(run_dir: Path) -> dict | None:
    """The last complete line of ``metrics.jsonl`` (reads only the file's end: it is polled live)."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - 8192))
            tail = handle.read().decode(errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            parsed = json.loads(line)
        except ValueError:
            continue  # a line being written, or cut by the seek
        if isinstance(parsed, dict) and "step" in parsed:
            return parsed
    return None


def clear_run_folder(run_dir: Path) -> None:
    """Empty a run's folder before it trains from scratch (the batch owns these folders: an
    earlier attempt's metrics would otherwise be appended to), under the run's lock, so a
    ``train --resume`` still running there is refused rather than deleted under its feet."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(run_dir / RUN_LOCK, f"another nfsd-nerf process is training in {run_dir}; "
                        "the batch cannot restart that run until it ends"):
        for entry in run_dir.iterdir():
            if entry.name == RUN_LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
