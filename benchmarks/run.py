"""`make bench`: where every second goes, printed as one table and saved as JSON with the machine.

Rows: hash-grid throughput, render throughput, a per-stage training-step breakdown (built-in
preset on the CPU, a tiny Stable Diffusion on the CPU, and, when CUDA is present, the default
preset with the full-size SD 2.1-base architecture in fp16 for NFSD and SDS), export and video.
GPU rows say "no CUDA device" when there is none: they are never estimated.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # sibling bench_* modules
RESULTS = HERE / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    parser.add_argument("--only", default="", help="comma-separated subset: grid,render,train,export")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    want = lambda name: not only or name in only  # noqa: E731

    from bench_train import bench_training  # noqa: E402

    results: dict = {"machine": machine(), "rows": []}
    rows = results["rows"]

    def add(group: str, name: str, value, unit: str, note: str = "") -> None:
        rows.append({"group": group, "name": name, "value": value, "unit": unit, "note": note})
        shown = value if isinstance(value, str) else f"{value:.4g}"
        print(f"  {group:<10} {name:<52} {shown:>12} {unit:<10} {note}", flush=True)

    print(f"machine: {results['machine']}")
    if want("grid"):
        from bench_encoding import bench_hash_grid

        grid = bench_hash_grid()
        for key, value in grid.items():
            if isinstance(value, (int, float)):
                add("hash grid", key, value, "", "2^16 points, 16 levels x 2, table 2^19")
    if want("render"):
        from bench_render import bench_render

        for key, value in bench_render().items():
            if isinstance(value, (int, float)):
                add("render", key, value, "")
    if want("train"):
        for row in bench_training(quick=args.quick):
            add("train", row["name"], row["value"], row["unit"], row.get("note", ""))
    if want("export"):
        from bench_export import bench_export

        for key, value in bench_export().items():
            if isinstance(value, (int, float)):
                add("export", key, value, "s" if "s" in key.split("_")[-1] else "")

    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"{dt.date.today().isoformat()}-{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    path = RESULTS / name
    with tempfile.NamedTemporaryFile("w", dir=RESULTS, delete=False, suffix=".tmp") as handle:
        json.dump(results, handle, indent=2)
    os.replace(handle.name, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
