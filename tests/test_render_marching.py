"""Ray marching: box slab test by hand, the CPU marcher against a per-point lattice test, CUDA vs CPU."""

from __future__ import annotations

import math
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from nfsd_nerf.render import marching
from nfsd_nerf.render.marching import march_rays_cpu, near_far_from_box, step_size_from_samples
from nfsd_nerf.render.occupancy import OccupancyGrid, cells_from_points
from nfsd_nerf.render.rays import render_rays

from render_helpers import BallField, SolidBackground, cells_touching_ball, random_rays, rays_along_x


# --------------------------------------------------------------------------- geometry


def test_near_far_from_box_hand_values():
    o = torch.tensor([[-3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-3.0, 5.0, 0.0], [-3.0, -3.0, 0.0]])
    d = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]), dim=-1)
    near, far = near_far_from_box(o, d, 1.0)
    assert torch.allclose(near[:2], torch.tensor([2.0, 0.0]))
    assert torch.allclose(far[:2], torch.tensor([4.0, 1.0]))
    assert far[2] <= near[2]  # misses
    assert torch.allclose(near[3], torch.tensor(2 * math.sqrt(2))) and torch.allclose(far[3], torch.tensor(4 * math.sqrt(2)))


# --------------------------------------------------------------------------- CPU marcher


def test_march_lattice_positions_and_bounds():
    o, d = rays_along_x([0.0, 0.5, 2.0])
    step = 0.25
    ri, ts, te = march_rays_cpu(o, d, bound=1.0, step=step, offsets=torch.zeros(3), occupancy=None)
    mid = 0.5 * (ts + te)
    # box [2, 4] along the ray, lattice midpoints at (k + 0.5) * 0.25 -> 2.125 ... 3.875
    expected = torch.arange(2.125, 3.9, 0.25)
    assert ri.tolist() == [0] * 8 + [1] * 8  # third ray misses
    assert torch.allclose(mid[:8], expected) and torch.allclose(mid[8:], expected)
    assert torch.allclose(te - ts, torch.full_like(ts, step))


def _lattice_reference(o, d, bound, step, offsets, grid):
    """Brute force: every lattice midpoint up to far beyond the box, tested one by one."""
    k = torch.arange(int(4 * bound * 3**0.5 / step) + 8, dtype=torch.float64)
    t = offsets.double()[:, None] + (k[None] + 0.5) * step  # [N, K]
    x = o.double()[:, None] + t[..., None] * d.double()[:, None]
    keep = (x.abs() <= bound).all(-1)
    if grid is not None:
        keep &= grid.binaries.view(-1)[cells_from_points(x, bound, grid.resolution)]
    row, col = torch.nonzero(keep, as_tuple=True)
    return row, t[row, col]


@pytest.mark.parametrize("with_grid", [True, False])
def test_cell_traversal_marcher_matches_per_point_lattice_test(with_grid):
    g = torch.Generator().manual_seed(5)
    o, d = random_rays(300, g)
    o[:50] *= 0.3  # rays starting inside the box
    d[50:60] = torch.tensor([0.0, 0.0, -1.0])  # axis-aligned rays
    o[50:60, 2] = 2.0
    d[60:70] = F.normalize(torch.tensor([1.0, 1.0, 0.0]), dim=0)
    o[60:70] = torch.tensor([-1.5, -1.4, 0.1])
    grid = None
    if with_grid:
        grid = OccupancyGrid(1.0, 12)
        grid.binaries.copy_(torch.rand(12, 12, 12, generator=g) < 0.3)
    step = step_size_from_samples(1.0, 200)
    offsets = torch.rand(300, generator=g) * step
    ri, ts, te = march_rays_cpu(o, d, bound=1.0, step=step, offsets=offsets, occupancy=grid)
    ref_ri, ref_t = _lattice_reference(o, d, 1.0, step, offsets, grid)
    assert len(ref_ri) > 5000
    assert torch.equal(ri, ref_ri)
    assert torch.allclose(0.5 * (ts + te).double(), ref_t, atol=1e-5)
    assert bool((torch.diff(ri) >= 0).all())


# --------------------------------------------------------------------------- CUDA (nerfacc)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nerfacc kernels)")
def test_cuda_marcher_matches_cpu():
    field = BallField(sigma=6.0, radius=0.7, smooth=True)
    grid = OccupancyGrid(bound=1.0, resolution=16)
    grid.binaries.copy_(cells_touching_ball(grid, 0.7))
    o, d = random_rays(300, torch.Generator().manual_seed(0))
    cpu = render_rays(field, SolidBackground(), o, d, occupancy=grid, n_samples=512)
    field.albedo = field.albedo.cuda()
    bg = SolidBackground()
    bg.color = bg.color.cuda()
    gpu = render_rays(field, bg, o.cuda(), d.cuda(), occupancy=grid.cuda(), n_samples=512)
    assert torch.allclose(gpu.opacity.cpu(), cpu.opacity, atol=2e-3)
    assert torch.allclose(gpu.rgb.cpu(), cpu.rgb, atol=2e-3)


# --------------------------------------------------------------------------- nerfacc's kernels, before training


@pytest.fixture
def kernel_state(monkeypatch):
    """A process that has not tried to load nerfacc's kernels yet (restored afterwards)."""
    marching._load_nerfacc_kernels.cache_clear()
    monkeypatch.setattr(marching, "_kernels_explained", False)
    yield
    marching._load_nerfacc_kernels.cache_clear()


def _recording_console():
    from rich.console import Console

    return Console(record=True, width=1000, force_terminal=False)


def test_kernel_preparation_is_a_no_op_off_cuda(kernel_state, monkeypatch):
    def must_not_import():
        raise AssertionError("nerfacc's kernels were touched on the CPU")

    monkeypatch.setattr(marching, "_import_nerfacc_backend", must_not_import)
    console = _recording_console()
    assert marching.prepare_nerfacc_kernels(console, torch.device("cpu")) is False
    assert console.export_text() == ""
    assert marching._load_nerfacc_kernels.cache_info().currsize == 0  # not even tried
    if not torch.cuda.is_available():
        assert "nerfacc.cuda._backend" not in sys.modules


def test_kernels_that_cannot_build_print_one_line_with_reason_cost_and_fix(kernel_state, monkeypatch):
    def no_cuda_home():
        raise OSError("CUDA_HOME environment variable is not set. Please set it to your CUDA install root.\nmore")

    monkeypatch.setattr(marching.shutil, "which", lambda name: f"/usr/local/cuda/bin/{name}")
    monkeypatch.setattr(marching, "_import_nerfacc_backend", no_cuda_home)
    console = _recording_console()
    assert marching.prepare_nerfacc_kernels(console, torch.device("cuda")) is False
    text = console.export_text().strip()
    assert "\n" not in text
    assert "unavailable (OSError: CUDA_HOME environment variable is not set" in text
    assert "PyTorch ray marcher" in text and "not measured" in text  # the cost, and that it is unmeasured
    assert "pip install ninja" in text and "set CUDA_HOME" in text  # the fix
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user was told once already: no second warning at the first render
        assert marching.nerfacc_kernels_available() is False


def test_missing_nvcc_is_reported_without_importing_nerfaccs_backend(kernel_state, monkeypatch):
    monkeypatch.setattr(marching.shutil, "which", lambda name: None)
    monkeypatch.setattr(marching, "_nerfacc_prebuilt", lambda: False)
    monkeypatch.setattr(marching, "_import_nerfacc_backend", lambda: pytest.fail("nerfacc would print its own line"))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    console = _recording_console()
    assert marching.prepare_nerfacc_kernels(console, torch.device("cuda")) is False
    assert "(nvcc is not on PATH and CUDA_HOME is unset)" in console.export_text()


def test_kernels_that_load_print_ready_and_a_render_without_preparation_warns_once(kernel_state, monkeypatch):
    loaded = types.SimpleNamespace(_C=object())
    monkeypatch.setattr(marching.shutil, "which", lambda name: f"/usr/local/cuda/bin/{name}")
    monkeypatch.setattr(marching, "_import_nerfacc_backend", lambda: loaded)
    console = _recording_console()
    assert marching.prepare_nerfacc_kernels(console, torch.device("cuda")) is True
    assert "nerfacc's CUDA kernels: ready" in console.export_text()

    marching._load_nerfacc_kernels.cache_clear()
    monkeypatch.setattr(marching, "_kernels_explained", False)
    monkeypatch.setattr(marching, "_import_nerfacc_backend", lambda: types.SimpleNamespace(_C=None))
    with pytest.warns(UserWarning, match="did not build"):
        assert marching.nerfacc_kernels_available() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert marching.nerfacc_kernels_available() is False


# --------------------------------------------------------------------------- alpha threshold (nerfacc's alpha_thre)


def test_alpha_threshold_is_capped_at_the_mean_occupancy():
    """nerfacc: min(alpha_thre, occs.mean()); no grid (nerfacc's transient one is empty) or 0: no threshold."""
    from nfsd_nerf.render.marching import sampling_alpha_threshold

    occs = torch.zeros(2, 2, 2)
    occs[0, 0, 0] = 0.04  # mean 0.005
    assert sampling_alpha_threshold(0.01, occs) == pytest.approx(0.005)
    assert sampling_alpha_threshold(0.01, torch.full((2, 2, 2), 0.5)) == 0.01
    assert sampling_alpha_threshold(0.01, None) == 0.0
    assert sampling_alpha_threshold(0.0, occs) == 0.0
    assert sampling_alpha_threshold(0.01, torch.zeros(2, 2, 2)) == 0.0


def test_cpu_filter_drops_low_alpha_and_occluded_samples_like_nerfacc():
    """Hand-built: unit steps, alpha = 1 - exp(-sigma). Ray 0: sigma 0.005 (alpha 0.00499 < 0.01: dropped),
    10 (T = exp(-0.005) kept), 1 (T = exp(-10.005) = 4.5e-5 < 1e-4: behind the early stop; the dropped
    first sample still counts in T, as in nerfacc's pre-pass). Ray 1: sigma 0.02 (alpha 0.0198: kept), 0 (dropped)."""
    from nfsd_nerf.render.marching import visible_after_density_pass

    t_starts = torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0])
    t_ends = t_starts + 1.0
    sigmas = torch.tensor([0.005, 10.0, 1.0, 0.02, 0.0], requires_grad=True)
    ray_indices = torch.tensor([0, 0, 0, 1, 1])
    keep = visible_after_density_pass(t_starts, t_ends, sigmas, ray_indices, 2, 1e-4, 0.01)
    assert keep.tolist() == [False, True, False, True, False]
    assert visible_after_density_pass(t_starts, t_ends, sigmas, ray_indices, 2, 1e-4, 0.0).tolist() == [
        True, True, False, True, True]
    assert visible_after_density_pass(t_starts, t_ends, sigmas, ray_indices, 2, 0.0, 0.01).tolist() == [
        False, True, True, True, False]
    assert visible_after_density_pass(t_starts, t_ends, sigmas, ray_indices, 2, 0.0, 0.0).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nerfacc kernels)")
def test_cuda_and_cpu_marchers_keep_the_same_samples_with_the_alpha_threshold():
    from nfsd_nerf.render.marching import march_rays_nerfacc, sampling_alpha_threshold, visible_after_density_pass

    field = BallField(sigma=6.0, radius=0.7, smooth=True)  # density falls to 0 at the rim: low-alpha samples
    grid = OccupancyGrid(bound=1.0, resolution=16)
    grid.binaries.copy_(cells_touching_ball(grid, 0.7))
    grid.occs.copy_(grid.binaries.float() * 0.5)  # mean above 0.01: the threshold is not capped
    o, d = random_rays(300, torch.Generator().manual_seed(0))
    step = step_size_from_samples(1.0, 512)
    offsets = torch.rand(300, generator=torch.Generator().manual_seed(1)) * step
    threshold = sampling_alpha_threshold(0.01, grid.occs)
    ri, ts, te = march_rays_cpu(o, d, bound=1.0, step=step, offsets=offsets, occupancy=grid)
    x = o[ri] + (0.5 * (ts + te))[:, None] * d[ri]
    keep = visible_after_density_pass(ts, te, field.density(x), ri, 300, 1e-4, threshold)
    assert 0 < int((~keep).sum()) < len(keep)  # the threshold drops some samples, not all
    gpu_grid = grid.cuda()
    gri, gts, gte = march_rays_nerfacc(field.density, o.cuda(), d.cuda(), gpu_grid, step, offsets.cuda(), 1.0,
                                       1e-4, 0.01)
    assert torch.equal(gri.cpu(), ri[keep])
    assert torch.allclose(gts.cpu(), ts[keep], atol=1e-5)
