"""Hash-grid throughput: forward+backward and forward-only, in million points per second.

Default setting (threestudio / Instant-NGP; ``FieldConfig``'s hash grid): 2^16 random points in
[0, 1]^3, 16 levels x 2 features, tables of 2^19 entries, base resolution 16, per-level scale
1.447269; gradient on the whole table; ``zero_grad`` (set to None) is inside the timed step;
eager mode. The best of ``repeats`` timings is reported (the median too), after two warm-up
steps.

On the CPU, ``tune_allocator`` first calls :func:`nfsd_nerf.runtime.tune_cpu_allocator`
(process-wide): without it glibc returns freed memory to the OS and every large temporary pays
page faults again, which makes this benchmark 2-4x slower in a VM.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from nfsd_nerf.config import FieldConfig
except ImportError:  # run from a checkout without the editable install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from nfsd_nerf.config import FieldConfig
from nfsd_nerf.encoding import HashGridEncoding
from nfsd_nerf.runtime import tune_cpu_allocator


def _timed(fn, repeats: int, device: torch.device) -> list[float]:
    """Seconds per call of ``fn`` (two warm-up calls first)."""
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return times


def bench_hash_grid(
    n_points: int = 2**16,
    repeats: int = 5,
    *,
    device: str | None = None,
    backend: str = "auto",
    tune_allocator: bool = True,
    seed: int = 0,
) -> dict:
    """Time the default hash grid; returns M points/s and ms for forward+backward and forward.

    Keys: ``fwd_bwd_mpts_per_s``, ``fwd_mpts_per_s`` (best of ``repeats``),
    ``fwd_bwd_with_input_grad_mpts_per_s`` (x.requires_grad too, as for analytic normals),
    ``fwd_bwd_ms``, ``fwd_ms`` (best), ``fwd_bwd_ms_median``, ``fwd_ms_median``, ``n_points``,
    ``threads``, and the strings ``device``, ``backend``, ``allocator`` ("tuned" or "default").
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tuned = tune_allocator and dev.type == "cpu" and tune_cpu_allocator()
    torch.manual_seed(seed)
    encoding = HashGridEncoding.from_config(FieldConfig(backend=backend)).to(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.rand(n_points, 3, device=dev, generator=gen)
    grad_out = torch.randn(n_points, encoding.n_output_dims, device=dev, generator=gen)

    def forward_backward() -> None:
        encoding.zero_grad(set_to_none=True)
        encoding(x).backward(grad_out)

    def forward() -> None:
        with torch.no_grad():
            encoding(x)

    x_grad = x.clone().requires_grad_(True)

    def forward_backward_input_grad() -> None:  # also dL/dx (analytic normals)
        encoding.zero_grad(set_to_none=True)
        x_grad.grad = None
        encoding(x_grad).backward(grad_out)

    fwd_bwd = _timed(forward_backward, repeats, dev)
    fwd = _timed(forward, repeats, dev)
    fwd_bwd_x = _timed(forward_backward_input_grad, max(1, repeats // 2), dev)
    return {
        "fwd_bwd_mpts_per_s": n_points / min(fwd_bwd) / 1e6,
        "fwd_mpts_per_s": n_points / min(fwd) / 1e6,
        "fwd_bwd_with_input_grad_mpts_per_s": n_points / min(fwd_bwd_x) / 1e6,
        "fwd_bwd_ms": 1e3 * min(fwd_bwd),
        "fwd_ms": 1e3 * min(fwd),
        "fwd_bwd_ms_median": 1e3 * statistics.median(fwd_bwd),
        "fwd_ms_median": 1e3 * statistics.median(fwd),
        "n_points": n_points,
        "threads": torch.get_num_threads(),
        "device": dev.type,
        "backend": encoding.backend if dev.type == "cuda" else "torch",
        "allocator": "tuned" if tuned else "default",
    }


if __name__ == "__main__":
    r = bench_hash_grid()
    print(
        f"hash grid ({r['device']}, {r['backend']}, {r['threads']} threads, {r['allocator']} allocator, "
        f"{r['n_points']} points, 16 levels x 2, table 2^19): "
        f"fwd+bwd {r['fwd_bwd_mpts_per_s']:.3f} M pts/s ({r['fwd_bwd_ms']:.1f} ms, median {r['fwd_bwd_ms_median']:.1f}), "
        f"fwd {r['fwd_mpts_per_s']:.3f} M pts/s ({r['fwd_ms']:.1f} ms, median {r['fwd_ms_median']:.1f}), "
        f"fwd+bwd with dL/dx {r['fwd_bwd_with_input_grad_mpts_per_s']:.3f} M pts/s"
    )
