"""Training-step breakdown: mean and p90 seconds per stage, after warm-up, device synchronised.

Configurations: the built-in preset on the CPU; a tiny random Stable Diffusion on the CPU (NFSD, NFSD +
Perp-Neg, VSD); and on CUDA the default preset (64x64, 16 levels, 512 samples) with the full-size SD
2.1-base architecture (random weights, fp16: the same arithmetic as the real model) for NFSD, SDS,
NFSD + Perp-Neg and VSD (last: its LoRA adapters stay, switched off, on the shared UNet).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from nfsd_nerf.config import load_config, merge, preset_path
from nfsd_nerf.guidance import load_prior
from nfsd_nerf.guidance.distill import ScoreDistillation
from nfsd_nerf.profiling import record_stages
from nfsd_nerf.runtime import cpu_threads
from nfsd_nerf.train import Trainer

STAGES = ("cameras", "render", "march", "field", "shading", "encode", "noise_prediction", "rule", "rule_state",
          "backward", "optimizer", "occupancy")
"""Stages in data-flow order; march, field and shading are parts of render."""


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def time_steps(cfg, prior, device: torch.device, *, warmup: int, steps: int, label: str) -> list[dict]:
    """Run ``warmup`` + ``steps`` training steps and return one row per stage plus totals."""
    distill = ScoreDistillation(prior, cfg.guidance, cfg.prompts, cfg.prompt)
    with tempfile.TemporaryDirectory() as tmp, cpu_threads(cfg.train.cpu_threads):  # as `train` runs it
        trainer = Trainer(cfg, Path(tmp), device, prior, distill)
        for _ in range(warmup):
            trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        totals = []
        with record_stages(device) as rec:
            for _ in range(steps):
                start = time.perf_counter()
                trainer.train_step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                totals.append(time.perf_counter() - start)
    rows = []
    for name in STAGES:
        times = rec.times.get(name)
        if not times:
            continue
        per_step = sum(times) / steps  # stages such as the occupancy refresh run on some steps only
        shown = f"  {name} (part of render)" if name in ("march", "field", "shading") else name
        rows.append({"name": f"{label}: {shown}", "value": per_step * 1e3, "unit": "ms/step",
                     "note": f"p90 {_p90(times) * 1e3:.1f} ms over {len(times)} calls"})
    mean = statistics.mean(totals)
    rows.append({"name": f"{label}: whole step", "value": mean * 1e3, "unit": "ms/step",
                 "note": f"p90 {_p90(totals) * 1e3:.1f} ms"})
    rows.append({"name": f"{label}: speed", "value": 1.0 / mean, "unit": "it/s",
                 "note": f"10k steps: {10000 * mean / 60:.1f} min"})
    if device.type == "cuda":
        rows.append({"name": f"{label}: peak GPU memory", "value": torch.cuda.max_memory_allocated() / 2**30,
                     "unit": "GiB"})
    return rows


def bench_training(quick: bool = False) -> list[dict]:
    from nfsd_nerf.testing import build_full_size_sd_prior, build_tiny_sd

    warmup, steps = (3, 10) if quick else (10, 40)
    cpu = torch.device("cpu")
    rows: list[dict] = []

    # 1. The built-in preset on the CPU (what `nfsd-nerf train "a red cube" --model builtin` runs)
    cfg = merge(load_config(preset_path("builtin")), {"prompt": "a red cube", "train": {"device": "cpu"}})
    prior = load_prior("builtin", device=cpu, image_size=cfg.render.size)
    rows += time_steps(cfg, prior, cpu, warmup=warmup, steps=steps, label="builtin preset, CPU, NFSD")

    # 2. A tiny random Stable Diffusion on the CPU (the pipeline code path without the model's cost)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_sd(Path(tmp) / "tiny-sd")
        cfg = merge(load_config(preset_path("cpu-tiny")), {"prompt": "a hamburger", "train": {"device": "cpu"}})
        prior = load_prior(str(folder), device=cpu, image_size=cfg.render.size, offline=True)
        plain = time_steps(cfg, prior, cpu, warmup=warmup, steps=steps, label="tiny SD, CPU, NFSD 32x32")
        cfg = merge(cfg, {"guidance": {"perp_neg": True}})
        perp_neg = time_steps(cfg, prior, cpu, warmup=warmup, steps=steps, label="tiny SD, CPU, NFSD + Perp-Neg 32x32")
        vsd = time_steps(merge(cfg, {"guidance": {"perp_neg": False, "method": "vsd"}}), prior, cpu, warmup=warmup,
                         steps=steps, label="tiny SD, CPU, VSD 32x32")
        rows += plain + perp_neg + [_ratio("tiny SD, CPU: Perp-Neg / plain step time", perp_neg, plain)]
        rows += vsd + [_ratio("tiny SD, CPU: VSD / NFSD step time", vsd, plain)]

    # 3. The default preset with the full-size SD 2.1-base architecture on CUDA, NFSD and SDS
    if not torch.cuda.is_available():
        for method in ("nfsd", "sds", "vsd"):
            rows.append({"name": f"default preset, full-size SD 2.1-base, {method.upper()}", "value": "no CUDA device",
                         "unit": "", "note": "not measured"})
        return rows
    gpu = torch.device("cuda")
    prior = build_full_size_sd_prior(gpu)
    per_method = {}
    for method in ("nfsd", "sds"):
        cfg = merge(load_config(preset_path("default")),
                    {"prompt": "a DSLR photo of a hamburger", "guidance": {"method": method}, "train": {"device": "cuda"}})
        method_rows = time_steps(cfg, prior, gpu, warmup=warmup, steps=steps,
                                 label=f"default preset, full-size SD 2.1-base, CUDA fp16, {method.upper()}")
        per_method[method] = _whole_step(method_rows)
        rows += method_rows
    rows.append({"name": "NFSD / SDS step-time ratio", "value": per_method["nfsd"] / per_method["sds"], "unit": "x"})
    cfg = merge(cfg, {"guidance": {"method": "nfsd", "perp_neg": True}})
    perp_neg = time_steps(cfg, prior, gpu, warmup=warmup, steps=steps,
                          label="default preset, full-size SD 2.1-base, CUDA fp16, NFSD + Perp-Neg")
    rows += perp_neg + [{"name": "NFSD + Perp-Neg / NFSD step-time ratio", "unit": "x",
                         "value": _whole_step(perp_neg) / per_method["nfsd"]}]
    cfg = merge(cfg, {"guidance": {"method": "vsd", "perp_neg": False}})
    vsd = time_steps(cfg, prior, gpu, warmup=warmup, steps=steps,
                     label="default preset, full-size SD 2.1-base, CUDA fp16, VSD")
    rows += vsd + [{"name": "VSD / NFSD step-time ratio", "unit": "x",
                    "value": _whole_step(vsd) / per_method["nfsd"]}]
    return rows


def _whole_step(rows: list[dict]) -> float:
    return next(r["value"] for r in rows if r["name"].endswith("whole step"))


def _ratio(name: str, rows: list[dict], baseline: list[dict]) -> dict:
    return {"name": name, "value": _whole_step(rows) / _whole_step(baseline), "unit": "x"}
