"""Runs a batch on Ray: one actor per slot (a GPU, or ``CPU_CORES_PER_RUN`` cores), each a
:class:`~.worker.RunExecutor` that keeps its prior loaded across the runs it is handed.

Ray is optional (``pip install 'nfsd-nerf[ray]'``) and imported only here, inside functions.
Without ``--address`` a local instance is started (no dashboard: its unauthenticated HTTP API is
not wanted; Ray's token authentication is left as Ray sets it); ``auto`` or ``ray://host:10001``
joins a cluster, whose nodes must all see the output folder at the same path: every worker reads
a marker file the driver wrote there before any run starts.

Ctrl-C: Ray blocks SIGINT in its workers, so a terminal's Ctrl-C never reaches them. The driver
sends each busy worker one SIGINT (a zero-CPU task pinned to the worker's node); a thread in the
worker takes it with ``sigwait`` and hands it to the run's own Ctrl-C handler once training has
installed it, so the run stops between steps with a checkpoint, exactly as ``train`` does.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write_bytes
from .worker import RunExecutor, RunOutcome, RunTask

CPU_CORES_PER_RUN = 1
"""Cores (torch threads) per concurrent run without a GPU. Measured on the 2-core reference machine,
4 built-in runs of 1,000 steps (README, "Many runs"): two concurrent runs on one core each, 275-278
runs/h (0.020-0.023 s/step); one run at a time on both cores, 115-120 runs/h (0.027-0.029 s/step):
the built-in preset's small tensors gain nothing from a second thread."""
START_TIMEOUT_S = 180.0
"""How long the driver waits for its workers to start (import torch, read the marker)."""
MARKER_PREFIX = ".nfsd-nerf-batch-"


def import_ray():
    """The ``ray`` module, or None when the optional extra is not installed."""
    try:
        import ray
    except ImportError:
        return None
    return ray


class _Worker:
    """The actor's body (wrapped with ``ray.remote`` by :class:`RayPool`)."""

    def __init__(self, marker: str, token: str):
        from ..runtime import prepare_process

        prepare_process()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # Ray does; threads started later inherit it
        self._baseline = signal.getsignal(signal.SIGINT)
        self._running = False
        self.executor = RunExecutor()
        try:
            self._sees_marker = Path(marker).read_text() == token
        except OSError:
            self._sees_marker = False
        threading.Thread(target=self._take_interrupts, name="nfsd-nerf-sigint", daemon=True).start()

    def where(self) -> dict:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "host": socket.gethostname(),
                "sees_marker": self._sees_marker}

    def run(self, task: RunTask) -> RunOutcome:
        self._running = True
        try:
            return self.executor.run(task)
        finally:
            self._running = False

    def _take_interrupts(self) -> None:
        """Each SIGINT during a run reaches the run's own handler once, as soon as it is installed
        (between steps it sets the stop flag; before training starts it waits for it)."""
        while True:
            signal.sigwait({signal.SIGINT})
            while self._running:
                handler = signal.getsignal(signal.SIGINT)
                if callable(handler) and handler is not self._baseline:
                    handler(signal.SIGINT, None)
                    break
                time.sleep(0.05)


def _send_sigint(pid: int) -> None:
    os.kill(pid, signal.SIGINT)


class RayPool:
    """Slots on Ray. The runner calls :meth:`start`, then :meth:`submit` / :meth:`poll` until done."""

    def __init__(self, ray, root: Path, *, address: str | None = None, cpu_cores_per_run: int | None = None):
        self.ray, self.root, self.address = ray, Path(root), address
        self.cpu_cores_per_run = cpu_cores_per_run or CPU_CORES_PER_RUN
        self.description = ""
        self._started_ray = False
        self._marker: Path | None = None
        self._token = ""
        self._options: dict = {}
        self._actor_class = None
        self._slots: list[dict] = []
        """Per slot: ``actor``, ``where`` (node, pid, host) and the running ``ref`` and ``task`` (or None)."""

    # ------------------------------------------------------------------ lifecycle

    def start(self, wanted: int) -> int:
        """Connect (or start Ray), size the slots from the cluster's resources, start up to ``wanted``
        workers and check that each sees the output folder. Returns the number of slots."""
        ray = self.ray
        if not ray.is_initialized():
            kwargs = {"log_to_driver": False, "logging_level": logging.WARNING}
            try:
                if self.address:
                    ray.init(address=self.address, **kwargs)
                else:
                    ray.init(address="local", include_dashboard=False, **kwargs)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                hint = ""
                if (self.address or "").startswith("ray://") and "RAY_AUTH_MODE" not in os.environ:
                    hint = " (a cluster with Ray's token authentication needs RAY_AUTH_MODE=token and its token here)"
                raise UserError(f"cannot connect to {where}: {str(exc).splitlines()[0]}{hint}") from None
            self._started_ray = True
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        if gpus:
            slots, self._options = gpus, {"num_gpus": 1, "num_cpus": 1}  # fits any node, whatever its CPU count
            kind = f"one run per GPU ({gpus} GPUs)"
        else:
            per_run = min(self.cpu_cores_per_run, cpus)
            slots, self._options = max(1, cpus // per_run), {"num_cpus": per_run}
            kind = f"{per_run} CPU core{'s' if per_run > 1 else ''} per run ({cpus} cores, no GPU)"
        where = f"Ray cluster at {self.address}" if self.address else "local Ray"
        self._token = uuid.uuid4().hex
        self._marker = atomic_write_bytes(self.root / f"{MARKER_PREFIX}{self._token[:12]}", self._token.encode())
        self._actor_class = ray.remote(max_restarts=0)(_Worker)
        started = self._start_workers(min(slots, wanted))
        if not started:
            raise UserError(f"no Ray worker started within {START_TIMEOUT_S:.0f} s on {where} "
                            f"(each needs {self._options}); check the cluster's free resources")
        self._slots = started
        self.description = f"{where}: {len(started)} slot(s), {kind}"
        return len(started)

    def _start_workers(self, n: int) -> list[dict]:
        ray = self.ray
        actors = [self._actor_class.options(**self._options).remote(str(self._marker), self._token) for _ in range(n)]
        refs = [actor.where.remote() for actor in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=START_TIMEOUT_S)
        slots = []
        for actor, ref in zip(actors, refs, strict=True):
            if ref not in ready:
                ray.kill(actor)
                continue
            try:
                where = ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise UserError(f"a Ray worker failed to start: {str(exc).strip().splitlines()[-1]}") from None
            if not where["sees_marker"]:
                raise UserError(
                    f"the output folder {self.root} is not visible from Ray node {where['host']}: on a cluster, "
                    "OUT must be storage every node sees at the same path (e.g. an NFS mount)")
            slots.append({"actor": actor, "where": where, "ref": None, "task": None})
        return slots

    def close(self) -> None:
        """Stop the workers (and the local Ray instance this pool started)."""
        ray = self.ray
        for slot in self._slots:
            try:
                ray.kill(slot["actor"])
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._slots = []
        if self._marker is not None:
            self._marker.unlink(missing_ok=True)
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    # ------------------------------------------------------------------ scheduling

    def free_slots(self) -> int:
        return sum(slot["ref"] is None for slot in self._slots)

    def busy(self) -> bool:
        return any(slot["ref"] is not None for slot in self._slots)

    def submit(self, task: RunTask) -> None:
        slot = next(slot for slot in self._slots if slot["ref"] is None)
        slot["task"], slot["ref"] = task, slot["actor"].run.remote(task)

    def poll(self, timeout: float) -> list[tuple[RunTask, RunOutcome]]:
        """Outcomes of the runs that ended within ``timeout`` seconds. A lost worker (crash, killed
        for memory, node gone) is a retryable failure, and its slot gets a fresh worker."""
        ray = self.ray
        busy = {slot["ref"]: slot for slot in self._slots if slot["ref"] is not None}
        if not busy:
            return []
        ready, _ = ray.wait(list(busy), num_returns=1, timeout=timeout)
        ended = []
        for ref in ready:
            slot = busy[ref]
            task, slot["ref"], slot["task"] = slot["task"], None, None
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the executor raised: a bug
                outcome = RunOutcome("failed", error=str(exc).strip().splitlines()[-1])
            except ray.exceptions.RayError as exc:
                outcome = RunOutcome("failed", error=f"lost the worker {slot['where']['host']}:{slot['where']['pid']} "
                                     f"({type(exc).__name__})", retryable=True)
                self._replace(slot)
            ended.append((task, outcome))
        return ended

    def _replace(self, slot: dict) -> None:
        try:
            fresh = self._start_workers(1)
        except UserError:
            fresh = []
        if fresh:
            slot.update(fresh[0])
        else:
            self._slots.remove(slot)

    def interrupt(self) -> None:
        """One SIGINT to every busy worker, on its node; each run saves a checkpoint and returns."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        send = ray.remote(num_cpus=0, max_retries=0)(_send_sigint)
        refs = [send.options(scheduling_strategy=NodeAffinitySchedulingStrategy(slot["where"]["node"], soft=False))
                .remote(slot["where"]["pid"]) for slot in self._slots if slot["ref"] is not None]
        try:
            ray.get(refs, timeout=30)
        except Exception:  # noqa: BLE001 - a worker that cannot be reached is stopped by close()
            pass
