"""The report's HTML and folder (``nfsd_nerf.report``): what each page shows, that it points at
nothing outside its folder, and that an old report is replaced only by a complete new one."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nfsd_nerf.cli import app
from nfsd_nerf.errors import UserError
from nfsd_nerf.report import build_report
from nfsd_nerf.report import build as build_module
from test_report_collect import make_batch, make_run

runner = CliRunner()


class Links(HTMLParser):
    """Every element's tag and attributes, to check what a page refers to."""

    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def refs(self) -> list[str]:
        return [a[k] for _, a in self.elements for k in ("src", "href", "data-rgb", "data-normal", "data-depth")
                if a.get(k)]


def parse(page: Path) -> Links:
    links = Links()
    links.feed(page.read_text())
    return links


def assert_self_contained(page: Path) -> None:
    """Every reference is a data: URL, an in-page anchor, or a file inside the report folder that exists."""
    root = page.parent
    while not (root / build_module.MARKER).exists():
        root = root.parent
    for ref in parse(page).refs():
        if ref.startswith("data:"):
            continue
        assert not re.match(r"^[a-z]+:", ref) and not ref.startswith("/"), ref
        target = (page.parent / ref).resolve()
        assert target.is_file(), ref
        assert root.resolve() in target.parents, ref


def test_run_report_shows_facts_media_plots_and_config(tmp_path):
    run = make_run(tmp_path / "run", mesh=b"glTF-bytes-of-the-mesh", previews=(5, 10, 15, 20))
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    page = run / "report" / "index.html"
    text = page.read_text()
    for fact in ("a red cube", "NFSD", "7.5", "builtin", "refs-abc", "20 of 20", "12.5 s", "0.100 s", "cpu",
                 "hash grid backend: torch", "ray marcher: pytorch", "PSNR (dB)", "15", "silhouette IoU", "0.8"):
        assert fact in text, fact
    links = parse(page)
    viewer = [a for tag, a in links.elements if tag == "model-viewer"]
    assert len(viewer) == 1
    assert base64.b64decode(viewer[0]["src"].split(",", 1)[1]) == b"glTF-bytes-of-the-mesh"
    assert '<script type="module">' in text and "customElements.define(\"model-viewer\"" in text
    videos = [a["src"] for tag, a in links.elements if tag == "video"]
    assert videos == ["media/turntable_rgb.mp4", "media/turntable_normal.mp4", "media/turntable_depth.mp4"]
    assert (run / "report" / "media" / "turntable_rgb.mp4").read_bytes() == b"mp4-rgb"
    previews = [a["data-step"] for tag, a in links.elements if tag == "img" and "data-step" in a]
    assert previews == ["5", "10", "15", "20"]
    titles = re.findall(r'<text x="\d+" y="15" class="plot-title">([^<]+)</text>', text)
    assert titles == ["loss", "loss_guidance", "grad_norm", "param_grad_norm", "t", "seconds_per_step", "skipped_steps"]
    assert "guidance:\n  model: builtin" in text  # the resolved config, verbatim
    assert "Partial report" not in text and "No turntable" not in text
    assert_self_contained(page)


def test_missing_media_get_the_commands_that_make_them(tmp_path):
    run = make_run(tmp_path / "my run", videos=("rgb",), mesh=None)
    page = build_report([run])
    text = page.read_text()
    assert "No exported mesh yet" in text and "nfsd-nerf export &#x27;" in text and "--format glb" in text
    assert "No normal, depth turntable" in text and "--modes normal,depth" in text
    assert "--make-missing" in text
    assert "<model-viewer" not in text and 'type="module"' not in text  # no viewer without a mesh
    assert_self_contained(page)


def test_a_run_still_training_gets_a_partial_report(tmp_path):
    run = make_run(tmp_path / "run", summary=False, videos=(), mesh=None, previews=())
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    text = (run / "report" / "index.html").read_text()
    assert "Partial report" in text and "up to step 20" in text and "train --resume" in text
    assert "No previews were saved" in text and "No turntable videos yet" in text
    assert '<polyline' in text  # the curves logged so far


def test_an_old_report_is_replaced_only_by_a_complete_one(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    first = build_report([run])
    first.write_text("the first report")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build_module, "run_page", broken)
    with pytest.raises(UserError, match="No space left"):
        build_report([run])
    assert first.read_text() == "the first report"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".report")) == []  # no staging folder left
    monkeypatch.undo()
    assert "a red cube" in build_report([run]).read_text()
    assert sorted(p.name for p in run.iterdir() if "report" in p.name) == ["report"]


def test_out_never_replaces_a_folder_that_is_not_a_report(tmp_path):
    run = make_run(tmp_path / "run")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    result = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "mine")])
    assert result.exit_code == 2 and "not a report" in result.output
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    page = build_report([run], out=tmp_path / "new" / "place")
    assert page == tmp_path / "new" / "place" / "index.html" and page.is_file()
    build_report([run], out=tmp_path / "new" / "place")  # an earlier report is replaced


def test_batch_report_has_grid_sortable_table_metric_plots_and_run_pages(tmp_path):
    root = make_batch(tmp_path / "plan", seeds=(0, 1))
    result = runner.invoke(app, ["report", str(root)])
    assert result.exit_code == 0, result.output
    page = root / "report" / "index.html"
    text = page.read_text()
    grid = text.split('<table class="grid">')[1].split("</table>")[0]
    assert re.findall(r'<th class="prompt">([^<]+)</th>', grid) == ["a red cube", "a blue ball"]
    assert re.findall(r"<th>(\w+)<br><small>seed (\d)</small></th>", grid) == [
        ("nfsd", "0"), ("nfsd", "1"), ("sds", "0"), ("sds", "1")]
    assert grid.count("<video") == 8 and 'data-sync' in text
    table = text.split('<table class="results">')[1].split("</table>")[0]
    assert table.count("<tr>") == 1 + 8 and "PSNR (dB)" in table and 'data-sort="12.0"' in table
    assert text.count('class="plot-mean"') == 3 * 2  # 3 metrics x 2 variants
    assert "<model-viewer" not in text
    sub = root / "report" / "runs" / "001" / "index.html"
    assert "<model-viewer" in sub.read_text() and 'href="../../index.html"' in sub.read_text()
    assert_self_contained(page)
    assert_self_contained(sub)


def test_several_runs_compare_into_out(tmp_path):
    a = make_run(tmp_path / "a", method="nfsd", psnr=14.0)
    b = make_run(tmp_path / "b", method="sds", psnr=11.0, videos=())
    result = runner.invoke(app, ["report", str(a), str(b), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "cmp" / "index.html").read_text()
    assert "nfsd s7.5" in text and "sds s7.5" in text and "no turntable yet" in text
    assert not (a / "report").exists()
    assert_self_contained(tmp_path / "cmp" / "index.html")
