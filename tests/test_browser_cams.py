"""In a real browser: a ZIP batch on the Predict page, the CAM method picker, the colour map and the
lung outline (screenshots under test-artifacts/cams_*.png)."""
from __future__ import annotations

import io
import re
import zipfile

import pytest
from streamlit_server import full_page_screenshot, serve_app
from synthetic import encode, tiny_bundle
from test_lungs import phantom

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def app_server(tmp_path_factory, browser):
    weights = tmp_path_factory.mktemp("weights")
    tiny_bundle(weights / "ct-tiny")
    env = {"COVIDSCAN_WEIGHTS_DIR": str(weights), "COVIDSCAN_RUNS_DIR": str(tmp_path_factory.mktemp("runs")),
           "COVIDSCAN_STATE_DIR": str(tmp_path_factory.mktemp("state"))}
    with serve_app(env, tmp_path_factory.mktemp("logs") / "streamlit.log") as server:
        yield server


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(2):
            archive.writestr(f"study/slice_{i}.png", encode(phantom(size=256, seed=i)[0]))
        archive.writestr("../escape.png", encode(phantom(size=64)[0]))
    return buffer.getvalue()


def _overlay_captions(page, prefix: str, count: int) -> None:
    page.wait_for_function(
        """([prefix, count]) => [...document.querySelectorAll('[data-testid="stImageCaption"]')]
            .filter(c => c.textContent.startsWith(prefix)).length >= count""",
        arg=[prefix, count], timeout=120_000)


def test_zip_batch_method_picker_and_lung_outline(app_server, browser):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 950})
    page.goto(app_server["url"], wait_until="domcontentloaded")
    expect(page.get_by_text("Upload one or more files")).to_be_visible(timeout=120_000)
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
        files=[{"name": "study.zip", "mimeType": "application/zip", "buffer": _zip()}])
    _overlay_captions(page, "Grad-CAM for", 2)
    expect(page.get_by_text("2 of 3 file(s) analysed")).to_be_visible(timeout=60_000)
    expect(page.locator('[data-testid="stAlertContentError"]')).to_contain_text("unsafe path")
    expect(page.get_by_text("Heatmap inside the lungs").first).to_be_visible()
    full_page_screenshot(page, "cams_1_zip_batch.png")

    # The method picker: HiResCAM, with its one-line description.
    page.locator('[data-testid="stSelectbox"]').filter(has_text="CAM method").click()
    page.get_by_role("option", name="HiResCAM").click()
    _overlay_captions(page, "HiResCAM for", 2)
    expect(page.get_by_text(re.compile(r"^Gradient times activation"))).to_be_visible()

    # A colour-blind-safe colour map and the lung outline.
    page.locator('[data-testid="stSelectbox"]').filter(has_text="Colour map").click()
    page.get_by_role("option", name="Cividis (colour-blind safe)").click()
    page.get_by_text("Outline the lungs").click()
    page.wait_for_timeout(3000)
    _overlay_captions(page, "HiResCAM for", 2)
    expect(page.locator('[data-testid="stStatusWidget"]')).to_be_hidden(timeout=120_000)  # the rerun is over
    full_page_screenshot(page, "cams_2_hirescam_cividis_outline.png")
    page.close()
