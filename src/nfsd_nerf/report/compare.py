"""The HTML of the page that compares several runs (a batch, or run folders given together).

Three views of the same runs: a grid of turntables (rows = prompts, columns = variants and seeds)
that turn in sync, the results table (sortable by any column) and one plot per evaluation metric
with the variants side by side. Each run's own page is linked from its grid cell and table row.
"""

from __future__ import annotations

import math
from html import escape

from .collect import VIDEO_MODES, RunData
from .page import EVAL_LABELS, RunMedia, command, document
from .plots import strip_plot


def columns(runs: list[RunData]) -> list[tuple[str, int | None]]:
    """The grid's columns: (variant, seed) in the runs' order (a plan's order for a batch)."""
    seen: list[tuple[str, int | None]] = []
    for run in runs:
        if (run.variant, run.seed) not in seen:
            seen.append((run.variant, run.seed))
    return seen


def prompts(runs: list[RunData]) -> list[str]:
    return list(dict.fromkeys(run.prompt for run in runs))


def _column_title(variant: str, seed: int | None) -> str:
    return escape(variant) + (f"<br><small>seed {seed}</small>" if seed is not None else "")


def grid_cell(run: RunData | None, media: RunMedia | None, page: str | None) -> str:
    if run is None:
        return '<td><div class="cell-empty">not in this comparison</div></td>'
    link = f'<a href="{escape(page)}">{escape(run.state)}</a>' if page else escape(run.state)
    if media is not None and "rgb" in media.videos:
        sources = "".join(f' data-{m}="{escape(media.videos[m])}"' for m in VIDEO_MODES if m in media.videos)
        return (f'<td><video src="{escape(media.videos["rgb"])}"{sources} autoplay muted loop playsinline '
                f'preload="auto" title="{escape(run.label)}"></video><small>{link}</small></td>')
    why = "no turntable yet" if run.state in ("done", "partial") else run.state
    return (f'<td><div class="cell-empty">{escape(why)}<br>{command("nfsd-nerf", "render-video", run.folder)}</div>'
            f"<small>{link}</small></td>")


def grid_section(runs: list[RunData], media: dict[str, RunMedia], pages: dict[str, str]) -> str:
    """Rows = prompts, columns = (variant, seed); ``media`` and ``pages`` are keyed by run label."""
    cols = columns(runs)
    by_cell = {(run.prompt, run.variant, run.seed): run for run in runs}
    head = "<th></th>" + "".join(f"<th>{_column_title(v, s)}</th>" for v, s in cols)
    rows = []
    for prompt in prompts(runs):
        cells = []
        for variant, seed in cols:
            run = by_cell.get((prompt, variant, seed))
            cells.append(grid_cell(run, media.get(run.label) if run else None, pages.get(run.label) if run else None))
        rows.append(f'<tr><th class="prompt">{escape(prompt)}</th>{"".join(cells)}</tr>')
    options = "".join(f'<option value="{m}">{m}</option>' for m in VIDEO_MODES)
    return (f'<div data-sync><div class="controls"><button class="playpause" type="button">pause</button>'
            f'<label>turntable <select class="mode">{options}</select></label></div>'
            f'<div style="overflow-x:auto"><table class="grid"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div></div>')


def eval_names(runs: list[RunData]) -> list[str]:
    names: list[str] = []
    for run in runs:
        names += [n for n in run.evaluation if n not in names]
    return names


def _cell(value, fmt: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '<td class="num" data-sort=""></td>'
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="num" data-sort="{value!r}">{value:{fmt}}</td>'
    return f"<td>{escape(str(value))}</td>"


def results_section(runs: list[RunData], pages: dict[str, str]) -> str:
    """Every run as a row; a click on any header sorts by it."""
    metrics = eval_names(runs)
    headers = ["prompt", "variant", "seed", "state", "steps", "wall time (s)", "s / step", "final loss",
               *(EVAL_LABELS.get(n, n) for n in metrics), "run"]
    rows = []
    for run in runs:
        s = run.summary or {}
        page = pages.get(run.label)
        link = f'<a href="{escape(page)}">{escape(run.label)}</a>' if page else escape(run.label)
        rows.append(
            "<tr>" + f"<td>{escape(run.prompt)}</td><td>{escape(run.variant)}</td>" + _cell(run.seed, "d")
            + f'<td title="{escape(run.note)}">{escape(run.state)}</td>' + _cell(run.step, "d")
            + _cell(s.get("wall_time_s"), ".1f") + _cell(s.get("seconds_per_step"), ".3f") + _cell(run.final_loss)
            + "".join(_cell(run.evaluation.get(n)) for n in metrics) + f"<td>{link}</td></tr>")
    head = "".join(f'<th scope="col">{escape(h)}</th>' for h in headers)
    return (f'<div style="overflow-x:auto"><table class="results"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def metric_plots_section(runs: list[RunData]) -> str:
    """One strip plot per evaluation metric: a column per variant, a dot per run (colour = prompt)."""
    names = eval_names(runs)
    if not names:
        return ('<p class="missing">No evaluation metrics: runs on the built-in prior are measured against the true '
                "object when they finish; other priors have no ground truth.</p>")
    plots = []
    for name in names:
        groups: dict[str, list[tuple[str, float]]] = {}
        for run in runs:
            if name in run.evaluation:
                groups.setdefault(run.variant, []).append((run.prompt, run.evaluation[name]))
        plots.append(strip_plot(EVAL_LABELS.get(name, name), groups))
    return '<div class="plots">' + "".join(plots) + "</div>"


def comparison_page(title: str, runs: list[RunData], media: dict[str, RunMedia], pages: dict[str, str],
                    *, subtitle: str = "") -> str:
    """The page of several runs: grid, results table, metric plots. ``media`` / ``pages``: per run
    label, its media (relative to this page) and the href of its own page."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.state] = counts.get(run.state, 0) + 1
    summary = f"{len(runs)} runs: " + ", ".join(f"{n} {state}" for state, n in counts.items())
    body = (
        f"<h1>{escape(title)}</h1><p class=\"subtitle\">{escape(subtitle)} {escape(summary)}</p>"
        f"<h2>Turntables</h2>{grid_section(runs, media, pages)}"
        f"<h2>Results</h2><p class=\"subtitle\">click a column's header to sort by it</p>{results_section(runs, pages)}"
        f"<h2>Evaluation metrics per variant</h2>{metric_plots_section(runs)}"
    )
    return document(f"{title} - nfsd-nerf report", body, with_viewer=False)
