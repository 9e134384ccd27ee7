"""AppTest of the Dataset explorer page on synthetic datasets (and ../shared/data when present)."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from test_explorer import SHARED, make_covid_ct_dataset, make_folder_dataset

PAGE = str(Path(__file__).resolve().parents[1] / "app_pages" / "explorer.py")


def open_page(kind: str, root: Path | str) -> AppTest:
    app = AppTest.from_file(PAGE, default_timeout=120)
    app.run()
    app.selectbox(key="explorer_kind").set_value(kind)
    app.text_input(key="explorer_root").set_value(str(root))
    app.button[0].click().run()
    assert not app.exception, app.exception
    return app


def texts(elements) -> list[str]:
    return [str(e.value) for e in elements]


def metrics(app: AppTest) -> dict[str, str]:
    return {m.label: str(m.value) for m in app.metric}


def test_page_asks_for_a_dataset_first():
    app = AppTest.from_file(PAGE, default_timeout=60)
    app.run()
    assert not app.exception
    assert any("Research use only" in t for t in texts(app.warning) + texts(app.caption))
    assert any("Open dataset" in t for t in texts(app.info))
    assert not app.metric


def test_bad_path_gives_a_clear_message(tmp_path):
    app = open_page("covid-ct", tmp_path / "nowhere")
    assert any("does not exist" in t for t in texts(app.error))
    (tmp_path / "empty").mkdir()
    app = open_page("covid-ct", tmp_path / "empty")
    assert any("not a COVID-CT folder" in t for t in texts(app.error))


def test_folder_dataset_table_charts_grid_and_planted_duplicate(tmp_path):
    root = make_folder_dataset(tmp_path)
    app = open_page("folder", root)
    assert metrics(app) == {"Images": "19", "Classes": "2", "Splits": "2", "Patients": "unknown"}
    table = app.dataframe[0].value
    assert len(table) == 19 and {"label", "split", "age", "sex"} <= set(table.columns)
    assert "path" not in table.columns
    assert app.get("download_button")
    assert app.get("vega_lite_chart")  # class balance at least
    assert len(app.get("image")) == 19

    # Filters narrow the table.
    app.multiselect(key="table_classes").set_value(["COVID"]).run()
    assert len(app.dataframe[0].value) == 9
    assert any(t.startswith("9 of 19 images") for t in texts(app.markdown))

    # Image grid filtered by split.
    app.multiselect(key="grid_splits").set_value(["val"]).run()
    assert len(app.get("image")) == 7

    # No metadata: the baseline says so rather than failing.
    assert any("no metadata columns" in t for t in texts(app.info))

    # Leakage: the planted JPEG copy of a training COVID image, filed as val/Normal.
    app.button(key="leak_go").click().run()
    assert not app.exception
    assert any("1 near-duplicate pairs (1 across splits or classes)" in t for t in texts(app.error))
    pairs = next(d.value for d in app.dataframe if "distance" in d.value.columns)
    assert set(pairs.loc[0, ["filename_a", "filename_b"]]) == {"covid-0.png", "planted.jpg"}
    assert pairs.loc[0, "kind"] == "other split and class"

    # Intensity histograms on demand.
    app.button(key="hist_go").click().run()
    assert not app.exception
    assert len(app.get("vega_lite_chart")) >= 2


def test_covid_ct_patients_baseline_and_absence_leak(tmp_path):
    app = open_page("covid-ct", make_covid_ct_dataset(tmp_path))
    assert metrics(app)["Images"] == "12"
    shared = next(d.value for d in app.dataframe if "splits" in d.value.columns)
    assert shared["patient_id"].tolist() == ["crawled_patient_1"]
    assert any("1 patients have images in more than one split" in t for t in texts(app.error))
    # Age, sex, severity and location charts exist because the COVID rows have them.
    assert len(app.get("vega_lite_chart")) >= 5

    app.slider(key="baseline_folds").set_value(3)
    app.button(key="baseline_go").click().run()
    assert not app.exception
    scores = next(d.value for d in app.dataframe if "balanced_accuracy" in d.value.columns)
    assert len(scores) == 7 and (scores["folds"] == 3).all()
    assert any("absence tells the class" in t for t in texts(app.warning))
    verdicts = [t for t in texts(app.warning) + texts(app.info) + texts(app.success) if "Best balanced accuracy" in t]
    assert len(verdicts) == 1


@pytest.mark.shared_data
def test_real_datasets_open(tmp_path):
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not present")
    expected = {"covid-ct": ("covid-ct", "543"), "ieee8023": ("covid-chestxray", "514"),
                "folder": ("covid19-image-dataset-3class", "243")}
    for kind, (folder, images) in expected.items():
        app = open_page(kind, SHARED / folder)
        assert metrics(app)["Images"] == images, kind
        assert not app.error, texts(app.error)
