"""The rendered report opened in headless Chromium: no errors, no failed requests, every image loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rfreport.report import render as report
from tests.support import EVIL, edited_runs, example_run, invoke

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
OUTPUT = Path(__file__).resolve().parents[2] / "test-output" / "browser"

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium "
                                 "(run `make browser`)")]


def test_report_opens_cleanly_in_chromium(tmp_path):
    """Open the example report: no console errors or failed requests, all images decode, all sections exist."""
    run = example_run(tmp_path)
    screenshot = tmp_path / "report.png"

    def look(page) -> tuple:
        page.screenshot(path=str(screenshot), full_page=True)
        return (page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])"),
                page.locator("table.overview tbody tr").count(),
                page.eval_on_selector_all("section.model", "s => s.map(e => e.id)"),
                page.locator("section.model h2").all_inner_texts())

    (images, overview_rows, sections, headings), errors, failed = open_page(report.render(run), look)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, OUTPUT / "report.png")
    assert not errors and not failed
    assert images and all(complete and width > 0 for complete, width in images)
    assert overview_rows == len(run.models)
    assert sections == [report.anchor(model) for model in run.models]
    assert any(heading.startswith(EVIL) for heading in headings)


def open_page(page_path: Path, action):
    """Open a page in headless Chromium, run `action(page)`; return its result, console errors, failed requests."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    failed: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("requestfailed", lambda request: failed.append(request.url))
        page.goto(page_path.as_uri(), wait_until="load")
        try:
            result = action(page)
        finally:
            browser.close()
    return result, errors, failed


def drawn_box(page) -> dict:
    """Read the explorer's drawn RF box of the first model back from the page."""
    return page.locator("rect.rf-box").first.evaluate(
        "r => ({pos: r.getAttribute('data-pos'), lo: r.getAttribute('data-lo'), hi: r.getAttribute('data-hi'),"
        " x: +r.getAttribute('x'), y: +r.getAttribute('y'), w: +r.getAttribute('width'),"
        " h: +r.getAttribute('height'), visible: r.getAttribute('visibility'),"
        " layer: r.parentNode.querySelector('image.rf-layer').getAttribute('visibility')})")


def expected(frame, pos: tuple[int, int]) -> dict:
    """Return the box the explorer must draw for an output position, from the frame."""
    row = frame[(frame["pos_h"] == pos[0]) & (frame["pos_w"] == pos[1])].iloc[0]
    lo, hi = [int(row["h_lo"]), int(row["w_lo"])], [int(row["h_hi"]), int(row["w_hi"])]
    return {"pos": f"{pos[0]},{pos[1]}", "lo": f"{lo[0]},{lo[1]}", "hi": f"{hi[0]},{hi[1]}", "x": lo[1], "y": lo[0],
            "w": hi[1] - lo[1] + 1, "h": hi[0] - lo[0] + 1, "visible": "visible"}


def test_pointing_at_an_output_cell_draws_its_exact_rf(tmp_path):
    """Hover a cell, then move with the keyboard and pin with Enter: the drawn box is the frame's box each time."""
    run = example_run(tmp_path)
    model = run.models[0]
    frame = model.frames["positions"]
    rows, cols = model.entry["output_shape"][2:]
    corner = next(iter(sorted(model.arrays["masks"])))

    def act(page):
        grid = page.locator(f"#{report.anchor(model)} .grid-output .panel[tabindex]").first
        grid.scroll_into_view_if_needed()
        box = grid.bounding_box()
        seen = {}
        for pos in [(2, 5), corner]:
            page.mouse.move(box["x"] + (pos[1] + 0.5) * box["width"] / cols,
                            box["y"] + (pos[0] + 0.5) * box["height"] / rows)
            seen[pos] = drawn_box(page)
        seen["info"] = page.locator(f"#{report.anchor(model)} output.rf-info").inner_text()
        page.mouse.move(0, 0)
        grid.focus()
        for key in ("ArrowUp", "ArrowLeft", "Enter"):
            page.keyboard.press(key)
        seen["keyboard"] = drawn_box(page)
        section = page.locator(f"#{report.anchor(model)}")
        section.locator("input.rf-erf-toggle").check()
        page.mouse.move(box["x"] + (corner[1] + 0.5) * box["width"] / cols,
                        box["y"] + (corner[0] + 0.5) * box["height"] / rows)
        key = ",".join(map(str, corner))
        seen["erf"] = (section.locator("image.rf-layer").get_attribute("href"),
                       section.locator(f'figure[data-position="{key}"] img').get_attribute("src"))
        return seen

    seen, errors, failed = open_page(report.render(run), act)
    assert not errors and not failed
    assert {k: v for k, v in seen[(2, 5)].items() if k != "layer"} == expected(frame, (2, 5))
    assert seen[(2, 5)]["layer"] == "hidden" and seen[corner]["layer"] == "visible"   # the corner's mask is kept
    assert {k: v for k, v in seen[corner].items() if k != "layer"} == expected(frame, corner)
    start = (rows // 2 - 1, cols // 2 - 1)
    assert {k: v for k, v in seen["keyboard"].items() if k != "layer"} == expected(frame, start)
    row = frame[(frame["pos_h"] == corner[0]) & (frame["pos_w"] == corner[1])].iloc[0]
    assert f"size {int(row['h_size'])} × {int(row['w_size'])}" in seen["info"] and "support mask shown" in seen["info"]
    layer, erf_map = seen["erf"]
    assert layer == erf_map and layer.startswith("data:image/png")   # the toggle shows the corner's ERF map


def test_diff_page_opens_cleanly_in_chromium(tmp_path):
    """The diff page of two runs: no console errors or failed requests, every image decodes."""
    a, b = edited_runs(tmp_path)
    assert invoke("diff", a, b, "--html", tmp_path / "diff.html").exit_code == 0
    images, errors, failed = open_page(
        tmp_path / "diff.html", lambda page: page.eval_on_selector_all(
            "img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])"))
    assert not errors and not failed
    assert images and all(complete and width > 0 for complete, width in images)
