"""The Train page end to end in a real browser: launch, watch, report, promote, predict.

Starts ``streamlit run app.py`` with an empty job state directory, launches a tiny ``tiny_cnn``
job (64 px, 1 epoch) on a class-per-folder dataset the test writes, reloads the browser while
it runs, waits for "succeeded", opens the run report, promotes the model and classifies an
image with it on the Predict page; then a 2-fold cross-validation and its out-of-fold report.
Screenshots go to ``test-artifacts/train_*.png``.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from jobs_helpers import make_dataset, wait_until
from streamlit_server import ARTIFACTS, full_page_screenshot, serve_app
from synthetic import encode, gradient_image


pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def train_app(tmp_path_factory, browser):
    """The app on a free loopback port, with its own job state dir and no shipped models."""
    base_dir = tmp_path_factory.mktemp("train_app")
    state_dir, weights_dir, runs_dir = base_dir / "state", base_dir / "weights", base_dir / "runs"
    for folder in (state_dir, weights_dir, runs_dir):
        folder.mkdir()
    env = {"COVIDSCAN_STATE_DIR": str(state_dir), "COVIDSCAN_WEIGHTS_DIR": str(weights_dir),
           "COVIDSCAN_RUNS_DIR": str(runs_dir)}
    with serve_app(env, base_dir / "streamlit.log") as server:
        yield {**server, "state_dir": state_dir, "data": make_dataset(base_dir / "data")}


def _set_number(page, label: str, value: int) -> None:
    field = page.get_by_role("spinbutton", name=label, exact=True)
    field.fill(str(value))
    field.press("Enter")
    page.wait_for_timeout(300)


def _wait_until_idle(page, timeout_ms: int = 30_000) -> None:
    """Wait until Streamlit shows no run in progress (its status widget), then a moment for the redraw."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=timeout_ms)
    page.wait_for_timeout(300)


def _pick_option(page, select_label: str, option, widget: str = "stSelectbox", attempts: int = 3) -> None:
    """Choose an option of a selectbox (or multiselect), opening it again if a rerun of the page replaced its list."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    for _ in range(attempts):
        page.locator(f'[data-testid="{widget}"]').filter(has_text=select_label).click()
        try:
            page.get_by_role("option", name=option, exact=isinstance(option, str)).click(timeout=5_000)
            return
        except PlaywrightTimeoutError:
            page.keyboard.press("Escape")
            page.wait_for_timeout(500)
    raise AssertionError(f"could not choose {option!r} in the {select_label} {widget}")


def _job_story(record) -> str:
    """A job's status, reason and log tail, for an assertion message."""
    from covidscan.jobs.base import tail_text
    from covidscan.runs import why_not_succeeded

    tail = tail_text(record.log_path, max_bytes=3_000) if record.log_path.is_file() else "(no log)"
    return f"{record.name}: {record.status} ({why_not_succeeded(record)}); log tail:\n{tail}"


def _jobs(state_dir: Path) -> list:
    """The app's job records as stored, read without starting or reaping anything (the app does that)."""
    from covidscan.jobs.store import JobStore, record_from_row

    return [record_from_row(row) for row in JobStore(state_dir).rows()]


def _newest_job(state_dir: Path, name: str):
    """The newest job called ``name`` in the app's job database, or None."""
    named = [record for record in _jobs(state_dir) if record.name == name]
    return named[-1] if named else None


def _ended(job):
    """The job if it has ended, else None."""
    return job if job is not None and job.done else None


def _wait_for_job(state_dir: Path, name: str, timeout: float):
    """The job called ``name`` once it has ended, read from the job database the app writes."""
    try:
        return wait_until(lambda: _ended(_newest_job(state_dir, name)), timeout, poll=2, what=f"{name!r} to end")
    except AssertionError as exc:
        stories = "\n".join(_job_story(record) for record in _jobs(state_dir))
        raise AssertionError(f"{exc}. Jobs:\n{stories}") from None


def _fill_form(page, data, run_name: str, fresh: bool = True) -> None:
    """The form: a class-per-folder dataset (checked: class counts per split), tiny_cnn, X-ray, 1 epoch.

    ``fresh``: the form has not been filled in this app before (a filled form remembers its modality).
    """
    from playwright.sync_api import expect

    _pick_option(page, "Dataset type", re.compile("Class-per-folder"))
    # Wait for the rerun of the kind change before typing on: an input sent while the page still shows
    # the old modality (CT, implied by COVID-CT) carries it back and overrides the change (seen in CI).
    if fresh:  # a class-per-folder dataset has no implied modality: launching waits until the user picks one
        expect(page.get_by_text("Choose CT or X-ray")).to_be_visible(timeout=60_000)
    else:
        expect(page.get_by_text("Validation fraction (when the folder has no val split)")).to_be_visible(
            timeout=60_000)
    folder = page.get_by_role("textbox", name="Dataset folder")
    folder.fill(str(data))
    folder.press("Enter")
    expect(page.get_by_text("Images per split and class")).to_be_visible(timeout=60_000)
    _pick_option(page, "Architecture", "tiny_cnn")
    expect(page.get_by_text("tiny_cnn has no ImageNet weights")).to_be_visible(timeout=30_000)
    if fresh:
        expect(page.get_by_text("Choose CT or X-ray")).to_be_visible(timeout=60_000)
        expect(page.get_by_role("button", name="Launch training")).to_be_disabled()
    page.locator('[data-testid="stRadio"]').filter(has_text="Modality").get_by_text("X-ray", exact=True).click()
    expect(page.get_by_text("Choose CT or X-ray")).to_be_hidden(timeout=30_000)
    _set_number(page, "Epochs", 1)
    _set_number(page, "Batch size", 4)
    expect(page.get_by_role("spinbutton", name="Image size (px)", exact=True)).to_have_value("64")
    name = page.get_by_role("textbox", name="Run name")
    name.fill(run_name)
    name.press("Enter")
    page.wait_for_timeout(300)


def test_launch_watch_report_promote_predict(train_app, browser):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    sidebar = page.locator('[data-testid="stSidebar"]')
    page.goto(train_app["url"], wait_until="domcontentloaded")
    expect(page.get_by_role("heading", name="Predict", exact=True)).to_be_visible(timeout=60_000)
    sidebar.locator('[data-testid="stSidebarNavLink"]').filter(has_text="Train").click()
    expect(page.get_by_role("heading", name="Train", exact=True)).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Research use only — not for diagnosis.")).to_be_visible()
    expect(page.get_by_text("No training runs yet")).to_be_visible(timeout=60_000)

    _fill_form(page, train_app["data"], "browser run")
    full_page_screenshot(page, "train_01_form.png")

    # The learning-rate finder draws loss against lr with the suggestion marked, and can fill it in.
    page.get_by_role("button", name="Find learning rate").click()
    use = page.get_by_role("button", name=re.compile(r"^Use the suggested learning rate"))
    expect(use).to_be_visible(timeout=120_000)
    # The chart's title, not the button's tooltip ("Runs a 40-step learning-rate range test ..."),
    # which is also on the page while the pointer rests on the button.
    expect(page.get_by_test_id("stVegaLiteChart").get_by_text("Learning-rate range test")).to_be_visible()
    full_page_screenshot(page, "train_01b_lr_finder.png")

    page.get_by_role("button", name="Launch training").click()
    expect(page.get_by_text(re.compile(r"^Launched browser run"))).to_be_visible(timeout=60_000)
    header = page.get_by_role("heading", name=re.compile(r"^browser run · .* — (queued|running|succeeded)"))
    expect(header).to_be_visible(timeout=30_000)
    assert "/train?job=" in page.url  # the selected run is in the URL: a reload keeps it
    full_page_screenshot(page, "train_02_running.png")

    # A browser reload in the middle changes nothing: the job lives in the runner, not the session.
    page.reload(wait_until="domcontentloaded")
    expect(page.get_by_role("heading", name=re.compile(r"^browser run · "))).to_be_visible(timeout=60_000)
    expect(sidebar.get_by_text("Dataset explorer")).to_be_visible()  # still inside the app's navigation
    expect(page.get_by_role("heading", name=re.compile(r"^browser run · .* — succeeded$"))).to_be_visible(
        timeout=240_000)
    expect(page.get_by_text("Loss", exact=True)).to_be_visible(timeout=30_000)  # curves drawn
    full_page_screenshot(page, "train_03_succeeded.png")

    # The run report: metrics, confusion matrix, ROC and misclassified-score charts.
    page.get_by_role("button", name="Open the run report").click()
    expect(page.get_by_text(re.compile(r"^From the best model evaluated on the validation split"))).to_be_visible(
        timeout=120_000)
    expect(page.get_by_text(re.compile(r"^Confusion matrix \(validation\)"))).to_be_visible(timeout=30_000)
    expect(page.get_by_text(re.compile(r"^ROC curve"))).to_be_visible()
    full_page_screenshot(page, "train_04_report.png")

    # Promote, then find the model on the Predict page and classify an image with it.
    expect(page.get_by_role("textbox", name="Model name", exact=True)).to_have_value("browser-run")
    page.get_by_role("button", name="Make available on the Predict page").click()
    expect(page.get_by_text(re.compile(r"^Promoted as browser-run"))).to_be_visible(timeout=60_000)
    assert (train_app["state_dir"] / "models" / "browser-run" / "card.json").is_file()
    full_page_screenshot(page, "train_05_promoted.png")

    sidebar.locator('[data-testid="stSidebarNavLink"]').filter(has_text="Predict").click()
    expect(page.get_by_role("heading", name="Predict", exact=True)).to_be_visible(timeout=60_000)
    expect(sidebar.get_by_text("browser-run").first).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Upload one or more files")).to_be_visible(timeout=120_000)
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
        files=[{"name": "slice.png", "mimeType": "image/png", "buffer": encode(gradient_image(128, 128, seed=3))}])
    # The promoted model's classes come back: the answer is one of them, and it names the model.
    expect(page.get_by_role("heading", level=3, name=re.compile(r"^(Covid|Normal)$"))).to_be_visible(timeout=120_000)
    expect(page.get_by_text("with browser-run.")).to_be_visible()
    expect(page.locator('[data-testid="stException"]')).to_have_count(0)
    full_page_screenshot(page, "train_06_predict.png")
    page.close()


def test_cross_validation_report(train_app, browser):
    """A 2-fold cross-validation launched from the form: its report is the out-of-fold estimate with
    95% intervals, the protocol and a reliability diagram."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(train_app["url"], wait_until="domcontentloaded")
    expect(page.get_by_role("heading", name="Predict", exact=True)).to_be_visible(timeout=60_000)
    page.locator('[data-testid="stSidebar"] [data-testid="stSidebarNavLink"]').filter(has_text="Train").click()
    # "Runs" is drawn after the form: once it shows, the form's expander is in its final state.
    expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible(timeout=60_000)
    if not page.get_by_text("Dataset type").is_visible():  # collapsed once there are runs
        page.get_by_text("New training run").click()
    _fill_form(page, train_app["data"], "browser cv", fresh=False)  # after the first test's run
    _set_number(page, "Cross-validation folds", 2)
    # Candidate inference sizes: suggested from the 64 px training size; each held-out fold is scored at both.
    page.get_by_text("Ship one model refitted on all images").click()
    _set_number(page, "SimCLR pretraining per fold (epochs; 0: off)", 2)
    sizes = page.locator('[data-testid="stMultiSelect"]').filter(has_text="Candidate inference sizes (px)")
    # Picked last, and checked again once the page is idle: a rerun still running from an earlier input
    # can redraw the multiselect from the state it started with and drop a size picked meanwhile.
    for _ in range(4):
        _wait_until_idle(page)
        missing = [size for size in ("64", "80") if not sizes.get_by_text(size, exact=True).is_visible()]
        if not missing:
            break
        for size in missing:  # offered once the app's rerun with the typed 64 px image size has drawn
            _pick_option(page, "Candidate inference sizes (px)", size, widget="stMultiSelect", attempts=6)
            page.keyboard.press("Escape")
    expect(sizes.get_by_text("64", exact=True)).to_be_visible()
    expect(sizes.get_by_text("80", exact=True)).to_be_visible()
    full_page_screenshot(page, "train_06b_cv_form.png")
    launch = page.get_by_role("button", name="Launch 2-fold cross-validation")
    launch.click()
    try:
        wait_until(lambda: _newest_job(train_app["state_dir"], "browser cv"), timeout=20, poll=1, what="the launch")
    except AssertionError:
        # A click that lands while a rerun from an earlier input is being replaced can be dropped by
        # Streamlit; a user would click again, and so does the test (once: a second drop fails below).
        launch.click()
    expect(page.get_by_text(re.compile(r"^Launched browser cv"))).to_be_visible(timeout=60_000)
    # Waited for in the job database, so a run that fails or stalls says why (status, reason, log tail).
    record = _wait_for_job(train_app["state_dir"], "browser cv", timeout=480)
    assert record.status == "succeeded", _job_story(record)
    expect(page.get_by_role("heading", name=re.compile(r"^browser cv · .* — succeeded$"))).to_be_visible(
        timeout=60_000)
    expect(page.get_by_text("Reads the cross-validation's out-of-fold estimate, with 95% intervals.")).to_be_visible(
        timeout=30_000)
    page.get_by_role("button", name="Open the run report").click()
    expect(page.get_by_text(re.compile(r"^From out-of-fold predictions of 2-fold cross-validation \(16 images, "
                                       r"\d+ groups\)"))).to_be_visible(timeout=120_000)
    expect(page.get_by_text(re.compile(r"^2-fold cross-validation over the pooled train\+val images"))).to_be_visible()
    expect(page.get_by_text(re.compile(r"inference size chosen among 64/80 px"))).to_be_visible()
    expect(page.get_by_text(re.compile(r"backbone SimCLR-pretrained \(2 epochs\) on its own training folds"))
           ).to_be_visible()
    expect(page.get_by_text(re.compile(r"the shipped model is the same recipe refitted once on all pooled images"))
           ).to_be_visible()
    charts = page.get_by_test_id("stVegaLiteChart")
    expect(charts.get_by_text("Confusion matrix (out-of-fold)")).to_be_visible(timeout=30_000)
    reliability = charts.filter(has_text=re.compile(r"Reliability diagram \(ECE \d\.\d{3}\)"))
    expect(reliability).to_be_visible(timeout=30_000)
    expect(page.locator('[data-testid="stException"]')).to_have_count(0)
    ARTIFACTS.mkdir(exist_ok=True)
    reliability.screenshot(path=str(ARTIFACTS / "train_08_cv_reliability.png"))
    full_page_screenshot(page, "train_07_cv_report.png")
    page.close()
