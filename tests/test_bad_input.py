"""Bad input, one class per test, through the command line: each is refused with exit code 2 and one
line ``error: ...`` naming the setting, without a traceback, before any folder is made under ``--out``
(or ``video/`` in the run) and before any model loads. Nothing here trains: refusals come first."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from nfsd_nerf.cli import app
from nfsd_nerf.config import checks

runner = CliRunner()
BUILTIN = ["--model", "builtin", "--steps", "2"]


@pytest.fixture
def paths(tmp_path) -> dict[str, Path]:
    """``{out}``: the --out folder (absent at first); ``{run}``: an existing, empty run folder."""
    run = tmp_path / "run"
    run.mkdir()
    return {"out": tmp_path / "out", "run": run}


def assert_refused(args: list[str], setting: str, paths: dict[str, Path]) -> str:
    """Run the CLI with ``{out}`` / ``{run}`` filled in; check the refusal; return its line."""
    result = runner.invoke(app, [a.format(**{k: str(v) for k, v in paths.items()}) for a in args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert setting in lines[0], lines[0]
    assert "Traceback" not in result.output
    out, run = paths["out"], paths["run"]
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))
    assert not any(run.iterdir()), sorted(run.rglob("*"))
    return lines[0]


@pytest.fixture
def machine_of_16_gib(monkeypatch):
    """The same answer on any machine: the device has 16 GiB."""
    monkeypatch.setattr(checks, "device_memory", lambda device: (16 << 30, "RAM"))


@pytest.mark.parametrize("args, setting", [
    (["train", "a red cube", *BUILTIN, "--out", "{out}", "--size", "100000"], "render.size=100000"),
    (["train", "a red cube", *BUILTIN, "--out", "{out}", "--set", "render.n_samples=100000000"], "render.n_samples"),
    (["train", "a red cube", *BUILTIN, "--out", "{out}", "--set", "render.occupancy_resolution=5000"],
     "render.occupancy_resolution"),
    (["train", "a red cube", *BUILTIN, "--out", "{out}", "--set", "field.hidden_dim=100000000"], "field.hidden_dim"),
    (["train", "a red cube", *BUILTIN, "--out", "{out}", "--set", "render.batch_size=1000000"], "render.batch_size"),
    (["train", "a red cube", "--out", "{out}", "--set", "field.log2_hashmap_size=30", "--set", "field.n_levels=32"],
     "field.log2_hashmap_size"),
    (["render-video", "{run}", "--size", "100000"], "--size"),
    (["render-video", "{run}", "--size", "4096", "--frames", "100000"], "--frames"),
])
def test_sizes_that_cannot_be_allocated_are_refused_against_the_machine(args, setting, paths, machine_of_16_gib):
    line = assert_refused(args, setting, paths)
    assert "16.0 GiB of RAM" in line


@pytest.mark.parametrize("args, setting", [
    (["train", "a red cube", *BUILTIN, "--out", "{out}", "--seed", "99999999999999999999"], "train.seed"),
    (["train", "a red cube", *BUILTIN, "--out", "{out}", "--set", "train.seed=99999999999999999999"], "train.seed"),
    (["train", "a red cube", *BUILTIN, "--out", "{out}", "--set", "render.size=99999999999999999999"], "render.size"),
    (["image", "a red cube", *BUILTIN, "--out", "{out}", "--seed", "99999999999999999999"], "--seed"),
    (["decompose", "a red cube", "--model", "builtin", "--out", "{out}", "--seed", "99999999999999999999"], "--seed"),
])
def test_integers_beyond_what_torch_holds_are_refused(args, setting, paths):
    assert_refused(args, setting, paths)


@pytest.mark.parametrize("override, setting", [
    ("field.bound=.inf", "field.bound"),
    ("cameras.distance_range=[.inf,.inf]", "cameras.distance_range[0]"),
    ("cameras.distance_range=[0,0]", "cameras.distance_range[0]"),
    ("field.blob_density=.nan", "field.blob_density"),
    ("optim.lr=.inf", "optim.lr"),
    ("guidance.scale=-.inf", "guidance.scale"),
    ("background.color=[2,-1,.nan]", "background.color[2]"),
    ("background.color=[2,-1,0]", "background.color[0]"),
    ("render.occupancy_threshold=2", "render.occupancy_threshold"),
    (f"optim.lr={10**400}", "optim.lr"),
])
def test_non_finite_and_out_of_range_numbers_are_refused(override, setting, paths):
    assert_refused(["train", "a red cube", *BUILTIN, "--out", "{out}", "--set", override], setting, paths)


@pytest.mark.parametrize("content, why", [
    (b"\xff\xfe\x00binary", "not UTF-8"),
    (b"render: {size: 32}\n" + b"#" * (1 << 20), "larger than 1 MiB"),
])
def test_config_files_that_are_not_yaml_text_are_refused_unread(content, why, paths, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_bytes(content)
    line = assert_refused(["train", "a red cube", "--out", "{out}", "--config", str(config)], str(config), paths)
    assert why in line


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_a_config_that_never_ends_is_refused(paths):
    assert_refused(["train", "a red cube", "--out", "{out}", "--config", "/dev/zero"], "/dev/zero", paths)


@pytest.mark.parametrize("lr", ["nan", "-1", "0", "inf"])
def test_image_learning_rate_must_be_positive_and_finite(lr, paths):
    assert_refused(["image", "a red cube", *BUILTIN, "--out", "{out}", "--lr", lr], "--lr", paths)


@pytest.mark.parametrize("name, value", [("HF_HUB_ETAG_TIMEOUT", "abc"), ("HF_HUB_ETAG_TIMEOUT", "2.5"),
                                         ("HF_HUB_ETAG_TIMEOUT", ""), ("HF_HUB_DOWNLOAD_TIMEOUT", "-1")])
def test_hub_variables_huggingface_hub_cannot_read_are_refused_before_it_is_imported(name, value, paths, monkeypatch):
    monkeypatch.setenv(name, value)
    assert_refused(["train", "a red cube", "--offline", "--out", "{out}"], name, paths)
    assert_refused(["doctor"], name, paths)


@pytest.mark.parametrize("args, setting", [
    (["train", "a red cube", "--steps", "abc"], "--steps: 'abc'"),
    (["train", "a red cube", "--size", "abc"], "--size"),
    (["train", "a red cube", "--scale", "abc"], "--scale"),
    (["train", "a red cube", "--seed", "abc"], "--seed"),
    (["image", "a red cube", "--steps", "1e9"], "--steps: '1e9'"),
    (["export", "{run}", "--resolution", "abc"], "--resolution"),
    (["render-video", "{run}", "--frames", "abc"], "--frames"),
    (["train", "a red cube", "--bogus"], "--bogus"),
    (["trian"], "trian"),
    (["export"], "run_dir"),
])
def test_usage_errors_are_one_line_like_every_other_error(args, setting, paths):
    assert_refused(args, setting, paths)


@pytest.mark.parametrize("override, setting", [
    ("field.log2_hashmap_size=40", "field.log2_hashmap_size"),
    ("field.log2_hashmap_size=-1", "field.log2_hashmap_size"),
    ("field.per_level_scale=0", "field.per_level_scale"),
    ("field.per_level_scale=.nan", "field.per_level_scale"),
    ("field.per_level_scale=-2", "field.per_level_scale"),
    ("field.n_levels=1000", "field.n_levels"),
    ("field.n_features_per_level=100000", "field.n_features_per_level"),
    ("field.base_resolution=100000000", "field.base_resolution"),
])
def test_hash_grid_settings_are_refused_before_the_run_folder(override, setting, paths):
    assert_refused(["train", "a red cube", *BUILTIN, "--out", "{out}", "--set", override], setting, paths)


@pytest.mark.parametrize("args", [
    ["train", "赤い立方体", *BUILTIN, "--out", "{out}"],
    ["train", "🧊🔴🔥", *BUILTIN, "--out", "{out}"],
    ["train", "a DSLR photo of a hamburger", *BUILTIN, "--out", "{out}"],
    ["train", "blurry, low quality", *BUILTIN, "--out", "{out}"],
    ["image", "🧊🔴", *BUILTIN, "--out", "{out}"],
    ["image", "a blue cube", *BUILTIN, "--out", "{out}", "--guidance", "dds", "--source-prompt", "赤"],
])
def test_the_builtin_prior_refuses_prompts_naming_none_of_its_objects(args, paths):
    assert_refused(args, "names no known shape", paths)


def test_image_leaves_no_folder_when_a_later_check_fails(paths):
    """The prompt's folder is made when the PNGs are written, not when the output is checked."""
    assert_refused(["image", "a red cube", "--model", "./no-such-model", "--offline", "--out", "{out}"],
                   "no-such-model", paths)


@pytest.mark.parametrize("args, setting", [
    (["train", "a red cube", *BUILTIN, "--out", "{out}", "--seed", "-1"], "train.seed"),
    (["image", "a red cube", *BUILTIN, "--out", "{out}", "--seed", "-1"], "--seed"),
    (["train", "a red cube", *BUILTIN[:2], "--out", "{out}", "--steps", "99999999999999999999999999"], "train.steps"),
])
def test_negative_seeds_and_steps_beyond_int64_are_refused(args, setting, paths):
    """README, Configuration: seeds are 0..2^63-1 (negative seeds alias positive ones in torch), steps
    any positive 64-bit integer; a negative --scale is accepted (see the config tests)."""
    assert_refused(args, setting, paths)
