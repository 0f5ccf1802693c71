"""`make check-full-size`: one training step of the default preset with the full-size SD 2.1-base
architecture on the CPU, through ``nfsd-nerf train`` exactly as a user runs it.

No weights can be downloaded, so the five components are built with random weights, saved with
``save_pretrained`` (fp32 files, ~5.2 GB) and loaded back from that folder by the command. Checks:
exit code 0, a finite logged loss, a checkpoint and a summary; measures the command's peak
resident memory (``wait4``'s ``ru_maxrss`` of that one process) against the ``--max-rss-gib``
limit, and writes the figures, with the machine, to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "a DSLR photo of a hamburger"


def save_model(folder: Path) -> float:
    """The random-weight SD 2.1-base folder (reused when already complete); seconds spent."""
    from nfsd_nerf.testing import save_full_size_sd

    if (folder / "model_index.json").exists():
        return 0.0
    start = time.perf_counter()
    save_full_size_sd(folder, variants=(None,))  # the CPU runs fp32
    return time.perf_counter() - start


def run_measured(args: list[str]) -> tuple[int, float, float, str]:
    """Run ``nfsd-nerf ARGS`` as one child process: exit code, wall seconds, peak RSS in GiB, output."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen([sys.executable, "-c", "from nfsd_nerf.cli import app; app()", *args],
                                 cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # that process's own peak RSS, not the largest child's
        log.seek(0)
        output = log.read()
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 2**20, output  # KiB -> GiB


def check_run(out: Path) -> dict:
    """What the run folder must hold after one step: summary, checkpoint, a finite loss."""
    runs = [p for p in out.iterdir() if p.is_dir()]
    if len(runs) != 1:
        raise SystemExit(f"expected one run folder in {out}, found {len(runs)}")
    run = runs[0]
    summary = json.loads((run / "summary.json").read_text())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [line["loss"] for line in lines]
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    return {
        "steps": summary["steps"],
        "seconds_per_step": summary["seconds_per_step"],
        "loss": losses[-1] if losses else None,
        "loss_finite": bool(losses) and all(math.isfinite(v) for v in losses),
        "checkpoints": checkpoints,
        "device": summary.get("device"),
        "hash_grid_backend": summary.get("hash_grid_backend"),
        "ray_marcher": summary.get("ray_marcher"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="where to keep the saved model (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--max-rss-gib", type=float, default=12.0)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from run import machine

    with tempfile.TemporaryDirectory(prefix="nfsd-full-size-") as tmp:
        model_dir = args.model_dir or Path(tmp) / "sd-2-1-base-random"
        print(f"saving the random-weight SD 2.1-base architecture to {model_dir} ...", flush=True)
        save_s = save_model(model_dir)
        out = Path(tmp) / "outputs"
        command = ["train", PROMPT, "--model", str(model_dir), "--offline", "--steps", str(args.steps),
                   "--device", "cpu", "--out", str(out)]
        print(f"nfsd-nerf {' '.join(command)}", flush=True)
        code, wall_s, peak_gib, output = run_measured(command)
        if code != 0:
            print(output[-4000:])
            raise SystemExit(f"nfsd-nerf train exited with {code}")
        run = check_run(out)
    result = {
        "machine": machine(),
        "what": "one `nfsd-nerf train` of the default preset, full-size SD 2.1-base architecture, random "
                "weights, fp32 on the CPU, loaded from a save_pretrained folder",
        "command": "nfsd-nerf " + " ".join(command[:1] + [repr(PROMPT)] + command[2:3] + ["<folder>"] + command[4:-2]),
        "save_model_s": round(save_s, 1),
        "command_wall_s": round(wall_s, 1),
        "peak_rss_gib": round(peak_gib, 2),
        "max_rss_gib": args.max_rss_gib,
        "run": run,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{dt.date.today().isoformat()}-full-size-cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("command_wall_s", "peak_rss_gib", "run")}, indent=2))
    print(f"figures: {path}")
    failures = []
    if not run["loss_finite"]:
        failures.append("the logged loss is not finite")
    if not run["checkpoints"]:
        failures.append("no checkpoint written")
    if peak_gib > args.max_rss_gib:
        failures.append(f"peak resident memory {peak_gib:.2f} GiB > {args.max_rss_gib} GiB")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
