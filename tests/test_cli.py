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
        "heavy = [m for m in ('diffusers', 'transformers', 'nerfacc', 'tinycudann') if m in sys.modules]; "
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
        (["train", "a red cube", "--model", "builtin", "--guidance", "vsd"], "nfsd or sds"),
        (["train", "a red cube", "--model", "builtin", "--device", "tpu"], "train.device"),
        (["train", "--resume", "/nonexistent/run"], "resume folder not found"),
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
