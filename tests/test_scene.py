"""build_scene: the trainable parts a Config describes, where they live, and their seeded draw."""

from __future__ import annotations

import pytest
import torch

from nfsd_nerf.config import BackgroundConfig, Config, FieldConfig, RenderConfig
from nfsd_nerf.field import Background, NeRFField
from nfsd_nerf.render import OccupancyGrid
from nfsd_nerf.scene import Scene, build_scene


def _config(**background) -> Config:
    return Config(
        field=FieldConfig(n_levels=4, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0, hidden_dim=8,
                          bound=1.5, backend="torch"),
        background=BackgroundConfig(**background),
        render=RenderConfig(occupancy_resolution=8, occupancy_threshold=0.05, occupancy_ema_decay=0.9),
    )


def _seeded_scene(seed: int, cfg: Config | None = None) -> Scene:
    torch.manual_seed(seed)
    return build_scene(cfg or _config())


def _tensors(scene: Scene) -> dict[str, torch.Tensor]:
    """Every saved tensor of the scene, keyed ``part.name``."""
    return {f"{part}.{k}": v for part, module in scene.modules().items() for k, v in module.state_dict().items()}


def test_parts_follow_the_config():
    cfg = _config(kind="mlp", random_solid_prob=0.25)
    scene = build_scene(cfg)
    assert isinstance(scene.field, NeRFField) and isinstance(scene.background, Background)
    assert isinstance(scene.occupancy, OccupancyGrid)
    assert scene.field.bound == scene.occupancy.bound == 1.5
    assert scene.field.encoding.n_levels == 4 and scene.field.mlp[0].weight.shape == (8, 8)
    assert (scene.background.kind, scene.background.random_solid_prob) == ("mlp", 0.25)
    occ = scene.occupancy
    assert (occ.resolution, occ.threshold, occ.ema_decay) == (8, 0.05, 0.9)


def test_modules_in_save_order_with_stable_state_keys():
    scene = build_scene(_config())
    modules = scene.modules()
    assert list(modules) == ["field", "background", "occupancy"]
    assert list(modules.values()) == [scene.field, scene.background, scene.occupancy]
    assert set(_tensors(scene)) == {
        "field.encoding.params", "field.mlp.0.weight", "field.mlp.2.weight",
        "background.mlp.0.weight", "background.mlp.0.bias", "background.mlp.2.weight", "background.mlp.2.bias",
        "occupancy.occs", "occupancy.binaries",
    }
    solid = build_scene(_config(kind="solid"))
    assert solid.background.state_dict() == {}


def test_same_seed_same_scene():
    a, b = _tensors(_seeded_scene(0)), _tensors(_seeded_scene(0))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = _tensors(_seeded_scene(1))
    assert not torch.equal(a["field.encoding.params"], c["field.encoding.params"])
    assert not torch.equal(a["background.mlp.0.weight"], c["background.mlp.0.weight"])


def test_parts_live_on_the_cpu_by_default():
    scene = build_scene(_config())
    for module in scene.modules().values():
        assert all(t.device.type == "cpu" for t in [*module.parameters(), *module.buffers()])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_parts_live_on_the_requested_device():
    scene = build_scene(_config(), torch.device("cuda"))
    for module in scene.modules().values():
        assert all(t.device.type == "cuda" for t in [*module.parameters(), *module.buffers()])
    x = torch.zeros(4, 3, device="cuda")
    sigma, albedo = scene.field(x)
    assert sigma.device.type == albedo.device.type == "cuda"
