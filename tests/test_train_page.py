"""AppTest of the Train page with real jobs: launch from the form, watch, cancel, failed reasons,
runs table and comparison, run report, promotion, and a fresh session that finds it all again."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from jobs_helpers import make_dataset
from streamlit.testing.v1 import AppTest

from covidscan import runs

PAGE = str(Path(__file__).resolve().parents[1] / "app_pages" / "train.py")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def texts(elements) -> list[str]:
    return [str(element.value) for element in elements]


def button(app: AppTest, label: str):
    matches = [b for b in app.button if b.label == label or b.label.startswith(label)]
    assert matches, f"no button {label!r} among {[b.label for b in app.button]}"
    return matches[0]


def headings(app: AppTest) -> list[str]:
    return [m for m in texts(app.markdown) if m.startswith("#### ")]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private job state dir (two jobs may run at once) and a tiny class-per-folder dataset."""
    base = tmp_path_factory.mktemp("train_page")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COVIDSCAN_STATE_DIR", str(base / "state"))
        patch.setenv("COVIDSCAN_JOBS_CONCURRENCY", "2")
        patch.delenv("COVIDSCAN_RAY_ADDRESS", raising=False)
        yield {"state": base / "state", "data": make_dataset(base / "data"), "base": base}


def open_page(**query) -> AppTest:
    app = AppTest.from_file(PAGE, default_timeout=180)
    app.query_params.update(query)
    app.run()
    assert not app.exception, app.exception
    return app


def fill_form(app: AppTest, root: Path | str, kind: str = "folder", arch: str = "tiny_cnn") -> AppTest:
    app.selectbox(key="train_arch").set_value(arch).run()  # its callback sets the image size
    app.selectbox(key="train_kind").set_value(kind).run()  # its callback sets the modality it implies
    if kind == "folder":
        app.radio(key="train_modality").set_value("CT")  # a class-per-folder dataset: the user says
    app.text_input(key="train_root").set_value(str(root))
    app.number_input(key="train_epochs").set_value(1)
    app.number_input(key="train_batch_size").set_value(4)
    return app.run()


def test_empty_page_checks_the_dataset_before_launch(env, tmp_path):
    app = open_page()
    assert any("Research use only" in t for t in texts(app.warning))
    assert any("No training runs yet" in t for t in texts(app.info))
    assert button(app, "Launch training").disabled  # nothing checked yet
    fill_form(app, tmp_path / "nowhere")
    assert any("does not exist" in t for t in texts(app.error))
    assert button(app, "Launch training").disabled
    (tmp_path / "empty").mkdir()
    fill_form(app, tmp_path / "empty", kind="covid-ct")
    assert any("not a COVID-CT folder" in t for t in texts(app.error))
    # tiny_cnn has no ImageNet weights: the switch is off and disabled, and the page says why.
    assert app.toggle(key="train_pretrained").disabled and not app.toggle(key="train_pretrained").value
    assert any("tiny_cnn has no ImageNet weights" in t for t in texts(app.caption))
    # A new architecture brings its own input size.
    app.selectbox(key="train_arch").set_value("resnet18").run()
    assert app.number_input(key="train_image_size").value == 224
    assert app.toggle(key="train_pretrained").disabled or not any("resnet18" in t for t in texts(app.warning))


def test_launch_watch_cancel_fail_report_promote(env):
    from covidscan.jobs import get_runner

    app = fill_form(open_page(), env["data"])
    preview = app.dataframe[0].value
    assert preview.loc["train", "total"] + preview.loc["val", "total"] == 16
    assert preview.loc["val", "Covid"] == preview.loc["val", "Normal"] == 2

    # The LR finder runs here, draws loss vs lr and offers its suggestion.
    button(app, "Find learning rate").click().run()
    assert not app.exception and len(app.get("vega_lite_chart")) == 1
    suggestion = button(app, "Use the suggested learning rate")
    suggested = float(suggestion.label.split("(")[1].rstrip(")"))
    suggestion.click().run()
    assert app.number_input(key="train_lr").value == pytest.approx(suggested)
    app.number_input(key="train_lr").set_value(1e-3)

    app.text_input(key="train_job_name").set_value("page run")
    button(app, "Launch training").click().run()
    assert not app.exception, app.exception
    assert any(t.startswith("Launched page run") for t in texts(app.success)), texts(app.error)
    runner = get_runner()
    [launched] = runner.list()
    assert launched.name == "page run" and launched.args == ["--config", str(Path(launched.run_dir) / "config.json")]
    assert runs.run_config(launched.run_dir)["arch"] == "tiny_cnn"  # the whole config reached the job
    assert app.query_params["job"] == [launched.id] or app.query_params["job"] == launched.id
    assert any("page run" in h for h in headings(app))

    # Two more jobs: one that fails (its folder vanished) and one to cancel from the page.
    broken = runner.submit(["--dataset", "folder", "--modality", "CT", "--root", str(env["base"] / "gone"), "--arch", "tiny_cnn"],
                           name="broken run")
    long = runner.submit(["--dataset", "folder", "--modality", "CT", "--root", str(env["data"]), "--arch", "tiny_cnn", "--epochs", "200",
                          "--image-size", "64", "--batch-size", "4"], name="long run")
    app = open_page(job=long.id)
    assert any("long run" in h for h in headings(app))
    button(app, "Cancel").click().run()
    assert not app.exception, app.exception
    assert runner.wait(long.id, timeout=60).status == "cancelled"

    for job in (launched, broken):
        assert runner.wait(job.id, timeout=240).done
    assert runner.get(launched.id).status == "succeeded", runner.logs(launched.id)
    assert runner.get(broken.id).status == "failed"

    # A new session (a browser reload) shows everything from the runner.
    app = open_page(job=broken.id)
    assert any("broken run" in h and "failed" in h for h in headings(app))
    assert any("This run failed" in t and "does not exist" in t for t in texts(app.error))
    app = open_page(job=long.id)
    assert any("This run was cancelled" in t for t in texts(app.warning))
    table = app.dataframe[0].value
    assert dict(zip(table["name"], table["status"])) == {"page run": "succeeded", "broken run": "failed",
                                                        "long run": "cancelled"}
    assert table.set_index("name").loc["page run", "architecture"] == "tiny_cnn"
    assert "does not exist" in table.set_index("name").loc["broken run", "why"]

    # Compare two runs: curves of the one with epochs, and a side-by-side table.
    app.multiselect(key="train_compare").set_value([launched.id, broken.id]).run()
    assert not app.exception, app.exception
    assert len(app.get("vega_lite_chart")) >= 5  # val AUC/accuracy/F1, losses, learning rate
    assert list(app.dataframe[1].value.columns) == [f"broken run · {broken.id}", f"page run · {launched.id}"]

    # The succeeded run: curves, log, report, promotion.
    app = open_page(job=launched.id)
    assert any("page run" in h and "succeeded" in h for h in headings(app))
    assert len(app.get("vega_lite_chart")) == 3  # loss, validation metrics, learning rate
    assert any("Best epoch 1" in t for t in texts(app.code))
    button(app, "Open the run report").click().run()
    assert not app.exception, app.exception
    assert any(t.startswith("From the best model evaluated on the validation split") for t in texts(app.caption))
    metric_tables = [d.value for d in app.dataframe if list(d.value.columns) == ["metric", "value"]]
    assert metric_tables and metric_tables[0].set_index("metric").loc["images", "value"] == "4"
    assert len(app.get("vega_lite_chart")) >= 5  # + confusion matrix, ROC (+ misclassified histogram)
    app.text_input(key=f"promote_name_{launched.id}").set_value("page-model")
    button(app, "Make available on the Predict page").click().run()
    assert any("Promoted as page-model" in t for t in texts(app.success)), texts(app.error)
    assert (env["state"] / "models" / "page-model" / "card.json").is_file()
    button(app, "Make available on the Predict page").click().run()
    assert any("exists already" in t for t in texts(app.error))
    assert any("Already available on the Predict page as: page-model" in t for t in texts(app.caption))


@pytest.mark.shared_data
def test_preview_of_the_shared_covid_ct_folder(env):
    root = SHARED / "covid-ct"
    if not (root / "CT_COVID").is_dir():
        pytest.skip("../shared/data/covid-ct is not present")
    app = fill_form(open_page(), root, kind="covid-ct")
    preview = app.dataframe[0].value
    assert list(preview.columns) == ["COVID", "NonCOVID", "total"]
    assert {"train", "val"} <= set(preview.index) and preview["total"].sum() > 500
    assert not button(app, "Launch training").disabled


def test_cross_validation_is_launched_from_the_form_as_a_cv_job(env):
    from covidscan.jobs import get_runner

    app = fill_form(open_page(), env["data"])
    app.number_input(key="train_cv_folds").set_value(1).run()
    assert button(app, "Launch").disabled  # one fold is no cross-validation
    app.number_input(key="train_cv_folds").set_value(2).run()
    sizes = app.multiselect(key="train_cv_eval_sizes")
    assert sizes.options == ["64", "72", "80", "88"] and sizes.value == []  # tiny_cnn's 64 px up to 10/7 of it
    sizes.set_value([64, 80])
    app.text_input(key="train_job_name").set_value("cv-from-page")
    button(app, "Launch 2-fold cross-validation").click().run()
    assert not app.exception, app.exception
    record = next(r for r in get_runner().list() if r.name == "cv-from-page")
    assert record.args[:2] == ["cv", "--config"]
    assert record.args[-6:] == ["--folds", "2", "--eval-size", "64", "--eval-size", "80"]
    finished = get_runner().wait(record.id, timeout=300)
    assert finished.status == "succeeded", get_runner().logs(record.id)
    from covidscan.bundle import read_card

    card = read_card(Path(finished.run_dir) / "model")
    estimate = card.metrics["estimate"]
    assert estimate["n"] == 16
    assert card.training["cross_validation"]["input_size_choice"]["candidates"] == [64, 80]

    # Its report: the out-of-fold estimate with intervals, the protocol, and the reliability diagram.
    app = open_page(job=record.id)
    runs_table = app.dataframe[0].value.set_index("name")
    assert runs_table.loc["cv-from-page", "epochs"] == "2 folds × 1"  # no metrics.csv of its own: folds of epochs
    assert any("cv-from-page" in h and "succeeded" in h for h in headings(app))
    assert any("one training run per fold" in t and "r0-f0" in t for t in texts(app.caption))
    assert any("out-of-fold estimate" in t for t in texts(app.caption))
    button(app, "Open the run report").click().run()
    assert not app.exception, app.exception
    captions = texts(app.caption)
    assert f"From out-of-fold predictions of 2-fold cross-validation (16 images, {estimate['groups']} groups)." in captions
    assert estimate["protocol"] in captions
    [table] = [d.value for d in app.dataframe if "95% CI" in d.value.columns]
    table = table.set_index("metric")
    assert table.loc["accuracy", "value"] == f"{estimate['accuracy']:.3f}" and table.loc["images", "value"] == "16"
    low, high = estimate["ci95"]["accuracy"]
    assert table.loc["accuracy", "95% CI"] == f"{low:.3f} – {high:.3f}"
    [bins] = [d.value for d in app.dataframe if "mean confidence" in d.value.columns]
    assert bins["images"].sum() == 16
    specs = [chart.proto.spec for chart in app.get("vega_lite_chart")]
    assert any("Reliability diagram (ECE" in spec for spec in specs)
    assert any("Confusion matrix (out-of-fold)" in spec for spec in specs)


def test_cross_validation_with_simclr_pretraining_per_fold_from_the_form(env):
    from covidscan.jobs import get_runner
    from covidscan.pretrain import record_path

    app = fill_form(open_page(), env["data"])
    app.number_input(key="train_cv_folds").set_value(2).run()
    app.number_input(key="train_cv_ssl_epochs").set_value(2).run()
    app.text_input(key="train_job_name").set_value("cv-ssl-from-page")
    button(app, "Launch 2-fold cross-validation").click().run()
    assert not app.exception, app.exception
    record = next(r for r in get_runner().list() if r.name == "cv-ssl-from-page")
    assert record.args[-4:] == ["--folds", "2", "--ssl-epochs", "2"]
    finished = get_runner().wait(record.id, timeout=300)
    assert finished.status == "succeeded", get_runner().logs(record.id)
    run_dir = Path(finished.run_dir)
    for fold in (0, 1):
        pretraining = json.loads(record_path(run_dir / "ssl" / f"r0-f{fold}.safetensors").read_text())
        assert pretraining["config"]["epochs"] == 2 and len(pretraining["losses"]) == 2
    from covidscan.bundle import read_card

    protocol = read_card(run_dir / "model").metrics["estimate"]["protocol"]
    assert "SimCLR-pretrained (2 epochs) on its own training folds' images" in protocol
