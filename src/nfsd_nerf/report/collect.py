"""Read run and batch folders into plain data for the report page; reads files only (no torch).

A *run* folder is what ``train`` writes (``train/run_folder.py``): any of ``config.yaml``,
``metrics.jsonl``, ``summary.json`` or ``checkpoints/``; ``export/mesh.glb`` and
``video/turntable_<mode>.mp4`` come from ``export`` and ``render-video``. A *batch* folder holds
``batch.json`` (``batch/report.py``) and one run folder per planned run below it. Anything else,
or a run whose ``summary.json`` exists but cannot be read, is a :class:`UserError` (exit 2). A
run without ``summary.json`` (still training, or interrupted) is read as *partial*.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import UserError

VIDEO_MODES = ("rgb", "normal", "depth")
"""The turntables a report shows, as ``render-video`` names them: ``video/turntable_<mode>.mp4``."""
MESH = Path("export") / "mesh.glb"
"""The mesh a report shows: ``export --format glb`` writes it."""
_PREVIEW = re.compile(r"^step(\d+)\.png$")
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints")


@dataclass
class RunData:
    """One run folder as the report sees it; every field may be missing in a partial run."""

    folder: Path
    label: str
    summary: dict | None
    config: dict
    config_text: str
    metrics: list[dict]
    previews: list[tuple[int, Path]]
    videos: dict[str, Path]
    mesh: Path | None
    has_checkpoint: bool
    variant: str = ""
    seed: int | None = None
    state: str = ""
    note: str = ""

    @property
    def partial(self) -> bool:
        return self.summary is None

    @property
    def prompt(self) -> str:
        return str((self.summary or {}).get("prompt") or self.config.get("prompt") or "(unknown prompt)")

    @property
    def step(self) -> int | None:
        """Steps done: the summary's, else the last logged step."""
        if self.summary is not None and isinstance(self.summary.get("steps"), int):
            return self.summary["steps"]
        return self.metrics[-1]["step"] if self.metrics else None

    @property
    def planned_steps(self) -> int | None:
        steps = (self.config.get("train") or {}).get("steps")
        return steps if isinstance(steps, int) else None

    @property
    def evaluation(self) -> dict[str, float]:
        values = (self.summary or {}).get("eval") or {}
        return {k: float(v) for k, v in values.items() if _is_number(v)} if isinstance(values, dict) else {}

    @property
    def final_loss(self) -> float | None:
        for line in reversed(self.metrics):
            if _is_number(line.get("loss")):
                return float(line["loss"])
        return None


@dataclass
class BatchData:
    """A batch folder: its plan's name and its runs in plan order (prompts x variants x seeds)."""

    folder: Path
    name: str
    runs: list[RunData] = field(default_factory=list)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_run_folder(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in RUN_MARKERS)


def is_batch_folder(folder: Path) -> bool:
    return folder.is_dir() and (folder / "batch.json").is_file()


def read_summary(folder: Path, strict: bool = True) -> dict | None:
    """``summary.json`` as a dict; None when there is none yet. Unreadable: UserError if ``strict``,
    else raises ValueError for the caller to record."""
    path = folder / "summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        message = f"{path} is corrupt ({str(exc).splitlines()[0]}): retrain or resume the run to rewrite it"
        if strict:
            raise UserError(message) from None
        raise ValueError(message) from None
    return summary


def read_metrics(folder: Path) -> list[dict]:
    """The lines of ``metrics.jsonl`` that parse and have an integer step (the last one may be half
    written while the run trains)."""
    try:
        text = (folder / "metrics.jsonl").read_text(errors="replace")
    except OSError:
        return []
    lines = []
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and isinstance(line.get("step"), int):
            lines.append(line)
    return lines


def read_config(folder: Path) -> tuple[dict, str]:
    """The resolved config as a dict (empty if unreadable) and its text as written."""
    try:
        text = (folder / "config.yaml").read_text(errors="replace")
    except OSError:
        return {}, ""
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None
    return (parsed if isinstance(parsed, dict) else {}), text


def read_previews(folder: Path) -> list[tuple[int, Path]]:
    """``previews/stepNNNNNN.png`` as (step, path), by step."""
    found = []
    preview_dir = folder / "previews"
    if preview_dir.is_dir():
        for path in preview_dir.iterdir():
            match = _PREVIEW.match(path.name)
            if match and path.is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def read_run(folder: Path, label: str = "", strict: bool = True) -> RunData:
    """One run folder. ``strict``: a folder that is no run, or a corrupt summary, is a UserError;
    otherwise (a batch's member) it is recorded in ``state`` / ``note``."""
    folder = Path(folder)
    if not is_run_folder(folder):
        if strict:
            raise UserError(f"{folder} is neither a run folder (config.yaml, metrics.jsonl, summary.json) "
                            "nor a batch folder (batch.json)")
        return _empty_run(folder, label, "not started", "no run folder yet")
    note, state = "", ""
    try:
        summary = read_summary(folder, strict)
    except ValueError as exc:
        summary, state, note = None, "corrupt", str(exc)
    config, config_text = read_config(folder)
    videos = {m: folder / "video" / f"turntable_{m}.mp4" for m in VIDEO_MODES}
    run = RunData(
        folder=folder, label=label or folder.name, summary=summary, config=config, config_text=config_text,
        metrics=read_metrics(folder), previews=read_previews(folder),
        videos={m: p for m, p in videos.items() if p.is_file()},
        mesh=folder / MESH if (folder / MESH).is_file() else None,
        has_checkpoint=any((folder / "checkpoints").glob("*.safetensors")),
    )
    run.state = state or ("done" if summary is not None else "partial")
    run.note = note
    run.variant, run.seed = _variant_of(run), _seed_of(run)
    return run


def _empty_run(folder: Path, label: str, state: str, note: str) -> RunData:
    return RunData(folder=folder, label=label or folder.name, summary=None, config={}, config_text="", metrics=[],
                   previews=[], videos={}, mesh=None, has_checkpoint=False, state=state, note=note)


def _variant_of(run: RunData) -> str:
    """A loose run's column in a comparison: its rule and scale (``nfsd s7.5``, ``+ perp-neg``)."""
    guidance = run.config.get("guidance") or {}
    summary = run.summary or {}
    method = summary.get("guidance") or guidance.get("method") or "?"
    scale = summary.get("scale", guidance.get("scale"))
    text = f"{method} s{scale:g}" if _is_number(scale) else str(method)
    return text + (" + perp-neg" if summary.get("perp_neg", guidance.get("perp_neg")) else "")


def _seed_of(run: RunData) -> int | None:
    seed = (run.config.get("train") or {}).get("seed")
    return seed if isinstance(seed, int) else None


def read_batch(folder: Path) -> BatchData:
    """A batch folder through its ``batch.json``; each listed run is read leniently (a run not
    started yet, or with a corrupt summary, is a row that says so rather than an error)."""
    folder = Path(folder)
    try:
        data = json.loads((folder / "batch.json").read_text())
        runs = data["runs"]
        if not isinstance(runs, list):
            raise ValueError("runs is not a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{folder / 'batch.json'} is corrupt ({first_words(exc)}): rerun the batch to rewrite it") from None
    batch = BatchData(folder=folder, name=str(data.get("plan") or folder.name))
    for entry in runs:
        if not isinstance(entry, dict) or not isinstance(entry.get("folder"), str):
            raise UserError(f"{folder / 'batch.json'} is corrupt (a run without a folder): rerun the batch to rewrite it")
        run = read_run(folder / entry["folder"], label=entry["folder"], strict=False)
        run.variant = str(entry.get("variant") or run.variant)
        run.seed = entry.get("seed") if isinstance(entry.get("seed"), int) else run.seed
        if run.state in ("partial", "not started") and entry.get("state") in ("failed", "stale", "running", "pending",
                                                                              "interrupted"):
            run.state = entry["state"]
        run.note = run.note or str(entry.get("error") or "")
        if not run.config.get("prompt") and isinstance(entry.get("prompt"), str):
            run.config["prompt"] = entry["prompt"]
        batch.runs.append(run)
    return batch


def first_words(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_inputs(paths: list[Path]) -> BatchData | list[RunData]:
    """What ``report`` was given: one batch folder, or one or more run folders (strict)."""
    if not paths:
        raise UserError("give a run folder, several run folders, or a batch folder")
    for path in paths:
        if not Path(path).exists():
            raise UserError(f"folder not found: {path}")
    if len(paths) == 1 and is_batch_folder(Path(paths[0])):
        return read_batch(Path(paths[0]))
    if any(is_batch_folder(Path(p)) for p in paths):
        raise UserError("give one batch folder alone (its runs are in its report), or run folders")
    runs = [read_run(Path(p)) for p in paths]
    _disambiguate(runs)
    return runs


def _disambiguate(runs: list[RunData]) -> None:
    """Loose runs sharing prompt, variant and seed get their folder name in the variant, so each
    has its own cell of the comparison grid."""
    seen: dict[tuple, int] = {}
    for run in runs:
        key = (run.prompt, run.variant, run.seed)
        seen[key] = seen.get(key, 0) + 1
    for run in runs:
        if seen[(run.prompt, run.variant, run.seed)] > 1:
            run.variant = f"{run.variant} ({run.folder.name})"
