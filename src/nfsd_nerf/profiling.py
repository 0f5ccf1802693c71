"""Named timing stages for benchmarks: ``with stage("encode"): ...`` costs nothing unless recording.

The benchmark turns recording on with :func:`record_stages`; each stage is timed with the device
synchronised on entry and exit, so GPU work is charged to the stage that launched it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

_recorder: "StageTimes | None" = None


class StageTimes:
    """Seconds per stage per step: ``times[name]`` is a list with one entry per recorded call."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.times: dict[str, list[float]] = defaultdict(list)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@contextmanager
def stage(name: str) -> Iterator[None]:
    recorder = _recorder
    if recorder is None:
        yield
        return
    recorder.sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        recorder.sync()
        recorder.times[name].append(time.perf_counter() - start)


@contextmanager
def record_stages(device: torch.device | str = "cpu") -> Iterator[StageTimes]:
    """Record every :func:`stage` entered inside the ``with`` block."""
    global _recorder
    previous, _recorder = _recorder, StageTimes(device)
    try:
        yield _recorder
    finally:
        _recorder = previous
