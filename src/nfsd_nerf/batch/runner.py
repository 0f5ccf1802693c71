"""Runs a checked plan: decides what each run folder needs (skip, train, resume, leave stale),
hands the runs to workers (Ray slots, or this process one after another), retries a run once
when its failure may not recur, and keeps ``batch.json`` / ``results.csv`` and the live table
current. One run's failure never stops the others; Ctrl-C makes every running run save a
checkpoint before the batch exits.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import UserError
from ..files import atomic_write_bytes, check_writable, exclusive_lock
from .folders import inspect_run
from .plan import BatchPlan
from .report import BatchReport, LiveTable, RunRecord
from .worker import RunExecutor, RunOutcome, RunTask

MAX_ATTEMPTS = 2
"""A run whose failure may not recur (out of memory, a lost worker) is tried once more."""
POLL_S = 0.5


class Backend(Protocol):
    """Where runs execute: :class:`InProcess` or :class:`~.ray_pool.RayPool`."""

    description: str

    def start(self, wanted: int) -> int: ...
    def free_slots(self) -> int: ...
    def busy(self) -> bool: ...
    def submit(self, task: RunTask) -> None: ...
    def poll(self, timeout: float) -> list[tuple[RunTask, RunOutcome]]: ...
    def interrupt(self) -> None: ...
    def close(self) -> None: ...


class InProcess:
    """Without Ray: one run after another in this process (Ctrl-C reaches the run directly)."""

    description = "in this process, one run after another (Ray is not installed)"

    def __init__(self) -> None:
        self.executor = RunExecutor()
        self._task: RunTask | None = None

    def start(self, wanted: int) -> int:
        return 1

    def free_slots(self) -> int:
        return int(self._task is None)

    def busy(self) -> bool:
        return self._task is not None

    def submit(self, task: RunTask) -> None:
        self._task = task

    def poll(self, timeout: float) -> list[tuple[RunTask, RunOutcome]]:
        task, self._task = self._task, None
        return [] if task is None else [(task, self.executor.run(task))]

    def interrupt(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class BatchResult:
    """How every run of a plan ended this time; ``executor`` says where they ran."""

    records: list[RunRecord]
    interrupted: bool
    executor: str


class BatchInterrupted(Exception):
    """Ctrl-C: running runs saved their checkpoints; the same command resumes them."""

    def __init__(self, result: BatchResult):
        super().__init__("interrupted")
        self.result = result


def initial_records(plan: BatchPlan, restart_stale: bool) -> list[RunRecord]:
    """What each run folder holds now, and what this invocation will do with it."""
    records = []
    for spec in plan.runs:
        found = inspect_run(spec)
        if found.kind == "done":
            records.append(RunRecord(spec, "done", "skip", summary=found.summary))
        elif found.kind == "stale" and not restart_stale:
            reason = f"stale: {found.reason} (--restart-stale retrains it)"
            records.append(RunRecord(spec, "stale", "leave", error=reason))
        else:
            action = {"new": "train", "resume": "resume", "stale": "restart"}[found.kind]
            records.append(RunRecord(spec, "pending", action))
    return records


def choose_backend(plan: BatchPlan, address: str | None, console) -> Backend:
    """Ray when it is installed, else this process (said in one line); ``--address`` needs Ray."""
    from .ray_pool import RayPool, import_ray

    ray = import_ray()
    if ray is None:
        if address:
            raise UserError("--address needs Ray: pip install 'nfsd-nerf[ray]'")
        console.print("Ray is not installed: running the runs one after another in this process "
                      "(pip install 'nfsd-nerf[ray]' to run them in parallel)")
        return InProcess()
    return RayPool(ray, plan.root, address=address)


def run_batch(plan: BatchPlan, *, address: str | None = None, restart_stale: bool = False, console=None,
              backend: Backend | None = None, live: bool = True) -> BatchResult:
    """Run every run of ``plan`` that is not finished; returns how each ended.

    Raises :class:`BatchInterrupted` after Ctrl-C (the reports are written first)."""
    from rich.console import Console

    console = console or Console()
    check_writable(plan.root)
    plan.root.mkdir(parents=True, exist_ok=True)
    with _exclusive(plan.root):
        return _run_locked(plan, address, restart_stale, console, backend, live)


def _exclusive(root: Path):
    """One batch per plan folder at a time: two would train the same runs into the same folders.
    The lock (``flock`` on ``.batch.lock``) goes with the process, however it ends."""
    return exclusive_lock(root / ".batch.lock", f"another nfsd-nerf batch is running in {root}")


def _run_locked(plan: BatchPlan, address: str | None, restart_stale: bool, console, backend: Backend | None,
                live: bool) -> BatchResult:
    from rich.live import Live

    records = initial_records(plan, restart_stale)
    atomic_write_bytes(plan.root / "plan.yaml", plan.text.encode())
    report = BatchReport(plan, records)
    todo = [r for r in records if r.state == "pending"]
    if not todo:
        report.write()
        return BatchResult(records, interrupted=False, executor="nothing to run")

    backend = backend or choose_backend(plan, address, console)
    try:
        slots = backend.start(len(todo))
        report.executor = backend.description
        report.write()
        console.print(f"{len(todo)} of {len(records)} runs to go; {backend.description}")
        scheduler = _Scheduler(backend, report, todo)
        with Live(LiveTable(records, slots), console=console, refresh_per_second=2, auto_refresh=live) as view:
            try:
                scheduler.run()
            except KeyboardInterrupt:
                scheduler.interrupted = True
                console.print("[yellow]interrupted[/]: every running run saves a checkpoint "
                              "(Ctrl-C again stops at once, losing the steps since each run's last checkpoint)")
                backend.interrupt()
                try:
                    scheduler.drain()
                except KeyboardInterrupt:
                    scheduler.abandon("stopped at once: resumes from its last periodic checkpoint")
            view.refresh()
        if not console.is_terminal:
            console.line()  # a non-terminal gets the table once, at the end, without its last newline
    finally:
        backend.close()
        report.write()
    result = BatchResult(records, interrupted=scheduler.interrupted, executor=backend.description)
    if result.interrupted:
        raise BatchInterrupted(result)
    return result


class _Scheduler:
    """Hands queued runs to free slots and records how each attempt ended."""

    def __init__(self, backend: Backend, report: BatchReport, todo: list[RunRecord]):
        self.backend, self.report = backend, report
        self.todo: deque[RunRecord] = deque(todo)
        self.running: dict = {}
        """Run folder -> its record, while a worker has it."""
        self.interrupted = False

    def run(self) -> None:
        """Until every run has ended; after an interrupted run (Ctrl-C in this process) no further
        run starts and only the running ones are waited for."""
        backend = self.backend
        while self.todo or backend.busy():
            while self.todo and backend.free_slots() and not self.interrupted:
                self._submit(self.todo.popleft())
            if self.todo and not backend.busy() and not backend.free_slots():
                for record in self.todo:
                    record.state, record.error = "failed", "no worker left to run it"
                self.todo.clear()
            self._collect(retry=True)
            if self.interrupted and not backend.busy():
                break

    def drain(self) -> None:
        """After Ctrl-C: wait for the running runs to save their checkpoints and return."""
        while self.backend.busy():
            self._collect(retry=False)

    def abandon(self, reason: str) -> None:
        """A second Ctrl-C: the running runs are stopped where they are (the backend closes them)."""
        for record in self.running.values():
            record.state, record.error = "interrupted", reason
        self.running.clear()

    def _submit(self, record: RunRecord) -> None:
        """Start ``record`` from what its folder holds now (an earlier attempt may have checkpointed)."""
        found = inspect_run(record.spec)
        record.attempts += 1
        record.state, record.detail = "running", None
        self.running[record.spec.run_dir] = record
        self.backend.submit(RunTask(record.spec, fresh=found.kind in ("new", "stale")))

    def _collect(self, retry: bool) -> None:
        for task, outcome in self.backend.poll(POLL_S):
            self._record(self.running.pop(task.spec.run_dir), outcome, retry)
            self.report.write()

    def _record(self, record: RunRecord, outcome: RunOutcome, retry: bool) -> None:
        """Note how an attempt ended; requeue a failure that may not recur, once."""
        record.worker = outcome.worker or record.worker
        if outcome.prior_load_s is not None or record.attempts == 1:
            record.prior_load_s = outcome.prior_load_s
        record.error, record.detail = outcome.error, outcome.detail
        if outcome.state == "done":
            record.state, record.summary = "done", outcome.summary
        elif outcome.state == "interrupted":
            record.state, self.interrupted = "interrupted", True
        elif outcome.retryable and retry and record.attempts < MAX_ATTEMPTS:
            record.state, record.error = "pending", f"retrying after: {outcome.error}"
            self.todo.append(record)
        else:
            record.state = "failed"
