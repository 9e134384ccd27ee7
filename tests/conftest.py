"""Fixtures shared by several test modules."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit_server import CHROMIUM, CHROMIUM_FLAGS
from synthetic import two_class_folder


@pytest.fixture(scope="session")
def browser():
    """Debian's headless Chromium driven by Playwright (never a downloaded browser)."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's Chromium is not installed (apt-get install chromium; scripts/test.sh does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def pooled_folder(tmp_path_factory) -> Path:
    """A two-class folder dataset to cross-validate (28 train + val images) and a test/ split that
    cross-validation must never touch."""
    root = tmp_path_factory.mktemp("pooled") / "data"
    two_class_folder(root, {"train": 10, "val": 4, "test": 3}, size=48)
    return root
