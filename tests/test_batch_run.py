"""``nfsd-nerf batch`` end to end with the built-in prior and tiny settings: on local Ray, without
Ray, rerun, failures, retries, stale folders, resume, Ctrl-C."""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import nfsd_nerf.train
from nfsd_nerf.cli import app

runner = CliRunner()

# The FAST settings of test_train_run.py, as plan overrides.
FAST = {
    "field.n_levels": 4, "field.log2_hashmap_size": 12, "field.hidden_dim": 16, "render.n_samples": 24,
    "render.occupancy_update_every": 2, "render.occupancy_resolution": 16, "train.preview_every": 0,
    "train.log_every": 1,
}
TWO_BY_TWO = {
    "prompts": ["a red cube", "a blue torus"], "model": "builtin",
    "variants": {"nfsd": {"guidance.method": "nfsd"}, "sds": {"guidance.method": "sds", "guidance.scale": 7.5}},
    "seeds": [0], "set": {"train.steps": 4, **FAST},
}


def write_plan(folder: Path, plan: dict, name: str = "plan.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(plan))
    return path


def batch(plan: Path, out: Path, *extra: str):
    return runner.invoke(app, ["batch", str(plan), "--out", str(out), *extra])


def results(root: Path) -> list[dict]:
    with open(root / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def states(root: Path) -> dict[str, str]:
    return {r["folder"]: r["state"] for r in json.loads((root / "batch.json").read_text())["runs"]}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (the batch joins an initialised Ray instead of starting one)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError


def test_a_plan_runs_on_local_ray_and_a_rerun_is_a_no_op(local_ray, tmp_path, monkeypatch):
    from nfsd_nerf.batch import ray_pool

    monkeypatch.setattr(ray_pool, "CPU_CORES_PER_RUN", 1)  # two slots on the two cores
    plan, out = write_plan(tmp_path, TWO_BY_TWO), tmp_path / "out"
    result = batch(plan, out)
    assert result.exit_code == 0, result.output
    assert "local Ray: 2 slot(s)" in result.output and "4 of 4 runs done" in result.output
    root = out / "plan"
    runs = sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("summary.json"))
    assert runs == ["a-blue-torus/nfsd/seed-0", "a-blue-torus/sds/seed-0",
                    "a-red-cube/nfsd/seed-0", "a-red-cube/sds/seed-0"]
    for run in runs:
        assert {p.name for p in (root / run / "checkpoints").iterdir()} == {"latest.safetensors", "final.safetensors"}
    rows = results(root)
    assert len(rows) == 4 and {r["state"] for r in rows} == {"done"}
    assert {"prompt", "variant", "seed", "steps", "wall_time_s", "seconds_per_step", "final_loss", "psnr",
            "psnr_masked", "silhouette_iou"} <= set(rows[0])
    assert all(r["steps"] == "4" and float(r["psnr"]) > 0 and r["final_loss"] for r in rows)
    assert (root / "plan.yaml").read_text() == plan.read_text()
    report = json.loads((root / "batch.json").read_text())
    assert report["counts"] == {"done": 4} and report["runs"][0]["summary"]["steps"] == 4
    workers = {r["worker"] for r in report["runs"]}
    loads = [r for r in report["runs"] if r["prior_load_s"] is not None]
    assert len(loads) == len(workers) <= 2  # each worker loaded the prior once, for its first run

    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}
    started = time.perf_counter()
    result = batch(plan, out)
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - started < 10
    assert "4 of 4 runs done (4 already were)" in result.output and "Ray" not in result.output
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")} == stamps


def test_a_failing_run_is_isolated_and_reported(local_ray, tmp_path):
    plan = dict(TWO_BY_TWO, prompts=["a red cube"],
                variants={"ok": {}, "diverges": {"guidance.scale": 1.0e300, "train.steps": 25}})
    result = batch(write_plan(tmp_path, plan), tmp_path)
    assert result.exit_code == 1, result.output
    assert "1 of 2 runs done, 1 failed" in result.output
    assert "failed a-red-cube/diverges/seed-0: training stopped at step 20" in result.output
    rows = {r["variant"]: r for r in results(tmp_path / "plan")}
    assert rows["ok"]["state"] == "done" and rows["diverges"]["state"] == "failed"
    assert "consecutive steps" in rows["diverges"]["error"]
    report = {r["variant"]: r for r in json.loads((tmp_path / "plan" / "batch.json").read_text())["runs"]}
    assert report["diverges"]["attempts"] == 1  # divergence is not worth a retry


def test_an_output_folder_the_workers_cannot_see_is_refused_before_any_run(local_ray, tmp_path, monkeypatch):
    from nfsd_nerf.batch import ray_pool

    monkeypatch.setattr(ray_pool, "atomic_write_bytes", lambda path, data: path)  # the marker never lands
    result = batch(write_plan(tmp_path, TWO_BY_TWO), tmp_path)
    assert result.exit_code == 2, result.output
    assert "is not visible from Ray node" in result.output and "same path" in result.output
    assert not any((tmp_path / "plan").glob("*/*/seed-0"))


def test_without_ray_the_runs_go_one_after_another_and_match_train(no_ray, tmp_path):
    plan = dict(TWO_BY_TWO, prompts=["a red cube"])
    result = batch(write_plan(tmp_path, plan), tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert result.output.count("Ray is not installed: running the runs one after another in this process") == 1
    report = json.loads((tmp_path / "out" / "plan" / "batch.json").read_text())
    assert report["counts"] == {"done": 2} and report["executor"].startswith("in this process")
    assert [r["prior_load_s"] is not None for r in report["runs"]] == [True, False]  # loaded once, then reused
    # an ordinary run folder: the same as `train` with the same settings, bit for bit
    sets = [x for key, value in {**FAST, "guidance.scale": 7.5}.items() for x in ("--set", f"{key}={value}")]
    train = runner.invoke(app, ["train", "a red cube", "--model", "builtin", "--guidance", "sds", "--steps", "4",
                                "--out", str(tmp_path / "train"), *sets])
    assert train.exit_code == 0, train.output
    (alone,) = (tmp_path / "train").iterdir()
    a = load_file(alone / "checkpoints" / "final.safetensors")
    b = load_file(tmp_path / "out" / "plan" / "a-red-cube" / "sds" / "seed-0" / "checkpoints" / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_batch_on_the_same_plan_folder_is_refused(no_ray, tmp_path):
    import fcntl

    path = write_plan(tmp_path, TWO_BY_TWO)
    (tmp_path / "plan").mkdir()
    with open(tmp_path / "plan" / ".batch.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 1 on elsewhere\n")
        held.flush()
        result = batch(path, tmp_path)
    assert result.exit_code == 2, result.output
    assert "another nfsd-nerf batch is running" in result.output and "pid 1 on elsewhere" in result.output
    assert not (tmp_path / "plan" / "batch.json").exists()


def test_an_out_of_memory_failure_is_retried_once(no_ray, tmp_path, monkeypatch):
    real, calls = nfsd_nerf.train.run_training, []

    def flaky(cfg, **kwargs):
        calls.append(cfg.guidance.method)
        if cfg.guidance.method == "sds" and (calls.count("sds") == 1 or cfg.prompt == "a blue torus"):
            raise MemoryError("out of memory")
        return real(cfg, **kwargs)

    monkeypatch.setattr(nfsd_nerf.train, "run_training", flaky)
    result = batch(write_plan(tmp_path, TWO_BY_TWO), tmp_path)
    assert result.exit_code == 1, result.output
    report = {r["folder"]: r for r in json.loads((tmp_path / "plan" / "batch.json").read_text())["runs"]}
    assert report["a-red-cube/sds/seed-0"]["state"] == "done" and report["a-red-cube/sds/seed-0"]["attempts"] == 2
    assert report["a-blue-torus/sds/seed-0"]["state"] == "failed" and report["a-blue-torus/sds/seed-0"]["attempts"] == 2
    assert report["a-blue-torus/nfsd/seed-0"]["state"] == "done"
    assert "MemoryError: out of memory" in report["a-blue-torus/sds/seed-0"]["error"]


def test_an_edited_plan_leaves_stale_runs_alone_unless_asked_and_extends_longer_ones(no_ray, tmp_path):
    plan = dict(TWO_BY_TWO, prompts=["a red cube"], set={**TWO_BY_TWO["set"], "train.steps": 3})
    path = write_plan(tmp_path, plan)
    assert batch(path, tmp_path).exit_code == 0
    root = tmp_path / "plan"
    sds_ckpt = root / "a-red-cube" / "sds" / "seed-0" / "checkpoints" / "final.safetensors"
    before = sds_ckpt.stat().st_mtime_ns

    plan["variants"] = {**plan["variants"], "sds": {"guidance.method": "sds", "guidance.scale": 20.0}}
    path = write_plan(tmp_path, plan)
    result = batch(path, tmp_path)
    assert result.exit_code == 1, result.output
    assert "stale a-red-cube/sds/seed-0: stale: the plan changed guidance.scale" in result.output
    assert states(root) == {"a-red-cube/nfsd/seed-0": "done", "a-red-cube/sds/seed-0": "stale"}
    assert sds_ckpt.stat().st_mtime_ns == before

    result = batch(path, tmp_path, "--restart-stale")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((sds_ckpt.parent.parent / "config.yaml").read_text())["guidance"]["scale"] == 20.0

    plan["set"]["train.steps"] = 5  # more steps: both runs continue from their checkpoints
    result = batch(write_plan(tmp_path, plan), tmp_path)
    assert result.exit_code == 0, result.output
    metrics = (root / "a-red-cube" / "nfsd" / "seed-0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3, 4, 5]
    assert {r["action"] for r in json.loads((root / "batch.json").read_text())["runs"]} == {"resume"}


def _as_from_a_terminal() -> None:
    """Child-process set-up: SIGINT delivered and handled by default, as a shell leaves it (the test
    runner's own state, inherited across fork/exec, may have it blocked or ignored)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_saves_every_running_run_and_the_same_command_resumes(tmp_path):
    pytest.importorskip("ray")
    # 1,500 steps (~20 s): the interrupt must land mid-run, and reaching a Ray worker takes seconds
    plan = dict(TWO_BY_TWO, prompts=["a red cube"], variants={"nfsd": {}},
                set={**TWO_BY_TWO["set"], "train.steps": 1500, "train.checkpoint_every": 100000})
    path, root = write_plan(tmp_path, plan), tmp_path / "plan"
    metrics = root / "a-red-cube" / "nfsd" / "seed-0" / "metrics.jsonl"
    command = [str(Path(sys.executable).parent / "nfsd-nerf"), "batch", str(path), "--out", str(tmp_path)]
    # its own process group, as a terminal's foreground job: Ctrl-C goes to the whole group
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=_as_from_a_terminal)
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 20):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "every running run saves a checkpoint" in output
    (run,) = json.loads((root / "batch.json").read_text())["runs"]
    assert run["state"] == "interrupted" and run["error"] == "saved checkpoints/latest.safetensors"
    from nfsd_nerf.checkpoint import read_checkpoint

    saved = read_checkpoint(metrics.parent / "checkpoints" / "latest.safetensors").step
    assert 20 <= saved < 1500  # saved at the interrupt (periodic checkpoints are off)
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == saved

    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (run,) = json.loads((root / "batch.json").read_text())["runs"]
    assert run["state"] == "done" and run["action"] == "resume"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 1501))


def test_restarting_a_run_empties_its_folder_only_under_the_run_lock(tmp_path):
    import fcntl

    from nfsd_nerf.batch.folders import clear_run_folder
    from nfsd_nerf.errors import UserError
    from nfsd_nerf.files import RUN_LOCK

    run = tmp_path / "001"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with open(run / RUN_LOCK, "a+") as held:  # a `train --resume` still running in the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="cannot restart that run until it ends"):
            clear_run_folder(run)
        assert (run / "metrics.jsonl").exists() and (run / "checkpoints").is_dir()
    clear_run_folder(run)
    assert [p.name for p in run.iterdir()] == [RUN_LOCK]
