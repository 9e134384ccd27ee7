"""The model card a clinician reads in the sidebar, in a real browser: the cross-validated figures
come with their 95% intervals, and a repeated cross-validation's line says how far another fold
partition moves them. The bundle is tiny; its metrics are the shipped CT card's own.

Screenshot: ``test-artifacts/card_estimate_intervals.png``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit_server import full_page_screenshot, serve_app
from synthetic import tiny_bundle

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SHIPPED_CT = Path(__file__).resolve().parents[1] / "weights" / "ct-covid-mobilenet_v2" / "card.json"


@pytest.fixture(scope="module")
def app_server(browser, tmp_path_factory):
    base = tmp_path_factory.mktemp("card_app")
    metrics = json.loads(SHIPPED_CT.read_text())["metrics"]
    tiny_bundle(base / "weights" / "ct-tiny", training={"data": "synthetic"}, metrics=metrics)
    env = {"COVIDSCAN_WEIGHTS_DIR": str(base / "weights"), "COVIDSCAN_RUNS_DIR": str(base / "runs"),
           "COVIDSCAN_STATE_DIR": str(base / "state")}
    with serve_app(env, base / "streamlit.log") as server:
        yield {**server, "metrics": metrics}


def test_sidebar_card_quotes_intervals_and_the_partition_spread(app_server, browser):
    from playwright.sync_api import expect

    estimate, repeated = app_server["metrics"]["estimate"], app_server["metrics"]["repeated_estimate"]
    auc = f"ROC AUC {estimate['auc']:.3f} ({estimate['ci95']['auc'][0]:.3f}–{estimate['ci95']['auc'][1]:.3f})"
    # A model joined from several runs (covidscan cv-join) repeats each run on each fold partition.
    runs = repeated.get("runs", 1)
    alone = "each run and partition alone" if runs > 1 else "each partition alone"
    spread = f"{alone}: ROC AUC " + ", ".join(f"{part['auc']:.3f}" for part in repeated["per_repeat"])
    partitions = len(repeated["per_repeat"]) // runs
    averaged = f"{runs} runs' models × {partitions} fold partitions" if runs > 1 else f"{partitions} fold partitions"
    page = browser.new_page(viewport={"width": 1400, "height": 950})
    page.goto(app_server["url"], wait_until="domcontentloaded")
    sidebar = page.locator('[data-testid="stSidebar"]')
    caption = sidebar.get_by_text("Metrics: cross-validated").first  # the compact card; the expander repeats it
    expect(caption).to_be_visible(timeout=120_000)
    assert auc in caption.inner_text() and spread in caption.inner_text()
    text = sidebar.inner_text()
    assert f"cross-validated estimate, {averaged} averaged" in text and "95% intervals" in text
    assert f"ROC AUC {repeated['auc']:.3f} ({repeated['ci95']['auc'][0]:.3f}–" in text
    full_page_screenshot(page, "card_estimate_intervals.png")
