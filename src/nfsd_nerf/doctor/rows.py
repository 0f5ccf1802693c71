"""The report's vocabulary: a row, what ``--model`` names, the facts checks share; small formatters."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Row:
    """One line of the report: what was checked, what was found, and what to do about it."""

    name: str
    value: str
    status: Status = "ok"
    advice: str = ""


@dataclass(frozen=True)
class ModelRef:
    """What ``--model`` names: the built-in prior, a local diffusers folder (resolved path) or a hub id."""

    kind: Literal["builtin", "folder", "hub"]
    name: str


@dataclass(frozen=True)
class Machine:
    """The facts several checks share: is there a GPU, and does train's preset run the prior in fp16 there."""

    cuda: bool
    half_precision: bool
    hash_grid_backend: str
    """``field.backend`` of the preset train would use (auto, tcnn or torch)."""




# --------------------------------------------------------------------------- small helpers


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing parent (free space and permissions are read there)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``, following the cache's symlinks, each blob counted once."""
    sizes = {}
    for path in folder.rglob("*"):
        if path.is_file():
            sizes[path.resolve()] = path.stat().st_size
    return sum(sizes.values())


def precision(variants: dict[str, str | None]) -> str:
    kinds = sorted({v or "fp32" for v in variants.values()})
    return "/".join(kinds)


def size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def major(version: str) -> str:
    return version.split(".")[0]


def tool_version(command: list, marker: str) -> str | None:
    """The first output line holding ``marker`` (e.g. nvcc's "release 12.4, V12.4.131"), or None."""
    try:
        text = subprocess.run(command, capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = next((line for line in text.splitlines() if marker in line), None)
    if line is None:
        return None
    return line.split(marker, 1)[1].strip(" ,").split(",")[0] if marker else line.strip()
