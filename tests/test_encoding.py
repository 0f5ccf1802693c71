"""HashGridEncoding against a slow per-point NumPy re-statement of tiny-cuda-nn's HashGrid.

The reference below is written from tcnn's ``grid.h`` / ``common_device.h`` (``grid_scale``,
``grid_resolution``, ``pos_fract``, ``grid_index``, ``coherent_prime_hash``, the offset table
of ``GridEncodingTemplated``), one point, level and corner at a time, in uint32 arithmetic.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from nfsd_nerf import encoding as encoding_module
from nfsd_nerf.encoding import HashGridEncoding, hash_grid_layout, level_scales
from nfsd_nerf.errors import UserError

U32 = np.uint32


# ------------------------------------------------------------------ reference (tcnn, restated)


def ref_scale(level: int, base_resolution: int, per_level_scale: float) -> np.float32:
    """grid_scale: exp2f(level * log2f(per_level_scale)) * base_resolution - 1.0f (float32)."""
    f32 = np.float32
    log2_scale = f32(math.log2(float(f32(per_level_scale))))  # std::log2(float)
    power = f32(2.0 ** float(f32(level) * log2_scale))  # exp2f
    return f32(power * f32(base_resolution)) - f32(1.0)


def ref_table_sizes(n_levels, log2_hashmap_size, base_resolution, per_level_scale):
    sizes = []
    for level in range(n_levels):
        res = int(np.ceil(ref_scale(level, base_resolution, per_level_scale))) + 1
        params_in_level = res**3
        params_in_level = (params_in_level + 7) // 8 * 8  # next_multiple(., 8)
        sizes.append(min(params_in_level, 1 << log2_hashmap_size))
    return sizes


def ref_grid_index(pos_grid, hashmap_size: int, resolution: int) -> int:
    """tcnn grid_index<3, CoherentPrime> with uint32 arithmetic."""
    with np.errstate(over="ignore"):
        stride, index = U32(1), U32(0)
        if resolution <= 0x659:
            for d in range(3):
                index = U32(index + pos_grid[d] * stride)
                stride = U32(stride * U32(resolution))
        else:
            stride = U32(0xFFFFFFFF)
        if hashmap_size < stride:
            primes = (U32(1), U32(2654435761), U32(805459861))
            index = U32(0)
            for d in range(3):
                index ^= U32(pos_grid[d] * primes[d])
        return int(index % U32(hashmap_size))


def ref_encode(x, params, n_levels, n_features, log2_hashmap_size, base_resolution, per_level_scale):
    """x [N, 3] float32 in [0, 1], params flat float -> [N, n_levels * n_features] float64."""
    sizes = ref_table_sizes(n_levels, log2_hashmap_size, base_resolution, per_level_scale)
    out = np.zeros((len(x), n_levels * n_features))
    offset = 0
    for level in range(n_levels):
        scale = ref_scale(level, base_resolution, per_level_scale)
        resolution = int(np.ceil(scale)) + 1
        for i, point in enumerate(x):
            pos, pos_grid = [], []
            for d in range(3):
                p = np.float32(float(scale) * float(point[d]) + 0.5)  # fmaf(scale, x, 0.5f)
                tmp = np.floor(p)
                pos_grid.append(U32(int(tmp)))
                pos.append(np.float32(p - tmp))
            for corner in range(8):
                weight = np.float32(1.0)
                local = []
                for d in range(3):
                    if corner & (1 << d):
                        weight = np.float32(weight * pos[d])
                        local.append(U32(pos_grid[d] + U32(1)))
                    else:
                        weight = np.float32(weight * (np.float32(1.0) - pos[d]))
                        local.append(pos_grid[d])
                index = ref_grid_index(local, sizes[level], resolution)
                for f in range(n_features):
                    out[i, level * n_features + f] += float(weight) * float(params[(offset + index) * n_features + f])
        offset += sizes[level]
    return out


def boundary_points(scales, rng, n_per_level=3):
    """Points whose float32 grid position is exactly an integer at some level (cell faces)."""
    points = []
    for scale in scales:
        for _ in range(n_per_level):
            c = rng.integers(1, max(2, int(scale)))
            coords = []
            for _d in range(3):
                v = np.float32((c - 0.5) / float(scale))
                for _try in range(64):  # walk float32 neighbours until fmaf lands on an integer
                    p = np.float32(float(scale) * float(v) + 0.5)
                    if p == np.floor(p):
                        break
                    v = np.nextafter(v, np.float32(2.0) if p < c else np.float32(-1.0), dtype=np.float32)
                coords.append(v if 0.0 <= v <= 1.0 else np.float32(0.5))
            points.append(coords)
    return np.array(points, dtype=np.float32)


def cube_points():
    """Corners, edge midpoints and face centres of the unit cube."""
    vals = np.array([0.0, 0.5, 1.0], dtype=np.float32)
    return np.stack(np.meshgrid(vals, vals, vals, indexing="ij"), -1).reshape(-1, 3)


CONFIGS = [
    # n_levels, F, log2_hashmap_size, base_resolution, per_level_scale
    pytest.param(4, 2, 10, 4, 2.0, id="pls2-mixed"),
    pytest.param(5, 2, 12, 16, 1.447269, id="pls1.447-base16"),
    pytest.param(4, 2, 12, 13, 1.37, id="base13"),
    pytest.param(3, 1, 8, 5, 2.0, id="F1-small-tables"),
    pytest.param(3, 4, 9, 3, 3.0, id="F4"),
]


@pytest.mark.parametrize("n_levels, n_features, log2_size, base, pls", CONFIGS)
def test_matches_tcnn_reference(n_levels, n_features, log2_size, base, pls):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    enc = HashGridEncoding(n_levels, n_features, log2_size, base, pls, backend="torch")
    layout = enc.layout
    assert any(layout.dense) and not all(layout.dense), "config must exercise dense and hashed levels"
    with torch.no_grad():
        enc.params.uniform_(-1.0, 1.0)
    x = np.concatenate(
        [
            rng.random((24, 3), dtype=np.float32),
            cube_points(),
            boundary_points(layout.scales, rng),
        ]
    )
    # exactness of the boundary points: at least some positions are integers at some level
    pos = np.float32(np.asarray(layout.scales)[:, None, None] * x[None].astype(np.float64) + 0.5)
    assert (pos == np.floor(pos)).any()

    got = enc(torch.from_numpy(x)).detach().double().numpy()
    want = ref_encode(x, enc.params.detach().numpy(), n_levels, n_features, log2_size, base, pls)
    assert got.shape == (len(x), n_levels * n_features)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_hash_uses_uint32_wraparound():
    """Fine hashed levels: y * 2654435761 overflows uint32 for almost every cell."""
    enc = HashGridEncoding(2, 2, 6, 600, 2.0, backend="torch")  # res 600 and 1200, 64-entry tables
    assert enc.layout.dense == (False, False)
    with torch.no_grad():
        enc.params.copy_(torch.linspace(-1, 1, enc.params.numel()))
    x = np.random.default_rng(1).random((40, 3), dtype=np.float32)
    got = enc(torch.from_numpy(x)).detach().double().numpy()
    want = ref_encode(x, enc.params.detach().numpy(), 2, 2, 6, 600, 2.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_layout_default_config():
    """16 levels x 2 features, 2^19 tables, base 16, scale 1.447269 (threestudio / Instant-NGP)."""
    layout = hash_grid_layout(16, 2, 19, 16, 1.447269)
    assert layout.resolutions == (16, 24, 34, 49, 71, 102, 148, 213, 308, 446, 646, 934, 1352, 1956, 2831, 4096)
    dense_sizes = [16**3, 24**3, 34**3, 117656, 357912]  # 49^3 = 117649 and 71^3 = 357911 rounded up to 8
    assert layout.table_sizes == tuple(dense_sizes + [2**19] * 11)
    assert layout.dense == (True,) * 5 + (False,) * 11
    assert layout.offsets[1:6] == tuple(np.cumsum(dense_sizes))
    assert layout.n_params == 2 * (sum(dense_sizes) + 11 * 2**19) == 12_599_920
    enc = HashGridEncoding(backend="torch")
    assert enc.params.shape == (12_599_920,) and enc.params.dtype == torch.float32
    assert enc.n_output_dims == 32 and enc.backend == "torch"


def test_level_scales_are_float32_formula():
    assert level_scales(4, 16, 2.0) == [15.0, 31.0, 63.0, 127.0]
    scales = level_scales(16, 16, 1.447269)
    for level, s in enumerate(scales):
        assert s == float(ref_scale(level, 16, 1.447269))
        assert abs(s - (16 * 1.447269**level - 1)) < 1e-3 * s
    assert ref_table_sizes(16, 19, 16, 1.447269) == list(hash_grid_layout(16, 2, 19, 16, 1.447269).table_sizes)


def test_parameter_layout_address():
    """Setting the single parameter (level_offset + index) * F + f moves exactly column level*F+f."""
    enc = HashGridEncoding(3, 2, 8, 4, 2.0, backend="torch")
    layout = enc.layout
    level, f = 2, 1
    x = torch.tensor([[0.3, 0.6, 0.2]])
    scale = layout.scales[level]
    pos = [np.float32(scale * float(np.float32(v)) + 0.5) for v in x[0]]
    cell = [U32(int(np.floor(p))) for p in pos]
    index = ref_grid_index(cell, layout.table_sizes[level], layout.resolutions[level])  # corner 0
    with torch.no_grad():
        enc.params.zero_()
        enc.params[(layout.offsets[level] + index) * 2 + f] = 1.0
    out = enc(x)[0]
    w0 = np.prod([1 - (p - np.floor(p)) for p in pos])
    expected = torch.zeros(6, dtype=torch.float64)
    expected[level * 2 + f] = float(w0)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)


def test_init_and_state_dict():
    torch.manual_seed(0)
    enc = HashGridEncoding(4, 2, 10, 4, 2.0, backend="torch")
    assert list(enc.state_dict().keys()) == ["params"]
    p = enc.params.detach()
    assert p.abs().max() <= 1e-4 and p.abs().max() > 0.9e-4 and abs(p.mean()) < 1e-5
    other = HashGridEncoding(4, 2, 10, 4, 2.0, backend="torch")
    other.load_state_dict(enc.state_dict())
    x = torch.rand(10, 3)
    torch.testing.assert_close(other(x), enc(x), rtol=0, atol=0)


def test_out_of_range_inputs_are_clamped():
    enc = HashGridEncoding(3, 2, 8, 4, 2.0, backend="torch")
    with torch.no_grad():
        enc.params.uniform_(-1, 1)
    x = torch.tensor([[-0.5, 1.7, 0.3], [float("nan"), 0.2, 2.0]])
    clamped = torch.tensor([[0.0, 1.0, 0.3], [0.0, 0.2, 1.0]])
    torch.testing.assert_close(enc(x), enc(clamped), rtol=0, atol=0)


def test_active_levels_zero_finer_columns():
    enc = HashGridEncoding(4, 2, 10, 4, 2.0, backend="torch")
    with torch.no_grad():
        enc.params.uniform_(-1, 1)
    x = torch.rand(50, 3)
    full = enc(x)
    enc.active_levels = 2
    part = enc(x)
    torch.testing.assert_close(part[:, :4], full[:, :4], rtol=0, atol=0)
    assert (part[:, 4:] == 0).all()
    part.sum().backward()
    layout = enc.layout
    assert (enc.params.grad[layout.offsets[2] * 2 :] == 0).all()
    assert (enc.params.grad[: layout.offsets[2] * 2] != 0).any()


def test_large_batch_matches_small_batches():
    """The level-parallel path (large N) equals the serial one (small N), values and gradient."""
    torch.manual_seed(0)
    enc = HashGridEncoding(8, 2, 14, 8, 1.6, backend="torch")
    with torch.no_grad():
        enc.params.uniform_(-1, 1)
    x = torch.rand(20_000, 3)  # 20k points x 8 levels x 8 corners: above the parallel threshold
    g = torch.randn(20_000, 16)
    (enc(x) * g).sum().backward()
    grad_big = enc.params.grad.clone()
    out_big = enc(x).detach()
    enc.params.grad = None
    outs = []
    for chunk in range(0, 20_000, 4000):
        out = enc(x[chunk : chunk + 4000])  # 4k x 8 levels x 8 corners: serial path
        (out * g[chunk : chunk + 4000]).sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(torch.cat(outs), out_big, rtol=0, atol=0)
    torch.testing.assert_close(enc.params.grad, grad_big, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ gradients (float64)


def _tiny_grid(n_features=2):
    torch.manual_seed(0)
    enc = HashGridEncoding(3, n_features, 6, 3, 2.0, backend="torch").double()  # dense 3^3, hashed 5^3 and 11^3
    with torch.no_grad():
        enc.params.uniform_(-1, 1)
    return enc


def _interior_points(enc, n, seed):
    """Random points at least 1e-3 (in cell units) away from every cell face."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(4 * n, 3, generator=gen, dtype=torch.float64)
    scales = torch.tensor(enc.layout.scales, dtype=torch.float64)
    frac = torch.frac(x[None] * scales[:, None, None] + 0.5)
    ok = ((frac > 1e-3) & (frac < 1 - 1e-3)).all(-1).all(0)
    return x[ok][:n]


@pytest.mark.parametrize("n_features", [1, 2, 4])
def test_gradcheck_params(n_features):
    enc = _tiny_grid(n_features)
    x = torch.rand(12, 3, dtype=torch.float64)
    x[0] = 1.0  # wrapped dense corner
    params = enc.params.detach().clone().requires_grad_(True)

    def f(p):
        return torch.func.functional_call(enc, {"params": p}, (x,))

    assert torch.autograd.gradcheck(f, (params,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("n_features", [1, 2, 4])
def test_gradcheck_positions(n_features):
    enc = _tiny_grid(n_features)
    x = _interior_points(enc, 10, seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(enc, (x,), eps=1e-7, atol=1e-6)


def test_gradgradcheck_for_analytic_normals():
    """d/dparams and d/dx of dL/dx (normals inside a loss, create_graph=True)."""
    enc = _tiny_grid()
    x = _interior_points(enc, 6, seed=2).requires_grad_(True)
    params = enc.params.detach().clone().requires_grad_(True)

    def f(p, xx):
        return torch.func.functional_call(enc, {"params": p}, (xx,))

    assert torch.autograd.gradgradcheck(f, (params, x), eps=1e-7, atol=1e-5)


def test_input_gradient_float32_matches_finite_difference_of_float64():
    enc = HashGridEncoding(4, 2, 10, 4, 2.0, backend="torch")
    with torch.no_grad():
        enc.params.uniform_(-1, 1)
    x = _interior_points(enc.double(), 20, seed=3).float().requires_grad_(True)
    enc.float()
    enc(x).sum().backward()
    enc64 = enc.double()
    x64 = x.detach().double().requires_grad_(True)
    enc64(x64).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-3)


def test_autograd_grad_wrt_x_alone():
    """``autograd.grad(y, x)`` (normals) skips the table gradient and gives the same dL/dx."""
    enc = HashGridEncoding(4, 2, 10, 4, 2.0, backend="torch")
    with torch.no_grad():
        enc.params.uniform_(-1, 1)
    x = torch.rand(30, 3, requires_grad=True)
    (gx,) = torch.autograd.grad(enc(x).square().sum(), x)
    assert enc.params.grad is None
    enc(x).square().sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=0, atol=0)


def test_no_input_gradient_unless_asked():
    enc = HashGridEncoding(3, 2, 8, 4, 2.0, backend="torch")
    x = torch.rand(5, 3)
    enc(x).sum().backward()
    assert x.grad is None and enc.params.grad is not None


# ------------------------------------------------------------------ backends and validation


def test_bad_hyperparameters_raise_user_error():
    with pytest.raises(UserError, match="n_features_per_level"):
        HashGridEncoding(n_features_per_level=3)
    with pytest.raises(UserError, match="'cuda'"):
        HashGridEncoding(backend="cuda")
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        HashGridEncoding(2, 2, 8, 4, 2.0, backend="torch")(torch.rand(4, 2))


def test_forced_tcnn_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(encoding_module, "tcnn_available", lambda: False)
    monkeypatch.setattr(encoding_module, "_warned_tcnn_fallback", False)
    with pytest.warns(UserWarning, match="tcnn"):
        enc = HashGridEncoding(2, 2, 8, 4, 2.0, backend="tcnn")
    assert enc.backend == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert HashGridEncoding(2, 2, 8, 4, 2.0, backend="tcnn").backend == "torch"
        assert HashGridEncoding(2, 2, 8, 4, 2.0, backend="auto").backend == "torch"


def test_tcnn_config():
    enc = HashGridEncoding(12, 4, 17, 8, 1.5, backend="torch")
    assert enc.tcnn_encoding_config() == {
        "otype": "HashGrid",
        "n_levels": 12,
        "n_features_per_level": 4,
        "log2_hashmap_size": 17,
        "base_resolution": 8,
        "per_level_scale": 1.5,
    }


def _has_tcnn():
    try:
        return encoding_module.tcnn_available()
    except Exception:
        return False


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not _has_tcnn(), reason="needs CUDA and tinycudann")
def test_tcnn_and_torch_backends_agree():
    torch.manual_seed(0)
    tcnn_enc = HashGridEncoding(backend="tcnn").cuda()
    assert tcnn_enc.backend == "tcnn"
    torch_enc = HashGridEncoding(backend="torch").cuda()
    with torch.no_grad():
        tcnn_enc.params.uniform_(-1, 1)
    torch_enc.load_state_dict(tcnn_enc.state_dict())  # checkpoints are interchangeable
    assert list(tcnn_enc.state_dict()) == ["params"]
    x = torch.rand(4096, 3, device="cuda")
    x[:8] = torch.tensor([0.0, 1.0], device="cuda").repeat(12)[:24].view(8, 3)
    x_tcnn = x.clone().requires_grad_(True)
    x_torch = x.clone().requires_grad_(True)
    out_tcnn = tcnn_enc(x_tcnn)
    out_torch = torch_enc(x_torch)
    assert out_tcnn.dtype == torch.float32
    torch.testing.assert_close(out_torch, out_tcnn, rtol=0, atol=1e-4)
    g = torch.randn_like(out_tcnn)
    (out_tcnn * g).sum().backward()
    (out_torch * g).sum().backward()
    torch.testing.assert_close(torch_enc.params.grad, tcnn_enc.params.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(x_torch.grad, x_tcnn.grad, rtol=1e-3, atol=1e-2)
    # the CPU path of the tcnn-backed module is the same function too
    torch.testing.assert_close(tcnn_enc.cpu()(x.cpu()), out_tcnn.detach().cpu(), rtol=0, atol=1e-4)
