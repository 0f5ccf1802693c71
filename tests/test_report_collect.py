"""Reading run and batch folders for the report (``nfsd_nerf.report.collect``), and the SVG plots.

``make_run`` / ``make_batch`` write the files ``train`` and ``batch`` write (no training), so these
tests run in milliseconds; the page and browser tests import them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from nfsd_nerf.cli import app
from nfsd_nerf.errors import UserError
from nfsd_nerf.report.collect import read_batch, read_inputs, read_run
from nfsd_nerf.report.plots import line_plot, metric_series, nice_ticks, strip_plot, thin, use_log_scale

PNG_1PX = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8"
                        "cfc000000301010018dd8db00000000049454e44ae426082")


def make_run(folder: Path, *, prompt="a red cube", method="nfsd", scale=7.5, seed=0, steps=20, summary=True,
             psnr=15.0, videos=("rgb", "normal", "depth"), mesh: bytes | None = b"glTF-fake", previews=(10, 20)) -> Path:
    """A run folder as ``train`` (and ``export`` / ``render-video``) leave it; media are stand-in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"prompt": prompt, "guidance": {"model": "builtin", "revision": None, "method": method, "scale": scale,
                                             "negative_prompt": "", "perp_neg": False},
              "train": {"steps": steps, "seed": seed, "device": "cpu"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    lines = [{"step": s, "loss": 100.0 / s, "loss_guidance": 90.0 / s, "t": [300 - s, 310 - s], "grad_norm": 2.0 * s,
              "param_grad_norm": float(s), "shading": "albedo", "skipped_steps": 0, "seconds_per_step": 0.1}
             for s in range(2, steps + 1, 2)]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (folder / "metrics.jsonl").write_text(text + ('{"step": 99, "loss"' if not summary else ""))  # live: half a line
    (folder / "previews").mkdir(exist_ok=True)
    for step in previews:
        (folder / "previews" / f"step{step:06d}.png").write_bytes(PNG_1PX)
    (folder / "checkpoints").mkdir(exist_ok=True)
    if summary:
        (folder / "summary.json").write_text(json.dumps({
            "prompt": prompt, "guidance": method, "scale": scale, "negative_prompt": "", "perp_neg": False,
            "steps": steps, "skipped_steps": 0, "wall_time_s": 12.5, "seconds_per_step": 0.1, "device": "cpu",
            "hash_grid_backend": "torch", "ray_marcher": "pytorch",
            "model": {"id": "builtin", "revision": "refs-abc", "dtype": None, "weight_files": []},
            "versions": {"nfsd-nerf": "0.1.0"},
            "eval": {"psnr": psnr, "psnr_masked": psnr - 4, "silhouette_iou": 0.8}}))
    if videos:
        (folder / "video").mkdir(exist_ok=True)
        for mode in videos:
            (folder / "video" / f"turntable_{mode}.mp4").write_bytes(b"mp4-" + mode.encode())
    if mesh is not None:
        (folder / "export").mkdir(exist_ok=True)
        (folder / "export" / "mesh.glb").write_bytes(mesh)
    return folder


def make_batch(root: Path, prompts=("a red cube", "a blue ball"), variants=("nfsd", "sds"), seeds=(0,),
               make=make_run) -> Path:
    """A batch folder: ``batch.json`` and a run folder per prompt x variant x seed."""
    runs = []
    for p, prompt in enumerate(prompts):
        for v, variant in enumerate(variants):
            for seed in seeds:
                label = f"{prompt.replace(' ', '-')}/{variant}/seed-{seed}"
                make(root / label, prompt=prompt, method=variant, seed=seed, psnr=10.0 + p + 2 * v)
                runs.append({"prompt": prompt, "variant": variant, "seed": seed, "folder": label, "state": "done"})
    (root / "batch.json").write_text(json.dumps({"plan": root.name, "runs": runs}))
    return root


def test_a_finished_run_reads_into_plain_data(tmp_path):
    run = read_run(make_run(tmp_path / "run", previews=(20, 5, 10)))
    assert (run.prompt, run.step, run.planned_steps, run.state, run.partial) == ("a red cube", 20, 20, "done", False)
    assert run.evaluation == {"psnr": 15.0, "psnr_masked": 11.0, "silhouette_iou": 0.8}
    assert [step for step, _ in run.previews] == [5, 10, 20]
    assert sorted(run.videos) == ["depth", "normal", "rgb"] and run.mesh.name == "mesh.glb"
    assert (run.variant, run.seed) == ("nfsd s7.5", 0)
    assert run.final_loss == pytest.approx(5.0)


def test_a_run_without_summary_is_partial_and_ignores_a_half_written_line(tmp_path):
    run = read_run(make_run(tmp_path / "run", summary=False, videos=(), mesh=None))
    assert run.partial and run.state == "partial"
    assert run.step == 20  # the last complete metrics line; the half line is skipped
    assert run.videos == {} and run.mesh is None and run.evaluation == {}


def test_corrupt_summary_and_non_run_folders_are_user_errors(tmp_path):
    folder = make_run(tmp_path / "run")
    (folder / "summary.json").write_text('{"prompt": "a red cu')
    with pytest.raises(UserError, match="summary.json is corrupt"):
        read_run(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a run folder"):
        read_inputs([tmp_path / "empty"])
    with pytest.raises(UserError, match="folder not found"):
        read_inputs([tmp_path / "nope"])


@pytest.mark.parametrize("case", ["neither", "corrupt", "missing", "several-without-out", "batch-json"])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, case):
    run = make_run(tmp_path / "run")
    args = {"neither": [str(tmp_path / "run" / "previews")], "missing": [str(tmp_path / "nope")],
            "corrupt": [str(run)], "several-without-out": [str(run), str(make_run(tmp_path / "other"))],
            "batch-json": [str(tmp_path / "batch")]}[case]
    if case == "corrupt":
        (run / "summary.json").write_text("[1, 2")
    if case == "batch-json":
        (tmp_path / "batch").mkdir()
        (tmp_path / "batch" / "batch.json").write_text('{"runs": 3}')
    result = CliRunner().invoke(app, ["report", *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert not (run / "report").exists()


def test_a_batch_reads_every_planned_run_leniently(tmp_path):
    root = make_batch(tmp_path / "plan")
    (root / "a-blue-ball/sds/seed-0/summary.json").write_text("not json")
    data = json.loads((root / "batch.json").read_text())
    data["runs"].append({"prompt": "a green cone", "variant": "nfsd", "seed": 0, "folder": "a-green-cone/nfsd/seed-0",
                         "state": "pending"})
    (root / "batch.json").write_text(json.dumps(data))
    batch = read_batch(root)
    assert [(r.prompt, r.variant, r.state) for r in batch.runs] == [
        ("a red cube", "nfsd", "done"), ("a red cube", "sds", "done"), ("a blue ball", "nfsd", "done"),
        ("a blue ball", "sds", "corrupt"), ("a green cone", "nfsd", "pending")]
    assert "summary.json is corrupt" in batch.runs[3].note
    assert isinstance(read_inputs([root]), type(batch))


def test_loose_runs_with_the_same_settings_get_their_own_column(tmp_path):
    runs = read_inputs([make_run(tmp_path / "a"), make_run(tmp_path / "b"), make_run(tmp_path / "c", method="sds")])
    assert [r.variant for r in runs] == ["nfsd s7.5 (a)", "nfsd s7.5 (b)", "sds s7.5"]


def test_metric_series_orders_keys_and_reduces_lists():
    lines = [{"step": 1, "loss": 2.0, "t": [100, 300], "loss_guidance": 1.0, "zeta": 3, "shading": "albedo",
              "grad_norm": float("nan"), "seconds_per_step": 0.5, "flag": True},
             {"step": 2, "loss": 1.0, "t": [200], "loss_guidance": 0.5, "zeta": 4, "grad_norm": 1.0}]
    series = metric_series(lines)
    assert list(series) == ["loss", "loss_guidance", "grad_norm", "t", "seconds_per_step", "zeta"]
    assert series["t"] == [(1, 200.0), (2, 200.0)]
    assert series["grad_norm"] == [(2, 1.0)]  # the NaN is left out


def test_plot_helpers():
    assert nice_ticks(0, 10, 4) == [0, 2, 4, 6, 8, 10] or nice_ticks(0, 10, 4) == [0, 5, 10]
    assert all(math.isclose(t % 0.5, 0) or math.isclose(t % 0.5, 0.5) for t in nice_ticks(0.1, 2.3))
    points = [(i, float(i)) for i in range(5000)]
    kept = thin(points, 1000)
    assert len(kept) <= 1001 and kept[-1] == points[-1] and kept[0] == points[0]
    assert use_log_scale([1e5, 1.0]) and not use_log_scale([1.0, 10.0]) and not use_log_scale([-1.0, 1e5])
    svg = line_plot("loss", [(1, 1e5), (2, 10.0), (3, 1.0)])
    assert svg.startswith("<svg") and "(log y)" in svg and svg.count("<polyline") == 1
    assert "no values" in line_plot("empty", [])
    strip = strip_plot("PSNR", {"nfsd": [("cube", 12.0), ("ball", 14.0)], "sds": [("cube", 9.0)]})
    assert strip.count('class="plot-dot"') == 3 and strip.count('class="plot-mean"') == 2
