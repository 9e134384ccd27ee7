"""End to end in a real browser: ``streamlit run app.py`` driven by Debian's Chromium through Playwright.

Starts the app on a free loopback port with a MobileNetV2 bundle (random weights, the real
architecture, so the timings are the real cost), uploads a 512x512 PNG, waits for the overlay
and the probabilities, downloads the PDF report, switches pages, and saves screenshots under
``test-artifacts/``. It prints the cold-start time (server start to the first page render) and
the time from upload to the first result, and writes them to ``test-artifacts/browser_timings.json``.

Budgets: the issue asks for under 10 s cold start and under 2 s to the first result on a 2-core
CPU. Shared machines are noisy (a bare MobileNetV2 forward pass, printed alongside as
``bare_forward_s``, varies tenfold with the load), so the test fails only past 3x those figures
unless ``COVIDSCAN_STRICT_TIMINGS=1`` asks for the budgets themselves.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from streamlit_server import ARTIFACTS, serve_app
from synthetic import PHI, ct_dicom_bytes, encode, gradient_image

COLD_START_BUDGET_S = 10.0
FIRST_RESULT_BUDGET_S = 2.0
SLACK = 1.0 if os.environ.get("COVIDSCAN_STRICT_TIMINGS") == "1" else 3.0

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def mobilenet_weights(tmp_path_factory) -> Path:
    """A weights folder with one CT MobileNetV2 bundle (random weights: the timing is what matters)."""
    import torch

    from covidscan.bundle import ModelCard, save_bundle
    from covidscan.models import create_model

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=2, pretrained=False).eval()
    card = ModelCard.for_architecture(
        "ct-browser-test", "mobilenet_v2", ["COVID", "NonCOVID"], "CT", window="lung",
        training={"data": "none (random weights for the browser test)"},
        metrics={"val": {"accuracy": 0.5, "auc": 0.5, "n": 0}},
    )
    save_bundle(model, card, folder / "ct-browser-test")
    return folder


def _bare_forward_seconds(weights: Path) -> float:
    """The median time of a plain MobileNetV2 forward pass here and now: how loaded the CPU is."""
    import torch

    from covidscan.bundle import load_bundle

    model = load_bundle(next(weights.iterdir())).model
    batch = torch.rand(1, 3, 224, 224)
    times = []
    with torch.inference_mode():
        model(batch)
        for _ in range(3):
            start = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - start)
    return sorted(times)[1]


@pytest.fixture(scope="module")
def app_server(mobilenet_weights, tmp_path_factory, browser):
    """``streamlit run app.py`` on a free loopback port with a MobileNetV2 bundle as the shipped model."""
    env = {"COVIDSCAN_WEIGHTS_DIR": str(mobilenet_weights),
           "COVIDSCAN_RUNS_DIR": str(tmp_path_factory.mktemp("runs")),
           "COVIDSCAN_STATE_DIR": str(tmp_path_factory.mktemp("state"))}
    with serve_app(env, tmp_path_factory.mktemp("logs") / "streamlit.log") as server:
        yield server


def _shot(page, name: str) -> None:
    """Screenshot the whole page: Streamlit scrolls inside its main section, so grow the window to fit."""
    ARTIFACTS.mkdir(exist_ok=True)
    viewport = page.viewport_size
    height = page.evaluate("""() => {
        const main = document.querySelector('[data-testid="stMain"]');
        return main ? main.scrollHeight : document.body.scrollHeight;
    }""")
    page.set_viewport_size({"width": viewport["width"], "height": max(viewport["height"], min(int(height), 6000))})
    page.wait_for_timeout(300)  # let the layout settle at the new size
    page.screenshot(path=str(ARTIFACTS / name))
    page.set_viewport_size(viewport)


def _wait_images_loaded(page, count: int, timeout_ms: float) -> None:
    """Wait until ``count`` Grad-CAM overlay pictures are on the page and decoded by the browser."""
    page.wait_for_function(
        """(count) => {
            const captions = [...document.querySelectorAll('[data-testid="stImageCaption"]')]
                .filter(c => c.textContent.includes('Grad-CAM for'));
            if (captions.length < count) return false;
            return captions.every(c => {
                const img = c.closest('[data-testid="stImageContainer"], [data-testid="stImage"]')
                    ?.querySelector('img') ?? c.parentElement.querySelector('img');
                return img && img.complete && img.naturalWidth > 0;
            });
        }""",
        arg=count, timeout=timeout_ms,
    )


def test_predict_in_a_real_browser(app_server, browser, mobilenet_weights, capsys):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 950})
    page.goto(app_server["url"], wait_until="domcontentloaded")
    # Cold start: server launch until the page is drawn (title, note and upload box visible).
    expect(page.get_by_role("heading", name="Predict")).to_be_visible(timeout=60_000)
    expect(page.locator('[data-testid="stFileUploaderDropzone"]')).to_be_visible(timeout=60_000)
    cold_start = time.monotonic() - app_server["started"]
    expect(page.get_by_text("Research use only — not for diagnosis.")).to_be_visible()
    # The model is loaded (in the background of the first visit) once the page invites an upload.
    expect(page.get_by_text("Upload one or more files")).to_be_visible(timeout=120_000)
    model_ready = time.monotonic() - app_server["started"]
    expect(page.locator('[data-testid="stSidebar"]').get_by_text("ct-browser-test").first).to_be_visible()
    _shot(page, "01_predict_empty.png")

    # Upload -> first result, for a 512x512 PNG, with the model loaded.
    png = encode(gradient_image(512, 512, seed=7))
    uploaded = time.monotonic()
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
        files=[{"name": "scan_512.png", "mimeType": "image/png", "buffer": png}])
    _wait_images_loaded(page, 1, timeout_ms=60_000)
    bars = page.locator('[data-testid="stProgress"]')
    expect(bars).to_have_count(2)
    expect(bars.first).to_contain_text(re.compile(r"(COVID|NonCOVID) — \d+\.\d%"))
    first_result = time.monotonic() - uploaded
    label = page.locator("h3").filter(has_text=re.compile(r"^(COVID|NonCOVID)$"))
    expect(label).to_have_count(1)
    _shot(page, "02_predict_result.png")

    # A second, different file: the first one comes from the cache, the second is new work.
    uploaded = time.monotonic()
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
        files=[{"name": "scan_b.png", "mimeType": "image/png", "buffer": encode(gradient_image(512, 512, seed=8))}])
    _wait_images_loaded(page, 2, timeout_ms=60_000)
    second_result = time.monotonic() - uploaded

    # A broken file and a DICOM join the batch: an error card for one, a de-identified result for the other.
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(files=[
        {"name": "broken.png", "mimeType": "image/png", "buffer": b"not an image at all"},
        {"name": "slice.dcm", "mimeType": "application/dicom", "buffer": ct_dicom_bytes()},
    ])
    expect(page.locator('[data-testid="stAlertContentError"]')).to_contain_text("broken.png", timeout=60_000)
    _wait_images_loaded(page, 3, timeout_ms=60_000)
    expect(page.get_by_text(re.compile(r"^DICOM \(de-identified\): .*Modality: CT"))).to_be_visible()
    expect(page.get_by_text("3 of 4 file(s) analysed")).to_be_visible()
    body = page.locator("body").inner_text()
    assert all(value not in body for value in PHI.values())
    _shot(page, "03_predict_batch.png")

    # The PDF report is made on click and downloads as a real PDF.
    with page.expect_download(timeout=60_000) as download_info:
        page.get_by_role("button", name=re.compile("PDF report")).first.click()
    pdf_path = download_info.value.path()
    assert Path(pdf_path).read_bytes()[:5] == b"%PDF-"
    assert download_info.value.suggested_filename == "scan_512_report.pdf"

    # Switch pages through the sidebar; each one draws and keeps the research-use note.
    sidebar = page.locator('[data-testid="stSidebar"]')
    for link, heading, shot in (("Train", "Train", "04_train.png"),
                                ("Dataset explorer", "Dataset explorer", "05_explorer.png")):
        sidebar.locator('[data-testid="stSidebarNavLink"]').filter(has_text=link).click()
        expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible(timeout=60_000)
        expect(sidebar.get_by_text("research use only — not for diagnosis")).to_be_visible()
        expect(page.locator('[data-testid="stException"]')).to_have_count(0)
        _shot(page, shot)
    sidebar.locator('[data-testid="stSidebarNavLink"]').filter(has_text="Predict").click()
    expect(page.get_by_role("heading", name="Predict", exact=True)).to_be_visible(timeout=60_000)
    page.close()

    timings = {"cold_start_s": round(cold_start, 2), "model_ready_s": round(model_ready, 2),
               "upload_to_first_result_s": round(first_result, 2),
               "upload_to_second_result_s": round(second_result, 2),
               "bare_forward_s": round(_bare_forward_seconds(mobilenet_weights), 3),
               "load_average": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "browser_timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    with capsys.disabled():
        print(f"\n[browser timings] {json.dumps(timings)}")
    assert cold_start < COLD_START_BUDGET_S * SLACK, timings
    assert first_result < FIRST_RESULT_BUDGET_S * SLACK, timings


def test_first_visit_straight_to_a_page_runs_the_app_shell(app_server, browser):
    """A bookmark or reload of /train in a new session gets the navigation, not a bare page file."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1300, "height": 900})
    page = context.new_page()
    page.goto(f"{app_server['url']}/train", wait_until="domcontentloaded")
    expect(page.get_by_role("heading", name="Train", exact=True)).to_be_visible(timeout=60_000)
    links = page.locator('[data-testid="stSidebarNavLink"]')
    expect(links).to_have_count(3)
    expect(links.filter(has_text="Dataset explorer")).to_be_visible()
    expect(page.locator('[data-testid="stSidebar"]').get_by_text("research use only — not for diagnosis")).to_be_visible()
    context.close()
