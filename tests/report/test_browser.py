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
    assert sections == [report.anchor(model) for model in report.by_verdict(run.models)]
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


LAYOUT = """() => {
  const page = document.scrollingElement;
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.right]; };
  return {width: innerWidth, scrollWidth: page.scrollWidth, header: box(document.querySelector('.page-header')),
          keys: [...document.querySelectorAll('table.overview thead th.key')].map(th => [th.textContent, ...box(th)])};
}"""


def layout_at(page_path: Path, width: int, action=None):
    """Open a page at `width` x 844 CSS pixels; return its layout (LAYOUT) and `action(page)`'s result."""
    def look(page):
        page.set_viewport_size({"width": width, "height": 844})
        return page.evaluate(LAYOUT), action(page) if action else None

    (layout, extra), errors, failed = open_page(page_path, look)
    assert not errors and not failed
    return layout, extra


def sticky_model_cell(page) -> dict:
    """Scroll the overview table to its right end; return where its box and first model cell then sit."""
    return page.evaluate("""() => {
      const scroller = document.querySelector('#overview .scroll');
      scroller.scrollLeft = scroller.scrollWidth;
      const cell = scroller.querySelector('tbody th[scope=row]').getBoundingClientRect();
      return {scrolled: scroller.scrollLeft, box: scroller.getBoundingClientRect().left, cell: cell.left,
              right: cell.right, text: scroller.querySelector('tbody th[scope=row]').textContent};
    }""")


def verdicts_shown(page) -> dict:
    """Read the verdict badges of the table of contents, the section headings and the overview, in page order."""
    read = "els => els.map(e => e.textContent.trim())"
    return {where: page.eval_on_selector_all(f"{where} .verdict", read)
            for where in ("nav.toc", "section.model h2", "table.overview tbody")}


def test_key_columns_and_verdicts_are_visible_at_1280(tmp_path):
    """At 1280 px: no page scroll, the key overview columns inside the viewport, verdicts everywhere, failures first."""
    run = example_run(tmp_path)
    layout, shown = layout_at(report.render(run), 1280, verdicts_shown)
    assert layout["scrollWidth"] <= layout["width"]
    assert [key[0] for key in layout["keys"]] == ["model", "input", "verdict", "architecture RF", "stride",
                                                  "global context"]
    assert all(left >= 0 and right <= layout["width"] for _name, left, right in layout["keys"])
    assert layout["header"] == [0, layout["width"]]
    expected = [report.verdict(model).text for model in report.by_verdict(run.models)]
    assert expected[:2] == ["job error", "fail: max_edge_fraction"]
    assert shown == {"nav.toc": expected, "section.model h2": expected, "table.overview tbody": expected}


def test_no_page_scroll_at_390_and_the_model_column_sticks(tmp_path):
    """At 390 px the report and the diff page fit the width (wide tables scroll in their box); the model
    column stays put when the overview table scrolls."""
    run = example_run(tmp_path)
    layout, sticky = layout_at(report.render(run), 390, sticky_model_cell)
    assert layout["scrollWidth"] <= layout["width"] and layout["header"] == [0, layout["width"]]
    assert sticky["scrolled"] > 0 and abs(sticky["cell"] - sticky["box"]) <= 1 and sticky["right"] <= 390
    assert sticky["text"] == report.by_verdict(run.models)[0].name
    a, b = edited_runs(tmp_path)
    assert invoke("diff", a, b, "--html", tmp_path / "diff.html").exit_code == 0
    layout, _ = layout_at(tmp_path / "diff.html", 390)
    assert layout["scrollWidth"] <= layout["width"] and layout["header"] == [0, layout["width"]]
