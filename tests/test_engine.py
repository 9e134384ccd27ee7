"""The ONNX Runtime engine: agrees with torch, caches by weights, falls back, and classifies without torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from synthetic import ct_dicom_bytes, encode, gradient_image, tiny_bundle

pytest.importorskip("onnxruntime")

from covidscan.engine import ENGINE_DIR, engine_key  # noqa: E402
from covidscan.predictor import Predictor  # noqa: E402


@pytest.fixture()
def bundle(tmp_path):
    return tiny_bundle(tmp_path / "bundle")


def images():
    return [encode(gradient_image(96, 80, seed=s), "PNG") for s in range(3)] + [ct_dicom_bytes()]


def test_onnx_agrees_with_torch_logits_and_features(bundle):
    onnx = Predictor(bundle, engine="auto")
    torch_predictor = Predictor(bundle, engine="torch")
    assert onnx.engine.name == "onnx" and torch_predictor.engine.name == "torch"
    loaded = [onnx.load(image) for image in images()]
    fast, slow = onnx.forward(loaded), torch_predictor.forward(loaded)
    assert np.abs(fast.logits - slow.logits).max() < 1e-4
    assert [f.shape for f in fast.features] == [f.shape for f in slow.features] == [(4, 32)]
    assert np.abs(fast.features[0] - slow.features[0]).max() < 1e-4
    for a, b in zip(onnx.predict(loaded), torch_predictor.predict(loaded)):
        assert a.label == b.label
        assert max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities) < 1e-4


def test_ensemble_exports_one_feature_output_per_member(tmp_path):
    import torch

    from covidscan.bundle import ModelCard, save_bundle
    from covidscan.models import create_ensemble

    torch.manual_seed(0)
    card = ModelCard.for_architecture("ens", "tiny_cnn", ["COVID", "NonCOVID"], "CT", ensemble_size=3)
    path = save_bundle(create_ensemble("tiny_cnn", 2, 3).eval(), card, tmp_path / "ens")
    onnx, reference = Predictor(path, engine="auto"), Predictor(path, engine="torch")
    loaded = [onnx.load(image) for image in images()]
    fast, slow = onnx.forward(loaded), reference.forward(loaded)
    assert onnx.engine.output_names == ["logits", "features_0", "features_1", "features_2",
                                        "member_logits_0", "member_logits_1", "member_logits_2"]
    assert np.abs(fast.logits - slow.logits).max() < 1e-4
    for f, s in zip(fast.member_logits, slow.member_logits, strict=True):
        assert np.abs(f - s).max() < 1e-4
    assert np.abs(np.mean(fast.member_logits, axis=0) - fast.logits).max() < 1e-4  # the ensemble averages its members
    for f, s in zip(fast.features, slow.features, strict=True):
        assert np.abs(f - s).max() < 1e-4


def test_the_gate_taps_are_exported_and_agree_with_torch_and_explain(tmp_path):
    import torch

    from covidscan.bundle import ModelCard, load_bundle, save_bundle
    from covidscan.gate import fit_gate, split_features, write_gate
    from covidscan.models import create_ensemble

    torch.manual_seed(0)
    card = ModelCard.for_architecture("ens", "tiny_cnn", ["COVID", "NonCOVID"], "CT", ensemble_size=2)
    path = save_bundle(create_ensemble("tiny_cnn", 2, 2).eval(), card, tmp_path / "ens")
    bundle = load_bundle(path)
    untapped_key = engine_key(bundle.card)
    rng = np.random.default_rng(0)
    train, val = (torch.from_numpy(rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8)) for n in (30, 12))
    taps = ["features.2", "features.4"]
    fitted = fit_gate(split_features(bundle.model, train, card.mean, card.std, taps=taps)[0],
                      split_features(bundle.model, val, card.mean, card.std, taps=taps)[0], rank=4, taps=taps)
    write_gate(path, fitted)
    onnx, reference = Predictor(path, engine="auto"), Predictor(path, engine="torch")
    assert onnx.engine.name == "onnx" and engine_key(onnx.card) != untapped_key  # the taps shape the graph
    # 2 heads (32), then features.2 (2 x 16) and features.4 (2 x 32) of each member, then the member logits.
    assert onnx.engine.output_names == ["logits", *[f"features_{j}" for j in range(6)], "member_logits_0",
                                        "member_logits_1"]
    loaded = [onnx.load(image) for image in images()]
    fast, slow = onnx.forward(loaded), reference.forward(loaded)
    assert [f.shape[1] for f in fast.features] == [f.shape[1] for f in slow.features] == [32, 32, 32, 32, 64, 64]
    for f, s in zip(fast.features, slow.features, strict=True):
        assert np.abs(f - s).max() < 1e-4 * max(1.0, np.abs(s).max())
    for a, b in zip(onnx.predict(loaded), reference.predict(loaded)):
        assert a.ood["score"] == pytest.approx(b.ood["score"], rel=1e-4)
    explained, _ = reference.explain(loaded[0])
    assert explained.ood["score"] == pytest.approx(onnx.predict_one(loaded[0]).ood["score"], rel=1e-4)


def test_export_is_cached_by_weights_and_reused(bundle):
    from covidscan.bundle import read_card

    Predictor(bundle, engine="auto")
    key = engine_key(read_card(bundle))
    cached = bundle / ENGINE_DIR / f"{key}.onnx"
    meta = json.loads((bundle / ENGINE_DIR / f"{key}.json").read_text())
    assert cached.is_file() and meta["max_abs_diff"] <= 1e-4
    stamp = cached.stat().st_mtime_ns
    assert Predictor(bundle, engine="auto").engine.path == cached
    assert cached.stat().st_mtime_ns == stamp  # reused, not exported again
    retrained = tiny_bundle(bundle, seed=7)  # new weights: a new key
    assert engine_key(read_card(retrained)) != key


def test_corrupted_cache_is_not_used(bundle):
    reference = Predictor(bundle, engine="torch").predict_one(images()[0]).probabilities
    Predictor(bundle, engine="auto")
    onnx_file = next((bundle / ENGINE_DIR).glob("*.onnx"))
    onnx_file.write_bytes(b"garbage" + onnx_file.read_bytes()[100:])
    from covidscan.bundle import read_card
    from covidscan.engine import load_cached_onnx

    assert load_cached_onnx(read_card(bundle), bundle) is None
    rebuilt = Predictor(bundle, engine="auto")  # re-exported from torch
    assert rebuilt.engine.name == "onnx"
    probabilities = rebuilt.predict_one(images()[0]).probabilities
    assert max(abs(probabilities[k] - reference[k]) for k in reference) < 1e-4


def test_torch_fallback_when_the_probe_check_fails(bundle, monkeypatch):
    import covidscan.engine as engine

    monkeypatch.setattr(engine, "PROBE_TOLERANCE", -1.0)  # no export can pass: ONNX Runtime must not be used
    predictor = Predictor(bundle, engine="auto")
    assert predictor.engine.name == "torch"
    assert not list((bundle / ENGINE_DIR).glob("*.onnx"))


def test_torch_fallback_without_onnxruntime(bundle):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["onnxruntime"] = None  # as if it were not installed
        from covidscan.predictor import Predictor
        print(Predictor({str(bundle)!r}, engine="auto").engine.name)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "torch", result.stderr


def test_numpy_preprocessing_matches_transforms():
    from covidscan.preprocessing import preprocess_array
    from covidscan.transforms import preprocess

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    pictures = [gradient_image(300, 200, 1), gradient_image(40, 50, 2), gradient_image(224, 224, 3)]
    expected = preprocess(pictures, 224, mean, std).numpy()
    actual = preprocess_array(pictures, 224, mean, std)
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1e-4


def test_builtin_architectures_match_the_registry():
    from covidscan.bundle import BUILTIN_ARCHITECTURES
    from covidscan.models import list_architectures

    assert set(BUILTIN_ARCHITECTURES) <= set(list_architectures())


def test_cli_predict_does_not_import_torch_once_cached(bundle, tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(images()[0])
    Predictor(bundle, engine="auto")  # the export, cached in the bundle
    code = textwrap.dedent(f"""
        import sys
        from covidscan.cli import main
        status = main(["predict", "--model", {str(bundle)!r}, "--json", {str(image)!r}])
        assert status == 0
        print("TORCH" if "torch" in sys.modules else "NO-TORCH", "torchvision" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ})
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stderr
    assert lines[-1] == "NO-TORCH False"
    record = json.loads(lines[0])
    expected = Predictor(bundle, engine="torch").predict_one(image).probabilities
    assert max(abs(record["probabilities"][k] - expected[k]) for k in expected) < 1e-4


def test_cli_models_does_not_import_torch(bundle):
    code = textwrap.dedent("""
        import sys
        from covidscan.cli import main
        assert main(["models", "--json"]) == 0
        print("TORCH" if "torch" in sys.modules else "NO-TORCH")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COVIDSCAN_WEIGHTS_DIR": str(bundle.parent)})
    assert result.returncode == 0, result.stderr
    *listing, marker = result.stdout.strip().splitlines()
    assert marker == "NO-TORCH"
    assert [m["name"] for m in json.loads("\n".join(listing))] == ["bundle"]


def test_changed_weights_are_refused_even_with_a_cached_export(bundle):
    from covidscan.errors import ModelBundleError

    Predictor(bundle, engine="auto")
    weights = bundle / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelBundleError, match="checksum"):
        Predictor(bundle, engine="auto")
