"""The PyTorch hash-grid kernels against a slow per-point NumPy re-statement of tcnn's HashGrid.

The reference below is written from tcnn's ``grid.h`` / ``common_device.h`` (``pos_fract``,
``grid_index``, ``coherent_prime_hash``), one point, level and corner at a time, in uint32
arithmetic. It takes the per-level scales and table sizes from the layout, which
``test_encoding_layout.py`` checks against tcnn separately.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nfsd_nerf.encoding import HashGridEncoding

U32 = np.uint32


def _grid(n_levels: int, n_features: int, log2_size: int, base: int, pls: float) -> HashGridEncoding:
    return HashGridEncoding(n_levels=n_levels, n_features_per_level=n_features, log2_hashmap_size=log2_size,
                            base_resolution=base, per_level_scale=pls, backend="torch")


# ------------------------------------------------------------------ reference (tcnn, restated)


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


def ref_encode(x, params, scales, table_sizes, n_features):
    """x [N, 3] float32 in [0, 1], params flat float, per-level float32 scales and table sizes
    -> [N, n_levels * n_features] float64."""
    out = np.zeros((len(x), len(scales) * n_features))
    offset = 0
    for level, (scale, size) in enumerate(zip(scales, table_sizes)):
        scale = np.float32(scale)
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
                index = ref_grid_index(local, size, resolution)
                for f in range(n_features):
                    out[i, level * n_features + f] += float(weight) * float(params[(offset + index) * n_features + f])
        offset += size
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


def _reference(enc: HashGridEncoding, x: np.ndarray) -> np.ndarray:
    layout = enc.layout
    return ref_encode(x, enc.params.detach().numpy(), layout.scales, layout.table_sizes, layout.n_features_per_level)


CONFIGS = [
    # n_levels, F, log2_hashmap_size, base_resolution, per_level_scale
    pytest.param(4, 2, 10, 4, 2.0, id="pls2-mixed"),
    pytest.param(5, 2, 12, 16, 1.447269, id="pls1.447-base16"),
    pytest.param(4, 2, 12, 13, 1.37, id="base13"),
    pytest.param(3, 1, 8, 5, 2.0, id="F1-small-tables"),
    pytest.param(3, 4, 9, 3, 3.0, id="F4"),
]


# ------------------------------------------------------------------ values


@pytest.mark.parametrize("n_levels, n_features, log2_size, base, pls", CONFIGS)
def test_matches_tcnn_reference(n_levels, n_features, log2_size, base, pls):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    enc = _grid(n_levels, n_features, log2_size, base, pls)
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
    assert got.shape == (len(x), n_levels * n_features)
    np.testing.assert_allclose(got, _reference(enc, x), rtol=0, atol=2e-6)


def test_hash_uses_uint32_wraparound():
    """Fine hashed levels: y * 2654435761 overflows uint32 for almost every cell."""
    enc = _grid(2, 2, 6, 600, 2.0)  # res 600 and 1200, 64-entry tables
    assert enc.layout.dense == (False, False)
    with torch.no_grad():
        enc.params.copy_(torch.linspace(-1, 1, enc.params.numel()))
    x = np.random.default_rng(1).random((40, 3), dtype=np.float32)
    got = enc(torch.from_numpy(x)).detach().double().numpy()
    np.testing.assert_allclose(got, _reference(enc, x), rtol=0, atol=2e-6)


def test_parameter_layout_address():
    """Setting the single parameter (level_offset + index) * F + f moves exactly column level*F+f."""
    enc = _grid(3, 2, 8, 4, 2.0)
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


def test_large_batch_matches_small_batches():
    """The level-parallel path (large N) equals the serial one (small N), values and gradient."""
    torch.manual_seed(0)
    enc = _grid(8, 2, 14, 8, 1.6)
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
    enc = _grid(3, n_features, 6, 3, 2.0).double()  # dense 3^3, hashed 5^3 and 11^3
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
    enc = _grid(4, 2, 10, 4, 2.0)
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
    enc = _grid(4, 2, 10, 4, 2.0)
    with torch.no_grad():
        enc.params.uniform_(-1, 1)
    x = torch.rand(30, 3, requires_grad=True)
    (gx,) = torch.autograd.grad(enc(x).square().sum(), x)
    assert enc.params.grad is None
    enc(x).square().sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=0, atol=0)


def test_no_input_gradient_unless_asked():
    enc = _grid(3, 2, 8, 4, 2.0)
    x = torch.rand(5, 3)
    enc(x).sum().backward()
    assert x.grad is None and enc.params.grad is not None


def _table_gradient_with_spy(monkeypatch):
    """Run one backward through the grid and return the index dtypes handed to ``scatter_add_``."""
    seen = []
    original = torch.Tensor.scatter_add_

    def spy(self, dim, index, src):
        seen.append(index.dtype)
        return original(self, dim, index, src)

    enc = HashGridEncoding(n_levels=2, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4,
                           per_level_scale=2.0, backend="torch")
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "scatter_add_", spy)
        enc(torch.rand(64, 3, generator=torch.Generator().manual_seed(0))).sum().backward()
    return seen, enc.params.grad


def test_scatter_index_dtype_follows_what_this_torch_accepts(monkeypatch):
    """torch >= 2.8 takes int32 scatter indices; 2.4-2.7 (admitted by pyproject) only int64."""
    from nfsd_nerf.encoding import torch_backend

    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    assert torch_backend.SCATTER_INDEX_DTYPE == (torch.int32 if (major, minor) >= (2, 8) else torch.int64)
    seen, grad_int32 = _table_gradient_with_spy(monkeypatch)
    assert seen and set(seen) == {torch_backend.SCATTER_INDEX_DTYPE}

    monkeypatch.setattr(torch_backend, "SCATTER_INDEX_DTYPE", torch.int64)  # what torch 2.4-2.7 gets
    seen, grad_int64 = _table_gradient_with_spy(monkeypatch)
    assert set(seen) == {torch.int64}
    assert torch.equal(grad_int32, grad_int64)
