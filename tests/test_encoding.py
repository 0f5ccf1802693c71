"""HashGridEncoding, the module: construction from settings or a FieldConfig, state, backends.

The kernels are checked against tcnn in ``test_encoding_torch_backend.py`` and the layout in
``test_encoding_layout.py``.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from nfsd_nerf import encoding as encoding_module
from nfsd_nerf.config import FieldConfig
from nfsd_nerf.encoding import HashGridEncoding, hash_grid_layout, level_scales, tcnn_available
from nfsd_nerf.encoding import hash_grid as hash_grid_module
from nfsd_nerf.errors import UserError


def _grid(n_levels: int, n_features: int, log2_size: int, base: int, pls: float, backend: str = "torch") -> HashGridEncoding:
    return HashGridEncoding(n_levels=n_levels, n_features_per_level=n_features, log2_hashmap_size=log2_size,
                            base_resolution=base, per_level_scale=pls, backend=backend)


# ------------------------------------------------------------------ construction


def test_package_exports():
    assert all(hasattr(encoding_module, name) for name in encoding_module.__all__)
    assert level_scales(2, 16, 2.0) == [15.0, 31.0]


def test_default_config_grid():
    """FieldConfig's defaults: 16 levels x 2 features, 2^19 tables (12.6 M parameters)."""
    enc = HashGridEncoding.from_config(FieldConfig(backend="torch"))
    assert enc.params.shape == (12_599_920,) and enc.params.dtype == torch.float32
    assert enc.n_output_dims == 32 and enc.backend == "torch"
    assert enc.layout == hash_grid_layout(16, 2, 19, 16, 1.447269)


def test_settings_are_required_keywords():
    with pytest.raises(TypeError):
        HashGridEncoding(backend="torch")
    with pytest.raises(TypeError):
        HashGridEncoding(4, 2, 10, 4, 2.0, "torch")


def test_from_config_reads_the_hash_grid_settings():
    cfg = dataclasses.replace(FieldConfig(), n_levels=4, n_features_per_level=4, log2_hashmap_size=10,
                              base_resolution=4, per_level_scale=2.0, hidden_dim=8, backend="torch")
    torch.manual_seed(0)
    from_cfg = HashGridEncoding.from_config(cfg)
    torch.manual_seed(0)
    explicit = _grid(4, 4, 10, 4, 2.0)
    assert from_cfg.tcnn_encoding_config() == explicit.tcnn_encoding_config()
    assert torch.equal(from_cfg.params, explicit.params)


def test_init_and_state_dict():
    torch.manual_seed(0)
    enc = _grid(4, 2, 10, 4, 2.0)
    assert list(enc.state_dict().keys()) == ["params"]
    p = enc.params.detach()
    assert p.abs().max() <= 1e-4 and p.abs().max() > 0.9e-4 and abs(p.mean()) < 1e-5
    other = _grid(4, 2, 10, 4, 2.0)
    other.load_state_dict(enc.state_dict())
    x = torch.rand(10, 3)
    torch.testing.assert_close(other(x), enc(x), rtol=0, atol=0)


# ------------------------------------------------------------------ forward


def test_out_of_range_inputs_are_clamped():
    enc = _grid(3, 2, 8, 4, 2.0)
    with torch.no_grad():
        enc.params.uniform_(-1, 1)
    x = torch.tensor([[-0.5, 1.7, 0.3], [float("nan"), 0.2, 2.0]])
    clamped = torch.tensor([[0.0, 1.0, 0.3], [0.0, 0.2, 1.0]])
    torch.testing.assert_close(enc(x), enc(clamped), rtol=0, atol=0)


def test_active_levels_zero_finer_columns():
    enc = _grid(4, 2, 10, 4, 2.0)
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


# ------------------------------------------------------------------ backends and validation


def test_bad_settings_raise():
    with pytest.raises(UserError, match="n_features_per_level"):
        _grid(16, 3, 19, 16, 1.447269)
    with pytest.raises(UserError, match="'cuda'"):
        _grid(2, 2, 8, 4, 2.0, backend="cuda")
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        _grid(2, 2, 8, 4, 2.0)(torch.rand(4, 2))


def test_forced_tcnn_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(hash_grid_module, "tcnn_available", lambda: False)
    monkeypatch.setattr(hash_grid_module, "_warned_tcnn_fallback", False)
    with pytest.warns(UserWarning, match="tcnn"):
        enc = _grid(2, 2, 8, 4, 2.0, backend="tcnn")
    assert enc.backend == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _grid(2, 2, 8, 4, 2.0, backend="tcnn").backend == "torch"
        assert _grid(2, 2, 8, 4, 2.0, backend="auto").backend == "torch"


def test_tcnn_config():
    enc = _grid(12, 4, 17, 8, 1.5)
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
        return tcnn_available()
    except Exception:
        return False


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not _has_tcnn(), reason="needs CUDA and tinycudann")
def test_tcnn_and_torch_backends_agree():
    torch.manual_seed(0)
    tcnn_enc = HashGridEncoding.from_config(FieldConfig(backend="tcnn")).cuda()
    assert tcnn_enc.backend == "tcnn"
    torch_enc = HashGridEncoding.from_config(FieldConfig(backend="torch")).cuda()
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
