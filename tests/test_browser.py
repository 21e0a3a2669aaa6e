"""The rendered report opened in headless Chromium: no errors, no failed requests, every image loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rfreport import report
from tests.test_report import EVIL, example_run

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
OUTPUT = Path(__file__).resolve().parent.parent / "test-output" / "browser"

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium "
                                 "(run `make browser`)")]


def test_report_opens_cleanly_in_chromium(tmp_path):
    """Open the example report: no console errors or failed requests, all images decode, all sections exist."""
    from playwright.sync_api import sync_playwright

    run = example_run(tmp_path)
    page_path = report.render(run)
    errors: list[str] = []
    failed: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("requestfailed", lambda request: failed.append(request.url))
        page.goto(page_path.as_uri(), wait_until="load")
        images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
        overview_rows = page.locator("table.overview tbody tr").count()
        sections = page.eval_on_selector_all("section.model", "s => s.map(e => e.id)")
        headings = page.locator("section.model h2").all_inner_texts()
        screenshot = tmp_path / "report.png"
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, OUTPUT / "report.png")
    assert not errors and not failed
    assert images and all(complete and width > 0 for complete, width in images)
    assert overview_rows == len(run.models)
    assert sections == [report.anchor(model) for model in run.models]
    assert any(heading.startswith(EVIL) for heading in headings)
