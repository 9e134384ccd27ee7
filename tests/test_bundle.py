"""Tests for model bundles: round trip, validation against the card, and refusing pickles."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from synthetic import tiny_bundle

from covidscan.bundle import CARD_FILE, WEIGHTS_FILE, ModelCard, load_bundle, read_card, save_bundle
from covidscan.errors import ModelBundleError
from covidscan.models import create_model


def test_round_trip_keeps_weights_and_card(tmp_path):
    torch.manual_seed(1)
    model = create_model("tiny_cnn", 3).eval()
    card = ModelCard.for_architecture("xr", "tiny_cnn", ["COVID", "Normal", "Viral Pneumonia"], "X-ray",
                                      training={"command": "covidscan train ..."}, metrics={"val": {"accuracy": 0.5}})
    path = save_bundle(model, card, tmp_path / "bundle")
    assert sorted(os.listdir(path)) == [CARD_FILE, WEIGHTS_FILE]
    assert path.stat().st_mode & 0o777 == 0o755 and (path / WEIGHTS_FILE).stat().st_mode & 0o777 == 0o644
    loaded = load_bundle(path)
    assert loaded.card.classes == ["COVID", "Normal", "Viral Pneumonia"]
    assert loaded.card.metrics == {"val": {"accuracy": 0.5}} and loaded.card.input_size == 64
    assert loaded.card.package_version and loaded.card.created and len(loaded.card.weights_sha256) == 64
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))
    assert not loaded.model.training
    assert load_bundle(path / CARD_FILE).card == loaded.card  # the card's path works too


def test_overwriting_a_bundle_is_atomic_and_leaves_no_temporaries(tmp_path):
    first = tiny_bundle(tmp_path / "b", seed=1)
    tiny_bundle(first, seed=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    torch.manual_seed(2)
    expected = create_model("tiny_cnn", 2).state_dict()
    loaded = load_bundle(first).model.state_dict()
    torch.testing.assert_close(loaded["classifier.weight"], expected["classifier.weight"])


def test_failed_save_leaves_no_bundle(tmp_path):
    card = ModelCard.for_architecture("bad", "tiny_cnn", ["A", "B"], "CT")

    class Exploding(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_bundle(Exploding(), card, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_tampered_weights_are_refused(tmp_path):
    path = tiny_bundle(tmp_path / "b")
    weights = path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelBundleError, match="do not match the model card"):
        load_bundle(path)


def test_card_must_match_weights(tmp_path):
    path = tiny_bundle(tmp_path / "b")
    card = json.loads((path / CARD_FILE).read_text())
    card["classes"] = ["A", "B", "C"]  # the weights have a 2-class head
    (path / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelBundleError, match="do not match the model card.*3 classes"):
        load_bundle(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architecture": "alexnet"}, "Unknown architecture"),
        ({"classes": ["COVID"]}, "at least two distinct"),
        ({"modality": "MR"}, "'modality' must be one of"),
        ({"input_size": 5}, "input_size"),
        ({"mean": [0.5]}, "'mean' must be"),
        ({"threshold": 1.5, "positive_class": "COVID"}, "threshold"),
        ({"positive_class": "Flu"}, "positive_class"),
        ({"temperature": 0}, "temperature"),
    ],
)
def test_invalid_cards_are_refused(tmp_path, change, message):
    path = tiny_bundle(tmp_path / "b")
    card = json.loads((path / CARD_FILE).read_text())
    card.update(change)
    (path / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelBundleError, match=message):
        load_bundle(path)


def test_missing_and_malformed_bundles(tmp_path):
    with pytest.raises(ModelBundleError, match="No model bundle"):
        load_bundle(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelBundleError, match="no card.json"):
        load_bundle(tmp_path / "empty")
    broken = tiny_bundle(tmp_path / "broken")
    (broken / CARD_FILE).write_text("{not json")
    with pytest.raises(ModelBundleError, match="not valid JSON"):
        read_card(broken)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelBundleError, match="not a model bundle"):
        load_bundle(text)


def test_pt_checkpoint_with_card_loads_through_weights_only(tmp_path):
    torch.manual_seed(3)
    model = create_model("tiny_cnn", 2).eval()
    card = ModelCard.for_architecture("pt", "tiny_cnn", ["COVID", "NonCOVID"], "CT")
    path = tmp_path / "model.pt"
    torch.save({"card": json.dumps(card.to_dict()), "state_dict": model.state_dict()}, path)
    loaded = load_bundle(path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))


class _Payload:
    """Unpickling this runs os.system: a stand-in for a malicious model file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["evil.pt", "evil.pth"])
def test_malicious_pickle_does_not_run(tmp_path, name):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    with open(path, "wb") as handle:
        pickle.dump({"card": {}, "state_dict": _Payload(marker)}, handle)
    # Also as a torch.save zip archive, the usual .pt layout.
    zipped = tmp_path / ("zip-" + name)
    torch.save({"state_dict": _Payload(marker)}, zipped)
    for candidate in (path, zipped):
        with pytest.raises(ModelBundleError, match="refused|not a readable"):
            load_bundle(candidate)
    assert not marker.exists(), "the pickle payload ran"


def test_malicious_pickle_inside_a_bundle_folder(tmp_path):
    marker = tmp_path / "pwned"
    path = tiny_bundle(tmp_path / "b")
    card = json.loads((path / CARD_FILE).read_text())
    card["weights_file"], card["weights_sha256"] = "model.pt", ""
    (path / CARD_FILE).write_text(json.dumps(card))
    torch.save({"x": _Payload(marker)}, path / "model.pt")
    with pytest.raises(ModelBundleError, match="refused"):
        load_bundle(path)
    assert not marker.exists()


def test_the_card_decides_its_dicom_window(tmp_path):
    from synthetic import ct_dicom_bytes

    from covidscan.predictor import Predictor

    ct = read_card(tiny_bundle(tmp_path / "ct", modality="CT"))
    xray = read_card(tiny_bundle(tmp_path / "xray", modality="X-ray"))
    assert ct.window == xray.window == "lung"
    assert ct.dicom_window == "lung" and xray.dicom_window is None
    ct.window = "mediastinum"
    assert ct.dicom_window == "mediastinum"
    ct.window = None
    assert ct.dicom_window is None
    # The Predictor reads DICOMs with it: a CT model applies its window, an X-ray model keeps the file's.
    data = ct_dicom_bytes()
    ct_model, xray_model = Predictor(tmp_path / "ct"), Predictor(tmp_path / "xray")
    for predictor in (ct_model, xray_model):
        predictor.card.window = "mediastinum"
    assert ct_model.load(data).info.window.startswith("mediastinum")
    assert xray_model.load(data).info.window.startswith("lung")  # the CT file's own default, not the card's
