"""Command-line behaviour that needs no model: help, version, and bad input -> one line + exit 2."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from nfsd_nerf import __version__
from nfsd_nerf.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_help_and_version():
    result = invoke("--help")
    assert result.exit_code == 0 and "train" in result.output
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_console_script_starts_without_importing_heavy_libraries():
    code = (
        "import sys; from nfsd_nerf.cli import app; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'nerfacc', 'tinycudann', 'trimesh', 'imageio') "
        "if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", ""], "prompt is empty"),
        (["train", "   "], "prompt is empty"),
        (["train"], "prompt is empty"),
        (["train", "a red cube", "--model", "builtin", "--set", "render.sise=3"], "render.sise"),
        (["train", "a red cube", "--model", "builtin", "--set", "render.size=big"], "render.size"),
        (["train", "a red cube", "--model", "builtin", "--steps", "0"], "must be positive"),
        (["train", "a red cube", "--model", "builtin", "--size", "-4"], "must be positive"),
        (["train", "a red cube", "--model", "builtin", "--guidance", "sjc"], "known: nfsd, sds, vsd"),
        (["train", "a red cube", "--model", "builtin", "--device", "tpu"], "train.device"),
        (["train", "--resume", "/nonexistent/run"], "resume folder not found"),
        (["train", "--resume", "/nonexistent/run", "--set", "render.size=8"], "drop the prompt, --config and --set"),
        (["train", "a red cube", "--model", "builtin", "--set", "train.log_every=0"], "train.log_every must be positive"),
        (["train", "a red cube", "--model", "builtin", "--set", "render.occupancy_update_every=0"], "occupancy_update_every"),
        (["train", "a red cube", "--model", "builtin", "--set", "field.bound=-1"], "field.bound must be positive"),
        (["train", "a red cube", "--model", "builtin", "--set", "optim.betas=[0.9, 1.5]"], "optim.betas[1]"),
        (["train", "a red cube", "--model", "builtin", "--set", "guidance.t_min=0.99"], "guidance.t_min"),
        (["train", "a red cube", "--model", "builtin", "--set", "cameras.fovy_range=[70, 40]"], "cameras.fovy_range"),
        (["train", "a red cube", "--device", "mps"], "not supported"),
        (["train", "a red cube", "--config", "/nonexistent.yaml"], "not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = invoke("train", "a red cube", "--model", "builtin", "--out", str(blocker / "runs"), "--steps", "1")
    assert result.exit_code == 2 and "not writable" in result.output


def test_image_command_writes_its_png(tiny_sd_path, tmp_path):
    result = invoke("image", "a hamburger", "--model", str(tiny_sd_path), "--offline", "--steps", "3",
                    "--out", str(tmp_path), "--device", "cpu")
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in (tmp_path / "a-hamburger").glob("*.png"))
    assert "nfsd-s7.5.png" in pngs and "nfsd-s7.5-steps.png" in pngs


@pytest.mark.parametrize("command", ["export", "render-video"])
def test_export_commands_refuse_missing_runs_and_bad_checkpoints(command, tmp_path):
    result = invoke(command, str(tmp_path / "nope"))
    assert result.exit_code == 2 and "run folder not found" in result.output
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    result = invoke(command, str(run))
    assert result.exit_code == 2 and "truncated or not a safetensors file" in result.output
    assert "Traceback" not in result.output


def test_export_and_video_of_a_trained_run(tmp_path):
    result = invoke("train", "a red cube", "--model", "builtin", "--steps", "60", "--out", str(tmp_path),
                    "--set", "train.preview_every=0")
    assert result.exit_code == 0, result.output
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    result = invoke("export", str(run), "--format", "ply", "--resolution", "64")
    assert result.exit_code == 0, result.output
    assert (run / "export" / "mesh.ply").is_file()
    result = invoke("export", str(run), "--threshold", "lots")
    assert result.exit_code == 2 and "--threshold" in result.output
    result = invoke("render-video", str(run), "--size", "32", "--frames", "4", "--modes", "rgb")
    assert result.exit_code == 0, result.output
    assert (run / "video" / "turntable_rgb.mp4").is_file()
    result = invoke("render-video", str(run), "--size", "33")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_unknown_builtin_object_is_refused_before_a_run_folder_exists(tmp_path):
    result = invoke("train", "a hamburger", "--model", "builtin", "--out", str(tmp_path))
    assert result.exit_code == 2 and "known shapes" in result.output
    assert list(tmp_path.iterdir()) == []
