"""NeRFField and Background against hand-derived values."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from nfsd_nerf.config import BackgroundConfig, FieldConfig
from nfsd_nerf.encoding import HashGridEncoding
from nfsd_nerf.field import (
    Background,
    NeRFField,
    blob_bias_from_points,
    frequency_encoding,
    resolve_normal_method,
    trunc_exp,
)

SMALL = FieldConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4, per_level_scale=2.0,
                    hidden_dim=16, n_hidden_layers=1, bound=1.0, backend="torch")


def _field(**overrides) -> NeRFField:
    torch.manual_seed(0)
    return NeRFField(dataclasses.replace(SMALL, **overrides))


def _roughen(field: NeRFField, scale: float = 1.0) -> NeRFField:
    """Make the hash grid matter: features of order 1 instead of 1e-4."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        field.encoding.params.copy_((torch.rand(field.encoding.params.shape, generator=g) * 2 - 1) * scale)
    return field


def _sphere_points(n: int, radius: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, 3, generator=g), dim=-1) * radius


# --------------------------------------------------------------------------- construction


def test_builds_from_field_config_and_state_dict_is_stable():
    field = NeRFField(FieldConfig(n_levels=SMALL.n_levels, log2_hashmap_size=SMALL.log2_hashmap_size))
    assert set(field.state_dict()) == {"encoding.params", "mlp.0.weight", "mlp.2.weight"}
    assert field.mlp[0].weight.shape == (64, 8) and field.mlp[2].weight.shape == (4, 64)
    deep = _field(n_hidden_layers=3, hidden_dim=8)
    assert set(deep.state_dict()) == {"encoding.params", "mlp.0.weight", "mlp.2.weight", "mlp.4.weight", "mlp.6.weight"}
    flat = _field(n_hidden_layers=0)
    assert flat.mlp[0].weight.shape == (4, 8)


def test_reads_its_settings_from_the_config():
    field = _field(bound=1.5, blob_density=7.0, blob_radius=0.6, density_activation="trunc_exp", normal_method="analytic")
    assert (field.bound, field.blob_density, field.blob_radius) == (1.5, 7.0, 0.6)
    assert (field.density_activation, field.normal_method) == ("trunc_exp", "analytic")
    assert field.normal_eps == pytest.approx(5e-3 * 1.5)
    assert field.encoding.tcnn_encoding_config()["n_levels"] == SMALL.n_levels


def test_hash_table_is_drawn_before_the_mlp():
    """Seeded runs depend on the order: the hash table's draw comes first."""
    field = _field()
    torch.manual_seed(0)
    encoding = HashGridEncoding.from_config(SMALL)
    assert torch.equal(field.encoding.params, encoding.params)


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="density_activation"):
        _field(density_activation="relu")
    with pytest.raises(ValueError, match="normal_method"):
        _field(normal_method="sobel")
    with pytest.raises(ValueError, match="heads"):
        _field(heads="three")


# --------------------------------------------------------------------------- heads


def test_separate_heads_are_two_mlps_drawn_density_first():
    field = _field(heads="separate")
    assert set(field.state_dict()) == {"encoding.params", "density_mlp.0.weight", "density_mlp.2.weight",
                                       "albedo_mlp.0.weight", "albedo_mlp.2.weight"}
    assert field.density_mlp[0].weight.shape == (16, 8) and field.density_mlp[2].weight.shape == (1, 16)
    assert field.albedo_mlp[0].weight.shape == (16, 8) and field.albedo_mlp[2].weight.shape == (3, 16)
    torch.manual_seed(0)
    HashGridEncoding.from_config(SMALL)
    first = torch.nn.Linear(8, 16, bias=False)  # the next draw after the hash table
    assert torch.equal(field.density_mlp[0].weight, first.weight)
    assert FieldConfig().heads == "shared"  # what a 0.1.0 config (no such key) gets: its checkpoints load


def test_separate_heads_with_a_shared_heads_weights_compute_the_shared_field():
    """Independent check of the wiring: a shared head [W1; W2] is two heads (W1, W2[:1]) and (W1, W2[1:])."""
    shared = _roughen(_field(heads="shared", blob_density=5.0, blob_radius=0.8), 0.3)
    separate = _field(heads="separate", blob_density=5.0, blob_radius=0.8)
    w1, w2 = shared.mlp[0].weight, shared.mlp[2].weight
    with torch.no_grad():
        separate.encoding.params.copy_(shared.encoding.params)
        separate.density_mlp[0].weight.copy_(w1)
        separate.density_mlp[2].weight.copy_(w2[:1])
        separate.albedo_mlp[0].weight.copy_(w1)
        separate.albedo_mlp[2].weight.copy_(w2[1:])
    x = _sphere_points(100, 0.6)
    sigma_a, albedo_a = shared(x)
    sigma_b, albedo_b = separate(x)
    torch.testing.assert_close(sigma_b, sigma_a)
    torch.testing.assert_close(albedo_b, albedo_a)


def test_density_alone_skips_the_albedo_head():
    field = _roughen(_field(heads="separate"), 0.1)
    with torch.no_grad():
        field.albedo_mlp[2].weight.fill_(float("nan"))
    x = _sphere_points(10, 0.4)
    assert torch.isfinite(field.density(x)).all()
    assert torch.isnan(field(x)[1]).all()
    trained = _roughen(_field(heads="separate"), 0.1)
    sigma, albedo = trained(x)
    (sigma.sum() + albedo.sum()).backward()
    assert all(p.grad.abs().sum() > 0 for p in trained.parameters())


def test_initial_separate_field_is_the_blob_with_grey_albedo():
    field = _field(heads="separate", bound=2.0)
    x = torch.tensor([[0.0, 0.0, 0.0], [0.25, 0.0, 0.0]])
    sigma, albedo = field(x)
    torch.testing.assert_close(sigma, F.softplus(torch.tensor([10.0, 5.0])), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(albedo, torch.full_like(albedo, 0.5), atol=1e-3, rtol=0)


# --------------------------------------------------------------------------- density


def test_blob_bias_hand_values():
    x = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.4, 0.0], [0.0, 0.0, 1.5]])
    assert torch.allclose(blob_bias_from_points(x, 10.0, 0.5), torch.tensor([10.0, 0.0, -20.0]))


@pytest.mark.parametrize("activation", ["softplus", "trunc_exp"])
def test_initial_density_is_the_blob(activation):
    field = _field(bound=2.0, blob_density=10.0, blob_radius=0.5, density_activation=activation)
    x = torch.tensor([[0.0, 0.0, 0.0], [0.25, 0.0, 0.0], [0.0, 1.5, 0.0], [1.9, 1.9, 1.9], [2.5, 0.0, 0.0]])
    sigma, albedo = field(x)
    act = F.softplus if activation == "softplus" else torch.exp
    expected = act(torch.tensor([10.0, 5.0, -20.0, 10 * (1 - math.sqrt(3 * 1.9**2) / 0.5)]))
    # the hash features start in U(-1e-4, 1e-4) and the MLP has no biases: raw ~ 0
    assert torch.allclose(sigma[:4], expected, rtol=1e-3, atol=1e-6)
    assert sigma[0] > 9.9 and sigma[2] < 1e-8
    assert sigma[4] == 0  # outside the box
    assert torch.allclose(albedo, torch.full_like(albedo, 0.5), atol=1e-3)
    assert torch.equal(field.density(x), sigma)


def test_zero_density_outside_the_box_even_when_the_field_is_dense():
    field = _roughen(_field(blob_density=50.0, blob_radius=10.0))  # positive bias everywhere
    x = torch.tensor([[0.99, 0.0, 0.0], [1.01, 0.0, 0.0], [0.0, -1.2, 0.0], [0.5, 0.5, 3.0]])
    sigma = field.density(x)
    assert sigma[0] > 1 and torch.equal(sigma[1:], torch.zeros(3))


def test_trunc_exp_values_and_clamped_gradient():
    x = torch.tensor([-3.0, 0.0, 5.0, 14.0, 20.0], dtype=torch.float64, requires_grad=True)
    y = trunc_exp(x)
    assert torch.allclose(y, torch.exp(x))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(g, torch.exp(x.detach().clamp(max=15.0)))
    small = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(trunc_exp, (small,))
    assert torch.autograd.gradgradcheck(trunc_exp, (small,))


def test_density_gradient_reaches_the_hash_table_and_mlp():
    field = _roughen(_field(), 0.1)
    x = _sphere_points(64, 0.4)
    sigma, albedo = field(x)
    (sigma.sum() + albedo.sum()).backward()
    assert field.encoding.params.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in field.mlp.parameters())


# --------------------------------------------------------------------------- normals


@pytest.mark.parametrize("method", ["finite_difference", "analytic"])
def test_normals_of_the_blob_point_outward(method):
    field = _field(bound=2.0, normal_method=method)
    x = _sphere_points(200, 0.3)
    n = field.normals(x)
    assert torch.allclose(n.norm(dim=-1), torch.ones(200), atol=1e-5)
    cos = (n * F.normalize(x, dim=-1)).sum(-1)
    assert cos.min() > 0.999


def test_analytic_and_finite_difference_normals_agree_on_a_smooth_field():
    # A field with order-1 hash features and a non-trivial MLP; points kept away from the cell
    # faces of every level (where trilinear interpolation has kinks) and from the box border.
    fd = _roughen(_field(normal_method="finite_difference", blob_density=5.0, blob_radius=0.8), 0.3)
    an = _field(normal_method="analytic", blob_density=5.0, blob_radius=0.8)
    an.load_state_dict(fd.state_dict())
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(4000, 3, generator=g) * 2 - 1) * 0.6
    u = (x + 1.0) / 2.0
    eps_u = 2 * fd.normal_eps / 2.0
    far_from_faces = torch.ones(len(x), dtype=torch.bool)
    for level in range(SMALL.n_levels):
        scale = 2.0**level * SMALL.base_resolution - 1
        frac = (scale * u + 0.5).frac()
        far_from_faces &= ((frac > scale * eps_u) & (frac < 1 - scale * eps_u)).all(-1)
    x = x[far_from_faces][:500]
    assert len(x) > 100
    n_fd, n_an = fd.normals(x), an.normals(x)
    cos = (n_fd * n_an).sum(-1)
    # the MLP's ReLU kinks can still sit between the FD points: allow a few outliers
    assert cos.median() > 0.9999
    assert (cos > 0.995).float().mean() > 0.95


def test_finite_difference_normals_hand_check_against_density():
    field = _roughen(_field(normal_method="finite_difference"), 0.2)
    x = _sphere_points(5, 0.3)
    e = field.normal_eps
    grad = torch.stack(
        [(field.density(x + e * v) - field.density(x - e * v)) / (2 * e) for v in torch.eye(3)], dim=-1
    )
    assert torch.allclose(field.normals(x), -F.normalize(grad, dim=-1), atol=1e-5)


@pytest.mark.parametrize("method", ["finite_difference", "analytic"])
def test_a_loss_on_normals_trains_the_field(method):
    field = _roughen(_field(normal_method=method), 0.1)
    x = _sphere_points(64, 0.5)
    n = field.normals(x)
    assert n.requires_grad
    (n[:, 0].sum()).backward()
    assert field.encoding.params.grad.abs().sum() > 0


def test_auto_normals_are_analytic_on_cuda_and_finite_differences_elsewhere():
    assert resolve_normal_method("auto", torch.device("cuda", 0)) == "analytic"
    assert resolve_normal_method("auto", torch.device("cpu")) == "finite_difference"
    assert resolve_normal_method("analytic", torch.device("cpu")) == "analytic"
    assert resolve_normal_method("finite_difference", torch.device("cuda")) == "finite_difference"
    auto = _roughen(_field(normal_method="auto"), 0.2)
    fd = _field(normal_method="finite_difference")
    fd.load_state_dict(auto.state_dict())
    x = _sphere_points(16, 0.3)
    assert torch.equal(auto.normals(x), fd.normals(x))
    assert FieldConfig().normal_method == "auto"


def test_analytic_normals_under_no_grad_are_detached():
    field = _field(normal_method="analytic")
    with torch.no_grad():
        n = field.normals(_sphere_points(8, 0.3))
    assert not n.requires_grad


# --------------------------------------------------------------------------- background


def test_frequency_encoding_hand_values():
    x = torch.tensor([[0.5, 0.0, -0.25]])
    out = frequency_encoding(x, 2)
    angles = torch.tensor([0.5 * math.pi, math.pi, 0.0, 0.0, -0.25 * math.pi, -0.5 * math.pi])
    assert torch.allclose(out, torch.cat([x[0], torch.sin(angles), torch.cos(angles)])[None], atol=1e-6)


def test_solid_background_is_its_colour_and_has_no_state():
    bg = Background(BackgroundConfig(kind="solid", color=(0.1, 0.2, 0.3), random_solid_prob=0.5))
    dirs = F.normalize(torch.randn(7, 3), dim=-1)
    assert torch.allclose(bg(dirs), torch.tensor([[0.1, 0.2, 0.3]] * 7))
    assert bg.state_dict() == {} and list(bg.parameters()) == []
    assert bg.random_solid_prob == 0.5


def test_mlp_background_depends_on_direction_and_learns():
    torch.manual_seed(0)
    bg = Background(BackgroundConfig(kind="mlp"))
    dirs = F.normalize(torch.randn(64, 3), dim=-1)
    rgb = bg(dirs)
    assert rgb.shape == (64, 3) and ((rgb > 0) & (rgb < 1)).all()
    assert rgb.std(0).min() > 1e-3  # not a constant
    assert set(bg.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
    # it can learn a direction-dependent colour (a sky gradient)
    target = 0.1 + 0.8 * (dirs + 1) / 2
    opt = torch.optim.Adam(bg.parameters(), lr=0.02)
    first = ((bg(dirs) - target) ** 2).mean().item()
    for _ in range(300):
        opt.zero_grad()
        ((bg(dirs) - target) ** 2).mean().backward()
        opt.step()
    last = ((bg(dirs) - target) ** 2).mean().item()
    assert last < 2e-3 < first


def test_background_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        Background(BackgroundConfig(kind="hdri"))


# --------------------------------------------------------------------------- with the renderer


def test_initial_field_renders_a_centred_blob():
    from nfsd_nerf.cameras import orbit_cameras
    from nfsd_nerf.render import OccupancyGrid, render_image, step_size_from_samples

    field = _field(bound=1.0, blob_density=10.0, blob_radius=0.5)
    bg = Background(BackgroundConfig(kind="solid", color=(1.0, 1.0, 1.0)))
    grid = OccupancyGrid(1.0, 16)
    grid.update(0, field.density, step_size=step_size_from_samples(1.0, 64), generator=torch.Generator().manual_seed(0))
    assert grid.occupied_fraction() < 0.2  # only the blob's cells survive
    with torch.no_grad():
        img = render_image(field, bg, orbit_cameras(2), 16, 16, occupancy=grid, n_samples=64, shading="lambertian",
                           need_normals=True)
    assert img["opacity"][:, 7:9, 7:9].min() > 0.95
    assert img["opacity"][:, 0, 0].max() < 1e-3
    assert torch.allclose(img["rgb"][:, 0, 0], torch.ones(2, 3))
    # Lambertian: the blob is brighter lit from the camera than from behind it
    cams = orbit_cameras(2)
    with torch.no_grad():
        behind = render_image(field, bg, cams, 16, 16, occupancy=grid, n_samples=64, shading="lambertian",
                              light_positions=-cams.light_positions)
    centre = (slice(None), slice(7, 9), slice(7, 9))
    assert (img["rgb"][centre] > behind["rgb"][centre] + 0.1).all()
    # the weighted normal at the centre faces the camera
    from nfsd_nerf.cameras import generate_rays

    _, d = generate_rays(cams, 16, 16)
    facing = -(F.normalize(img["normal"], dim=-1) * d).sum(-1)
    assert facing[centre].min() > 0.5
