"""Checks of the machine: versions, GPU, hash-grid backend, toolchain, nerfacc's kernels, ffmpeg, disk, offline mode."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import sys
from pathlib import Path

from .. import __version__
from .rows import Machine, ModelRef, Row, existing_ancestor, gib, major, size, tool_version

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
        rows.append(Row(f"GPU {i}", f"{props.name}, {gib(total)} ({gib(free)} free), "
                                    f"compute capability {props.major}.{props.minor}"))
    return rows


def hash_grid_row(machine: Machine) -> Row:
    """Which hash-grid backend train would use, and whether tinycudann imports."""
    from ..encoding.hash_grid import tcnn_available

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
    release = tool_version([nvcc, "--version"], "release") if nvcc else None
    value = f"{nvcc} (release {release or 'unknown'})" if nvcc else "not found on PATH"
    status, advice = "ok", ""
    if machine.cuda and not nvcc:
        status, advice = "warn", f"needed to build nerfacc's kernels: install the CUDA {torch.version.cuda} toolkit, put its bin/ on PATH"
    elif machine.cuda and release and torch.version.cuda and major(release) != major(torch.version.cuda):
        status, advice = "warn", f"nvcc is {release} but torch was built for CUDA {torch.version.cuda}: install a matching toolkit"
    ninja = shutil.which("ninja")
    ninja_value = f"{ninja} ({tool_version([ninja, '--version'], '') or 'unknown version'})" if ninja else "not found on PATH"
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

        from ..render.marching import prepare_nerfacc_kernels

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
    from ..render.marching import kernels_unavailable_message

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




# --------------------------------------------------------------------------- disk and network settings


def disk_rows(ref: ModelRef, out: Path) -> list[Row]:
    """Free space (and writability) of the output folder, and of the HF cache for hub models."""
    rows = []
    base = existing_ancestor(out)
    writable = base.is_dir() and os.access(base, os.W_OK | os.X_OK)
    value = f"{out} ({size(shutil.disk_usage(base).free)} free)"
    if writable:
        rows.append(Row("output folder", value))
    else:
        rows.append(Row("output folder", f"{out}: not writable (at {base})", "fail",
                        "train refuses it: pass a writable --out"))
    if ref.kind == "hub":
        from ..guidance.hub import hub_cache_dir

        cache = hub_cache_dir()
        rows.append(Row("HF cache", f"{cache} ({size(shutil.disk_usage(existing_ancestor(cache)).free)} free)"))
    return rows


def offline_row(offline: bool) -> Row:
    """Whether train may download (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, --offline)."""
    from ..guidance.hub import offline_reason, hub_timeout

    reason = offline_reason(offline)
    if reason:
        return Row("offline mode", f"on ({reason}): train never downloads")
    return Row("offline mode", f"off: train downloads a model missing from the cache (the hub gets {hub_timeout():g} s "
                               "to answer first)")
