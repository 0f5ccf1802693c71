"""Issue #15, one test per class of failure: tampered checkpoints, temporaries left by kill -9, runs
stopped before their first checkpoint or while finishing, a full disk anywhere in a run, two trainers
in one folder, a video encoder that ran out of disk space, a stalled hub endpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from nfsd_nerf.checkpoint import read_checkpoint
from nfsd_nerf.cli import app
from nfsd_nerf.errors import UserError
from nfsd_nerf.files import exclusive_lock

runner = CliRunner()

FAST = [
    "--set", "field.n_levels=4", "--set", "field.log2_hashmap_size=12", "--set", "field.hidden_dim=16",
    "--set", "render.n_samples=24", "--set", "render.occupancy_update_every=2",
    "--set", "render.occupancy_resolution=16", "--set", "train.preview_every=0", "--set", "train.log_every=1",
]


def train_args(out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "a red cube", "--model", "builtin", "--steps", str(steps), "--out", str(out), *FAST, *extra]


def only_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def one_line_error(result, code: int = 2) -> str:
    """The command failed with ``code`` and said so in one ``error:`` line, without a traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 3-step built-in run (read-only: tests copy it)."""
    out = tmp_path_factory.mktemp("finished")
    result = runner.invoke(app, train_args(out, 3, "--set", "train.checkpoint_every=2"))
    assert result.exit_code == 0, result.output
    return only_run(out)


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


# --------------------------------------------------------------------------- 1. tampered checkpoints


def retamper(path: Path, meta: dict | None = None, drop: tuple[str, ...] = (), tensors: dict | None = None) -> None:
    """Rewrite a checkpoint as a valid safetensors file with changed metadata (a value; None deletes the
    key; a function of the old value) or tensors."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    data = load_file(path)
    for key, value in (meta or {}).items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value(metadata[key]) if callable(value) else value
    for key in drop:
        data.pop(key)
    data.update(tensors or {})
    save_file(data, path, metadata=metadata)


READ_TIME = {  # refused by every command that reads the file, naming the field
    "step-abc": ({"step": "abc"}, "'step'"),
    "step-missing": ({"step": None}, "'step'"),
    "config-missing": ({"config": None}, "'config'"),
    "config-python-tag": ({"config": "!!python/object/apply:os.system ['echo owned']"}, "'config'"),
    "config-not-a-mapping": ({"config": "just some text"}, "'config'"),
    "config-wrong-type": ({"config": "field: {n_levels: many}"}, "field.n_levels"),
    "config-out-of-range": ({"config": lambda text: text.replace("hidden_dim: 16", "hidden_dim: -4")},
                            "field.hidden_dim"),
    "param-groups-not-json": ({"param_groups": "[{"}, "'param_groups'"),
    "param-groups-no-params": ({"param_groups": '[{"lr": 0.01}]'}, "'param_groups'"),
    "param-groups-missing": ({"param_groups": None}, "'param_groups'"),
    "skipped-steps-lots": ({"skipped_steps": "lots"}, "'skipped_steps'"),
    "overflow-steps-negative": ({"encoder_overflow_steps": "-1"}, "'encoder_overflow_steps'"),
    "loss-scale-abc": ({"loss_scale": "abc"}, "'loss_scale'"),
    "loss-scale-inf": ({"loss_scale": "inf"}, "'loss_scale'"),
    "clean-steps-float": ({"loss_scale": "1024.0", "loss_scale_clean_steps": "2.5"}, "'loss_scale_clean_steps'"),
}
RESTORE_TIME = {  # refused by train --resume, which needs them; export and render-video do not
    "rng-generator-missing": ({}, ("rng.generator",), {}, "rng.generator"),
    "rng-torch-wrong-size": ({}, (), {"rng.torch": torch.zeros(100, dtype=torch.uint8)}, "rng.torch"),
    "adam-moment-wrong-shape": ({}, (), {"optimizer.state.1.exp_avg": torch.zeros(3)}, "optimizer.state.1.exp_avg"),
    "adam-moment-missing": ({}, ("optimizer.state.1.exp_avg_sq",), {}, "optimizer.state.1.exp_avg_sq"),
    "param-groups-regrouped": ({"param_groups": lambda text: json.dumps(
        [{**g, "params": g["params"][:1]} for g in json.loads(text)] + [{**g, "params": g["params"][1:]}
                                                                       for g in json.loads(text)])},
        (), {}, "'param_groups'"),
    "param-groups-lr-text": ({"param_groups": lambda text: json.dumps([{**g, "lr": "fast"} for g in json.loads(text)])},
                             (), {}, "lr='fast'"),
}


@pytest.mark.parametrize("case", sorted(READ_TIME))
def test_tampered_metadata_is_one_line_in_resume_export_and_render_video(finished_run, tmp_path, case):
    meta, field = READ_TIME[case]
    run = copy_run(finished_run, tmp_path)
    (run / "summary.json").unlink()  # else --resume would stop at "already ran"
    latest = run / "checkpoints" / "latest.safetensors"
    latest.unlink()  # a hard link to final: write a new file
    shutil.copy(run / "checkpoints" / "final.safetensors", latest)
    retamper(latest, meta)
    for args in (["train", "--resume", str(run), "--steps", "4"],
                 ["export", str(run), "--format", "ply", "--resolution", "16", "--threshold", "1"],
                 ["render-video", str(run), "--frames", "2", "--size", "16"]):
        line = one_line_error(runner.invoke(app, args))
        assert str(latest) in line and field in line, (args[0], line)
    assert not (run / "export").exists() and not (run / "video").exists()


@pytest.mark.parametrize("case", sorted(RESTORE_TIME))
def test_tampered_tensors_and_groups_stop_a_resume_in_one_line(finished_run, tmp_path, case):
    meta, drop, tensors, field = RESTORE_TIME[case]
    run = copy_run(finished_run, tmp_path)
    (run / "summary.json").unlink()
    latest = run / "checkpoints" / "latest.safetensors"
    latest.unlink()
    shutil.copy(run / "checkpoints" / "final.safetensors", latest)
    retamper(latest, meta, drop, tensors)
    line = one_line_error(runner.invoke(app, ["train", "--resume", str(run), "--steps", "4"]))
    assert str(latest) in line and field in line, line
    read_checkpoint(latest)  # the file itself reads: what a resume needs is checked where it is restored


# --------------------------------------------------------------------------- 2. temporaries left by kill -9


def test_temporaries_of_killed_writers_are_cleared_by_the_next_trainer_only(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    left = [run / "checkpoints" / ".latest.k1ll3d00.tmp.safetensors", run / ".summary.k1ll3d00.tmp.json",
            run / "previews" / ".step000002.k1ll3d00.tmp.png"]
    foreign = run / "video" / ".turntable_rgb.l1ve0000.tmp.mp4"  # render-video's: it runs beside training
    for path in [*left, foreign]:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    assert runner.invoke(app, ["export", str(run), "--format", "ply", "--resolution", "16",
                               "--threshold", "1"]).exit_code == 0  # readers leave them alone
    assert all(p.exists() for p in left)
    result = runner.invoke(app, ["train", "--resume", str(run), "--steps", "4"])
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in left) and foreign.exists()
    hidden = {p.name for p in run.rglob(".*") if not p.name.endswith(".lock")} - {foreign.name}  # locks: .lock, .export.lock
    assert not hidden, hidden


# --------------------------------------------------------------------------- 3. stopped early or while finishing


def test_a_run_killed_before_its_first_checkpoint_resumes(tmp_path):
    """kill -9 in the first steps, long before train.checkpoint_every: the step-0 checkpoint resumes."""
    exe = Path(sys.executable).parent / "nfsd-nerf"
    proc = subprocess.Popen([str(exe), *train_args(tmp_path, 100000)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, run = time.time() + 120, None
    while time.time() < deadline and run is None:
        metrics = list(tmp_path.glob("*/metrics.jsonl"))
        if metrics and metrics[0].read_text().count("\n") >= 2:
            run = metrics[0].parent
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert run is not None, "training never started"
    assert read_checkpoint(run / "checkpoints" / "latest.safetensors").step == 0
    result = runner.invoke(app, ["train", "--resume", str(run), "--steps", "3"])  # the killed lock is gone
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_run_stopped_while_finishing_is_finished_by_resume_without_new_steps(tmp_path, monkeypatch):
    from nfsd_nerf.train import run as run_module

    def ctrl_c(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # Ctrl-C during the final evaluation and summary
        patch.setattr(run_module, "write_summary", ctrl_c)
        result = runner.invoke(app, train_args(tmp_path, 3))
    assert result.exit_code == 130, result.output
    run = only_run(tmp_path)
    assert "holds step 3" in result.output and f"nfsd-nerf train --resume {run}" in result.output
    assert not (run / "summary.json").exists()
    final = load_file(run / "checkpoints" / "final.safetensors")
    metrics = (run / "metrics.jsonl").read_text()

    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval"] and summary["seconds_per_step"] > 0
    assert (run / "metrics.jsonl").read_text() == metrics  # no step was run again
    again = load_file(run / "checkpoints" / "final.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert "already ran 3 steps" in runner.invoke(app, ["train", "--resume", str(run)]).output


def test_ctrl_c_before_any_checkpoint_prints_no_resume_command(tmp_path, monkeypatch):
    from nfsd_nerf.train import run as run_module

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "write_config", ctrl_c)  # the first write of a new run
    result = runner.invoke(app, train_args(tmp_path, 3))
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "--resume" not in result.output


# --------------------------------------------------------------------------- 4. a full disk anywhere in a run


@pytest.mark.parametrize("fail_from, expected", [
    (0, "(no checkpoint could be saved)"),  # the step-0 checkpoint already
    (2, "latest.safetensors holds step 2"),  # step 0 and step 2 saved, then final fails: latest is kept
])
def test_a_full_disk_while_saving_names_the_last_good_checkpoint(tmp_path, monkeypatch, fail_from, expected):
    import nfsd_nerf.checkpoint as checkpoint

    real, calls = checkpoint.atomic_write_bytes, []

    def writer(path, data):
        calls.append(Path(path).name)
        if len(calls) > fail_from:
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", writer)
    result = runner.invoke(app, train_args(tmp_path, 3, "--set", "train.checkpoint_every=2"))
    line = one_line_error(result)
    assert "No space left on device" in line and expected in line, line
    run = only_run(tmp_path)
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())
    if fail_from:
        assert calls[-2:] == ["final.safetensors", "latest.safetensors"]  # tried to save the newer state
        monkeypatch.setattr(checkpoint, "atomic_write_bytes", real)
        result = runner.invoke(app, ["train", "--resume", str(run)])  # disk freed: the run completes
        assert result.exit_code == 0, result.output
        assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_a_full_disk_in_the_final_preview_keeps_the_final_state(tmp_path, monkeypatch):
    from nfsd_nerf.train import run as run_module

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_module, "write_preview", full)
    line = one_line_error(runner.invoke(app, train_args(tmp_path, 2)))
    assert "latest.safetensors holds step 2" in line and "--resume" in line


# --------------------------------------------------------------------------- 5. one trainer per run folder


def test_a_second_trainer_in_a_run_folder_is_refused_and_readers_are_not(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    (run / "summary.json").unlink()
    with exclusive_lock(run / ".lock", "held by the test"):  # what a live `train` holds
        line = one_line_error(runner.invoke(app, ["train", "--resume", str(run), "--steps", "5"]))
        assert f"another nfsd-nerf process is training in {run}" in line and f"pid {os.getpid()}" in line
        assert runner.invoke(app, ["export", str(run), "--format", "ply", "--resolution", "16",
                                   "--threshold", "1"]).exit_code == 0
        assert runner.invoke(app, ["render-video", str(run), "--frames", "2", "--size", "16",
                                   "--modes", "rgb"]).exit_code == 0
    assert read_checkpoint(run / "checkpoints" / "latest.safetensors").step == 3  # untouched
    assert runner.invoke(app, ["train", "--resume", str(run), "--steps", "4"]).exit_code == 0  # lock released


def test_a_checkpoint_replaced_between_reading_and_locking_is_refused(finished_run, tmp_path):
    from nfsd_nerf.train import run_training

    run = copy_run(finished_run, tmp_path)
    latest = run / "checkpoints" / "latest.safetensors"
    ckpt = read_checkpoint(latest)
    data = latest.read_bytes()
    latest.unlink()  # another trainer saved the run meanwhile (an atomic replace: a new file)
    latest.write_bytes(data)
    with pytest.raises(UserError, match="changed since it was read"):
        run_training(ckpt.config, resume=ckpt, run_dir=run, progress=False)


# --------------------------------------------------------------------------- 6. a video encoder out of disk space


def test_a_truncated_video_is_refused_and_the_earlier_one_kept(finished_run, tmp_path, monkeypatch):
    from nfsd_nerf.export import video_file

    run = copy_run(finished_run, tmp_path)
    args = ["render-video", str(run), "--frames", "3", "--size", "16", "--modes", "rgb,depth"]
    assert runner.invoke(app, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in (run / "video").iterdir()}
    real_init = video_file.VideoFile.__init__

    def init(self, *a, **k):  # ffmpeg failed writing the trailer: the file is cut, close() still succeeds
        real_init(self, *a, **k)
        close = self.writer.close

        def cut_close():
            close()
            if self.path.name == "turntable_depth.mp4":
                self.tmp.write_bytes(self.tmp.read_bytes()[:300])

        self.writer.close = cut_close

    monkeypatch.setattr(video_file.VideoFile, "__init__", init)
    line = one_line_error(runner.invoke(app, [*args[:3], "5", *args[4:]]))
    assert "turntable_depth.mp4" in line and "incomplete" in line and "wrote" not in line
    assert {p.name: p.read_bytes() for p in (run / "video").iterdir()} == before  # neither file replaced

    def init_dying(self, *a, **k):  # ffmpeg exited mid-stream: writing the next frame is a broken pipe
        real_init(self, *a, **k)

        def broken(frame):
            raise OSError(32, "Broken pipe")

        self.writer.append_data = broken

    monkeypatch.setattr(video_file.VideoFile, "__init__", init_dying)
    line = one_line_error(runner.invoke(app, args))
    assert "turntable_rgb.mp4" in line and "the encoder stopped" in line
    assert {p.name: p.read_bytes() for p in (run / "video").iterdir()} == before


# --------------------------------------------------------------------------- 7. a stalled hub endpoint


def test_a_stalled_hub_gets_one_request_and_the_deadline(tmp_path, monkeypatch):
    """A server that accepts and never answers: the deadline holds, and the only request is the model's
    (huggingface_hub's own /api/agent-harnesses fetch would take 3 s of it first)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    from nfsd_nerf.guidance.hub import resolve_model_folder

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    requests, held = [], []

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            conn.settimeout(2)
            try:
                requests.append(conn.recv(4096).split(b"\r\n")[0].decode())
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
    monkeypatch.setattr(constants, "ENDPOINT", url)  # as when HF_ENDPOINT is set before the import
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agents.json"))
    monkeypatch.setattr(_detect_agent, "_registry", None)  # a fresh process: nothing fetched yet
    start = time.perf_counter()
    try:
        with pytest.raises(UserError, match="did not answer within 1 s"):
            resolve_model_folder("some/id")
        elapsed = time.perf_counter() - start
        time.sleep(0.2)
    finally:
        server.close()
        for conn in held:
            conn.close()
    assert elapsed < 2.0, elapsed
    assert [r.split()[1] for r in requests] == ["/api/models/some/id"], requests
