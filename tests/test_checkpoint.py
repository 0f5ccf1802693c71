"""Checkpoints: round trip, every way a file can be bad, which file a run uses, and 0.1.0 files."""

from pathlib import Path

import pytest
import torch

from nfsd_nerf.checkpoint import FINAL, LATEST, find_checkpoint, load_run, read_checkpoint, save_checkpoint
from nfsd_nerf.config import Config, merge
from nfsd_nerf.errors import UserError
from nfsd_nerf.scene import build_scene

DATA = Path(__file__).parent / "data"
TINY = {"field": {"n_levels": 2, "log2_hashmap_size": 8, "hidden_dim": 8}, "render": {"occupancy_resolution": 8}}


def tiny_config(**sections) -> Config:
    return merge(merge(Config(prompt="a red cube"), TINY), sections)


def saved(tmp_path, cfg=None, step=7, with_optimizer=True) -> tuple[Path, dict]:
    cfg = cfg or tiny_config()
    torch.manual_seed(0)
    scene = build_scene(cfg)
    with torch.no_grad():
        scene.field.encoding.params.uniform_(-1, 1)  # not the initial values, so a restore is visible
        scene.occupancy.occs.uniform_()
    optimizer = None
    if with_optimizer:
        optimizer = torch.optim.Adam(scene.field.parameters(), lr=0.01)
        scene.field.density(torch.rand(64, 3)).sum().backward()
        optimizer.step()
    rng = {"generator": torch.Generator().manual_seed(3).get_state()}
    path = save_checkpoint(tmp_path / "ckpt.safetensors", config=cfg, scene=scene, step=step, optimizer=optimizer,
                           rng=rng, extra_meta={"skipped_steps": "2"})
    return path, {"scene": scene, "optimizer": optimizer, "config": cfg, "rng": rng}


def test_round_trip_restores_every_part(tmp_path):
    path, original = saved(tmp_path)
    ckpt = read_checkpoint(path)
    assert ckpt.config == original["config"] and ckpt.step == 7 and ckpt.skipped_steps == 2
    assert ckpt.encoder_overflow_steps == 0 and ckpt.loss_scale is None  # absent: the defaults
    assert torch.equal(ckpt.section("rng")["generator"], original["rng"]["generator"])
    run = load_run(tmp_path, path)
    for name, module in original["scene"].modules().items():
        restored = run.scene.modules()[name].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(restored[key], value), f"{name}.{key}"
    assert not run.field.training  # ready to render
    state = ckpt.section("optimizer.state")
    n_params = len(list(original["scene"].field.parameters()))
    assert set(state) == {f"{i}.{name}" for i in range(n_params) for name in ("step", "exp_avg", "exp_avg_sq")}
    assert ckpt.param_groups[0]["lr"] == 0.01 and set(ckpt.optimizer_state) == set(range(n_params))


def test_files_are_atomic_and_tensors_stored_fp32_on_the_cpu(tmp_path):
    path, _ = saved(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]  # no temporary left
    ckpt = read_checkpoint(path)
    assert all(not t.is_floating_point() or t.dtype == torch.float32 for t in ckpt.tensors.values())


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated"),
    (lambda p: p.write_bytes(b"not a checkpoint at all"), "truncated or not a safetensors"),
    (lambda p: p.unlink(), "not found"),
])
def test_bad_files_are_one_line_user_errors(tmp_path, damage, message):
    path, _ = saved(tmp_path)
    damage(path)
    with pytest.raises(UserError, match=message):
        read_checkpoint(path)


def test_foreign_safetensors_and_future_versions_are_refused(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, other)
    with pytest.raises(UserError, match="not an nfsd-nerf checkpoint"):
        read_checkpoint(other)
    newer = tmp_path / "newer.safetensors"
    save_file({"x": torch.zeros(1)}, newer, metadata={"format": "nfsd-nerf-checkpoint", "version": "99"})
    with pytest.raises(UserError, match="version '99'"):
        read_checkpoint(newer)


def test_a_checkpoint_of_another_shape_is_refused_by_name(tmp_path):
    path, _ = saved(tmp_path)
    ckpt = read_checkpoint(path)
    from nfsd_nerf.checkpoint import restore_scene

    with pytest.raises(UserError, match="does not match this field"):
        restore_scene(build_scene(tiny_config(field={"hidden_dim": 16})), ckpt)


def test_which_checkpoint_a_run_uses(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no checkpoint"):
        find_checkpoint(run)
    (run / "checkpoints" / FINAL).write_bytes(b"")
    assert find_checkpoint(run).name == FINAL
    (run / "checkpoints" / LATEST).write_bytes(b"")
    assert find_checkpoint(run).name == LATEST  # latest is always the newest state
    assert find_checkpoint(run, tmp_path / "x.safetensors") == tmp_path / "x.safetensors"
    with pytest.raises(UserError, match="run folder not found"):
        find_checkpoint(tmp_path / "missing")


def test_a_checkpoint_written_by_0_1_0_still_loads_and_gives_the_same_field():
    """tests/data/checkpoint-0.1.0.safetensors: 3 built-in training steps written by nfsd-nerf 0.1.0;
    the densities and albedos below were computed by 0.1.0 from that file."""
    run = load_run(DATA, DATA / "checkpoint-0.1.0.safetensors")
    assert run.step == 3 and run.config.prompt == "a red cube"
    x = torch.tensor([[0.0, 0.0, 0.0], [0.1, -0.2, 0.05], [0.3, 0.3, -0.3], [-0.45, 0.1, 0.2]])
    with torch.no_grad():
        sigma, albedo = run.field(x)
    expected_sigma = [10.010452270507812, 5.4259724617004395, 0.5202970504760742, 0.6720839142799377]
    expected_albedo_0 = [0.4995594322681427, 0.4982410669326782, 0.49935412406921387]
    assert sigma.tolist() == pytest.approx(expected_sigma, rel=1e-6)
    assert albedo[0].tolist() == pytest.approx(expected_albedo_0, rel=1e-6)
    assert run.occupancy.binaries.float().mean().item() == 0.158203125
