"""Real-browser test of the Dataset explorer: headless Debian Chromium driven by Playwright.

Starts ``streamlit run app.py`` on a free port, opens the explorer, loads a small synthetic dataset
by path, and checks the charts, the image grid and the leakage table. Screenshots go to
``test-artifacts/``.
"""
from __future__ import annotations


import pytest
from streamlit_server import ARTIFACTS, serve_app
from test_explorer import make_folder_dataset

pytestmark = pytest.mark.browser



@pytest.fixture(scope="module")
def explorer_server(browser, tmp_path_factory):
    """The app served by Streamlit on 127.0.0.1; yields its base URL."""
    with serve_app({}, tmp_path_factory.mktemp("logs") / "streamlit.log") as server:
        yield server["url"]


def test_explorer_shows_charts_grid_and_leakage(explorer_server, browser, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    root = make_folder_dataset(tmp_path / "xray")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    # Through the app's own navigation, as a user gets there.
    page.goto(explorer_server)
    page.get_by_test_id("stSidebarNav").get_by_text("Dataset explorer").click()
    page.get_by_role("heading", name="Dataset explorer").wait_for()
    assert page.get_by_text("Research use only").first.is_visible()

    # Pick the class-per-folder layout and type the dataset's path.
    page.get_by_test_id("stSelectbox").first.click()
    page.get_by_role("option", name="Class-per-folder", exact=False).click()
    page.get_by_label("Dataset folder", exact=False).fill(str(root))
    page.get_by_role("button", name="Open dataset").click()

    page.get_by_test_id("stMetric").first.wait_for()
    assert page.get_by_test_id("stMetricValue").first.inner_text() == "19"
    page.get_by_test_id("stDataFrame").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "explorer-metadata.png"), full_page=True)

    page.get_by_role("tab", name="Charts").click()
    chart = page.get_by_test_id("stVegaLiteChart").first
    chart.wait_for()
    chart.locator("canvas, svg").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "explorer-charts.png"), full_page=True)

    page.get_by_role("tab", name="Images").click()
    thumbnails = page.get_by_test_id("stImage")
    thumbnails.first.wait_for()
    assert thumbnails.count() == 19
    page.screenshot(path=str(ARTIFACTS / "explorer-grid.png"), full_page=True)

    page.get_by_role("tab", name="Leakage check").click()
    page.get_by_role("button", name="Find near-duplicates").click()
    page.get_by_text("1 near-duplicate pairs (1 across splits or classes)").wait_for()
    # The data grid draws on a canvas; its hidden accessible copy holds the cell text.
    page.locator('[role="gridcell"]', has_text="planted.jpg").first.wait_for(state="attached")
    page.locator('[role="gridcell"]', has_text="other split and class").first.wait_for(state="attached")
    # Each pair is also shown as two thumbnails with its kind.
    page.get_by_test_id("stMarkdown").filter(has_text="other split and class, distance").first.wait_for()
    page.get_by_test_id("stMarkdown").filter(has_text="other split and class, distance").first.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "explorer-leakage.png"), full_page=True)
    page.close()
