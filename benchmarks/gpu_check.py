"""`make gpu-check`: everything that needs a CUDA GPU, in one go, on a bare box with no network.

Stages, in this order, each in its own process under a time cap and one overall budget
(``GPU_CHECK_BUDGET_S``, 300 s by default):

``environment``  the card, torch and CUDA, package versions, ``pip check``, whether tinycudann imports;
``nerfacc``      build (first run) and load nerfacc's CUDA kernels; if they fail, later stages run with
                 nvcc hidden, so the PyTorch marcher takes over without retrying the build;
``bench``        training steps of the default preset with the full-size SD 2.1-base architecture
                 (random weights) in fp16, NFSD, SDS and NFSD + Perp-Neg: it/s, per-stage ms, peak
                 GPU memory, NFSD/SDS step-time ratio, projected time for 10,000 steps;
``pytest``       ``pytest -m cuda``;
``train``        that pipeline saved with fp16 variant files only, then ``nfsd-nerf train`` for 200 steps
                 of the default preset, ``export --format glb`` and a short ``render-video``.

After each stage the whole report so far is written to ``GPU_CHECK_OUT`` (default
``benchmarks/results/``) as ``<date>-gpu-check-<card>.json``: a check cut short still reports what it
measured. A stage that fails, crashes or runs out of time is recorded with its error, and the next
one runs. Without CUDA: one line, exit code 2. The stages run this working tree's ``src/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SRC = ROOT / "src"
DEFAULT_BUDGET_S = 300.0
MIN_STAGE_S = 10.0
"""A stage is skipped, not started, with less time than this left."""
TRAIN_STEPS = 200
DEVICE = "cuda"
"""Where the stages run (a CPU dry run of the stage code sets "cpu")."""
PROMPT = "a DSLR photo of a hamburger"


class StageError(Exception):
    """A stage that ran and failed; ``result`` keeps what it measured before failing."""

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result or {}


class StageTimeout(StageError):
    """The stage's process ran past its time and was killed with its children."""


# --------------------------------------------------------------------------- the runner


@dataclass
class Stage:
    name: str
    cap_s: float
    run: Callable[[float], dict]
    """Seconds allowed -> measured figures; raises :class:`StageError` (or anything) on failure."""


def run_stages(stages: list[Stage], report: dict, path: Path, budget_s: float,
               clock: Callable[[], float] = time.monotonic) -> dict:
    """Run ``stages`` in order within ``budget_s``; after each one rewrite ``path`` with ``report``.

    A failing stage is recorded (``status`` ``failed`` or ``timed out``, ``error``, what it measured)
    and the next one runs; a stage with under :data:`MIN_STAGE_S` left is recorded as ``skipped``.
    """
    deadline = clock() + budget_s
    report.setdefault("stages", [])
    for stage in stages:
        left = min(stage.cap_s, deadline - clock())
        entry: dict = {"stage": stage.name, "status": "skipped"}
        if left < MIN_STAGE_S:
            entry["error"] = f"out of time ({max(0.0, deadline - clock()):.0f} s of the {budget_s:.0f} s budget left)"
        else:
            start = clock()
            try:
                entry.update(stage.run(left))
                entry["status"] = "ok"
            except StageError as exc:
                entry.update(exc.result)
                entry.update(status="timed out" if isinstance(exc, StageTimeout) else "failed", error=str(exc))
            except Exception as exc:  # a bug in a stage must not stop the others
                entry.update(status="failed", error=_first_line(exc))
            entry["seconds"] = round(clock() - start, 1)
        report["stages"].append(entry)
        write_json(path, report)
        print(f"{stage.name:<12} {entry['status']:<10} {entry.get('seconds', 0):6.1f} s  {entry.get('error', '')}",
              flush=True)
    return report


def run_child(cmd: list[str], result_file: Path, timeout: float, env: dict | None = None) -> dict:
    """Run ``cmd`` in a new process group that writes its figures (JSON) to ``result_file`` as it goes.

    Returns them if it exits with 0; else raises :class:`StageError` (:class:`StageTimeout` after
    ``timeout`` s, the whole group killed) carrying the figures written so far and the output's tail.
    """
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise StageTimeout(f"killed after {timeout:.0f} s", _partial(result_file, output)) from None
    if proc.returncode != 0:
        partial = _partial(result_file, output)
        lines = [line for line in (output or "").splitlines() if line.strip()]
        raise StageError(partial.pop("error", None) or (lines[-1] if lines else f"exit code {proc.returncode}"),
                         partial)
    return _read(result_file)


def _partial(result_file: Path, output: str) -> dict:
    result = _read(result_file)
    result["output_tail"] = (output or "")[-2000:]
    return result


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0]


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_json(path: Path, data: dict) -> None:
    """Atomic: a reader (or a check killed mid-write) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the stages (child side)


def stage_environment(emit: Callable[[dict], None]) -> None:
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    import torch

    props = torch.cuda.get_device_properties(0)
    packages = {}
    for name in ("torch", "diffusers", "transformers", "huggingface-hub", "safetensors", "accelerate", "nerfacc",
                 "tinycudann", "trimesh", "xatlas", "PyMCubes", "imageio-ffmpeg", "numpy", "nfsd-nerf"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    emit({"gpu": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
          "compute_capability": f"{props.major}.{props.minor}", "torch": torch.__version__, "cuda": torch.version.cuda,
          "python": platform.python_version(), "cpu_cores": os.cpu_count(), "nvcc": shutil.which("nvcc"),
          "ninja": shutil.which("ninja"), "tinycudann_importable": importlib.util.find_spec("tinycudann") is not None,
          "packages": packages, "pip_check": (check.stdout + check.stderr).strip().splitlines()[:20]})


def stage_nerfacc(emit: Callable[[dict], None]) -> None:
    import warnings

    from nfsd_nerf.render.marching import nerfacc_kernels_available

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ready = nerfacc_kernels_available()
    result = {"kernels_ready": ready, "load_or_build_s": round(time.perf_counter() - start, 1)}
    emit(result)
    if not ready:
        raise StageError(str(caught[0].message) if caught else "nerfacc's kernels did not load", result)


def stage_bench(emit: Callable[[dict], None]) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from bench_train import time_steps

    from nfsd_nerf.config import load_config, merge, preset_path
    from nfsd_nerf.testing import build_full_size_sd_prior

    gpu = torch.device(DEVICE)
    start = time.perf_counter()
    prior = build_full_size_sd_prior(gpu)
    result: dict = {"model": "full-size SD 2.1-base architecture, random weights", "dtype": str(prior.dtype),
                    "preset": "default", "build_s": round(time.perf_counter() - start, 1), "warmup": 5, "steps": 20}
    emit(result)
    runs = [("nfsd", {"method": "nfsd"}), ("sds", {"method": "sds"}),
            ("nfsd_perp_neg", {"method": "nfsd", "perp_neg": True}), ("vsd", {"method": "vsd"})]
    for name, guidance in runs:
        cfg = merge(load_config(preset_path("default")), {"prompt": PROMPT, "guidance": guidance,
                                                          "train": {"device": DEVICE}})
        rows = time_steps(cfg, prior, gpu, warmup=result["warmup"], steps=result["steps"], label=name)
        figures = {row["name"].split(": ", 1)[1].strip(): round(row["value"], 3) for row in rows}
        step_ms = figures["whole step"]
        result[name] = {"it_per_s": figures["speed"], "ms_per_step": step_ms,
                        "peak_gpu_memory_gib": figures.get("peak GPU memory"),
                        "projected_10k_steps_min": round(10_000 * step_ms / 1e3 / 60, 1),
                        "stages_ms": {k: v for k, v in figures.items()
                                      if k not in ("whole step", "speed", "peak GPU memory")}}
        if "nfsd" in result and "sds" in result and "nfsd_sds_step_time_ratio" not in result:
            result["nfsd_sds_step_time_ratio"] = round(result["nfsd"]["ms_per_step"] / result["sds"]["ms_per_step"], 3)
        emit(result)


def stage_pytest(emit: Callable[[dict], None]) -> None:
    import xml.etree.ElementTree as ET

    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                               f"--junitxml={xml}", "tests"], cwd=ROOT, capture_output=True, text=True)
        suite = ET.parse(xml).getroot() if xml.exists() else None
    if suite is None:
        raise StageError(f"pytest wrote no report (exit code {proc.returncode})", {"output_tail": proc.stdout[-2000:]})
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [f"{case.get('classname')}.{case.get('name')}: {(bad.get('message') or '').splitlines()[0][:300]}"
              for case in suite.iter("testcase") for bad in list(case) if bad.tag in ("failure", "error")]
    result = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    result.update(passed=result["tests"] - result["failures"] - result["errors"] - result["skipped"],
                  failed=failed, summary=(proc.stdout.strip().splitlines() or [""])[-1])
    emit(result)
    if proc.returncode != 0:
        raise StageError(f"pytest -m cuda: exit code {proc.returncode} ({len(failed)} failed)", result)


def stage_train(emit: Callable[[dict], None]) -> None:
    from nfsd_nerf.testing import save_full_size_sd

    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "sd-2-1-base-random", Path(tmp) / "outputs"
        start = time.perf_counter()
        save_full_size_sd(folder, variants=("fp16",))
        result["save_fp16_folder_s"] = round(time.perf_counter() - start, 1)
        emit(result)
        _cli(result, emit, "train", ["train", PROMPT, "--model", str(folder), "--offline", "--steps",
                                     str(TRAIN_STEPS), "--device", DEVICE, "--out", str(out)])
        run = next(p for p in out.iterdir() if p.is_dir())
        summary = json.loads((run / "summary.json").read_text())
        keep = ("steps", "skipped_steps", "wall_time_s", "seconds_per_step", "device", "hash_grid_backend",
                "ray_marcher", "model", "versions", "encoder_overflow_steps", "loss_scale")
        result["summary"] = {k: summary[k] for k in keep if k in summary}
        result["projected_10k_steps_min"] = round(10_000 * summary["seconds_per_step"] / 60, 1)
        emit(result)
        _cli(result, emit, "export", ["export", str(run), "--format", "glb"])
        result["glb_bytes"] = sum(p.stat().st_size for p in (run / "export").rglob("*.glb"))
        _cli(result, emit, "render_video", ["render-video", str(run), "--frames", "24", "--size", "256"])
        result["videos"] = sorted(p.name for p in (run / "video").iterdir())
        emit(result)


def _cli(result: dict, emit: Callable[[dict], None], step: str, args: list[str]) -> None:
    """One ``nfsd-nerf`` command, timed; its last output lines kept; a failure ends the stage."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from nfsd_nerf.cli import app; app()", *args], cwd=ROOT,
                          capture_output=True, text=True)
    result[f"{step}_s"] = round(time.perf_counter() - start, 1)
    result[f"{step}_output"] = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
    emit(result)
    if proc.returncode != 0:
        raise StageError(f"nfsd-nerf {args[0]}: exit code {proc.returncode}", result)


STAGES: dict[str, tuple[float, Callable[[Callable[[dict], None]], None]]] = {
    "environment": (60.0, stage_environment),
    "nerfacc": (150.0, stage_nerfacc),
    "bench": (120.0, stage_bench),
    "pytest": (120.0, stage_pytest),
    "train": (180.0, stage_train),
}
"""Name -> (time cap in seconds, body run in the child process)."""


def child_main(name: str, result_file: Path) -> int:
    """Run one stage's body in this process; its figures go to ``result_file`` each time it emits."""
    latest: dict = {}

    def emit(figures: dict) -> None:
        latest.clear()
        latest.update(figures)
        write_json(result_file, figures)

    try:
        STAGES[name][1](emit)
    except StageError as exc:
        write_json(result_file, {**latest, **exc.result, "error": str(exc)})
        return 1
    except Exception as exc:  # out of memory, a missing package...: recorded, with the traceback in the output
        traceback.print_exc()
        write_json(result_file, {**latest, "error": _first_line(exc)})
        return 1
    return 0


# --------------------------------------------------------------------------- the parent


def card_slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``, for file names."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def cuda_card() -> str:
    """The first CUDA device's name; SystemExit(2) with one line when there is none."""
    try:
        import torch
    except ImportError:
        _fail(f"{sys.executable} cannot import torch; install a CUDA build of torch first")
    if not torch.cuda.is_available():
        _fail(f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); the GPU check "
              f"runs on a CUDA machine only")
    return torch.cuda.get_device_name(0)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    parser.add_argument("--check-cuda", action="store_true", help="only check for a CUDA device (exit code 2 if none)")
    parser.add_argument("--child", choices=list(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(SRC))
    if args.child:
        sys.exit(child_main(args.child, args.result))
    card = cuda_card()
    if args.check_cuda:
        return
    names = [n.strip() for n in args.stages.split(",") if n.strip()]
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        _fail(f"unknown stage {unknown[0]!r} (known: {', '.join(STAGES)})")
    out_dir = Path(os.environ.get("GPU_CHECK_OUT") or HERE / "results")
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S") or DEFAULT_BUDGET_S)
    path = out_dir / f"{dt.date.today().isoformat()}-gpu-check-{card_slug(card)}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    report = {"card": card, "date": dt.datetime.now().isoformat(timespec="seconds"), "budget_s": budget,
              "command": "make gpu-check"}
    stages = [Stage(name, STAGES[name][0], _child_stage(name, env)) for name in names]
    print(f"GPU check on {card}: {', '.join(names)}; budget {budget:.0f} s; report {path}", flush=True)
    run_stages(stages, report, path, budget)
    print(f"wrote {path}")


def _child_stage(name: str, env: dict) -> Callable[[float], dict]:
    def run(seconds: float) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            result_file = Path(tmp) / "result.json"
            try:
                return run_child([sys.executable, str(Path(__file__).resolve()), "--child", name, "--result",
                                  str(result_file)], result_file, seconds, env)
            except StageError:
                if name == "nerfacc":  # no second build attempt in later stages: the PyTorch marcher runs
                    _hide_nvcc(env)
                raise

    return run


def _hide_nvcc(env: dict) -> None:
    """Drop nvcc's folders from PATH and CUDA_HOME, so nfsd-nerf falls back at once to the PyTorch marcher."""
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    while nvcc:
        folder = str(Path(nvcc).parent)
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p.rstrip("/") != folder)
        nvcc = shutil.which("nvcc", path=env["PATH"])
    env.pop("CUDA_HOME", None)
    env.pop("CUDA_PATH", None)


if __name__ == "__main__":
    main()
