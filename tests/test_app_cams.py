"""AppTest of the Predict page's explanation controls: the method picker, colour map, lung outline and
share inside the lungs, faithfulness, and a ZIP batch (with a refused member)."""
from __future__ import annotations

import io
import zipfile

from streamlit.testing.v1 import AppTest
from synthetic import encode
from test_app_predict import _captions as image_captions
from test_app_predict import _run_upload as _upload
from test_app_predict import model_dirs  # noqa: F401  (the fixture)
from test_lungs import phantom

from covidscan.cams import CAM_METHODS


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _captions(at: AppTest) -> list[str]:
    return [c.value for c in at.caption]


def test_zip_batch_method_picker_lungs_and_faithfulness(model_dirs):  # noqa: F811
    slices = {f"case/{i}.png": encode(phantom(size=160, seed=i)[0]) for i in range(2)}
    archive = _zip({**slices, "../evil.png": slices["case/0.png"], "notes.txt": b"text"})
    at = _upload([("batch.zip", archive, "application/zip")])
    assert "2 of 3 file(s) analysed" in at.markdown[0].value
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith("batch.zip/../evil.png:") and "unsafe path" in errors[0]
    labels = [m.value for m in at.markdown if m.value.startswith("**batch.zip/case/")]
    assert labels == ["**batch.zip/case/0.png**", "**batch.zip/case/1.png**"]
    # CT phantoms: the share of each map inside the lungs is shown.
    shares = [m for m in at.metric if m.label == "Heatmap inside the lungs"]
    assert len(shares) == 2 and all(m.value.endswith("%") for m in shares)
    for metric in shares:
        if int(metric.value.rstrip("%")) < 50:
            assert any("outside the lungs" in w.value for w in at.warning)

    # Every method is offered, with a plain line on what it shows.
    picker = at.selectbox(key="predict_cam_method")
    assert list(picker.options) == [method.display for method in CAM_METHODS.values()]
    picker.set_value("eigencam").run()
    assert not at.exception
    assert any(c.startswith(CAM_METHODS["eigencam"].description) for c in _captions(at))
    assert any(c.startswith("EigenCAM for '") for c in image_captions(at))

    at.selectbox(key="predict_colormap").set_value("cividis")
    at.checkbox(key="predict_lung_outline").check()
    at.checkbox(key="predict_faithfulness").check().run()
    assert not at.exception, [e.value for e in at.exception]
    readings = [c for c in _captions(at) if c.startswith("Hiding the hottest 20% of the image")]
    assert len(readings) == 2 and all("ROAD faithfulness" in c for c in readings)


def test_a_file_that_is_not_a_zip_is_refused_clearly(model_dirs):  # noqa: F811
    at = _upload([("broken.zip", b"PK\x03\x04 nothing", "application/zip")])
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith("broken.zip:") and "not a readable ZIP" in errors[0]
    assert "0 of 1 file(s) analysed" in at.markdown[0].value
