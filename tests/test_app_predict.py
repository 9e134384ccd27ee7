"""The Streamlit app through AppTest: navigation, the Predict page's results, errors, DICOM and caching.

Every test builds tiny ``tiny_cnn`` bundles in a temporary folder and points
``COVIDSCAN_WEIGHTS_DIR`` / ``COVIDSCAN_RUNS_DIR`` at it, so no shipped model is needed.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest
from synthetic import PHI, ct_dicom_bytes, encode, gradient_image, tiny_bundle

from app_pages import ui
from covidscan import catalog
from covidscan.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PREDICT_PAGE = str(ROOT / "app_pages" / "predict.py")
TIMEOUT = 180  # seconds per script run: the first one imports torch and pytorch-grad-cam


@pytest.fixture
def model_dirs(tmp_path, monkeypatch):
    """A weights folder with one CT bundle and an empty runs folder, wired through the env."""
    weights = tmp_path / "weights"
    runs = tmp_path / "runs"
    runs.mkdir()
    tiny_bundle(weights / "ct-tiny", metrics={"val": {"accuracy": 0.75, "auc": 0.8, "n": 40}},
                training={"data": "synthetic gradients"})
    monkeypatch.setenv("COVIDSCAN_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv(catalog.RUNS_ENV, str(runs))
    monkeypatch.setenv("COVIDSCAN_STATE_DIR", str(tmp_path / "state"))  # no promoted models of the machine's
    monkeypatch.chdir(ROOT)
    return weights, runs


@pytest.fixture
def model_calls(monkeypatch):
    """Count every forward pass the app asks of a Predictor (explain and predict)."""
    calls = {"explain": 0, "predict": 0}
    real_explain, real_predict = Predictor.explain, Predictor.predict

    def explain(self, *args, **kwargs):
        calls["explain"] += 1
        return real_explain(self, *args, **kwargs)

    def predict(self, *args, **kwargs):
        calls["predict"] += 1
        return real_predict(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "explain", explain)
    monkeypatch.setattr(Predictor, "predict", predict)
    return calls


def _png(seed: int = 0, size: int = 96) -> bytes:
    return encode(gradient_image(size, size, seed=seed))


def _page_text(at: AppTest) -> str:
    """Every element's serialized content on the page (text, captions, options, chart data)."""
    parts: list[str] = []

    def walk(node) -> None:
        children = getattr(node, "children", None)
        if isinstance(children, dict):
            for child in children.values():
                walk(child)
        proto = getattr(node, "proto", None)
        if proto is not None:
            parts.append(str(proto))

    walk(at._tree)
    return "\n".join(parts)


def _captions(at: AppTest) -> list[str]:
    return [caption for image in at.get("image") for caption in image.captions]


def _run_upload(files: list[tuple[str, bytes, str]]) -> AppTest:
    at = AppTest.from_file(PREDICT_PAGE, default_timeout=TIMEOUT)
    at.run()
    at.file_uploader[0].set_value(files)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


# ---------------------------------------------------------------- the shell


def test_app_shows_note_and_every_page_runs(model_dirs):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception
    assert [t.value for t in at.title] == ["Predict"]
    assert any("Research use only" in w.value and "not for diagnosis" in w.value for w in at.warning)
    assert any("research use only" in c.value for c in at.sidebar.caption)
    # The sidebar shows the picked model's card: classes, training data, metrics with their split.
    sidebar = _page_text(at)
    assert "ct-tiny (CT)" in sidebar and "synthetic gradients" in sidebar
    assert "validation: accuracy 0.750" in sidebar and "ROC AUC 0.800" in sidebar
    for page, title in (("app_pages/train.py", "Train"), ("app_pages/explorer.py", "Dataset explorer")):
        at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert title in [t.value for t in at.title]
        # (AppTest drops the entry script's sidebar after switch_page; the browser test checks it there.)


def test_without_any_model_the_page_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDSCAN_WEIGHTS_DIR", str(tmp_path / "none"))
    monkeypatch.setenv(catalog.RUNS_ENV, str(tmp_path / "no-runs"))
    monkeypatch.setenv("COVIDSCAN_STATE_DIR", str(tmp_path / "no-state"))
    at = AppTest.from_file(PREDICT_PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert any("No model is available" in i.value for i in at.info)
    assert at.sidebar.selectbox[0].options == ["Another bundle folder…"]


def test_a_damaged_model_is_reported_not_raised(model_dirs):
    weights, _ = model_dirs
    weights_file = weights / "ct-tiny" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-64] + b"\0" * 64)  # the card still reads fine
    at = AppTest.from_file(PREDICT_PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "could not be loaded" in errors[0] and "checksum differs" in errors[0]


def test_typed_bundle_path_is_checked(model_dirs, tmp_path):
    other = tiny_bundle(tmp_path / "elsewhere" / "xray-tiny", classes=("COVID", "Normal", "Pneumonia"),
                        modality="X-ray")
    at = AppTest.from_file(PREDICT_PAGE, default_timeout=TIMEOUT).run()
    at.sidebar.selectbox[0].select("Another bundle folder…").run()
    at.sidebar.text_input[0].input(str(tmp_path / "missing")).run()
    assert any("is not a model bundle" in e.value or "No model bundle" in e.value for e in at.sidebar.error)
    at.sidebar.text_input[0].input(str(other)).run()
    assert not at.sidebar.error
    assert at.selectbox(key="predict_target").options == ["Predicted class", "COVID", "Normal", "Pneumonia"]


# ---------------------------------------------------------------- results


def test_good_and_bad_files_each_get_their_own_card(model_dirs):
    at = _run_upload([("scan.png", _png(), "image/png"),
                      ("notes.png", b"this is not an image", "image/png")])
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith("notes.png:") and "not an image" in errors[0]
    # The good file still has its answer, its image and its overlay (explaining the predicted class).
    labels = [m.value.removeprefix("### ") for m in at.markdown if m.value.startswith("### ")]
    assert len(labels) == 1 and labels[0] in ("COVID", "NonCOVID")
    assert _captions(at) == ["scan.png", f"Grad-CAM for '{labels[0]}'"]
    # One probability bar per class, highest first, the predicted class in bold; they add up to 100 %.
    bars = at.get("progress")
    assert len(bars) == 2 and bars[0].text.startswith(f"**{labels[0]}** — ")
    assert bars[0].value >= bars[1].value and abs(sum(bar.value for bar in bars) - 100) <= 1
    for bar in bars:  # the text's percentage is the bar's length (which Streamlit keeps as a whole number)
        assert abs(float(bar.text.rsplit("— ", 1)[1].rstrip("%")) - bar.value) < 1
    assert "1 of 2 file(s) analysed" in at.markdown[0].value
    assert {b.label for b in at.get("download_button")} == {"Results CSV", "Overlay PNG", "PDF report"}


def test_dicom_gets_a_result_a_window_choice_and_no_phi(model_dirs, model_calls):
    hu = np.tile(np.linspace(-1000, 300, 80), (80, 1))
    at = _run_upload([("slice.dcm", ct_dicom_bytes(hu), "application/dicom")])
    assert not at.error
    assert len([m for m in at.markdown if m.value.startswith("### ")]) == 1
    summary = [c.value for c in at.caption if c.value.startswith("DICOM (de-identified)")]
    assert len(summary) == 1
    assert "Modality: CT" in summary[0] and "80 × 80 px" in summary[0] and "0.7 × 0.7 mm" in summary[0]
    assert "lung" in summary[0]
    text = _page_text(at)
    for value in PHI.values():
        assert value not in text and value.split("^")[0] not in text
    # A different window re-reads the file (new pixels) and says so.
    calls_before = model_calls["explain"]
    at.selectbox(key="predict_window").select("mediastinum").run()
    assert not at.exception
    summary = [c.value for c in at.caption if c.value.startswith("DICOM (de-identified)")]
    assert "mediastinum" in summary[0]
    assert model_calls["explain"] == calls_before + 1


def test_other_modalities_are_warned_about(model_dirs):
    at = _run_upload([("head.dcm", ct_dicom_bytes(modality="MR"), "application/dicom"),
                      ("chest.dcm", ct_dicom_bytes(modality="CR"), "application/dicom")])
    warnings = [w.value for w in at.warning]
    assert any("modality is MR" in w and "trained on CT" in w for w in warnings)
    assert any("modality is CR" in w and "trained on CT" in w for w in warnings)


def test_cam_controls_never_rerun_the_classifier(model_dirs, model_calls):
    at = _run_upload([("one.png", _png(1), "image/png"), ("two.png", _png(2), "image/png")])
    after_upload = dict(model_calls)
    labels = [m.value for m in at.markdown if m.value.startswith("### ")]
    overlay_urls = [image.value[0] for image in at.get("image")][1::2]

    # Opacity only re-blends: no model call, yet a different overlay picture.
    at.slider(key="predict_opacity").set_value(0.9).run()
    assert model_calls == after_upload
    assert [image.value[0] for image in at.get("image")][1::2] != overlay_urls

    # A new CAM method computes that CAM once per image; the answer itself is unchanged.
    at.selectbox(key="predict_cam_method").set_value("gradcam++").run()
    assert model_calls["explain"] == after_upload["explain"] + 2
    assert [m.value for m in at.markdown if m.value.startswith("### ")] == labels
    assert all(c.startswith("Grad-CAM++ for") for c in _captions(at)[1::2])

    # Going back is served from the per-image cache; so is a rerun with nothing changed.
    at.selectbox(key="predict_cam_method").set_value("gradcam").run()
    at.run()
    assert model_calls["explain"] == after_upload["explain"] + 2
    assert model_calls["predict"] == after_upload["predict"] == 0

    # Explaining another class: one CAM per image, and the caption names that class.
    at.selectbox(key="predict_target").select("COVID").run()
    assert model_calls["explain"] == after_upload["explain"] + 4
    assert all(c == "Grad-CAM for 'COVID'" for c in _captions(at)[1::2])
    assert [m.value for m in at.markdown if m.value.startswith("### ")] == labels


def test_a_per_feature_map_method_says_what_it_costs_with_the_model(model_dirs):
    """Picking Score-CAM warns, before any upload, how many times it runs the picked model per image;
    Grad-CAM does not warn."""
    weights, _ = model_dirs
    at = AppTest.from_file(PREDICT_PAGE, default_timeout=TIMEOUT)
    at.run()
    assert not [w for w in at.warning if "times per image" in w.value]
    at.selectbox(key="predict_cam_method").set_value("scorecam").run()
    assert not at.exception, [e.value for e in at.exception]
    passes = Predictor(weights / "ct-tiny").cam_forward_passes("scorecam")
    assert passes > 1
    assert [w.value for w in at.warning if "times per image" in w.value] == [
        f"Score-CAM runs this model {passes:,} times per image (once per feature map): minutes per image "
        "on a CPU. Grad-CAM runs it once."]


# ---------------------------------------------------------------- helpers behind the page


def test_analyze_upload_caches_by_content_and_reports_bad_files(tmp_path, model_calls):
    predictor = Predictor(tiny_bundle(tmp_path / "m"))
    cache = ui.CaseCache(capacity=2)
    first = ui.analyze_upload(predictor, "m", "a.png", _png(3), None, cache)
    again = ui.analyze_upload(predictor, "m", "renamed.png", _png(3), None, cache)
    assert again is first and model_calls["explain"] == 1
    assert first.prediction.label in predictor.classes and first.error is None
    bad = ui.analyze_upload(predictor, "m", "empty.dcm", b"", None, cache)
    assert bad.error == "The file is empty." and bad.prediction is None
    # Capacity 2: a third distinct file evicts the oldest.
    ui.analyze_upload(predictor, "m", "c.png", _png(4), None, cache)
    assert len(cache) == 2
    assert ui.analyze_upload(predictor, "m", "a.png", _png(3), None, cache) is not first


def test_case_overlay_reblends_without_the_model(tmp_path, model_calls):
    predictor = Predictor(tiny_bundle(tmp_path / "m"))
    case = ui.analyze_upload(predictor, "m", "a.png", _png(5, 120), None, ui.CaseCache())
    calls = model_calls["explain"]
    target, faint = ui.case_overlay(predictor, case, "gradcam", None, 0.1)
    _, strong = ui.case_overlay(predictor, case, "gradcam", None, 0.9)
    assert model_calls["explain"] == calls and target == case.prediction.label
    assert faint.shape == strong.shape == (120, 120, 3)
    # Low opacity stays close to the image; high opacity moves away from it.
    pixels = case.image.pixels.astype(int)
    assert np.abs(faint.astype(int) - pixels).mean() < np.abs(strong.astype(int) - pixels).mean()
    # What the page sends is encoded once per setting: reruns reuse the bytes.
    png = ui.image_png(case, 768)
    assert ui.image_png(case, 768) is png and np.array_equal(np.asarray(Image.open(io.BytesIO(png))), case.image.pixels)
    _, jpeg = ui.overlay_jpeg(predictor, case, "gradcam", None, 0.5, 768)
    assert ui.overlay_jpeg(predictor, case, "gradcam", None, 0.5, 768)[1] is jpeg
    _, other = ui.overlay_jpeg(predictor, case, "gradcam", None, 0.6, 768)
    assert other != jpeg and Image.open(io.BytesIO(other)).format == "JPEG"
    assert model_calls["explain"] == calls


def test_large_images_are_previewed_small_and_downloaded_full_size(tmp_path, model_calls):
    predictor = Predictor(tiny_bundle(tmp_path / "m"))
    case = ui.analyze_upload(predictor, "m", "xray.png", encode(gradient_image(1000, 500)),
                             None, ui.CaseCache())
    _, preview = ui.case_overlay(predictor, case, "gradcam", None, 0.5, max_side=300)
    _, full = ui.case_overlay(predictor, case, "gradcam", None, 0.5)
    assert preview.shape == (150, 300, 3) and full.shape == (500, 1000, 3)
    assert ui.preview_pixels(case, 300) is ui.preview_pixels(case, 300)  # shrunk once, then kept
    assert ui.preview_pixels(case, 2000) is case.image.pixels
    assert model_calls["explain"] == 1


def test_sessions_sharing_a_model_get_their_own_heatmaps(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    predictor = Predictor(tiny_bundle(tmp_path / "m"))
    files = [encode(gradient_image(96, 96, seed=seed)) for seed in range(6)]

    def analyse(data: bytes) -> np.ndarray:  # each "session" has its own cache
        case = ui.analyze_upload(predictor, "m", "x.png", data, None, ui.CaseCache(), "gradcam++")
        return ui.case_heatmap(predictor, case, "gradcam++", None)[1]

    alone = [analyse(data) for data in files]
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(analyse, files))
    for expected, got in zip(alone, together):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_results_survive_a_visit_to_another_page_and_clear_with_the_upload(model_dirs, model_calls):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.file_uploader[0].set_value([("kept.png", _png(9), "image/png")]).run()
    assert [m.value for m in at.markdown if m.value.startswith("### ")]
    calls = model_calls["explain"]
    at.switch_page("app_pages/train.py").run()
    at.switch_page("app_pages/predict.py").run()
    assert not at.exception
    assert _captions(at)[0] == "kept.png"  # shown again, from this session's memory ...
    assert model_calls["explain"] == calls  # ... and from the cache, not the model
    assert any("uploaded earlier in this session" in c.value for c in at.caption)
    at.button(key="predict_clear").click().run()
    assert not at.get("image") and not at.exception
    # Removing the files from the upload box removes their results too.
    at.file_uploader[0].set_value([("again.png", _png(10), "image/png")]).run()
    assert _captions(at)[0] == "again.png"
    at.file_uploader[0].set_value(None).run()
    assert not at.get("image")


# ---------------------------------------------------------------- Hugging Face Spaces packaging


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def test_space_front_matter_and_dockerfile_agree():
    import shlex

    import yaml

    readme = (ROOT / "README.md").read_text()
    assert readme.startswith("---\n")
    meta = yaml.safe_load(readme.split("---\n", 2)[1])
    assert meta["sdk"] == "docker" and meta["license"] == "mit"
    assert meta["title"] and meta["emoji"] and meta["colorFrom"] and meta["colorTo"]
    assert len(meta["short_description"]) <= 60  # the Hub's limit
    port = int(meta["app_port"])

    steps = _dockerfile_instructions()
    kinds = [kind for kind, _ in steps]
    assert kinds[0] == "FROM" and "python:3" in steps[0][1]
    # Runs as a non-root user, from before anything is installed.
    user_at = kinds.index("USER")
    assert steps[user_at][1] not in ("root", "0") and user_at < kinds.index("RUN", user_at)
    runs = " ".join(args for kind, args in steps if kind == "RUN")
    # The same requirements file as everywhere else, torch from the CPU-only wheel index.
    assert "-r requirements.txt" in runs and "download.pytorch.org/whl/cpu" in runs
    pinned = {line.split("==")[0] for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.startswith(("torch==", "torchvision=="))}
    assert pinned == {"torch", "torchvision"}  # what the Dockerfile's grep picks for the CPU index
    assert any(kind == "COPY" and args.split()[-2:] == ["requirements.txt", "./"] for kind, args in steps)
    assert f"EXPOSE {port}" in [f"{kind} {args}" for kind, args in steps]
    command = json.loads(dict(steps)["CMD"])
    # The preloading launcher (Streamlit in the same process), listening on every interface at app_port.
    assert command[:2] == ["covidscan", "app"]
    options = dict(zip(command[2::2], command[3::2]))
    assert options == {"--host": "0.0.0.0", "--port": str(port)}
    # Nothing the app needs is kept out of the image.
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in ("app.py", "app_pages", "covidscan", "weights", "requirements.txt", ".streamlit", "pyproject.toml"):
        assert needed not in ignored
    assert shlex.split(dict(steps)["WORKDIR"]) == ["/home/user/app"]


def test_the_uploader_accepts_every_format_read_image_reads(model_dirs):
    """The help text and read_image promise GIF (and the others): the uploader must let them through."""
    from covidscan.images import SUPPORTED_TEXT, read_image

    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    uploader = at.get("file_uploader")[0].proto
    accepted = {t.lstrip(".").lower() for t in uploader.type}
    assert SUPPORTED_TEXT in uploader.help
    for pil_format, extension in (("PNG", "png"), ("JPEG", "jpg"), ("BMP", "bmp"), ("TIFF", "tif"), ("GIF", "gif")):
        assert pil_format in SUPPORTED_TEXT
        assert read_image(encode(gradient_image(64, 64), pil_format)).info.format == pil_format
        assert extension in accepted, f"{extension} files are refused by the uploader"
    assert {"dcm", "dicom"} <= accepted


def test_a_flagged_image_is_not_assessed_and_the_batch_counts_it(model_dirs):
    at = _run_upload([("head.dcm", ct_dicom_bytes(modality="MR"), "application/dicom"),
                      ("scan.png", _png(), "image/png")])
    statements = [e.value for e in at.error if "not assessed" in e.value]
    assert statements == ["**Outside what this model was trained on: not assessed.**"]
    # Only the image that passed leads with its label; the flagged one's output sits in an expander.
    assert len([m for m in at.markdown if m.value.startswith("### ")]) == 1
    assert [e.label for e in at.expander if e.label.startswith("Model output")] == [
        "Model output anyway (not an assessment)"]
    assert any("modality is MR" in c.value for c in at.caption)
    assert any(c.value.startswith("1 outside what the model was trained on") for c in at.caption)
