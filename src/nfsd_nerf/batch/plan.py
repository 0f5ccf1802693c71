"""A batch plan: the YAML file, checked in full and expanded into runs before anything is written.

A plan names prompts (or a prompts file), a model, variants (name -> config overrides), seeds and
overrides common to every run. It expands to prompts x variants x seeds runs, each with its
resolved config and its fixed folder ``OUT/<plan name>/<prompt slug>/<variant>/seed-<n>/``.
Overrides apply as preset < ``set`` < variant; the prompt and the seed come last. Every way a
plan can be wrong (unknown key, an override the config refuses, no prompts, a prompt the prior
cannot take) is a one-line :class:`~nfsd_nerf.errors.UserError` from :func:`load_plan`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import (
    BUILTIN_MODEL,
    DEFAULT_MODEL,
    Config,
    check_config,
    load_config,
    merge,
    preset_path,
    with_rule_defaults,
)
from ..errors import UserError
from ..files import slugify

PLAN_KEYS = ("name", "prompts", "prompts_file", "model", "config", "variants", "seeds", "set")
"""Top-level keys a plan may have (anything else is refused, so a typo never silently does nothing)."""
DEFAULT_VARIANT = "default"
"""The one variant of a plan without ``variants``: the preset with the plan's ``set``."""
RESERVED_KEYS = {
    "prompt": "list prompts under prompts: (or prompts_file:)",
    "train.seed": "list seeds under seeds:",
    "guidance.model": "name the model once, under model:",
}
"""Config keys the plan sets itself, refused in ``set`` and in variants (with where they belong)."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class RunSpec:
    """One run of a plan: what it trains and where its folder is."""

    prompt: str
    variant: str
    seed: int
    run_dir: Path
    """Absolute: ``OUT/<plan name>/<prompt slug>/<variant>/seed-<n>``."""
    config: Config
    """Resolved as the run folder's ``config.yaml`` records it (rule defaults filled in)."""

    @property
    def label(self) -> str:
        """``<prompt slug>/<variant>/seed-<n>``: the run's folder below the plan's."""
        return f"{self.run_dir.parent.parent.name}/{self.variant}/seed-{self.seed}"


@dataclass(frozen=True)
class BatchPlan:
    """A checked plan and its runs, in the order prompts x variants x seeds."""

    name: str
    source: Path
    text: str
    """The plan file as written (copied beside the runs)."""
    model: str
    prompts: tuple[str, ...]
    variants: dict[str, dict]
    """Variant name -> nested overrides."""
    seeds: tuple[int, ...]
    common: dict
    """The nested overrides of ``set``."""
    root: Path
    """Absolute ``OUT/<plan name>``."""
    runs: tuple[RunSpec, ...]


def load_plan(path: Path, out: Path) -> BatchPlan:
    """Read, check and expand the plan at ``path`` for the output folder ``out``; writes nothing."""
    path = Path(path)
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise UserError(f"plan not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read plan {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"plan {path}: expected a mapping with prompts:, variants:, seeds: ... at the top level")
    unknown = [k for k in data if k not in PLAN_KEYS]
    if unknown:
        raise UserError(f"plan {path}: unknown key {unknown[0]!r} (known: {', '.join(PLAN_KEYS)})")

    where = f"plan {path}"
    name = _plan_name(data.get("name", path.stem), where)
    model = data.get("model", DEFAULT_MODEL)
    if not isinstance(model, str) or not model.strip():
        raise UserError(f"{where}: model: expected a model id, a local folder or {BUILTIN_MODEL!r}, got {model!r}")
    prompts = _prompts(data, path, where)
    variants = _variants(data.get("variants"), where)
    seeds = _seeds(data.get("seeds", [0]), where)
    common = _overrides(data.get("set") or {}, f"{where}: set")

    base = load_config(_config_path(data.get("config"), path, model, where))
    base = merge(base, {"guidance": {"model": model}})
    base = _merged(base, common, f"{where}: set")
    root = (Path(out) / name).resolve()
    runs = []
    for prompt in prompts:
        for variant, overrides in variants.items():
            cfg = _merged(base, overrides, f"{where}: variant {variant!r}")
            cfg = _resolved(cfg, prompt, f"{where}: variant {variant!r}, prompt {prompt!r}")
            for seed in seeds:
                run_cfg = merge(cfg, {"train": {"seed": seed}})
                runs.append(RunSpec(prompt, variant, seed, root / slugify(prompt) / variant / f"seed-{seed}", run_cfg))
    return BatchPlan(name=name, source=path.resolve(), text=text, model=model, prompts=prompts, variants=variants,
                     seeds=seeds, common=common, root=root, runs=tuple(runs))


def _plan_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise UserError(f"{where}: name {value!r} must be a folder name of letters, digits, '.', '_' and '-'")
    return value


def _prompts(data: dict, path: Path, where: str) -> tuple[str, ...]:
    """From ``prompts:`` or ``prompts_file:`` (one a line; blank lines and ``#`` comments skipped)."""
    if "prompts" in data and "prompts_file" in data:
        raise UserError(f"{where}: give prompts: or prompts_file:, not both")
    if "prompts_file" in data:
        file = data["prompts_file"]
        if not isinstance(file, str):
            raise UserError(f"{where}: prompts_file: expected a path, got {file!r}")
        file_path = path.parent / file
        try:
            lines = file_path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{where}: cannot read prompts_file {file_path}: {exc.strerror or exc}") from None
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        prompts = data.get("prompts") or []
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise UserError(f"{where}: prompts: expected a list of strings, got {prompts!r}")
        prompts = [p.strip() for p in prompts]
        if any(not p for p in prompts):
            raise UserError(f"{where}: prompts: a prompt is empty")
    if not prompts:
        raise UserError(f"{where}: no prompts: list them under prompts: or in a prompts_file:")
    by_slug: dict[str, str] = {}
    for prompt in prompts:
        other = by_slug.setdefault(slugify(prompt), prompt)
        if other != prompt:
            raise UserError(f"{where}: prompts {other!r} and {prompt!r} would share the folder {slugify(prompt)!r}")
        elif prompts.count(prompt) > 1:
            raise UserError(f"{where}: prompt {prompt!r} is listed twice")
    return tuple(prompts)


def _variants(value: Any, where: str) -> dict[str, dict]:
    if value is None:
        return {DEFAULT_VARIANT: {}}
    if not isinstance(value, dict) or not value:
        raise UserError(f"{where}: variants: expected a mapping of name -> overrides, got {value!r}")
    variants = {}
    for name, overrides in value.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise UserError(f"{where}: variant name {name!r} must be a folder name of letters, digits, "
                            "'.', '_' and '-'")
        variants[name] = _overrides(overrides or {}, f"{where}: variant {name!r}")
    return variants


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    seeds = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise UserError(f"{where}: seeds: expected a list of non-negative integers, got {value!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: seeds: a seed is listed twice in {seeds}")
    return tuple(seeds)


def _overrides(value: Any, where: str) -> dict:
    """``{"guidance.method": "sds"}`` (dotted keys, or nested mappings) -> nested overrides."""
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping of config keys, e.g. {{guidance.method: sds}}, got {value!r}")
    nested: dict = {}
    for dotted, setting in value.items():
        parts = str(dotted).split(".")
        if not all(parts):
            raise UserError(f"{where}: empty part in the key {dotted!r}")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"{where}: {dotted!r} sets a key below a value")
        if isinstance(node.get(parts[-1]), dict) and isinstance(setting, dict):
            node[parts[-1]].update(setting)
        else:
            node[parts[-1]] = setting
    for key, hint in RESERVED_KEYS.items():
        if _has_key(nested, key):
            raise UserError(f"{where}: {key} is set by the plan itself: {hint}")
    return nested


def _has_key(nested: dict, dotted: str) -> bool:
    node: Any = nested
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _config_path(value: Any, path: Path, model: str, where: str) -> Path:
    """``config:`` (relative to the plan) instead of the preset the model picks, as ``train --config``."""
    if value is None:
        return preset_path("builtin" if model == BUILTIN_MODEL else "default")
    if not isinstance(value, str):
        raise UserError(f"{where}: config: expected a path to a YAML config, got {value!r}")
    return path.parent / value


def _merged(cfg: Config, overrides: dict, where: str) -> Config:
    try:
        return merge(cfg, overrides)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def _resolved(cfg: Config, prompt: str, where: str) -> Config:
    """The run's config with the rule's defaults filled in, checked as ``train`` checks it, and the
    prompt checked against the prior where that needs no model load (the built-in prior's vocabulary)."""
    cfg = merge(cfg, {"prompt": prompt})
    try:
        check_config(cfg)
        cfg = dataclasses.replace(cfg, guidance=with_rule_defaults(cfg.guidance))
        if cfg.guidance.model == BUILTIN_MODEL:
            _check_builtin_prompts(cfg)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return cfg


def _check_builtin_prompts(cfg: Config) -> None:
    """Every text a run would embed must be in the built-in prior's vocabulary (view variants, the
    empty prompt and the negative prompt included); ``check_config`` has already refused a drawn
    prompt that names no built-in object."""
    from ..guidance.shapes import parse_prompt
    from ..train.run import prompt_variants

    for text in prompt_variants(cfg):
        parse_prompt(text)