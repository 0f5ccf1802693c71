"""``nfsd-nerf doctor``: will ``train`` run on this machine with this model, and if not, what to do.

Run before a long job or when reporting a bug. Each check is a function returning :class:`Row`
(name, value, ``ok`` / ``warn`` / ``fail``, advice); :func:`run_checks` gathers them and
:func:`render` prints the table. Rules:

* a ``--model`` value that cannot name a model (a file, a folder that is not a diffusers folder,
  a malformed hub id) is a :class:`~nfsd_nerf.errors.UserError` (exit code 2) before any check;
* :func:`exit_code` is 1 when a row fails (``train`` would not run: a model missing from the
  cache, an unwritable output folder...), else 0;
* the network is never touched unless ``online=True``: then one hub request, under hub.py's
  deadline (:func:`~nfsd_nerf.guidance.hub.hub_timeout`);
* nerfacc's kernels are never imported without a GPU, and built only with ``build=True``.

torch, huggingface_hub and nerfacc are imported inside the functions (the CLI imports this module lazily anyway).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import __version__
from .config import BUILTIN_MODEL, load_config, preset_path
from .errors import UserError

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


# --------------------------------------------------------------------------- entry points


def run_checks(model: str, *, revision: str | None = None, out: Path = Path("outputs"), offline: bool = False,
               online: bool = False, build: bool = False, console=None) -> list[Row]:
    """Every check, in report order. Raises UserError for a ``--model`` that names no model."""
    ref = parse_model(model)
    if online and offline:
        raise UserError("--online and --offline contradict each other: pass one")
    import torch

    cfg = load_config(preset_path("builtin" if ref.kind == "builtin" else "default"))
    machine = Machine(torch.cuda.is_available(), cfg.guidance.half_precision, cfg.field.backend)
    return [
        *version_rows(ref),
        *cuda_rows(ref),
        hash_grid_row(machine),
        *toolchain_rows(machine),
        nerfacc_row(machine, build=build, console=console),
        ffmpeg_row(),
        *model_rows(ref, machine, revision=revision, offline=offline, online=online),
        *disk_rows(ref, out),
        offline_row(offline),
    ]


def exit_code(rows: list[Row]) -> int:
    """1 when any check fails (train would not run), else 0."""
    return 1 if any(row.status == "fail" for row in rows) else 0


_STYLES = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]"}


def render(rows: list[Row], console, model: str) -> None:
    """The table, then each row's advice on its own line (commands stay whole), then the verdict."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"nfsd-nerf doctor (--model {escape(model)})", title_justify="left")
    table.add_column("check", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("status", no_wrap=True)
    for row in rows:
        table.add_row(escape(row.name), escape(row.value), _STYLES[row.status])
    console.print(table, soft_wrap=False)
    for row in sorted((r for r in rows if r.advice), key=lambda r: ("fail", "warn", "ok").index(r.status)):
        label = {"ok": "tip", "warn": "warn", "fail": "FAIL"}[row.status]
        first, *more = row.advice.splitlines()
        console.print(f"{label} {escape(row.name)}: {escape(first)}", highlight=False)
        for line in more:  # commands: one line each, never wrapped (the console soft-wraps)
            console.print(f"    {escape(line)}", highlight=False)
    if exit_code(rows):
        console.print(f"[bold red]train --model {escape(model)} would not run here[/]: fix the FAIL rows above")
    else:
        console.print(f"[green]train --model {escape(model)} would run here[/]")


# --------------------------------------------------------------------------- the model argument


def parse_model(model: str) -> ModelRef:
    """Classify ``--model`` without touching the network; UserError for a value that names no model."""
    from .guidance.hub import _looks_like_path, missing_files, weight_variants

    if model == BUILTIN_MODEL:
        return ModelRef("builtin", model)
    path = Path(model).expanduser()
    if path.is_dir():
        missing = missing_files(path, weight_variants(path, half_precision=False))
        if missing:
            raise UserError(f"--model {model!r} is not a Stable Diffusion diffusers folder: missing {', '.join(missing)}")
        return ModelRef("folder", str(path.resolve()))
    if path.exists():
        raise UserError(f"--model {model!r} is a file; pass a diffusers folder, a hub id (org/name) or 'builtin'")
    if _looks_like_path(model):
        raise UserError(f"--model {model!r}: no such folder; pass a diffusers folder, a hub id or 'builtin'")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        raise UserError(f"--model {model!r} is neither an existing folder nor a valid hub id (org/name)") from None
    return ModelRef("hub", model)


# --------------------------------------------------------------------------- software and GPU


def version_rows(ref: ModelRef) -> list[Row]:
    """nfsd-nerf, Python and the libraries a run's results depend on."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    rows = [Row("nfsd-nerf", __version__), Row("python", f"{platform.python_version()} ({sys.executable})"),
            Row("torch", torch.__version__)]
    for dist in ("diffusers", "transformers", "huggingface-hub", "nerfacc"):
        try:
            rows.append(Row(dist, version(dist)))
        except PackageNotFoundError:
            needed = ref.kind != "builtin" and dist != "nerfacc"
            rows.append(Row(dist, "not installed", "fail" if needed else "warn",
                            f"reinstall nfsd-nerf (`make install`) to get {dist}"))
    return rows


def cuda_rows(ref: ModelRef) -> list[Row]:
    """CUDA availability, and each GPU's name, memory (total, free) and compute capability."""
    import torch

    if not torch.cuda.is_available():
        why = "CPU build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}, no GPU visible"
        if ref.kind == "builtin":
            return [Row("CUDA", f"not available ({why}); train runs on the CPU")]
        return [Row("CUDA", f"not available ({why})", "warn",
                    "Stable Diffusion on the CPU is very slow (train prints the measured s/step and the projected "
                    "total after 3 steps): install a CUDA build of torch (README, 'With a GPU and Stable Diffusion')")]
    count = torch.cuda.device_count()
    rows = [Row("CUDA", f"available: torch built for CUDA {torch.version.cuda}, {count} GPU(s)")]
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        rows.append(Row(f"GPU {i}", f"{props.name}, {_gib(total)} ({_gib(free)} free), "
                                    f"compute capability {props.major}.{props.minor}"))
    return rows


def hash_grid_row(machine: Machine) -> Row:
    """Which hash-grid backend train would use, and whether tinycudann imports."""
    from .encoding.hash_grid import tcnn_available

    installed = importlib.util.find_spec("tinycudann") is not None
    if machine.hash_grid_backend != "torch" and tcnn_available():
        return Row("hash grid", "tinycudann (installed and importable)")
    if machine.hash_grid_backend == "torch":
        why = "field.backend is torch"
    elif not installed:
        why = "tinycudann is not installed"
    elif not machine.cuda:
        why = "tinycudann is installed but needs a GPU"
    else:
        why = "tinycudann is installed but does not import"
    tip = ("optional, a faster hash grid: pip install \"git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory="
           "bindings/torch\" (needs nvcc)") if machine.cuda and not installed else ""
    return Row("hash grid", f"PyTorch backend ({why}; same function, same checkpoints)", "ok", tip)


def toolchain_rows(machine: Machine) -> list[Row]:
    """nvcc, CUDA_HOME and ninja: what building nerfacc's kernels (and tinycudann) needs. Only a GPU needs them."""
    import torch

    nvcc = shutil.which("nvcc")
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    release = _tool_version([nvcc, "--version"], "release") if nvcc else None
    value = f"{nvcc} (release {release or 'unknown'})" if nvcc else "not found on PATH"
    status, advice = "ok", ""
    if machine.cuda and not nvcc:
        status, advice = "warn", f"needed to build nerfacc's kernels: install the CUDA {torch.version.cuda} toolkit, put its bin/ on PATH"
    elif machine.cuda and release and torch.version.cuda and _major(release) != _major(torch.version.cuda):
        status, advice = "warn", f"nvcc is {release} but torch was built for CUDA {torch.version.cuda}: install a matching toolkit"
    ninja = shutil.which("ninja")
    ninja_value = f"{ninja} ({_tool_version([ninja, '--version'], '') or 'unknown version'})" if ninja else "not found on PATH"
    ninja_row = Row("ninja", ninja_value, "warn" if machine.cuda and not ninja else "ok",
                    "needed to build nerfacc's kernels: pip install ninja (in the environment on PATH)"
                    if machine.cuda and not ninja else "")
    return [Row("nvcc", value, status, advice), Row("CUDA_HOME", home or "unset"), ninja_row]


def nerfacc_row(machine: Machine, *, build: bool, console=None) -> Row:
    """nerfacc's CUDA kernels: built, buildable, or not. Built only with ``build`` (and only on a GPU)."""
    name = "nerfacc kernels"
    if not machine.cuda:
        return Row(name, "not used without a GPU (the PyTorch marcher runs)" + ("; --build ignored" if build else ""))
    if build:
        import torch

        from .render.marching import prepare_nerfacc_kernels

        if console is None:
            from rich.console import Console

            console = Console()
        if prepare_nerfacc_kernels(console, torch.device("cuda")):
            return Row(name, "built and loaded")
        return Row(name, "could not be built (see the warning above)", "warn",
                   "train will use the PyTorch marcher on the GPU")
    built = _nerfacc_built_at()
    if built:
        return Row(name, f"built ({built})")
    if shutil.which("nvcc") and shutil.which("ninja"):
        return Row(name, "not built yet; buildable (nvcc and ninja found)", "ok",
                   "train builds them before its first step (minutes, once); `nfsd-nerf doctor --build` does it now")
    from .render.marching import kernels_unavailable_message

    return Row(name, "not built, and cannot be built here (nvcc or ninja missing)", "warn",
               kernels_unavailable_message("nvcc or ninja missing"))


def _nerfacc_built_at() -> str | None:
    """Where nerfacc's compiled kernels are (a prebuilt wheel, or torch's JIT extension folder), else None.

    The JIT folder follows torch.utils.cpp_extension's naming (``TORCH_EXTENSIONS_DIR``, else
    ``<root>/py<XY>_cu<ZZ>/nerfacc_cuda``); if torch renames it, this says "not built" and train builds.
    """
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    try:
        if importlib.util.find_spec("nerfacc.csrc") is not None:
            return "prebuilt in the nerfacc package"
    except ImportError:
        return None
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        tag = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{tag}_cu{(torch.version.cuda or '').replace('.', '')}")
    library = Path(root) / "nerfacc_cuda" / "nerfacc_cuda.so"
    return str(library) if library.is_file() else None


def ffmpeg_row() -> Row:
    """The ffmpeg imageio-ffmpeg ships (render-video writes H.264 with it)."""
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
        return Row("ffmpeg", f"{imageio_ffmpeg.get_ffmpeg_version()} ({exe})")
    except Exception as exc:  # ImportError, RuntimeError (no binary for this platform)
        return Row("ffmpeg", f"not found ({type(exc).__name__}: {str(exc).strip()[:120]})", "warn",
                   "render-video needs it: pip install imageio-ffmpeg, or set IMAGEIO_FFMPEG_EXE to an ffmpeg")


# --------------------------------------------------------------------------- model files


def model_rows(ref: ModelRef, machine: Machine, *, revision: str | None, offline: bool, online: bool) -> list[Row]:
    """Is the model on this machine (revision, size), and if not: the exact download, the alternatives."""
    from .guidance.hub import weight_variants

    if ref.kind == "builtin":
        return [Row("model", "builtin: the built-in offline prior (no download)")]
    choose = functools.partial(weight_variants, half_precision=machine.half_precision,
                               device="cuda" if machine.cuda else "cpu")
    if ref.kind == "folder":
        folder = Path(ref.name)
        return [Row("model", f"found: local folder {folder}, {_size(_folder_bytes(folder))} on disk, "
                             f"{_precision(choose(folder))} weights")]
    snapshot, problem = _cached_snapshot(ref.name, revision, choose)
    rows: list[Row] = []
    listing = None
    if online:
        hub_row, listing = _hub_listing_row(ref.name, revision, choose, offline)
        rows.append(hub_row)
    if snapshot is not None:
        value = (f"found in the Hugging Face cache: {ref.name} @ {snapshot.name[:12]}, "
                 f"{_size(_folder_bytes(snapshot))} on disk, {_precision(choose(snapshot))} weights")
        return [Row("model", value), *rows]
    return [_missing_model_row(ref.name, revision, problem, choose, listing, offline), *rows]


def _cached_snapshot(model: str, revision: str | None, choose) -> tuple[Path | None, str]:
    """(complete snapshot, "") from the local cache, or (None, why not). No network (local_files_only)."""
    from huggingface_hub import snapshot_download

    from .guidance.hub import hub_cache_dir, missing_files

    try:
        folder = Path(snapshot_download(model, revision=revision, cache_dir=hub_cache_dir(), local_files_only=True))
    except (OSError, ValueError):
        return None, f"not in the Hugging Face cache {hub_cache_dir()}"
    missing = missing_files(folder, choose(folder))
    if missing:
        return None, f"incomplete in the Hugging Face cache (snapshot {folder.name[:12]} lacks {', '.join(missing)})"
    return folder, ""


def _missing_model_row(model: str, revision: str | None, problem: str, choose, listing, offline: bool) -> Row:
    """The model is not usable from the cache: fail with the download command, or (hub listing known,
    online allowed) warn that train will download it."""
    from .guidance.hub import MIRRORS, _offline_reason

    variants = choose(listing if listing is not None else [])
    command = download_command(model, revision, variants)
    if listing is None:
        weights = ("the fp16 variants (*.fp16.safetensors) a GPU run reads; if the repository has none, "
                   "`nfsd-nerf doctor --online` prints the command for its plain files"
                   if set(variants.values()) == {"fp16"} else
                   "the plain fp32 *.safetensors a CPU run reads, not the *.fp16.safetensors variants")
    else:
        weights = f"{_precision(variants)} weights, as the repository has them"
    mirrors = " or ".join(m for m in MIRRORS if m != model)
    advice = (f"download only the files a run needs ({weights}):\n{command}\n"
              f"or use a mirror ({mirrors}), a local diffusers folder, or --model builtin (offline, no download)")
    if listing is not None and not _offline_reason(offline):
        return Row("model", f"{problem}; train will download it on its first run", "warn", advice)
    return Row("model", problem, "fail", advice)


def download_patterns(variants: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """``hf download`` globs (include, exclude) for the files a run reads: configs, tokenizer, and each
    component's weights in its variant (single file or shards + index). Globs match across ``/``."""
    from .guidance.hub import WEIGHT_STEMS, weight_names

    include = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*.json", "tokenizer/*.txt"]
    exclude = []
    for component, variant in variants.items():
        stem = WEIGHT_STEMS[component]
        include += [f"{component}/config.json", f"{component}/{weight_names(component, variant)[1]}"]
        if variant is None:  # the file and its shards, no variant (fp16, non_ema...) of them
            include.append(f"{component}/{stem}*.safetensors")
            exclude.append(f"{component}/{stem}.*.safetensors")
        else:  # stem.fp16.safetensors and its shards stem.fp16-00001-of-00002.safetensors
            include.append(f"{component}/{stem}.{variant}*.safetensors")
    return include, exclude


def download_command(model: str, revision: str | None, variants: dict[str, str | None]) -> str:
    """The one-line ``hf download`` that fetches exactly :func:`download_patterns` into the HF cache."""
    include, exclude = download_patterns(variants)
    words = ["hf download", shlex.quote(model)] + ([f"--revision {shlex.quote(revision)}"] if revision else [])
    words += [f'--include "{p}"' for p in include] + [f'--exclude "{p}"' for p in exclude]
    return " ".join(words)


def _hub_listing_row(model: str, revision: str | None, choose, offline: bool) -> tuple[Row, list[str] | None]:
    """--online: one request for the repository's file list and sizes, under hub.py's deadline."""
    from .guidance.hub import (
        _call_with_deadline,
        _offline_reason,
        download_files,
        first_line,
        hub_endpoint,
        hub_timeout,
        missing_files,
    )

    reason = _offline_reason(offline)
    if reason:
        return Row("hub", f"not asked: offline mode is on ({reason})", "warn", "unset it to let --online ask"), None
    from huggingface_hub import HfApi

    endpoint, timeout = hub_endpoint(), hub_timeout()
    try:
        info = _call_with_deadline(lambda: HfApi(endpoint=endpoint).model_info(
            model, revision=revision, files_metadata=True, timeout=timeout + 1.0), timeout)
    except Exception as exc:  # timeout, not found, gated, offline, connection errors
        return Row("hub", f"{endpoint}: no usable answer ({first_line(exc)})", "warn",
                   "set HF_HUB_ETAG_TIMEOUT to wait longer, check HF_ENDPOINT, or download on a machine online"), None
    sizes = {s.rfilename: s.size or 0 for s in (info.siblings or [])}
    variants = choose(list(sizes))
    files = download_files(sizes, variants)
    missing = missing_files(files, variants)
    if missing:
        return Row("hub", f"{endpoint}: {model} is not a Stable Diffusion diffusers repository with safetensors "
                          f"(missing {', '.join(missing)})", "fail", "use another --model"), None
    total = sum(sizes[f] for f in files)
    return Row("hub", f"{endpoint}: {model} @ {(info.sha or '?')[:12]}, a run needs {len(files)} files, "
                      f"{_size(total)} ({_precision(variants)} weights)"), list(sizes)


# --------------------------------------------------------------------------- disk and network settings


def disk_rows(ref: ModelRef, out: Path) -> list[Row]:
    """Free space (and writability) of the output folder, and of the HF cache for hub models."""
    rows = []
    base = _existing_ancestor(out)
    writable = base.is_dir() and os.access(base, os.W_OK | os.X_OK)
    value = f"{out} ({_size(shutil.disk_usage(base).free)} free)"
    if writable:
        rows.append(Row("output folder", value))
    else:
        rows.append(Row("output folder", f"{out}: not writable (at {base})", "fail",
                        "train refuses it: pass a writable --out"))
    if ref.kind == "hub":
        from .guidance.hub import hub_cache_dir

        cache = hub_cache_dir()
        rows.append(Row("HF cache", f"{cache} ({_size(shutil.disk_usage(_existing_ancestor(cache)).free)} free)"))
    return rows


def offline_row(offline: bool) -> Row:
    """Whether train may download (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, --offline)."""
    from .guidance.hub import _offline_reason, hub_timeout

    reason = _offline_reason(offline)
    if reason:
        return Row("offline mode", f"on ({reason}): train never downloads")
    return Row("offline mode", f"off: train downloads a model missing from the cache (the hub gets {hub_timeout():g} s "
                               "to answer first)")


# --------------------------------------------------------------------------- small helpers


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing parent (free space and permissions are read there)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``, following the cache's symlinks, each blob counted once."""
    sizes = {}
    for path in folder.rglob("*"):
        if path.is_file():
            sizes[path.resolve()] = path.stat().st_size
    return sum(sizes.values())


def _precision(variants: dict[str, str | None]) -> str:
    kinds = sorted({v or "fp32" for v in variants.values()})
    return "/".join(kinds)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _major(version: str) -> str:
    return version.split(".")[0]


def _tool_version(command: list, marker: str) -> str | None:
    """The first output line holding ``marker`` (e.g. nvcc's "release 12.4, V12.4.131"), or None."""
    try:
        text = subprocess.run(command, capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = next((line for line in text.splitlines() if marker in line), None)
    if line is None:
        return None
    return line.split(marker, 1)[1].strip(" ,").split(",")[0] if marker else line.strip()
