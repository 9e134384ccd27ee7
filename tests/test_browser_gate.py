"""In a real browser: an image the input gate flags leads with 'not assessed', its output behind an expander."""
from __future__ import annotations

import re

import pytest
from streamlit_server import ARTIFACTS, serve_app
from synthetic import ct_dicom_bytes, encode, gradient_image
from test_gate import _images

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def gated_weights(tmp_path_factory):
    from synthetic import tiny_bundle

    from covidscan.bundle import load_bundle
    from covidscan.gate import fit_gate, split_features, write_gate

    folder = tmp_path_factory.mktemp("weights")
    path = tiny_bundle(folder / "ct-gated", metrics={"val": {"accuracy": 0.5, "auc": 0.5, "n": 0}})
    bundle = load_bundle(path)
    train, _ = split_features(bundle.model, _images(40, 0), bundle.card.mean, bundle.card.std)
    val, _ = split_features(bundle.model, _images(20, 1), bundle.card.mean, bundle.card.std)
    write_gate(path, fit_gate(train, val, rank=8))
    return folder


def test_a_flagged_card_in_a_real_browser(gated_weights, tmp_path_factory, browser):
    from playwright.sync_api import expect

    env = {"COVIDSCAN_WEIGHTS_DIR": str(gated_weights), "COVIDSCAN_RUNS_DIR": str(tmp_path_factory.mktemp("runs")),
           "COVIDSCAN_STATE_DIR": str(tmp_path_factory.mktemp("state"))}
    with serve_app(env, tmp_path_factory.mktemp("logs") / "streamlit.log") as server:
        page = browser.new_page(viewport={"width": 1400, "height": 950})
        page.goto(server["url"], wait_until="domcontentloaded")
        expect(page.get_by_text("Upload one or more files")).to_be_visible(timeout=120_000)
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(files=[
            {"name": "head.dcm", "mimeType": "application/dicom", "buffer": ct_dicom_bytes(modality="MR")},
            {"name": "scan.png", "mimeType": "image/png", "buffer": encode(gradient_image(256, 256, seed=3))},
        ])
        # The MR DICOM is flagged; the synthetic PNG may be too (it is no CT slice): one statement per flagged card.
        expect(page.get_by_text("Outside what this model was trained on: not assessed.").first).to_be_visible(
            timeout=90_000)
        expect(page.get_by_text("2 of 2 file(s) analysed")).to_be_visible(timeout=60_000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "gate_flagged_card.png"), full_page=True)
        summary = page.get_by_text(re.compile(r"[12] outside what the model was trained on \(not assessed\)"))
        expect(summary).to_be_visible()
        flagged = int(summary.inner_text().strip()[0])
        expander = page.get_by_text("Model output anyway (not an assessment)")
        expect(expander).to_have_count(flagged)
        # Only images that passed lead with a big label; a flagged one's probabilities stay collapsed.
        expect(page.locator("h3").filter(has_text="COVID")).to_have_count(2 - flagged)
        expander.first.click()
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "gate_flagged_card_open.png"), full_page=True)
        page.close()
