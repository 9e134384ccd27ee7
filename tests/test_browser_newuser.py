"""What a new user tripped over, in a real browser (headless Debian Chromium through Playwright).

- Predict: a GIF upload is accepted (the uploader once answered "image/gif files are not allowed"),
  the Grad-CAM++ overlay downloads as ``..._gradcampp.png`` and the batch CSV names the modality.
- Train: "ImageNet initialisation" is offered with nothing cached, and an uploaded checkpoint is imported.
- Dataset explorer: opening an ieee8023 folder and then a COVID-CT folder in the same session
  shows every image of the second one (the class filter used to come up empty).

Screenshots go to ``test-artifacts/newuser_*.png``.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import pandas as pd
import pytest
from streamlit_server import full_page_screenshot, serve_app
from synthetic import encode, gradient_image, tiny_bundle
from test_explorer import make_covid_ct_dataset
from test_explorer_page import make_ieee8023_dataset
from test_weights_import import REAL

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def app_server(browser, tmp_path_factory):
    """The app with one tiny CT model as its shipped model."""
    base = tmp_path_factory.mktemp("newuser_app")
    tiny_bundle(base / "weights" / "ct-tiny", training={"data": "synthetic"}, metrics={"val": {"auc": 0.5, "n": 4}})
    env = {"COVIDSCAN_WEIGHTS_DIR": str(base / "weights"), "COVIDSCAN_RUNS_DIR": str(base / "runs"),
           "COVIDSCAN_STATE_DIR": str(base / "state"), "TORCH_HOME": str(base / "torch-home")}
    with serve_app(env, base / "streamlit.log") as server:
        yield {**server, "torch_home": base / "torch-home"}


def test_gif_upload_gradcampp_download_and_csv_modality(app_server, browser):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 950}, accept_downloads=True)
    page.goto(app_server["url"], wait_until="domcontentloaded")
    expect(page.get_by_text("Upload one or more files")).to_be_visible(timeout=120_000)
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
        files=[{"name": "scan.gif", "mimeType": "image/gif", "buffer": encode(gradient_image(128, 128), "GIF")}])
    expect(page.get_by_text("1 of 1 file(s) analysed")).to_be_visible(timeout=60_000)
    assert "not allowed" not in page.locator("body").inner_text()
    expect(page.locator('[data-testid="stImageCaption"]').filter(has_text="Grad-CAM for")).to_have_count(1)

    page.locator('[data-testid="stSelectbox"]').filter(has_text="CAM method").click()
    page.get_by_role("option", name="Grad-CAM++", exact=True).click()
    expect(page.locator('[data-testid="stImageCaption"]').filter(has_text="Grad-CAM++ for")).to_have_count(
        1, timeout=60_000)
    full_page_screenshot(page, "newuser_predict_gif.png")
    with page.expect_download(timeout=60_000) as overlay:
        page.get_by_role("button", name=re.compile("Overlay PNG")).click()
    assert overlay.value.suggested_filename == "scan_gradcampp.png"
    assert Path(overlay.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with page.expect_download(timeout=60_000) as csv:
        page.get_by_role("button", name=re.compile("Results CSV")).click()
    table = pd.read_csv(io.BytesIO(Path(csv.value.path()).read_bytes()))
    assert table.loc[0, "file"] == "scan.gif" and table.loc[0, "format"] == "GIF"
    assert table.loc[0, "modality"] == "CT"
    page.close()


def test_explorer_filters_follow_a_second_dataset(app_server, browser, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(app_server["url"])
    page.get_by_test_id("stSidebarNav").get_by_text("Dataset explorer").click()
    page.get_by_role("heading", name="Dataset explorer").wait_for()

    def open_dataset(option: str, root: Path) -> None:
        page.get_by_test_id("stSelectbox").first.click()
        page.get_by_role("option", name=option, exact=False).click()
        page.get_by_label("Dataset folder", exact=False).fill(str(root))
        page.get_by_role("button", name="Open dataset").click()

    open_dataset("ieee8023", make_ieee8023_dataset(tmp_path / "xray"))
    expect(page.get_by_text("8 of 8 images")).to_be_visible(timeout=60_000)
    open_dataset("COVID-CT", make_covid_ct_dataset(tmp_path / "ct"))
    expect(page.get_by_text("12 of 12 images")).to_be_visible(timeout=60_000)
    expect(page.get_by_text("the filters now select all of its classes")).to_be_visible(timeout=60_000)
    full_page_screenshot(page, "newuser_explorer_switched.png")
    page.get_by_role("tab", name="Images").click()
    expect(page.get_by_text("12 images; showing 12.")).to_be_visible(timeout=60_000)
    page.close()


def test_train_page_offers_imagenet_and_imports_a_checkpoint(app_server, browser):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_server["url"], wait_until="domcontentloaded")
    page.get_by_test_id("stSidebarNav").get_by_text("Train", exact=True).click()
    expect(page.get_by_role("heading", name="Train", exact=True)).to_be_visible(timeout=60_000)
    expect(page.get_by_text("torchvision downloads mobilenet_v2-7ebf99e0.pth when the run starts")).to_be_visible(
        timeout=60_000)
    toggle = page.locator('[data-testid="stCheckbox"]').filter(has_text="ImageNet initialisation").locator("input")
    expect(toggle).to_be_enabled()
    page.get_by_text("Import an ImageNet checkpoint file").click()
    full_page_screenshot(page, "newuser_train_imagenet.png")
    if not REAL.is_file():
        pytest.skip("../shared/data/weights is not present")
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(REAL))
    expect(page.get_by_text(f"Imported {REAL.name}: ImageNet weights for mobilenet_v2")).to_be_visible(timeout=60_000)
    expect(page.get_by_text(f"ImageNet weights cached ({REAL.name}).")).to_be_visible(timeout=60_000)
    assert (app_server["torch_home"] / "hub" / "checkpoints" / REAL.name).stat().st_size == REAL.stat().st_size
    full_page_screenshot(page, "newuser_train_imported.png")
    page.close()
