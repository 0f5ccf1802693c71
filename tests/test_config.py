"""Typed config: presets, overrides and the errors users see for bad keys and values."""

import re

import pytest

from nfsd_nerf.config import (
    Config, GuidanceConfig, check_config, dump_yaml, from_dict, load_config, merge, parse_override, preset_path,
    with_rule_defaults,
)
from nfsd_nerf.errors import UserError


def test_defaults_are_the_published_ones():
    cfg = Config()
    assert (cfg.render.size, cfg.render.batch_size, cfg.train.steps) == (64, 1, 10000)
    assert (cfg.optim.lr, cfg.optim.background_lr, cfg.optim.betas, cfg.optim.eps) == (0.01, 0.001, (0.9, 0.99), 1e-15)
    assert (cfg.field.n_levels, cfg.field.log2_hashmap_size, cfg.field.base_resolution) == (16, 19, 16)
    assert cfg.guidance.method == "nfsd" and cfg.guidance.scale is None


def test_default_preset_is_threestudios_dreamfusion_sd():
    """Each default README and docs/design.md section 1.4 call threestudio's (its dreamfusion-sd.yaml)."""
    from nfsd_nerf.train.schedules import active_levels

    cfg = load_config(preset_path("default"))
    assert cfg.render.ambient_only_steps == 2001  # albedo only for steps 0..2000
    assert [active_levels(s, cfg.train, cfg.field.n_levels) for s in (0, 2000, 2499, 2500, 5999, 6000)] == [
        8, 8, 8, 9, 15, 16]  # min(8 + max(step - 2000, 0) // 500, 16)
    assert cfg.cameras.elevation_range == (-10.0, 90.0)
    assert cfg.cameras.elevation_range[1] > cfg.prompts.overhead_min_elevation  # the overhead prompt can fire
    assert (cfg.cameras.position_perturb, cfg.cameras.position_perturb_distribution) == (0.1, "uniform")
    assert (cfg.cameras.center_perturb, cfg.cameras.up_perturb) == (0.2, 0.02)  # normal, as threestudio's
    assert cfg.render.alpha_threshold == 0.01
    assert cfg.field.normal_method == "auto"  # analytic on CUDA, as threestudio's
    assert cfg.field.heads == "separate"
    loss = cfg.loss
    assert (loss.orientation_start, loss.orientation_end, loss.orientation_ramp_steps) == (10.0, 1000.0, 5000)


def test_builtin_preset_keeps_the_values_its_figures_were_measured_with():
    cfg = load_config(preset_path("builtin"))
    assert cfg.render.alpha_threshold == 0.0 and cfg.cameras.elevation_range == (-10.0, 45.0)
    assert cfg.cameras.position_perturb_distribution == "normal"
    assert (cfg.field.normal_method, cfg.field.heads) == ("finite_difference", "shared")
    assert cfg.train.start_levels is None and cfg.render.ambient_only_steps == 0
    assert (cfg.render.light, cfg.render.ambient, cfg.render.lambertian_prob) == ("camera", 0.3, 1.0)
    assert cfg.field.density_activation == "trunc_exp"
    assert (cfg.loss.orientation_start, cfg.loss.orientation_end, cfg.loss.orientation_ramp_steps) == (10.0, 100.0, 1000)
    assert load_config(preset_path("cpu-tiny")).render.alpha_threshold == 0.0


def test_a_config_without_the_keys_added_after_0_1_0_means_what_it_meant():
    """0.1.0's config.yaml (in every run folder and checkpoint) lacks these keys: it had a shared MLP,
    no alpha threshold and normal position jitter."""
    cfg = from_dict({"field": {"n_levels": 8}})
    assert cfg.field.heads == "shared" and cfg.render.alpha_threshold == 0.0
    assert cfg.cameras.position_perturb_distribution == "normal"


def test_overrides_are_parsed_as_yaml_and_nested():
    assert parse_override("render.size=32") == {"render": {"size": 32}}
    assert parse_override("guidance.negative_prompt=ugly, blurry") == {"guidance": {"negative_prompt": "ugly, blurry"}}
    cfg = load_config(None, ["render.size=32", "cameras.fovy_range=[30, 60]", "guidance.scale=20"])
    assert cfg.render.size == 32 and cfg.cameras.fovy_range == (30.0, 60.0) and cfg.guidance.scale == 20.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("render.sise=32", "render.sise"),
        ("nothing.size=1", "nothing"),
        ("render.size=big", "render.size"),
        ("render.size=3.5", "render.size"),
        ("train.device=tpu", "train.device"),
        ("field.heads=both", "field.heads"),
        ("field.normal_method=sobel", "field.normal_method"),
        ("cameras.position_perturb_distribution=laplace", "cameras.position_perturb_distribution"),
        ("cameras.fovy_range=[1, 2, 3]", "cameras.fovy_range"),
        ("guidance.offline=maybe", "guidance.offline"),
        ("render=3", "render"),
        ("size", "section.key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        load_config(None, [override])


def test_yaml_round_trip_is_exact(tmp_path):
    cfg = load_config(preset_path("default"), ["guidance.scale=7.5", "cameras.elevation_range=[0, 30]"])
    again = from_dict(__import__("yaml").safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_presets_load_and_unknown_preset_is_refused(tmp_path):
    for name in ("default", "builtin", "cpu-tiny"):
        load_config(preset_path(name))
    with pytest.raises(UserError, match="unknown preset"):
        preset_path("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("render: [1, 2]\n")
    with pytest.raises(UserError, match="render"):
        load_config(bad)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_merge_keeps_untouched_defaults():
    cfg = merge(Config(), {"render": {"size": 16}})
    assert cfg.render.size == 16 and cfg.render.n_samples == Config().render.n_samples


@pytest.mark.parametrize(
    "override, message",
    [
        ("guidance.method=sjc", "unknown guidance method 'sjc' (known: nfsd, sds, vsd)"),
        ("guidance.t_min=0.99", "guidance.t_min"),
        ("train.steps=0", "train.steps must be positive"),
        ("render.ambient=2", "render.ambient must be in [0, 1]"),
        ("loss.sparsity=-1", "loss.sparsity must be zero or positive"),
        ("train.start_levels=40", "train.start_levels"),
        ("train.cpu_threads=0", "train.cpu_threads must be at least 1"),
        ("cameras.distance_range=[2, 1]", "cameras.distance_range"),
        ("cameras.elevation_range=[-10, 100]", "cameras.elevation_range must lie in [-90, 90]"),
        ("cameras.position_perturb=-0.1", "cameras.position_perturb must be zero or positive"),
        ("render.alpha_threshold=1.5", "render.alpha_threshold must be in [0, 1]"),
    ],
)
def test_check_config_names_the_key(override, message):
    cfg = merge(load_config(None, [override]), {"prompt": "a red cube"})
    with pytest.raises(UserError, match=re.escape(message)):
        check_config(cfg)


def test_check_config_accepts_defaults_and_presets_and_refuses_an_empty_prompt():
    for name in ("default", "builtin", "cpu-tiny"):
        check_config(merge(load_config(preset_path(name)), {"prompt": "a red cube"}))
    with pytest.raises(UserError, match="prompt is empty"):
        check_config(Config(prompt="  "))


def test_a_registered_rule_is_a_valid_method(monkeypatch):
    from nfsd_nerf.guidance.rules import RULES

    monkeypatch.setitem(RULES, "mine", RULES["sds"])
    check_config(merge(load_config(None, ["guidance.method=mine"]), {"prompt": "x"}))


def test_rule_defaults_fill_only_unset_values():
    assert with_rule_defaults(GuidanceConfig(method="sds")).scale == 100.0
    assert with_rule_defaults(GuidanceConfig(method="nfsd", scale=3.0)).scale == 3.0
    assert with_rule_defaults(GuidanceConfig(method="sds")).negative_prompt == ""
    assert with_rule_defaults(GuidanceConfig(method="nfsd", negative_prompt="x")).negative_prompt == "x"


def test_a_negative_guidance_scale_is_a_valid_setting():
    """README, Configuration: s = 0 drops the prompt's direction and s < 0 pushes away from the prompt;
    both are experiments, so only a non-finite scale is refused."""
    for scale in ("0", "-1"):
        check_config(merge(load_config(preset_path("builtin"), [f"guidance.scale={scale}"]), {"prompt": "a red cube"}))


@pytest.mark.parametrize("preset", ["default", "builtin", "cpu-tiny"])
def test_memory_needs_are_below_the_first_renders_and_the_presets_fit_a_small_machine(preset):
    """The samples counted for a training render never exceed what the marcher makes in the first
    renders (an all-occupied grid), so the memory check refuses only what would run out; and every
    preset's needs stay far below 4 GiB, so no real machine refuses them."""
    import torch

    from nfsd_nerf.cameras import generate_rays
    from nfsd_nerf.config.checks import RAY_BYTES, SAMPLE_BYTES, run_memory_needs
    from nfsd_nerf.render.marching import march_rays_cpu, step_size_from_samples
    from nfsd_nerf.render.occupancy import OccupancyGrid
    from nfsd_nerf.train.step import sample_views

    cfg = merge(load_config(preset_path(preset)), {"prompt": "a red cube"})
    assert sum(n.bytes for n in run_memory_needs(cfg)) < 4 << 30
    cfg = merge(cfg, {"render": {"size": 32}})  # the samples per ray do not depend on the size: fewer rays, faster
    needs = {n.what: n.bytes for n in run_memory_needs(cfg)}
    f, r = cfg.field, cfg.render
    per_sample = SAMPLE_BYTES + 4 * (f.n_levels * f.n_features_per_level + f.hidden_dim)
    counted = (needs["a training render"] - RAY_BYTES * r.size**2 * r.batch_size) / per_sample
    grid, generator = OccupancyGrid(f.bound, r.occupancy_resolution), torch.Generator().manual_seed(0)
    for _ in range(6):
        views = sample_views(0, cfg, generator, torch.device("cpu"))
        rays_o, rays_d = (x.reshape(-1, 3) for x in generate_rays(views.cameras, r.size, r.size))
        samples = march_rays_cpu(rays_o, rays_d, bound=f.bound, step=step_size_from_samples(f.bound, r.n_samples),
                                 offsets=torch.zeros(len(rays_o)), occupancy=grid)[0]
        assert 0 < counted <= len(samples), (counted, len(samples))


def test_memory_is_the_gpus_where_the_run_uses_cuda_else_the_ram(monkeypatch):
    import torch

    from nfsd_nerf.config.checks import device_memory

    gpu = type("Properties", (), {"total_memory": 80 << 30, "name": "Fake GPU"})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpu)
    device_memory.cache_clear()
    try:
        assert device_memory("auto") == device_memory("cuda:0") == (80 << 30, "GPU memory (Fake GPU)")
        ram, kind = device_memory("cpu")
        assert kind == "RAM" and ram > 1 << 30
    finally:
        device_memory.cache_clear()
