"""The HTML of one run's report page, and the parts every report page shares (head, styles, script).

Every page is one file that needs nothing but the media beside it: styles, script, plots (SVG) and
the model viewer are inline, the mesh is a ``data:`` URL (a ``file://`` page may not ``fetch()``
a file, nor load a module script from one). Pure functions: plain data in, a string out.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from html import escape
from importlib import resources
from pathlib import Path

from .. import __version__
from .collect import VIDEO_MODES, RunData
from .plots import line_plot, metric_series

EVAL_LABELS = {"psnr": "PSNR (dB)", "psnr_masked": "masked PSNR (dB)", "silhouette_iou": "silhouette IoU"}


@dataclass
class RunMedia:
    """Where a run's media are, relative to its page: ``videos`` {mode: href}, ``previews``
    [(step, href)], ``mesh_href`` (the GLB to download) and ``mesh_data_url`` (what the viewer loads)."""

    videos: dict[str, str] = field(default_factory=dict)
    previews: list[tuple[int, str]] = field(default_factory=list)
    mesh_href: str | None = None
    mesh_data_url: str | None = None


def _static(name: str) -> str:
    return (resources.files("nfsd_nerf.report") / "static" / name).read_text(encoding="utf-8")


def viewer_script() -> str:
    """The vendored ``<model-viewer>`` bundle, checked safe to inline in a ``<script>`` element."""
    text = (resources.files("nfsd_nerf.report") / "vendor" / "model-viewer.min.js").read_text(encoding="utf-8")
    lowered = text.lower()
    if "</script" in lowered or "<script" in lowered:  # would end (or escape) the inline element early
        raise RuntimeError("the vendored model-viewer.min.js cannot be inlined: it contains '<script'")
    return text


def document(title: str, body: str, *, with_viewer: bool) -> str:
    """A complete page: inline styles, the body, the page script and (if asked) the viewer's bundle.
    The CSP forbids every request but media from the page's own folder and ``data:``/``blob:`` URLs."""
    csp = ("default-src 'none'; script-src 'unsafe-inline' 'wasm-unsafe-eval' blob:; style-src 'unsafe-inline'; "
           "img-src 'self' data: blob:; media-src 'self' data: blob:; connect-src data: blob:; "
           "worker-src blob:")
    viewer = f'<script type="module">{viewer_script()}</script>\n' if with_viewer else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<link rel="icon" href="data:,">\n<title>{escape(title)}</title>\n<style>\n{_static("report.css")}</style>\n'
        f"</head>\n<body>\n{body}\n"
        f"<footer>made by nfsd-nerf {escape(__version__)} (<code>nfsd-nerf report</code>); opens from the file system "
        "with no network.</footer>\n"
        f"<script>\n{_static('report.js')}</script>\n{viewer}</body>\n</html>\n"
    )


def command(*words: str | Path) -> str:
    """A shell command as ``<code>``, paths quoted as a shell needs them."""
    return f"<code>{escape(' '.join(shlex.quote(str(w)) for w in words))}</code>"


def _number(value, fmt: str, unit: str = "") -> str:
    return f"{value:{fmt}}{unit}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def facts(run: RunData) -> list[tuple[str, str]]:
    """The run's key facts as (label, HTML) rows, from the summary or, in a partial run, the config."""
    s, cfg = run.summary or {}, run.config
    guidance, train = cfg.get("guidance") or {}, cfg.get("train") or {}
    model = s.get("model") if isinstance(s.get("model"), dict) else {}
    model_id = model.get("id") or guidance.get("model") or ""
    revision = model.get("revision") or guidance.get("revision") or "(default)"
    method = str(s.get("guidance") or guidance.get("method") or "")
    perp = s.get("perp_neg", guidance.get("perp_neg"))
    steps = f"{run.step if run.step is not None else 0}"
    if run.planned_steps is not None:
        steps += f" of {run.planned_steps}"
    if s.get("skipped_steps"):
        steps += f" ({s['skipped_steps']} skipped)"
    rows = [
        ("prompt", escape(run.prompt)),
        ("rule", escape(method.upper() + (" + Perp-Neg" if perp else ""))),
        ("scale", escape(_number(s.get("scale", guidance.get("scale")), "g"))),
        ("negative prompt", escape(str(s.get("negative_prompt", guidance.get("negative_prompt")) or "(none)"))),
        ("model", f"{escape(str(model_id))} @ <code>{escape(str(revision))}</code>"
                  + (f" ({escape(str(model['dtype']))})" if model.get("dtype") else "")),
        ("seed", escape(str(train.get("seed", "")))),
        ("steps", escape(steps)),
        ("wall time", escape(_number(s.get("wall_time_s"), ".1f", " s"))),
        ("time per step", escape(_number(s.get("seconds_per_step"), ".3f", " s"))),
        ("device", escape(str(s.get("device") or train.get("device") or ""))),
        ("backends", escape(", ".join(f"{k.replace('_', ' ')}: {s[k]}" for k in ("hash_grid_backend", "ray_marcher")
                                      if s.get(k)))),
    ]
    versions = s.get("versions")
    if isinstance(versions, dict) and versions:
        rows.append(("versions", escape(", ".join(f"{k} {v}" for k, v in versions.items()))))
    for name, value in run.evaluation.items():
        rows.append((EVAL_LABELS.get(name, name), f"<strong>{value:.4g}</strong>"))
    rows.append(("folder", f"<code>{escape(str(run.folder))}</code>"))
    return [(label, value) for label, value in rows if value]


def facts_table(run: RunData) -> str:
    return ('<table class="facts">' + "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in facts(run))
            + "</table>")


def partial_notice(run: RunData) -> str:
    """The line a run without ``summary.json`` gets: what it has, and how it finishes."""
    if not run.partial:
        return ""
    if run.state == "corrupt":
        return f'<p class="notice">{escape(run.note)}</p>'
    upto = f" up to step {run.step}" if run.step is not None else ""
    return (f'<p class="notice partial"><strong>Partial report:</strong> this run has no <code>summary.json</code> yet '
            f"(still training, or interrupted); it shows what was logged{escape(upto)}. An interrupted run "
            f"continues with {command('nfsd-nerf', 'train', '--resume', run.folder)}.</p>")


def missing_line(what: str, it: str, run: RunData, *make: object) -> str:
    """'No <what> yet: <the command that makes it> makes <it> (or report --make-missing).'"""
    return (f'<p class="missing">No {what} yet: {command("nfsd-nerf", *make)} makes {it} '
            f"(or {command('nfsd-nerf', 'report', run.folder, '--make-missing')}).</p>")


def videos_section(run: RunData, media: RunMedia) -> str:
    if not media.videos:
        return missing_line("turntable videos", "them", run, "render-video", run.folder)
    figures = "".join(
        f'<figure><video src="{escape(href)}" autoplay muted loop playsinline preload="auto"></video>'
        f"<figcaption>{escape(mode)}</figcaption></figure>"
        for mode, href in sorted(media.videos.items(), key=lambda kv: VIDEO_MODES.index(kv[0])))
    missing = [m for m in VIDEO_MODES if m not in media.videos]
    note = (f'<p class="missing">No {", ".join(missing)} turntable: '
            f'{command("nfsd-nerf", "render-video", run.folder, "--modes", ",".join(missing))}</p>') if missing else ""
    return (f'<div data-sync><div class="controls"><button class="playpause" type="button">pause</button>'
            f'<span class="subtitle">rgb, normal and depth turn in sync</span></div>'
            f'<div class="videos">{figures}</div></div>{note}')


def viewer_section(run: RunData, media: RunMedia) -> str:
    if not media.mesh_data_url:
        return missing_line("exported mesh", "it", run, "export", run.folder, "--format", "glb")
    return (f'<model-viewer src="{media.mesh_data_url}" alt="{escape(run.prompt)}: the exported mesh" '
            'camera-controls auto-rotate shadow-intensity="0.6" exposure="1.1" interaction-prompt="none" '
            'data-status="viewer-status"><div slot="progress-bar"></div></model-viewer>'  # no bar left over the model
            f'<div class="viewer-status"><span id="viewer-status">loading the mesh...</span> '
            f'(<a href="{escape(media.mesh_href or "")}" download>mesh.glb</a>)</div>')


def previews_section(media: RunMedia) -> str:
    if not media.previews:
        return '<p class="missing">No previews were saved (<code>train.preview_every</code> was 0).</p>'
    last = len(media.previews) - 1
    selected = ' class="selected"'
    thumbs = "".join(f'<img src="{escape(href)}" data-step="{step}" alt="step {step}" title="step {step}"'
                     f'{selected if i == last else ""}>' for i, (step, href) in enumerate(media.previews))
    step, href = media.previews[-1]
    return (f'<div class="previews"><p class="subtitle">rgb | normals | opacity of one view; '
            f'<span class="preview-step">step {step}</span></p>'
            f'<img class="current" src="{escape(href)}" alt="preview">'
            f'<input type="range" min="0" max="{last}" value="{last}" aria-label="training step">'
            f'<div class="strip">{thumbs}</div></div>')


def plots_section(run: RunData) -> str:
    series = metric_series(run.metrics)
    if not series:
        return '<p class="missing">Nothing logged yet (<code>metrics.jsonl</code> is empty or missing).</p>'
    return '<div class="plots">' + "".join(line_plot(key, points) for key, points in series.items()) + "</div>"


def config_section(run: RunData) -> str:
    if not run.config_text:
        return '<p class="missing">No <code>config.yaml</code> in this run folder.</p>'
    return f'<pre class="config">{escape(run.config_text)}</pre>'


def run_page(run: RunData, media: RunMedia, *, back: str | None = None) -> str:
    """One run's report: facts and metrics, the 3D model, turntables, previews, curves, config.
    ``back``: href of the comparison page this one belongs to."""
    link = f'<p><a href="{escape(back)}">&larr; all runs</a></p>' if back else ""
    body = (
        f"{link}<h1>{escape(run.prompt)}</h1>"
        f'<p class="subtitle">{escape(run.label)}</p>{partial_notice(run)}'
        f'<div class="top"><section><h2>Run</h2>{facts_table(run)}</section>'
        f"<section><h2>Exported mesh</h2>{viewer_section(run, media)}</section></div>"
        f"<h2>Turntables</h2>{videos_section(run, media)}"
        f"<h2>Previews over training</h2>{previews_section(media)}"
        f"<h2>Training curves</h2>{plots_section(run)}"
        f"<h2>Resolved config</h2>{config_section(run)}"
    )
    return document(f"{run.prompt} - nfsd-nerf report", body, with_viewer=media.mesh_data_url is not None)
