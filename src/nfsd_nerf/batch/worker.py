"""One batch worker: trains the runs it is handed one after another in its own process, keeping
the diffusion prior loaded between them (a prior is loaded once per worker, not once per run).

The same :class:`RunExecutor` serves the in-process fallback and each Ray actor. It never raises:
every ending of a run is a :class:`RunOutcome` the driver records.
"""

from __future__ import annotations

import io
import os
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Literal

from ..errors import UserError
from .folders import clear_run_folder
from .plan import RunSpec


@dataclass(frozen=True)
class RunTask:
    """A planned run and how to start it: ``fresh`` clears its folder and trains from step 0,
    otherwise it continues from ``checkpoints/latest.safetensors`` up to the planned steps."""

    spec: RunSpec
    fresh: bool


@dataclass
class RunOutcome:
    """How one attempt ended. ``retryable`` marks failures that may not recur (out of memory, a lost
    worker); ``prior_load_s`` is None when the run reused the worker's loaded prior."""

    state: Literal["done", "failed", "interrupted"]
    summary: dict | None = None
    error: str | None = None
    detail: str | None = None
    """The traceback of an unexpected exception (a bug, not bad input)."""
    retryable: bool = False
    prior_load_s: float | None = None
    worker: str = ""


class RunExecutor:
    """Trains :class:`RunTask` s in this process; keeps the last prior (one prior in memory at a
    time: on a GPU two full-size priors may not fit)."""

    def __init__(self) -> None:
        self._prior_key: tuple | None = None
        self._prior = None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, task: RunTask) -> RunOutcome:
        from rich.console import Console

        from ..train import Interrupted, run_training

        spec, load_s = task.spec, None
        try:
            cfg, ckpt = self._start(task)
            prior, load_s = self._prior_for(cfg)
            quiet = Console(file=io.StringIO())  # the driver's table shows progress, from metrics.jsonl
            result = run_training(cfg, out=spec.run_dir.parent, resume=ckpt, run_dir=spec.run_dir,
                                  console=quiet, progress=False, prior=prior)
            return RunOutcome("done", summary=result.summary, prior_load_s=load_s, worker=self.worker)
        except Interrupted as stop:
            return RunOutcome("interrupted", error=f"saved checkpoints/{stop.checkpoint.name}",
                              prior_load_s=load_s, worker=self.worker)
        except KeyboardInterrupt:
            return RunOutcome("interrupted", error="interrupted before training", prior_load_s=load_s,
                              worker=self.worker)
        except UserError as exc:  # includes divergence: a retry would end the same way
            return RunOutcome("failed", error=str(exc), prior_load_s=load_s, worker=self.worker)
        except Exception as exc:  # noqa: BLE001 - one run's failure must never stop the others
            retryable = _out_of_memory(exc)
            if retryable:
                self._drop_prior()
            return RunOutcome("failed", error=_one_line(exc), detail=None if retryable else traceback.format_exc(),
                              retryable=retryable, prior_load_s=load_s, worker=self.worker)

    @staticmethod
    def _start(task: RunTask):
        """The config and checkpoint to train from: the plan's from scratch, or the saved run's with
        only what ``train --resume`` may change taken from the plan (steps, device, offline)."""
        from ..checkpoint import LATEST, read_checkpoint
        from ..config import merge

        spec = task.spec
        if task.fresh:
            clear_run_folder(spec.run_dir)
            return spec.config, None
        ckpt = read_checkpoint(spec.run_dir / "checkpoints" / LATEST)
        planned = spec.config
        cfg = merge(ckpt.config, {"train": {"steps": planned.train.steps, "device": planned.train.device},
                                  "guidance": {"offline": planned.guidance.offline}})
        return cfg, ckpt

    def _prior_for(self, cfg) -> tuple[object, float | None]:
        """The worker's prior when ``cfg`` needs the same one, else a newly loaded one (and its load time)."""
        from ..config import BUILTIN_MODEL
        from ..runtime import resolve_device
        from ..train.run import load_run_prior

        device = resolve_device(cfg.train.device)
        g = cfg.guidance
        key = (g.model, g.revision, str(device), g.half_precision, g.offline,
               cfg.render.size if g.model == BUILTIN_MODEL else None)
        if key == self._prior_key:
            return self._prior, None
        self._drop_prior()
        started = time.perf_counter()
        self._prior = load_run_prior(cfg, device)
        self._prior_key = key
        return self._prior, round(time.perf_counter() - started, 2)

    def _drop_prior(self) -> None:
        self._prior, self._prior_key = None, None
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _out_of_memory(exc: BaseException) -> bool:
    """Out of memory on the host or a GPU: worth one retry (another run may have held the memory)."""
    import torch

    return isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in str(exc).lower()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
