"""`snakemake --report report.html`, what users send to colleagues, opened in a real browser:
headless Chromium (Debian's package) driven by Playwright. The report is a JavaScript app whose
results appear only when clicked, so the test clicks through it as a reader would and checks what
is on screen: the paper-style tables, the image grid and the training curves.

Skipped without Chromium or Playwright, unless SRPO_REQUIRE_BROWSER=1 (CI), where that fails.
"""

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageStat
from support import REPO, snakemake

pytestmark = pytest.mark.workflow
CHROMIUM = shutil.which("chromium")
# As root and offline: no sandbox, and none of Chromium's background calls to Google's hosts.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = REPO / "docs" / "report-tables.png"
"""Committed; refreshed by SRPO_UPDATE_SCREENSHOT=1 (README, "Quick start")."""


@pytest.fixture(scope="module")
def browser():
    reason = None
    if CHROMIUM is None:
        reason = "no chromium (bash tests/workflow/install-browser.sh)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "no playwright (envs/test-reference.lock.txt)"
    if reason:
        if os.environ.get("SRPO_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def html_report(finished, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("html") / "report.html"
    result = snakemake(finished, "--report", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    return path


def show(page, category: str, name: str) -> None:
    """Open a result as a reader does: its category in the menu, then its eye button."""
    page.get_by_text(category, exact=True).click()
    page.locator("tr", has_text=name).locator("a[iconname=eye]").click()


def not_blank(path: Path) -> bool:
    """More than one colour, with real contrast (a white or half-rendered page has none)."""
    grey = Image.open(path).convert("L")
    low, high = grey.getextrema()
    return high - low > 100 and ImageStat.Stat(grey).stddev[0] > 10


def test_report_shows_tables_grid_and_curves(browser, html_report, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(html_report.as_uri())
    assert "SRPO" in page.inner_text("body")  # the workflow description on the home view
    # Tables: the HTML tables render inline in a frame, every metric in the paper's order.
    show(page, "Tables", "tables.html")
    frame = page.frame_locator("iframe")
    header = frame.locator("table").first.locator("th").all_inner_texts()
    assert header == ["model", "HPSv2.1", "HPSv3", "Aesthetic", "PickScore"]
    rows = frame.locator("table").first.locator("tbody tr th, tbody tr td:first-child")
    assert rows.all_inner_texts() == ["tiny FLUX (random init)", "tiny SRPO"]
    assert frame.locator("table").count() == 5  # all prompts + one per metric by HPD style
    assert "Tiny random-initialised models" in frame.locator("body").inner_text()
    tables_png = tmp_path / "tables.png"
    page.screenshot(path=str(tables_png))
    assert not_blank(tables_png)
    if os.environ.get("SRPO_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(tables_png, SCREENSHOT)
    # Figures: the image grid and the training curves are decoded images, not broken links.
    for figure in ("image_grid.png", "training_curves.png"):
        page.get_by_role("link", name="Results").first.click()
        show(page, "Figures", figure)
        image = page.locator("img[src^='data:image/png']")
        image.wait_for()
        width = image.evaluate("img => img.complete ? img.naturalWidth : 0")
        assert width > 200, figure
        shot = tmp_path / figure
        page.screenshot(path=str(shot))
        assert not_blank(shot), figure
    page.close()
