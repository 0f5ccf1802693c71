"""The GPU check (benchmarks/gpu_check.py) and its wheelhouse (benchmarks/wheelhouse.py), on the CPU.

What can be checked without a GPU: the stage runner goes on past a failing, crashing or slow stage
and writes the report after every stage; a missing CUDA device is one line and exit code 2; the
wheelhouse keeps exactly what a GPU box lacks. Building the real wheelhouse needs a package index
and about two minutes: ``NFSD_NERF_TEST_WHEELHOUSE=1`` turns that test on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import wheelhouse  # noqa: E402
from gpu_check import Stage, StageError, StageTimeout, run_child, run_stages  # noqa: E402


def test_a_failing_stage_is_recorded_and_the_next_one_runs(tmp_path):
    path = tmp_path / "report.json"
    seen_by_third = {}

    def third(seconds):
        seen_by_third.update(json.loads(path.read_text()))  # written after each stage, not at the end
        return {"figure": 3}

    def fail(seconds):
        raise StageError("no kernels", {"tried": True})

    def crash(seconds):
        raise ZeroDivisionError("division by zero\nmore lines")

    stages = [Stage("first", 60, lambda s: {"it_per_s": 12.5}),
              Stage("second", 60, fail),
              Stage("third", 60, third),
              Stage("fourth", 60, crash)]
    report = run_stages(stages, {"card": "test card"}, path, budget_s=300)
    assert [s["status"] for s in report["stages"]] == ["ok", "failed", "ok", "failed"]
    first, second, _, fourth = report["stages"]
    assert first["it_per_s"] == 12.5 and second["error"] == "no kernels" and second["tried"] is True
    assert fourth["error"] == "ZeroDivisionError: division by zero"
    assert [s["stage"] for s in seen_by_third["stages"]] == ["first", "second"]
    assert json.loads(path.read_text()) == report and report["card"] == "test card"


def test_stages_get_what_is_left_of_the_budget_and_are_skipped_without_it(tmp_path):
    now = [0.0]
    given = []

    def slow(seconds):
        given.append(seconds)
        now[0] += 250
        return {}

    stages = [Stage("a", 100, slow), Stage("b", 100, slow), Stage("c", 100, slow)]
    report = run_stages(stages, {}, tmp_path / "r.json", budget_s=300, clock=lambda: now[0])
    assert given == [100, 50]  # the cap, then what the budget has left
    assert [s["status"] for s in report["stages"]] == ["ok", "ok", "skipped"]
    assert "out of time" in report["stages"][2]["error"]


def test_a_stage_process_past_its_time_is_killed_keeping_its_figures(tmp_path):
    result = tmp_path / "result.json"
    script = f"import json, time; open({str(result)!r}, 'w').write(json.dumps({{'nfsd': 1.5}})); time.sleep(60)"
    start = time.monotonic()
    with pytest.raises(StageTimeout) as info:
        run_child([sys.executable, "-c", script], result, timeout=3)
    assert time.monotonic() - start < 10
    assert info.value.result["nfsd"] == 1.5 and "killed after 3 s" in str(info.value)


def test_a_crashing_stage_process_reports_its_last_line(tmp_path):
    with pytest.raises(StageError) as info:
        run_child([sys.executable, "-c", "raise RuntimeError('CUDA out of memory')"], tmp_path / "r.json", timeout=30)
    assert str(info.value) == "RuntimeError: CUDA out of memory" and "Traceback" in info.value.result["output_tail"]
    assert run_child([sys.executable, "-c", "print('fine')"], tmp_path / "none.json", timeout=30) == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_it_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path / "out")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: no CUDA device")
    assert not (tmp_path / "out").exists()


def test_card_names_make_file_names():
    assert gpu_check.card_slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.card_slug("NVIDIA GeForce RTX 4090 (24GB)") == "nvidia-geforce-rtx-4090-24gb"


def test_wheelhouse_keeps_what_the_box_lacks():
    """From pip's resolution report: follow requirements (markers for Python 3.12, requested extras)
    from the project, stopping at packages the box has, whose own dependencies it has too."""
    def item(name, version, requires=(), requested=False, extras=()):
        entry = {"metadata": {"name": name, "version": version, "requires_dist": list(requires)},
                 "requested": requested}
        if extras:
            entry["requested_extras"] = list(extras)
        return entry

    report = {"install": [
        item("nfsd-nerf", "0.1.0", ["torch>=2.4", "diffusers<0.43", "trimesh", "pygltflib; extra == 'dev'",
                                    "old-backport; python_version < '3.8'"], requested=True, extras=["dev"]),
        item("torch", "2.11.0", ["nvidia-cublas", "sympy"]),
        item("nvidia-cublas", "13"), item("sympy", "1.14"), item("old-backport", "1.0"),
        item("diffusers", "0.42.1", ["huggingface-hub>=1", "Importlib_Metadata", "torch; extra == 'torch'"]),
        item("huggingface-hub", "2.4.0", ["hf-xet"]), item("hf-xet", "1.8"),
        item("importlib-metadata", "10.2", ["zipp"]), item("zipp", "4.1"),
        item("trimesh", "5.2.0", ["numpy"]), item("numpy", "2.5"),
        item("pygltflib", "1.16.5", ["dataclasses-json"]), item("dataclasses-json", "0.6.7"),
    ]}
    kept = wheelhouse.needed(report, {wheelhouse.canonical(n) for n in wheelhouse.BOX_HAS})
    assert kept == {"nfsd-nerf": "0.1.0", "diffusers": "0.42.1", "importlib-metadata": "10.2", "zipp": "4.1",
                    "trimesh": "5.2.0", "pygltflib": "1.16.5", "dataclasses-json": "0.6.7"}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NFSD_NERF_TEST_WHEELHOUSE") != "1",
                    reason="builds the wheelhouse from a package index (~2 min): set NFSD_NERF_TEST_WHEELHOUSE=1")
def test_make_wheelhouse_fits_and_holds_what_the_box_lacks(tmp_path):
    folder = tmp_path / "wheelhouse"
    proc = subprocess.run(["make", "wheelhouse", f"WHEELHOUSE={folder}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = {wheelhouse.canonical(w.name.split("-")[0]): w for w in folder.glob("*.whl")}
    assert {"diffusers", "nerfacc", "trimesh", "xatlas", "pymcubes", "imageio-ffmpeg", "pygltflib",
            "nfsd-nerf"} <= set(wheels)
    assert not {"torch", "numpy", "transformers", "ray", "playwright"} & set(wheels)
    assert (folder / "requirements.txt").read_text().splitlines()[0] == "nfsd-nerf"
    assert sum(w.stat().st_size for w in wheels.values()) < 64 * 2**20
    assert all(w.name.endswith(("-none-any.whl", "x86_64.whl")) and ("cp312" in w.name or "py3" in w.name)
               for w in wheels.values())
