"""Where the work runs: device choice, the CPU allocator set-up, and what the run used.

Every command calls :func:`prepare_process` once before its work and :func:`resolve_device` for its
``--device`` value, so the choice is made the same way everywhere.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from typing import Iterator

import torch

from . import __version__
from .errors import UserError

DEVICES = ("auto", "cuda", "cpu")
"""Values ``--device`` accepts (MPS is refused with a reason: see :func:`resolve_device`)."""


def resolve_device(name: str) -> torch.device:
    """auto -> CUDA when available, else the CPU. MPS is refused: the hash grid, the packed
    transmittance and the built-in prior compute in float64, which MPS does not support."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if name == "mps":
        raise UserError("--device mps is not supported yet (parts of the renderer need float64); use --device cpu")
    if name not in DEVICES:
        raise UserError(f"--device {name!r}: expected {', '.join(DEVICES)}")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """``"cuda (NVIDIA H100 ...)"`` or ``"cpu"``, for summaries."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process instead of returning it to the OS (Linux, glibc).

    By default glibc serves large allocations with fresh ``mmap`` pages and unmaps them on
    free, so every large PyTorch temporary pays one page fault per 4 KiB on first touch; in a
    VM that is most of an elementwise op's time. Measured here, the hash grid's
    forward+backward runs about 2x faster after this call (and every other large-tensor op of
    a CPU training step gains too). Process-wide and irreversible; call it once at program
    start for CPU work. Returns whether it was applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30)
        ok &= libc.mallopt(m_trim_threshold, (1 << 31) - 1)
        ok &= libc.mallopt(m_top_pad, 64 << 20)
        return bool(ok)
    except (OSError, AttributeError):
        return False


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to ``n`` inside the block and restored after (None: unchanged).

    Small tensors lose more to OpenMP's fork-join than a second thread gains: the built-in preset's
    1,000 steps take 33 s on one thread and 51 s on two (2-core VM, ``train.cpu_threads``).
    """
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def module_device(module: torch.nn.Module) -> torch.device:
    """Device of a module's parameters (the CPU for a parameter-free module)."""
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def prepare_process() -> None:
    """Once per command, before any tensor work: the allocator tuning, only without CUDA
    (the CUDA caching allocator does not go through glibc, and pinned host memory should)."""
    if not torch.cuda.is_available():
        tune_cpu_allocator()


def package_versions() -> dict[str, str]:
    """Versions of the packages a run's results depend on (those installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"nfsd-nerf": __version__}
    for name in ("torch", "diffusers", "transformers", "huggingface-hub", "nerfacc", "tinycudann"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
