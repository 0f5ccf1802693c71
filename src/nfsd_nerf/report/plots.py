"""Inline SVG plots for the report page: training curves against the step, and a metric per variant.

Inline SVG, not a plotting library: the page must open from ``file://`` with no network and no
script beyond the viewer, and a few hundred lines of polyline need no dependency. Pure functions:
numbers in, an ``<svg>`` string out.
"""

from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT = 340, 190
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 24, 30
MAX_POINTS = 1000
"""A curve is thinned to about this many points (the page stays small for long runs)."""
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
PREFERRED = ("loss", "grad_norm", "param_grad_norm", "t", "seconds_per_step")


def _number(value) -> float | None:
    """A finite float from a logged value; a list (``t`` of a batch of views) gives its mean."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (list, tuple)) and value:
        parts = [_number(v) for v in value]
        return None if any(p is None for p in parts) else sum(parts) / len(parts)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def metric_series(lines: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``metrics.jsonl`` lines -> {key: [(step, value)]} for every numeric key but ``step``, in the
    order loss, loss terms, gradient norms, t, seconds per step, then the rest alphabetically."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in lines:
        step = line.get("step")
        for key, raw in line.items():
            value = _number(raw)
            if key != "step" and value is not None:
                series.setdefault(key, []).append((step, value))

    def rank(key: str) -> tuple:
        if key in PREFERRED:
            return (PREFERRED.index(key) if key != "loss" else 0, 0, key)
        return (0, 1, key) if key.startswith("loss_") else (len(PREFERRED), 0, key)

    return {key: series[key] for key in sorted(series, key=rank)}


def thin(points: list[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    """Every k-th point so that at most about ``limit`` remain; the last one always kept."""
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / limit)
    kept = points[::stride]
    return kept if kept[-1] == points[-1] else kept + [points[-1]]


def nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    """About ``count`` round values (1, 2 or 5 times a power of ten) spanning [low, high]."""
    if not high > low:
        return [low]
    raw = (high - low) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _label(value: float) -> str:
    return f"{value:.3g}" if value != 0 else "0"


def use_log_scale(values: list[float]) -> bool:
    """Log axis for positive values spanning more than three decades (a loss that falls a lot)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 1e3


def line_plot(title: str, points: list[tuple[float, float]], *, x_label: str = "step") -> str:
    """One curve as an ``<svg>``: ``points`` [(x, y)], axes with round ticks, log y when it spans decades."""
    points = thin([(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)])
    head = (f'<svg class="plot" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>'
            f'<text x="{LEFT}" y="15" class="plot-title">{escape(title)}</text>')
    if not points:
        return head + f'<text x="{LEFT}" y="{HEIGHT // 2}" class="plot-empty">no values</text></svg>'
    log = use_log_scale([y for _, y in points])
    ys = [math.log10(y) if log else y for _, y in points]
    xs = [x for x, _ in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    px = lambda x: LEFT + (x - x0) / (x1 - x0) * (WIDTH - LEFT - RIGHT)
    py = lambda y: HEIGHT - BOTTOM - (y - y0) / (y1 - y0) * (HEIGHT - TOP - BOTTOM)
    frame = (f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" '
             'class="plot-frame"/>')
    parts = [head, frame]
    for tick in nice_ticks(y0, y1):
        text = _label(10 ** tick) if log else _label(tick)
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" class="plot-grid"/>'
                     f'<text x="{LEFT - 4}" y="{py(tick) + 4:.1f}" class="plot-tick" text-anchor="end">{text}</text>')
    for tick in nice_ticks(x0, x1):
        parts.append(f'<text x="{px(tick):.1f}" y="{HEIGHT - BOTTOM + 14}" class="plot-tick" '
                     f'text-anchor="middle">{_label(tick)}</text>')
    parts.append(f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 3}" class="plot-tick" text-anchor="end">{escape(x_label)}'
                 f'{" (log y)" if log else ""}</text>')
    path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
    parts.append(f'<polyline points="{path}" class="plot-line"/>')
    if len(xs) == 1:
        parts.append(f'<circle cx="{px(xs[0]):.1f}" cy="{py(ys[0]):.1f}" r="3" class="plot-dot"/>')
    return "".join(parts) + "</svg>"


def strip_plot(title: str, groups: dict[str, list[tuple[str, float]]]) -> str:
    """A metric per variant as an ``<svg>``: one column per group, a dot per run (coloured by its
    ``(series, value)`` series, e.g. the prompt) and a bar at the group's mean."""
    values = [v for members in groups.values() for _, v in members if math.isfinite(v)]
    width = max(WIDTH, LEFT + RIGHT + 90 * len(groups))
    head = (f'<svg class="plot" role="img" viewBox="0 0 {width} {HEIGHT + 20}" width="{width}" height="{HEIGHT + 20}" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>'
            f'<text x="{LEFT}" y="15" class="plot-title">{escape(title)}</text>')
    if not values:
        return head + f'<text x="{LEFT}" y="{HEIGHT // 2}" class="plot-empty">no values</text></svg>'
    y0, y1 = min(values), max(values)
    pad = (y1 - y0) * 0.1 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    bottom = HEIGHT - BOTTOM
    py = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - TOP)
    series = sorted({s for members in groups.values() for s, _ in members})
    colour = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(series)}
    column = (width - LEFT - RIGHT) / max(1, len(groups))
    parts = [head, f'<rect x="{LEFT}" y="{TOP}" width="{width - LEFT - RIGHT}" height="{bottom - TOP}" class="plot-frame"/>']
    for tick in nice_ticks(y0, y1):
        parts.append(f'<line x1="{LEFT}" x2="{width - RIGHT}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" class="plot-grid"/>'
                     f'<text x="{LEFT - 4}" y="{py(tick) + 4:.1f}" class="plot-tick" text-anchor="end">{_label(tick)}</text>')
    for i, (name, members) in enumerate(groups.items()):
        cx = LEFT + column * (i + 0.5)
        parts.append(f'<text x="{cx:.1f}" y="{bottom + 14}" class="plot-tick" text-anchor="middle">{escape(name)}</text>')
        finite = [(s, v) for s, v in members if math.isfinite(v)]
        for j, (s, v) in enumerate(finite):
            dx = (j - (len(finite) - 1) / 2) * 6
            parts.append(f'<circle cx="{cx + dx:.1f}" cy="{py(v):.1f}" r="4" fill="{colour[s]}" class="plot-dot">'
                         f'<title>{escape(s)}: {v:.4g}</title></circle>')
        if finite:
            mean = sum(v for _, v in finite) / len(finite)
            parts.append(f'<line x1="{cx - 18:.1f}" x2="{cx + 18:.1f}" y1="{py(mean):.1f}" y2="{py(mean):.1f}" '
                         f'class="plot-mean"><title>mean {mean:.4g}</title></line>')
    for k, s in enumerate(series):
        parts.append(f'<text x="{LEFT + 150 * k}" y="{HEIGHT + 16}" class="plot-tick">'  # the dot in the series' colour
                     f'<tspan fill="{colour[s]}">\u25cf</tspan> {escape(s[:28])}</text>')
    return "".join(parts) + "</svg>"
