"""AppTest of the Train page's form: built from TrainConfig's fields (advanced ones reachable), values
kept for the session across page switches, and the modality inferred or chosen, never silently CT."""
from __future__ import annotations

from pathlib import Path

import pytest
from jobs_helpers import make_dataset
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PAGE = str(ROOT / "app_pages" / "train.py")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("train_form")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COVIDSCAN_STATE_DIR", str(base / "state"))
        patch.delenv("COVIDSCAN_RAY_ADDRESS", raising=False)
        yield {"data": make_dataset(base / "data"), "base": base}


def launch_button(app: AppTest):
    return next(b for b in app.button if b.label == "Launch training")


def test_form_values_survive_a_visit_to_another_page(env):
    app = AppTest.from_file(APP, default_timeout=180)
    app.run()
    app.switch_page("app_pages/train.py").run()
    assert not app.exception, app.exception
    app.selectbox(key="train_kind").set_value("folder").run()
    app.text_input(key="train_root").set_value(str(env["data"])).run()
    app.radio(key="train_modality").set_value("X-ray").run()
    app.number_input(key="train_patience").set_value(3).run()
    app.switch_page("app_pages/explorer.py").run()
    assert not app.exception, app.exception
    assert not [w for w in app.text_input if w.key == "train_root"]  # the Train page is not shown
    app.switch_page("app_pages/train.py").run()
    assert not app.exception, app.exception
    assert app.selectbox(key="train_kind").value == "folder"
    assert app.text_input(key="train_root").value == str(env["data"])
    assert app.radio(key="train_modality").value == "X-ray"
    assert app.number_input(key="train_patience").value == 3
    assert not launch_button(app).disabled


def test_modality_is_inferred_or_chosen_never_silently_ct(env, tmp_path):
    app = AppTest.from_file(PAGE, default_timeout=180)
    app.run()
    assert app.radio(key="train_modality").value == "CT"  # covid-ct, the default layout, is CT
    app.selectbox(key="train_kind").set_value("ieee8023").run()
    assert app.radio(key="train_modality").value == "X-ray"
    app.selectbox(key="train_kind").set_value("folder").run()
    app.text_input(key="train_root").set_value(str(env["data"])).run()
    assert app.radio(key="train_modality").value is None  # a class-per-folder dataset: the user says
    assert any("Choose CT or X-ray" in str(w.value) for w in app.warning)
    assert launch_button(app).disabled
    app.radio(key="train_modality").set_value("X-ray").run()
    assert not launch_button(app).disabled


def _tiny_xray_form(env) -> AppTest:
    """The Train page with tiny_cnn on the test's class-per-folder X-ray data (not yet rerun after the modality)."""
    app = AppTest.from_file(PAGE, default_timeout=180)
    app.run()
    app.selectbox(key="train_arch").set_value("tiny_cnn").run()
    app.selectbox(key="train_kind").set_value("folder").run()
    app.text_input(key="train_root").set_value(str(env["data"]))
    app.radio(key="train_modality").set_value("X-ray")
    return app


def test_advanced_options_reach_the_job(env):
    from covidscan.jobs import get_runner
    from covidscan.training import TrainConfig

    app = _tiny_xray_form(env)
    app.selectbox(key="train_schedule").set_value("plateau")
    app.selectbox(key="train_monitor").set_value("val_f1")
    app.number_input(key="train_patience").set_value(2)
    app.text_input(key="train_progressive_resize").set_value("48,64")
    app.toggle(key="train_calibrate").set_value(False)
    app.number_input(key="train_epochs").set_value(1)
    app.run()
    launch_button(app).click().run()
    assert not app.exception, app.exception
    assert not app.error, [e.value for e in app.error]
    [record] = get_runner().list()
    config = TrainConfig.load(Path(record.run_dir) / "config.json")  # the launch config, or what training resolved
    assert (config.schedule, config.monitor, config.patience, config.progressive_resize, config.calibrate,
            config.modality, config.arch) == ("plateau", "val_f1", 2, [48, 64], False, "X-ray", "tiny_cnn")
    get_runner().cancel(record.id, wait=30)


def test_lung_crop_reaches_a_ct_job_and_is_refused_for_xray_with_a_message(env):
    from covidscan.jobs import get_runner
    from covidscan.training import TrainConfig

    app = _tiny_xray_form(env)
    app.selectbox(key="train_crop").set_value("lungs")
    app.number_input(key="train_epochs").set_value(1)
    app.run()
    before = {record.id for record in get_runner().list()}
    launch_button(app).click().run()
    assert not app.exception, app.exception
    assert any("CT slices only" in e.value for e in app.error), [e.value for e in app.error]
    assert {record.id for record in get_runner().list()} == before  # nothing launched; the form keeps its values
    assert app.selectbox(key="train_crop").value == "lungs"
    app.radio(key="train_modality").set_value("CT").run()
    launch_button(app).click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    [record] = [record for record in get_runner().list() if record.id not in before]
    config = TrainConfig.load(Path(record.run_dir) / "config.json")
    assert (config.crop, config.modality) == ("lungs", "CT")
    get_runner().cancel(record.id, wait=30)
