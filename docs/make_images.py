"""Render the pictures of the README from a real run: `make docs` calls this.

Sweeps configs/examples.toml into a temporary run folder with the installed `rfreport`, opens its
report in Debian's headless Chromium (playwright, no network) and writes docs/img/report.png (the
top of the page: header, contents and overview with every verdict) and docs/img/model.png (the
first model's section: findings, audit, per-layer table and maps).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "img"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def run_examples(out: Path) -> Path:
    """Sweep the example config into `out` and return its index.html."""
    rfreport = str(Path(sys.executable).with_name("rfreport"))
    subprocess.run([rfreport, "run", str(ROOT / "configs" / "examples.toml"), "--out", str(out), "-q"], check=False)
    page = out / "index.html"
    if not page.is_file():
        raise SystemExit(f"make_images: {page} was not written")
    return page


def screenshots(page: Path) -> None:
    """Write the report's top and its first model section as PNG files."""
    from playwright.sync_api import sync_playwright

    IMAGES.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        view = browser.new_page(viewport={"width": 1400, "height": 900})
        view.goto(page.as_uri(), wait_until="load")
        view.screenshot(path=str(IMAGES / "report.png"))
        first = view.locator("section.model").first
        first.locator("details").first.evaluate("d => d.open = true")
        first.screenshot(path=str(IMAGES / "model.png"))
        browser.close()


def main() -> None:
    """Sweep the examples and write the pictures."""
    with tempfile.TemporaryDirectory() as tmp:
        screenshots(run_examples(Path(tmp) / "run"))
    print(f"wrote {IMAGES / 'report.png'} and {IMAGES / 'model.png'}")


if __name__ == "__main__":
    main()
