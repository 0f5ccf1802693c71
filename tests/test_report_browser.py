"""The report page in a real browser: Debian's chromium, headless, driven over the DevTools protocol
by Playwright for Python (no browser is downloaded), the page opened from ``file://`` with no file
access flag. It trains a tiny run on the built-in prior, makes its mesh and turntables with
``report --make-missing``, then checks that the 3D model loads, that every video decodes frames,
that nothing is logged as an error and that no request leaves the page's files.

Skipped without chromium or playwright, except where ``NFSD_REQUIRE_BROWSER=1`` (CI): there it fails.
``NFSD_REPORT_SCREENSHOT=PATH`` also writes the run page's screenshot to PATH (the README's figure);
``python tests/test_report_browser.py REPORT/index.html OUT.png`` screenshots any report.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nfsd_nerf.cli import app

CHROMIUM = os.environ.get("NFSD_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--disable-quic", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
LOCAL = ("file:", "data:", "blob:")
ALL_VIDEOS_DECODED = ("Array.from(document.querySelectorAll('video'))"
                      ".every(v => v.readyState >= 2 && v.videoWidth > 0)")


def _browser_or_skip():
    """Playwright's sync API, or a skip (a failure under NFSD_REQUIRE_BROWSER=1)."""
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem, sync_playwright = "playwright is not installed (pip install -e '.[dev]')", None
    if problem is None and not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        problem = f"no chromium at {CHROMIUM} (apt-get install chromium)"
    if problem:
        if os.environ.get("NFSD_REQUIRE_BROWSER") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    return sync_playwright


class PageCheck:
    """One browser; ``open`` loads a page from file:// and records console errors and requests."""

    def __init__(self, playwright, user_data: Path):
        self.context = playwright.chromium.launch_persistent_context(
            str(user_data), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 1000})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.context.on("request", lambda request: self.requests.append(request.url))

    def open(self, page_path: Path):
        page = self.context.new_page()
        page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.goto(page_path.resolve().as_uri())
        return page

    def close(self):
        self.context.close()


def poll(page, expression: str, timeout_s: float, what: str):
    """Evaluate ``expression`` until it is truthy. Not ``wait_for_function``: that evaluates a string
    inside the page, which the page's Content-Security-Policy (no eval) rightly refuses."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        page.wait_for_timeout(100)


def wait_until_shown(page, *, model: bool) -> dict:
    """Wait for the model (its ``load`` event) and for every video's frames; returns what the page reports."""
    if model:
        poll(page, "() => document.querySelector('model-viewer').getAttribute('data-loaded') === 'true' || "
             "document.querySelector('model-viewer').getAttribute('data-error') === 'true'", 45, "the 3D model")
    poll(page, f"() => {ALL_VIDEOS_DECODED}", 30, "every video's frames")
    return page.evaluate("""() => ({
        videos: Array.from(document.querySelectorAll('video')).map(v => [v.readyState, v.videoWidth, v.paused]),
        loaded: document.querySelector('model-viewer')?.loaded ?? null,
        error: document.querySelector('model-viewer')?.getAttribute('data-error') ?? null,
    })""")


@pytest.mark.browser
@pytest.mark.slow
def test_report_pages_work_from_file_urls_with_no_network(tmp_path):
    sync_playwright = _browser_or_skip()
    runner = CliRunner()
    result = runner.invoke(app, ["train", "a red cube", "--model", "builtin", "--steps", "20", "--out", str(tmp_path),
                                 "--set", "train.preview_every=5", "--set", "train.log_every=2"])
    assert result.exit_code == 0, result.output
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    result = runner.invoke(app, ["report", str(run), "--make-missing", "--size", "64", "--frames", "8",
                                 "--resolution", "48"])
    assert result.exit_code == 0, result.output
    other = shutil.copytree(run, tmp_path / "copy", ignore=shutil.ignore_patterns("report", ".lock"))
    result = runner.invoke(app, ["report", str(run), str(other), "--out", str(tmp_path / "compare")])
    assert result.exit_code == 0, result.output

    with sync_playwright() as playwright:
        browser = PageCheck(playwright, tmp_path / "profile")
        try:
            page = browser.open(run / "report" / "index.html")
            state = wait_until_shown(page, model=True)
            assert state["loaded"] is True and state["error"] is None
            assert len(state["videos"]) == 3 and all(w == 64 for _, w, _ in state["videos"])
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            comparison = browser.open(tmp_path / "compare" / "index.html")
            state = wait_until_shown(comparison, model=False)
            assert len(state["videos"]) == 2
        finally:
            browser.close()

    assert browser.errors == []
    assert [url for url in browser.requests if not url.startswith(LOCAL)] == []
    assert any(url.startswith("file:") and url.endswith(".mp4") for url in browser.requests)
    if os.environ.get("NFSD_REPORT_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["NFSD_REPORT_SCREENSHOT"])


def screenshot(page_path: Path, png: Path, width: int = 1280, height: int = 1000) -> None:
    """Screenshot a report page once its model and videos are shown (for the README's figure)."""
    from playwright.sync_api import sync_playwright

    import tempfile

    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        browser = PageCheck(playwright, Path(profile))
        try:
            page = browser.open(page_path)
            page.set_viewport_size({"width": width, "height": height})
            wait_until_shown(page, model=page.query_selector("model-viewer") is not None)
            page.wait_for_timeout(500)
            page.screenshot(path=str(png), full_page=False)
        finally:
            browser.close()
    if browser.errors:
        raise SystemExit("\n".join(browser.errors))


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]))
