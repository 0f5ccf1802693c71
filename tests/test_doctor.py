"""``nfsd-nerf doctor`` through the command line: exit codes 0 / 1 / 2, no network, no nerfacc kernels on CPU."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import types

import pytest
import torch
from typer.testing import CliRunner

from nfsd_nerf import doctor
from nfsd_nerf.doctor import model_files
from nfsd_nerf.cli import app
from nfsd_nerf.guidance import hub
from nfsd_nerf.render import marching

runner = CliRunner()
MISSING = "nobody-here/not-a-cached-model"


@pytest.fixture
def empty_hf_home(tmp_path, monkeypatch):
    """An empty Hugging Face home, and no offline or endpoint settings from the environment."""
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a connection or resolve a name is recorded and refused."""
    attempts: list[str] = []

    def refuse(name):
        def call(*args, **kwargs):
            attempts.append(name)
            raise OSError(f"network use in a test: {name}")
        return call

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return attempts


def invoke(*args):
    return runner.invoke(app, ["doctor", *args], env={"COLUMNS": "300"})  # wide: table cells stay on one line


def test_builtin_model_would_run_and_the_table_names_torch(tmp_path, no_network):
    result = invoke("--model", "builtin", "--out", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    assert torch.__version__ in result.output
    assert "would run here" in result.output
    assert not no_network
    assert not (tmp_path / "runs").exists()  # checking the output folder creates nothing


def test_a_local_diffusers_folder_is_found(tiny_sd_path, tmp_path, no_network):
    result = invoke("--model", str(tiny_sd_path), "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "found: local folder" in result.output
    assert not no_network


def test_a_hub_id_missing_from_the_cache_fails_with_the_download_command_and_no_network(empty_hf_home, tmp_path,
                                                                                         no_network):
    result = invoke("--model", MISSING, "--out", str(tmp_path))
    assert result.exit_code == 1, result.output
    command = next(line.strip() for line in result.output.splitlines() if line.strip().startswith("hf download"))
    assert command.startswith(f"hf download {MISSING} --include ")
    assert '--include "unet/diffusion_pytorch_model' in command and '--include "model_index.json"' in command
    assert "*.fp16.safetensors" in result.output  # says which weight files it picked and why
    assert "--model builtin" in result.output and hub.MIRRORS[1] in result.output  # the alternatives
    assert "would not run" in result.output
    assert not no_network, f"doctor used the network without --online: {no_network}"


def test_a_model_in_the_hf_cache_is_found_with_its_revision_and_size(tiny_sd_path, empty_hf_home, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hf_home / "hub" / "models--someone--tiny-sd"
    shutil.copytree(tiny_sd_path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    result = invoke("--model", "someone/tiny-sd", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "found in the Hugging Face cache" in result.output and commit[:12] in result.output
    assert " MB on disk" in result.output


@pytest.mark.parametrize("kind", ["empty folder", "file", "missing path", "bad id"])
def test_a_model_value_that_names_no_model_is_one_line_and_exit_code_2(kind, tmp_path):
    value = {"empty folder": str(tmp_path), "file": str(tmp_path / "weights.bin"),
             "missing path": str(tmp_path / "no" / "such"), "bad id": "not a hub id!"}[kind]
    (tmp_path / "weights.bin").write_bytes(b"")
    result = invoke("--model", value)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --model"), result.output


def test_online_and_offline_together_are_refused():
    result = invoke("--model", "builtin", "--online", "--offline")
    assert result.exit_code == 2 and "contradict" in result.output


def test_an_unwritable_output_folder_fails(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = invoke("--model", "builtin", "--out", str(blocker / "runs"))
    assert result.exit_code == 1 and "not writable" in result.output


def test_online_lists_the_repository_under_the_deadline_and_a_downloadable_model_would_run(empty_hf_home, tmp_path,
                                                                                           monkeypatch):
    sizes = {"model_index.json": 500, "scheduler/scheduler_config.json": 300, "tokenizer/vocab.json": 1_000_000,
             "tokenizer/merges.txt": 500_000, "unet/config.json": 900, "unet/diffusion_pytorch_model.safetensors": 3_000_000_000,
             "unet/diffusion_pytorch_model.fp16.safetensors": 1_500_000_000, "vae/config.json": 600,
             "vae/diffusion_pytorch_model.safetensors": 300_000_000, "text_encoder/config.json": 600,
             "text_encoder/model.safetensors": 1_000_000_000, "unet/diffusion_pytorch_model.bin": 3_000_000_000}
    asked = []

    def model_info(self, repo_id, revision=None, files_metadata=False, timeout=None):
        asked.append((repo_id, files_metadata, timeout))
        siblings = [types.SimpleNamespace(rfilename=name, size=size) for name, size in sizes.items()]
        return types.SimpleNamespace(sha="f" * 40, siblings=siblings)

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", model_info)
    result = invoke("--model", MISSING, "--out", str(tmp_path), "--online")
    assert asked and asked[0][1] is True and asked[0][2] == pytest.approx(hub.hub_timeout() + 1.0)
    assert result.exit_code == 0, result.output
    assert "train will download it" in result.output
    if torch.cuda.is_available():  # fp16 run: the fp16 UNet, plain VAE and text encoder (they have no fp16 files)
        assert "a run needs 10 files, 2.8 GB (fp16/fp32 weights)" in result.output
    else:  # fp32 run: the plain weights; neither the fp16 UNet nor the pickle
        assert "a run needs 10 files, 4.3 GB (fp32 weights)" in result.output


def test_doctor_answers_within_10_s_and_never_loads_nerfaccs_kernels_on_the_cpu():
    code = (
        "import sys, time; t = time.perf_counter(); from nfsd_nerf.cli import app\n"
        "try:\n    app(['doctor', '--model', 'builtin'])\nexcept SystemExit as e:\n    rc = e.code\n"
        "print('RESULT', rc, round(time.perf_counter() - t, 2), 'nerfacc.cuda._backend' in sys.modules)"
    )
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False).stdout
    wall = time.perf_counter() - started
    rc, _, kernels_loaded = out.strip().splitlines()[-1].split()[1:]
    assert rc in ("0", "None") and wall < 10, (out, wall)
    if not torch.cuda.is_available():
        assert kernels_loaded == "False"


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch reports one GPU (this CPU machine cannot show the CUDA rows otherwise); nothing may build kernels."""
    props = types.SimpleNamespace(name="NVIDIA Test GPU", major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (60 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/nonexistent/torch-extensions")
    monkeypatch.setattr(marching, "_import_nerfacc_backend", lambda: pytest.fail("nerfacc's kernels were loaded"))
    marching._load_nerfacc_kernels.cache_clear()
    yield
    marching._load_nerfacc_kernels.cache_clear()


def test_on_a_gpu_the_report_names_it_and_the_kernel_state_without_building(fake_gpu, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no nvcc, no ninja
    rows = {row.name: row for row in doctor.run_checks("builtin", out=tmp_path)}
    assert rows["CUDA"].value.startswith("available: torch built for CUDA 12.8, 1 GPU")
    assert rows["GPU 0"].value == "NVIDIA Test GPU, 80.0 GiB (60.0 GiB free), compute capability 9.0"
    assert rows["nvcc"].status == "warn" and "CUDA 12.8 toolkit" in rows["nvcc"].advice
    assert rows["ninja"].status == "warn" and "pip install ninja" in rows["ninja"].advice
    assert rows["nerfacc kernels"].status == "warn" and "cannot be built" in rows["nerfacc kernels"].value
    assert "tiny-cuda-nn" in rows["hash grid"].advice  # optional, faster
    assert doctor.exit_code(list(rows.values())) == 0  # all of that slows train down, none of it stops it


def test_build_on_a_gpu_reports_a_failed_build_as_a_warning(fake_gpu, tmp_path, monkeypatch):
    def no_cuda_home():
        raise OSError("CUDA_HOME environment variable is not set")

    monkeypatch.setattr(marching.shutil, "which", lambda name: f"/usr/local/cuda/bin/{name}")
    monkeypatch.setattr(marching, "_import_nerfacc_backend", no_cuda_home)
    monkeypatch.setattr(marching, "_kernels_explained", False)
    result = invoke("--model", "builtin", "--out", str(tmp_path), "--build")
    assert result.exit_code == 0, result.output
    assert "nerfacc's CUDA kernels are unavailable (OSError: CUDA_HOME" in result.output
    assert "could not be built" in result.output


# --------------------------------------------------------------------------- the download command


def _listing(sharded: bool) -> list[str]:
    """A Stable Diffusion repository as the hub lists it: plain, fp16 and non-EMA weights, pickles, extras."""
    files = ["model_index.json", "README.md", "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json",
             "safety_checker/config.json", "safety_checker/model.safetensors", "safety_checker/model.fp16.safetensors",
             "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/special_tokens_map.json",
             "tokenizer/tokenizer_config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.non_ema.safetensors",
             "vae/diffusion_flax_model.msgpack", "text_encoder/pytorch_model.bin"]
    for component, stem in hub.WEIGHT_STEMS.items():
        files.append(f"{component}/config.json")
        for tag in ("", ".fp16"):
            if sharded:
                files += [f"{component}/{stem}{tag}-0000{i}-of-00002.safetensors" for i in (1, 2)]
                files.append(f"{component}/{stem}.safetensors.index{tag}.json")
            else:
                files.append(f"{component}/{stem}{tag}.safetensors")
    return files


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("variants", [
    {"unet": None, "vae": None, "text_encoder": None},
    {"unet": "fp16", "vae": "fp16", "text_encoder": "fp16"},
    {"unet": "fp16", "vae": None, "text_encoder": "fp16"},
])
def test_download_patterns_fetch_exactly_the_files_a_run_reads(sharded, variants):
    from huggingface_hub.utils import filter_repo_objects

    listing = _listing(sharded)
    include, exclude = model_files.download_patterns(variants)
    fetched = sorted(filter_repo_objects(listing, allow_patterns=include, ignore_patterns=exclude))
    assert fetched == hub.download_files(listing, variants)
    assert not hub.missing_files(fetched, variants)
