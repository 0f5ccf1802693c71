"""The built-in preset's mesh figures (issue #16): train and export "a red cube" and "a blue torus"
over seeds 0, 1, 2 exactly as the README's quick start does, and tabulate the evaluation (PSNR,
masked PSNR, IoU, printed by ``train``) and ``export/metrics.json`` of each run.

Run: ``.venv/bin/python benchmarks/mesh_table.py [--seeds 0 1 2] [--jobs 2] [--out DIR]``; prints a
markdown table and writes it with the raw figures to ``benchmarks/results/<date>-mesh-table.{md,json}``.
Each run is a subprocess of the installed CLI (``nfsd-nerf train`` then ``export --format glb``),
one thread each, ``--jobs`` at a time; about 1-2 minutes per run on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = ("a red cube", "a blue torus")
EVAL_LINE = re.compile(r"PSNR ([\d.]+) dB, masked PSNR ([\d.]+) dB, silhouette IoU ([\d.]+)")
SECONDS_LINE = re.compile(r"in ([\d.]+) s \(([\d.]+) s/step\)")


def run_one(prompt: str, seed: int, out: Path) -> dict:
    """Train and export one run; -> its figures (train's evaluation and export's metrics.json)."""
    cli = str(Path(sys.executable).with_name("nfsd-nerf"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = out / f"{prompt.replace(' ', '-')}-seed{seed}"
    train = subprocess.run([cli, "train", prompt, "--model", "builtin", "--seed", str(seed), "--out", str(parent)],
                           capture_output=True, text=True, env=env, check=True)
    run_dir = next(p for p in parent.iterdir() if p.is_dir())
    subprocess.run([cli, "export", str(run_dir), "--format", "glb"], capture_output=True, text=True, env=env, check=True)
    psnr, masked, iou = (float(x) for x in EVAL_LINE.search(train.stdout).groups())
    seconds = SECONDS_LINE.search(train.stdout)
    metrics = json.loads((run_dir / "export" / "metrics.json").read_text())
    return {"prompt": prompt, "seed": seed, "psnr": psnr, "psnr_masked": masked, "silhouette_iou": iou,
            "train_seconds": float(seconds.group(1)) if seconds else None, "mesh": metrics}


def table(rows: list[dict]) -> str:
    """Markdown: one line per run."""
    lines = ["| prompt | seed | PSNR / masked / IoU | pieces | Euler (genus) | volume | surface dist. | normal err. | mean colour (true) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["mesh"]
        colour = ", ".join(f"{c:.2f}" for c in m["colour_mean"])
        true = ", ".join(f"{c:.2f}" for c in m["true_albedo"])
        lines.append(f"| {r['prompt']} | {r['seed']} | {r['psnr']:.2f} / {r['psnr_masked']:.2f} / {r['silhouette_iou']:.3f} "
                     f"| {m['pieces']} | {m['euler']} ({m['genus']}) | {m['volume_error']:+.1%} "
                     f"| {100 * m['surface_distance_median']:.2f} cm | {m['normal_error_median_deg']:.1f} deg "
                     f"| ({colour}) ({true}), err {m['colour_error']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="Parent of the run folders (default: a temporary folder).")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="mesh-table-"))
    jobs = [(prompt, seed) for prompt in PROMPTS for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: run_one(*job, out), jobs))
    text = table(rows)
    print(text)
    results = Path(__file__).parent / "results"
    stem = results / f"{datetime.date.today().isoformat()}-mesh-table"
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"runs_in": str(out), "rows": rows}, indent=2) + "\n")
    print(f"wrote {stem}.md and {stem}.json (runs in {out})")


if __name__ == "__main__":
    main()
