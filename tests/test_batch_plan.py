"""Batch plans: expansion into runs, override order, and every bad plan refused in one line before
anything is written."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from nfsd_nerf.batch import load_plan
from nfsd_nerf.cli import app
from nfsd_nerf.errors import UserError

runner = CliRunner()


def write_plan(folder: Path, plan: dict, name: str = "plan.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(plan))
    return path


def test_a_plan_expands_to_prompts_x_variants_x_seeds_in_fixed_folders(tmp_path):
    path = write_plan(tmp_path, {
        "prompts": ["a red cube", "a blue torus"], "model": "builtin",
        "variants": {"nfsd": {"guidance.method": "nfsd"}, "sds-7.5": {"guidance.method": "sds", "guidance.scale": 7.5}},
        "seeds": [0, 3], "set": {"train.steps": 50, "guidance.t_max": 0.4},
    })
    plan = load_plan(path, tmp_path / "out")
    assert plan.name == "plan" and plan.root == (tmp_path / "out" / "plan").resolve()
    assert len(plan.runs) == 8
    assert [r.label for r in plan.runs[:4]] == [
        "a-red-cube/nfsd/seed-0", "a-red-cube/nfsd/seed-3", "a-red-cube/sds-7.5/seed-0", "a-red-cube/sds-7.5/seed-3"]
    run = plan.runs[2]
    assert run.run_dir == plan.root / "a-red-cube" / "sds-7.5" / "seed-0"
    cfg = run.config
    assert (cfg.prompt, cfg.train.seed, cfg.train.steps) == ("a red cube", 0, 50)
    assert (cfg.guidance.method, cfg.guidance.scale, cfg.guidance.t_max) == ("sds", 7.5, 0.4)
    assert cfg.render.size == 32  # the builtin preset, picked by the model as for train
    nfsd = plan.runs[0].config.guidance
    assert nfsd.scale == 7.5 and nfsd.negative_prompt.startswith("unrealistic")  # rule defaults resolved
    assert not (tmp_path / "out").exists()


def test_a_variant_wins_over_set_which_wins_over_the_preset(tmp_path):
    path = write_plan(tmp_path, {
        "prompts": ["a red cube"], "model": "builtin", "set": {"guidance.scale": 5.0, "render": {"size": 24}},
        "variants": {"common": None, "own": {"guidance.scale": 9.0}},
    })
    common, own = load_plan(path, tmp_path).runs
    assert (common.config.guidance.scale, own.config.guidance.scale) == (5.0, 9.0)
    assert common.config.render.size == own.config.render.size == 24
    assert common.seed == 0 and common.variant == "common"


def test_prompts_file_and_defaults(tmp_path):
    (tmp_path / "prompts.txt").write_text("# shapes\na red cube\n\n  a green sphere  \n")
    path = write_plan(tmp_path, {"prompts_file": "prompts.txt", "model": "builtin", "name": "shapes"})
    plan = load_plan(path, tmp_path)
    assert plan.prompts == ("a red cube", "a green sphere")
    assert [r.label for r in plan.runs] == ["a-red-cube/default/seed-0", "a-green-sphere/default/seed-0"]
    assert plan.root.name == "shapes"


def test_the_example_plan_is_valid():
    plan = load_plan(Path("configs/batches/builtin-nfsd-vs-sds.yaml"), Path("outputs"))
    assert len(plan.runs) == 18
    assert {r.config.guidance.scale for r in plan.runs} == {7.5, 100.0}


@pytest.mark.parametrize("plan, message", [
    ({"prompts": ["a red cube"], "model": "builtin", "varients": {}}, "unknown key 'varients'"),
    ({"prompts": [], "model": "builtin"}, "no prompts"),
    ({"model": "builtin"}, "no prompts"),
    ({"prompts": ["a red cube", " "], "model": "builtin"}, "a prompt is empty"),
    ({"prompts": ["a red cube", "A red cube!"], "model": "builtin"}, "share the folder"),
    ({"prompts": ["a hamburger"], "model": "builtin"}, "cannot draw 'a hamburger'"),
    ({"prompts": ["a red cube"], "model": "builtin", "set": {"render.sise": 3}},
     "set: unknown config key 'render.sise'"),
    ({"prompts": ["a red cube"], "model": "builtin", "variants": {"x": {"guidance.scale": "big"}}},
     "variant 'x': guidance.scale: expected a number"),
    ({"prompts": ["a red cube"], "model": "builtin", "variants": {"x": {"guidance.method": "sjc"}}},
     "unknown guidance method 'sjc'"),
    ({"prompts": ["a red cube"], "model": "builtin", "variants": {"x": {"train.steps": 0}}},
     "train.steps must be positive"),
    ({"prompts": ["a red cube"], "model": "builtin", "variants": {"x": {"guidance.perp_neg": True}}}, "--perp-neg"),
    ({"prompts": ["a red cube"], "model": "builtin", "variants": {"a/b": {}}}, "variant name 'a/b'"),
    ({"prompts": ["a red cube"], "model": "builtin", "seeds": [0, 0]}, "listed twice"),
    ({"prompts": ["a red cube"], "model": "builtin", "seeds": ["one"]}, "seeds: expected a list"),
    ({"prompts": ["a red cube"], "model": "builtin", "set": {"train.seed": 3}}, "list seeds under seeds:"),
    ({"prompts": ["a red cube"], "model": "builtin", "variants": {"x": {"guidance.model": "builtin"}}}, "under model:"),
    ({"prompts": ["a red cube"], "model": "builtin", "set": {"prompt": "a blue cube"}}, "prompts:"),
    ({"prompts": ["a red cube"], "prompts_file": "p.txt"}, "not both"),
    ({"prompts_file": "missing.txt", "model": "builtin"}, "cannot read prompts_file"),
    (["a red cube"], "expected a mapping"),
])
def test_bad_plans_are_refused_in_one_line(tmp_path, plan, message):
    path = write_plan(tmp_path, plan)
    with pytest.raises(UserError) as info:
        load_plan(path, tmp_path / "out")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_bad_plan_exits_2_and_leaves_nothing(tmp_path):
    path = write_plan(tmp_path, {"prompts": ["a red cube", "a DSLR photo of a hamburger"], "model": "builtin",
                                 "variants": {"nfsd": {"guidance.method": "nfsd"}}})
    out = tmp_path / "out"
    result = runner.invoke(app, ["batch", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "hamburger" in result.output and "Traceback" not in result.output
    assert not out.exists()
    result = runner.invoke(app, ["batch", str(tmp_path / "missing.yaml"), "--out", str(out)])
    assert result.exit_code == 2 and "plan not found" in result.output and not out.exists()


def test_the_cli_and_the_batch_package_import_neither_torch_nor_ray():
    code = ("import sys; import nfsd_nerf.cli, nfsd_nerf.batch; "
            "print([m for m in ('torch', 'ray') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
