"""Checks of the model: found locally or in the Hugging Face cache, or the exact command that downloads what a run needs."""

from __future__ import annotations

import functools
import shlex
from pathlib import Path

from .rows import Machine, ModelRef, Row, folder_bytes, precision, size

# --------------------------------------------------------------------------- model files


def model_rows(ref: ModelRef, machine: Machine, *, revision: str | None, offline: bool, online: bool) -> list[Row]:
    """Is the model on this machine (revision, size), and if not: the exact download, the alternatives."""
    from ..guidance.hub import weight_variants

    if ref.kind == "builtin":
        return [Row("model", "builtin: the built-in offline prior (no download)")]
    choose = functools.partial(weight_variants, half_precision=machine.half_precision,
                               device="cuda" if machine.cuda else "cpu")
    if ref.kind == "folder":
        folder = Path(ref.name)
        return [Row("model", f"found: local folder {folder}, {size(folder_bytes(folder))} on disk, "
                             f"{precision(choose(folder))} weights")]
    snapshot, problem = _cached_snapshot(ref.name, revision, choose)
    rows: list[Row] = []
    listing = None
    if online:
        hub_row, listing = _hub_listing_row(ref.name, revision, choose, offline)
        rows.append(hub_row)
    if snapshot is not None:
        value = (f"found in the Hugging Face cache: {ref.name} @ {snapshot.name[:12]}, "
                 f"{size(folder_bytes(snapshot))} on disk, {precision(choose(snapshot))} weights")
        return [Row("model", value), *rows]
    return [_missing_model_row(ref.name, revision, problem, choose, listing, offline), *rows]


def _cached_snapshot(model: str, revision: str | None, choose) -> tuple[Path | None, str]:
    """(complete snapshot, "") from the local cache, or (None, why not). No network (local_files_only)."""
    from huggingface_hub import snapshot_download

    from ..guidance.hub import hub_cache_dir, missing_files

    try:
        folder = Path(snapshot_download(model, revision=revision, cache_dir=hub_cache_dir(), local_files_only=True))
    except (OSError, ValueError):
        return None, f"not in the Hugging Face cache {hub_cache_dir()}"
    missing = missing_files(folder, choose(folder))
    if missing:
        return None, f"incomplete in the Hugging Face cache (snapshot {folder.name[:12]} lacks {', '.join(missing)})"
    return folder, ""


def _missing_model_row(model: str, revision: str | None, problem: str, choose, listing, offline: bool) -> Row:
    """The model is not usable from the cache: fail with the download command, or (hub listing known,
    online allowed) warn that train will download it."""
    from ..guidance.hub import MIRRORS, offline_reason

    variants = choose(listing if listing is not None else [])
    command = download_command(model, revision, variants)
    if listing is None:
        weights = ("the fp16 variants (*.fp16.safetensors) a GPU run reads; if the repository has none, "
                   "`nfsd-nerf doctor --online` prints the command for its plain files"
                   if set(variants.values()) == {"fp16"} else
                   "the plain fp32 *.safetensors a CPU run reads, not the *.fp16.safetensors variants")
    else:
        weights = f"{precision(variants)} weights, as the repository has them"
    mirrors = " or ".join(m for m in MIRRORS if m != model)
    advice = (f"download only the files a run needs ({weights}):\n{command}\n"
              f"or use a mirror ({mirrors}), a local diffusers folder, or --model builtin (offline, no download)")
    if listing is not None and not offline_reason(offline):
        return Row("model", f"{problem}; train will download it on its first run", "warn", advice)
    return Row("model", problem, "fail", advice)


def download_patterns(variants: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """``hf download`` globs (include, exclude) for the files a run reads: configs, tokenizer, and each
    component's weights in its variant (single file or shards + index). Globs match across ``/``."""
    from ..guidance.hub import WEIGHT_STEMS, weight_names

    include = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*.json", "tokenizer/*.txt"]
    exclude = []
    for component, variant in variants.items():
        stem = WEIGHT_STEMS[component]
        include += [f"{component}/config.json", f"{component}/{weight_names(component, variant)[1]}"]
        if variant is None:  # the file and its shards, no variant (fp16, non_ema...) of them
            include.append(f"{component}/{stem}*.safetensors")
            exclude.append(f"{component}/{stem}.*.safetensors")
        else:  # stem.fp16.safetensors and its shards stem.fp16-00001-of-00002.safetensors
            include.append(f"{component}/{stem}.{variant}*.safetensors")
    return include, exclude


def download_command(model: str, revision: str | None, variants: dict[str, str | None]) -> str:
    """The one-line ``hf download`` that fetches exactly :func:`download_patterns` into the HF cache."""
    include, exclude = download_patterns(variants)
    words = ["hf download", shlex.quote(model)] + ([f"--revision {shlex.quote(revision)}"] if revision else [])
    words += [f'--include "{p}"' for p in include] + [f'--exclude "{p}"' for p in exclude]
    return " ".join(words)


def _hub_listing_row(model: str, revision: str | None, choose, offline: bool) -> tuple[Row, list[str] | None]:
    """--online: one request for the repository's file list and sizes, under hub.py's deadline."""
    from ..guidance.hub import (
        call_with_deadline,
        offline_reason,
        download_files,
        first_line,
        hub_endpoint,
        hub_timeout,
        missing_files,
    )

    reason = offline_reason(offline)
    if reason:
        return Row("hub", f"not asked: offline mode is on ({reason})", "warn", "unset it to let --online ask"), None
    from huggingface_hub import HfApi

    endpoint, timeout = hub_endpoint(), hub_timeout()
    try:
        info = call_with_deadline(lambda: HfApi(endpoint=endpoint).model_info(
            model, revision=revision, files_metadata=True, timeout=timeout + 1.0), timeout)
    except Exception as exc:  # timeout, not found, gated, offline, connection errors
        return Row("hub", f"{endpoint}: no usable answer ({first_line(exc)})", "warn",
                   "set HF_HUB_ETAG_TIMEOUT to wait longer, check HF_ENDPOINT, or download on a machine online"), None
    sizes = {s.rfilename: s.size or 0 for s in (info.siblings or [])}
    variants = choose(list(sizes))
    files = download_files(sizes, variants)
    missing = missing_files(files, variants)
    if missing:
        return Row("hub", f"{endpoint}: {model} is not a Stable Diffusion diffusers repository with safetensors "
                          f"(missing {', '.join(missing)})", "fail", "use another --model"), None
    total = sum(sizes[f] for f in files)
    return Row("hub", f"{endpoint}: {model} @ {(info.sha or '?')[:12]}, a run needs {len(files)} files, "
                      f"{size(total)} ({precision(variants)} weights)"), list(sizes)
