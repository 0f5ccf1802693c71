"""What a batch knows about each run, and its three views: ``batch.json`` (every run's state and
summary), ``results.csv`` (one row per run, for a spreadsheet) and the live table.

Both files are rewritten atomically after every change of state, so they are complete at any moment
(and after Ctrl-C). Progress (step, it/s) is read from each run's ``metrics.jsonl``: the driver needs
no channel to the workers beyond the shared output folder.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

from ..files import atomic_write_bytes
from .folders import last_metrics
from .plan import BatchPlan, RunSpec

State = Literal["pending", "running", "done", "failed", "stale", "interrupted"]
RESULT_COLUMNS = ("prompt", "variant", "seed", "state", "steps", "wall_time_s", "seconds_per_step", "final_loss")
"""The first columns of ``results.csv``; the evaluation metrics follow (built-in prior), then the
folder and any error."""


@dataclass
class RunRecord:
    """One planned run as this invocation sees it. ``action``: what this invocation does with it
    (``train``, ``resume``, ``restart``, ``skip``, ``leave`` for a stale run)."""

    spec: RunSpec
    state: State
    action: str
    attempts: int = 0
    error: str | None = None
    detail: str | None = None
    summary: dict | None = None
    worker: str = ""
    prior_load_s: float | None = None
    progress: dict = field(default_factory=dict)
    """The run's last ``metrics.jsonl`` line (refreshed by the live table and at the end)."""

    def refresh_progress(self) -> dict:
        self.progress = last_metrics(self.spec.run_dir) or self.progress
        return self.progress

    @property
    def step(self) -> int:
        if self.summary is not None:
            return int(self.summary.get("steps", 0))
        return int(self.progress.get("step", 0))

    @property
    def seconds_per_step(self) -> float | None:
        if self.summary is not None and self.summary.get("seconds_per_step"):
            return float(self.summary["seconds_per_step"])
        value = self.progress.get("seconds_per_step")
        return float(value) if value else None


class BatchReport:
    """Writes ``batch.json`` and ``results.csv`` into the plan's folder."""

    def __init__(self, plan: BatchPlan, records: list[RunRecord], executor: str = "") -> None:
        self.plan, self.records, self.executor = plan, records, executor

    def write(self) -> None:
        root = self.plan.root
        for record in self.records:
            if record.state != "pending":
                record.refresh_progress()
        atomic_write_bytes(root / "batch.json", (json.dumps(self.as_json(), indent=2) + "\n").encode())
        atomic_write_bytes(root / "results.csv", self.as_csv().encode())

    def as_json(self) -> dict:
        counts: dict[str, int] = {}
        for record in self.records:
            counts[record.state] = counts.get(record.state, 0) + 1
        return {
            "plan": self.plan.name,
            "plan_file": str(self.plan.source),
            "out": str(self.plan.root),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "executor": self.executor,
            "counts": counts,
            "runs": [_run_json(record) for record in self.records],
        }

    def as_csv(self) -> str:
        metrics: list[str] = []
        for record in self.records:
            for name, value in ((record.summary or {}).get("eval") or {}).items():
                if isinstance(value, (int, float)) and name not in metrics:
                    metrics.append(name)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*RESULT_COLUMNS, *metrics, "run_dir", "error"])
        for record in self.records:
            summary = record.summary or {}
            evaluation = summary.get("eval") or {}
            writer.writerow([
                record.spec.prompt, record.spec.variant, record.spec.seed, record.state, record.step or "",
                _cell(summary.get("wall_time_s")), _cell(record.seconds_per_step), _cell(record.progress.get("loss")),
                *(_cell(evaluation.get(name)) for name in metrics),
                record.spec.label, record.error or "",
            ])
        return buffer.getvalue()


def _run_json(record: RunRecord) -> dict:
    return {
        "prompt": record.spec.prompt, "variant": record.spec.variant, "seed": record.spec.seed,
        "folder": record.spec.label, "state": record.state, "action": record.action, "attempts": record.attempts,
        "step": record.step, "steps": record.spec.config.train.steps, "final_loss": record.progress.get("loss"),
        "error": record.error, "traceback": record.detail, "worker": record.worker or None,
        "prior_load_s": record.prior_load_s, "summary": record.summary,
    }


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class LiveTable:
    """A rich renderable that reads the runs' progress each time it is drawn: run, state, step,
    it/s and ETA per run, and the batch's ETA (remaining steps at the measured speed, over ``slots``)."""

    MAX_ROWS = 24
    """Beyond this many runs, finished ones are counted instead of listed."""

    def __init__(self, records: list[RunRecord], slots: int = 1) -> None:
        self.records, self.slots = records, slots

    def __rich__(self):
        from rich.table import Table

        for record in self.records:
            if record.state == "running":
                record.refresh_progress()
        table = Table(title=None, caption=self._caption(), caption_justify="left", expand=False)
        # minimum widths fit every state and a 5-digit step count; the run and the note give way first
        for name, justify, width in (("run", "left", 16), ("state", "left", 11), ("step", "right", 11),
                                     ("it/s", "right", 5), ("ETA", "right", 7), ("note", "left", None)):
            table.add_column(name, justify=justify, no_wrap=True, overflow="ellipsis", min_width=width)
        shown = self.records
        if len(shown) > self.MAX_ROWS:
            shown = [r for r in shown if r.state in ("running", "failed", "interrupted", "stale")][: self.MAX_ROWS]
        for record in shown:
            sps = record.seconds_per_step
            remaining = max(0, record.spec.config.train.steps - record.step)
            eta = format_duration(remaining * sps) if sps and record.state == "running" else ""
            style = {"done": "green", "failed": "red", "stale": "yellow", "interrupted": "yellow", "running": "bold"}
            state = f"[{style[record.state]}]{record.state}[/]" if record.state in style else record.state
            table.add_row(record.spec.label, state, f"{record.step}/{record.spec.config.train.steps}",
                          f"{1 / sps:.1f}" if sps and record.state == "running" else "", eta,
                          record.error or "")
        return table

    def _caption(self) -> str:
        counts: dict[str, int] = {}
        for record in self.records:
            counts[record.state] = counts.get(record.state, 0) + 1
        text = ", ".join(f"{n} {state}" for state, n in counts.items())
        eta = self.batch_eta()
        return f"{len(self.records)} runs: {text}" + (f"; batch ETA {format_duration(eta)}" if eta is not None else "")

    def batch_eta(self) -> float | None:
        """Seconds until every pending and running run is done, at the speeds measured so far."""
        todo = [r for r in self.records if r.state in ("pending", "running")]
        if not todo:
            return None
        known = [r.seconds_per_step for r in self.records if r.seconds_per_step]
        if not known:
            return None
        mean = sum(known) / len(known)
        work = sum(max(0, r.spec.config.train.steps - r.step) * (r.seconds_per_step or mean) for r in todo)
        return work / max(1, min(self.slots, len(todo)))


def format_duration(seconds: float) -> str:
    """``"42 s"``, ``"3.5 min"`` or ``"2.1 h"``: an ETA people read at a glance."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def print_result(console, plan: BatchPlan, records: list[RunRecord], interrupted: bool = False) -> int:
    """The closing lines: counts, every run that did not succeed and why, where the reports are.
    Returns the exit code: 0 when every run is done, 1 when some failed or are stale."""
    done = [r for r in records if r.state == "done"]
    skipped = sum(r.action == "skip" for r in done)
    problems = [r for r in records if r.state in ("failed", "stale", "interrupted")]
    text = f"{len(done)} of {len(records)} runs done" + (f" ({skipped} already were)" if skipped else "")
    counts = {s: sum(r.state == s for r in records) for s in ("failed", "stale", "interrupted", "pending")}
    text += "".join(f", {n} {s}" for s, n in counts.items() if n)
    console.print(text)
    for record in problems:
        console.print(f"  [red]{record.state}[/] {record.spec.label}: {record.error or ''}")
    if any(r.state == "interrupted" or r.state == "pending" for r in records) and interrupted:
        console.print("the same command resumes the interrupted runs from their checkpoints")
    console.print(f"results: [bold]{plan.root / 'results.csv'}[/] and {plan.root / 'batch.json'}")
    return 0 if len(done) == len(records) else 1
