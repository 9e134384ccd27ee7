"""Inference engines for the forward pass: ONNX Runtime (fast, torch-free once cached) or PyTorch.

A bundle's model is exported to ONNX once and cached by its weights' SHA-256: inside the bundle
(``<bundle>/.engine/``) when that folder is writable, else in the user cache folder. Before an
export is first used, its probabilities are checked against PyTorch's on a probe batch (max abs
difference at most :data:`PROBE_TOLERANCE`); a failed check, a missing ``onnxruntime`` or a damaged
cache file falls back to PyTorch (or to a fresh export). The exported graph has the outputs
``logits``; ``features_{j}``: the features the out-of-distribution gate scores, in
:func:`covidscan.gate.feature_layers` order (per ensemble member ``i``, a single model being member
0, the input of its final linear layer; then, for each tap the card's gate names, each member's
pooled block output); and per member ``member_logits_{i}``.

Loading a cached export (:func:`load_cached_onnx`) imports neither torch nor torchvision. Grad-CAM
always runs on PyTorch (it needs gradients).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from covidscan.utils import sha256_file


log = logging.getLogger(__name__)

#: "auto" (ONNX Runtime when it works, else torch), "onnx" (same, but say so when it falls back), "torch".
ENGINES = ("auto", "onnx", "torch")
#: Environment variable that overrides the engine a Predictor is asked for (e.g. COVIDSCAN_ENGINE=torch).
ENGINE_ENV = "COVIDSCAN_ENGINE"
#: Largest max-abs difference of probabilities between ONNX Runtime and torch accepted on the probe batch.
PROBE_TOLERANCE = 1e-4
PROBE_BATCH = 4
#: Bump when the exported graph's layout changes, so old caches are not used.
EXPORT_VERSION = 3  # 2: member logits as outputs (the gate's uncertainty); 3: the gate's tap features
ENGINE_DIR = ".engine"


@dataclass
class ForwardResult:
    """One forward pass: logits (N x classes), the gate's features (N x D_j in
    :func:`covidscan.gate.feature_layers` order: each member's penultimate features, then each
    tap's per member) and each member's own logits (N x classes; the ensemble's logits are their mean)."""

    logits: np.ndarray
    features: list[np.ndarray]
    member_logits: list[np.ndarray]


class OnnxEngine:
    """An ONNX Runtime session over an exported bundle (CPU; CUDA when its provider is installed)."""

    name = "onnx"

    def __init__(self, path: Path, device: str = "cpu") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Idle ORT workers otherwise spin for a while after each call and starve the torch work that
        # follows on the same cores (Grad-CAM after an ONNX prediction ran up to 3x slower).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.path = path
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]
        if not self.output_names or self.output_names[0] != "logits":
            raise ValueError("the exported graph has no 'logits' output")

    def forward(self, batch: np.ndarray) -> ForwardResult:
        """Run a normalised N x 3 x S x S float32 batch."""
        outputs = dict(zip(self.output_names,
                           self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(batch, np.float32)})))
        features = sum(name.startswith("features_") for name in outputs)
        members = sum(name.startswith("member_logits_") for name in outputs) or features
        return ForwardResult(logits=outputs["logits"], features=[outputs[f"features_{j}"] for j in range(features)],
                             member_logits=[outputs.get(f"member_logits_{i}", outputs["logits"]) for i in range(members)])


class TorchEngine:
    """The PyTorch forward pass, with the same outputs as :class:`OnnxEngine`."""

    name = "torch"

    def __init__(self, model, device, taps: Sequence[str] = ()) -> None:
        self.model = model
        self.device = device
        self._features = _FeatureTap(model, taps)

    def forward(self, batch: np.ndarray) -> ForwardResult:
        """Run a normalised N x 3 x S x S float32 batch (no gradients)."""
        import torch

        with torch.inference_mode(), self._features.capture() as captured:
            logits = self.model(torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device))
        features, member_logits = self._features.split(captured)
        return ForwardResult(logits=logits.float().cpu().numpy(),
                             features=[f.float().cpu().numpy() for f in features],
                             member_logits=[out.float().cpu().numpy() for out in member_logits])


class _FeatureTap:
    """Records the gate's feature of each of :func:`covidscan.gate.feature_layers`' layers (and each
    head's output) while :meth:`capture` is active."""

    def __init__(self, model, taps: Sequence[str] = ()) -> None:
        from covidscan.gate import feature_layers

        self.layers = feature_layers(model, taps)
        self.heads = len(self.layers) // (len(taps) + 1)
        self._active: dict | None = None
        self._handles = [layer.register_forward_hook(self._recorder(index)) for index, layer in enumerate(self.layers)]

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()

    def _recorder(self, index: int):
        from covidscan.gate import layer_feature

        def record(_module, inputs, output) -> None:
            if self._active is not None:
                self._active[index] = (layer_feature(index < self.heads, inputs, output).detach(), output.detach())
        return record

    def split(self, captured: dict) -> tuple[list, list]:
        """The captured features in layer order, and the heads' outputs (each member's logits)."""
        return ([captured[j][0] for j in range(len(self.layers))],
                [captured[i][1] for i in range(self.heads)])

    def capture(self):
        tap = self

        class _Capture:
            def __enter__(self):
                tap._active = {}
                return tap._active

            def __exit__(self, *exc):
                tap._active = None

        return _Capture()


def final_linears(model) -> list:
    """The last ``nn.Linear`` of each ensemble member (of the model itself when not an ensemble)."""
    from torch import nn

    from covidscan.models import Ensemble

    members = list(model.members) if isinstance(model, Ensemble) else [model]
    heads = []
    for member in members:
        linears = [module for module in member.modules() if isinstance(module, nn.Linear)]
        if not linears:
            raise ValueError("the model has no final linear layer")
        heads.append(linears[-1])
    return heads


# ---------------------------------------------------------------------- cache


def engine_key(card: Any) -> str:
    """The cache key of a bundle's export: its weights and everything that shapes the graph."""
    facts = {"weights": card.weights_sha256, "architecture": card.architecture, "ensemble": card.ensemble_size,
             "classes": len(card.classes), "input_size": card.input_size, "export": EXPORT_VERSION,
             "taps": card_taps(card)}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def card_taps(card: Any) -> list[str]:
    """The gate taps a card names (hooked and exported besides the final layers)."""
    from covidscan.gate import gate_taps

    return gate_taps(getattr(card, "gate", None))


def cache_folders(bundle_path: Path) -> list[Path]:
    """Where an export is looked for, in order: inside the bundle, then the user cache folder."""
    from platformdirs import user_cache_dir

    return [Path(bundle_path) / ENGINE_DIR, Path(user_cache_dir("covidscan")) / "engine"]


def load_cached_onnx(card: Any, bundle_path: Path, device: str = "cpu") -> OnnxEngine | None:
    """A checked export of this bundle from the cache, or None (torch-free).

    An export is used only if its metadata says it passed the probe check and the file's SHA-256
    still matches; a damaged file is ignored (and replaced by the next export).
    """
    if not card.weights_sha256 or not _onnxruntime_available():
        return None
    weights = Path(bundle_path) / card.weights_file
    # The bundle must still be what its card says (as load_bundle checks), or torch reports why not.
    if Path(card.weights_file).name != card.weights_file or not weights.is_file() \
            or sha256_file(weights) != card.weights_sha256:
        return None
    key = engine_key(card)
    for folder in cache_folders(bundle_path):
        onnx_path, meta_path = folder / f"{key}.onnx", folder / f"{key}.json"
        if not (onnx_path.is_file() and meta_path.is_file()):
            continue
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != key or meta.get("max_abs_diff", 1.0) > PROBE_TOLERANCE:
                continue
            if sha256_file(onnx_path) != meta.get("onnx_sha256"):
                log.warning("The cached ONNX export %s is damaged; ignoring it.", onnx_path.name)
                continue
            return OnnxEngine(onnx_path, device)
        except Exception as exc:  # noqa: BLE001 - a bad cache entry must never stop prediction
            log.warning("The cached ONNX export %s is unusable (%s); ignoring it.", onnx_path.name, exc)
    return None


def export_onnx(model, card: Any, bundle_path: Path, device: str = "cpu") -> OnnxEngine | None:
    """Export ``model`` to ONNX, check it against torch on a probe batch, cache and return it.

    Returns:
        The engine, or None when onnxruntime/the exporter is missing, the export fails, or the
        probe check fails (the caller then uses torch).
    """
    if not card.weights_sha256 or not _onnxruntime_available():
        return None
    key = engine_key(card)
    for folder in cache_folders(bundle_path):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
        except OSError:
            continue  # read-only bundle folder: try the user cache
        try:
            onnx_file = staging / f"{key}.onnx"
            _export(model, card, onnx_file)
            engine = OnnxEngine(onnx_file, device)
            max_diff = probe_difference(model, engine, card)
            if max_diff > PROBE_TOLERANCE:
                log.warning("ONNX Runtime differs from torch by %.2g on the probe batch; using torch.", max_diff)
                return None
            meta = {"key": key, "onnx_sha256": sha256_file(onnx_file), "max_abs_diff": max_diff,
                    "weights_sha256": card.weights_sha256, "outputs": engine.output_names}
            (staging / f"{key}.json").write_text(json.dumps(meta, indent=2))
            os.replace(onnx_file, folder / f"{key}.onnx")
            os.replace(staging / f"{key}.json", folder / f"{key}.json")
            return OnnxEngine(folder / f"{key}.onnx", device)
        except OSError:
            continue
        except Exception as exc:  # noqa: BLE001 - exporter errors come in many types; torch still works
            log.warning("Could not export the model to ONNX (%s); using torch.", exc)
            return None
        finally:
            for item in staging.iterdir() if staging.exists() else ():
                item.unlink(missing_ok=True)
            if staging.exists():
                staging.rmdir()
    return None


def probe_difference(model, engine: OnnxEngine, card: Any) -> float:
    """Max abs difference of (temperature-scaled) probabilities, ONNX Runtime vs torch, on a probe batch."""
    rng = np.random.default_rng(0)
    probe = rng.standard_normal((PROBE_BATCH, 3, card.input_size, card.input_size)).astype(np.float32)
    torch_engine = TorchEngine(model, next(model.parameters()).device, card_taps(card))
    try:
        reference = torch_engine.forward(probe)
    finally:
        torch_engine._features.remove()
    candidate = engine.forward(probe)
    if len(candidate.features) != len(reference.features):
        return float("inf")
    # The gate's features must agree too (relative to their size: a block's raw activations can be large).
    for ours, theirs in zip(candidate.features, reference.features):
        if ours.shape != theirs.shape:
            return float("inf")
        if np.abs(ours - theirs).max() > PROBE_TOLERANCE * max(1.0, float(np.abs(theirs).max())):
            return float("inf")
    temperature = float(card.temperature)
    diff = np.abs(softmax(candidate.logits / temperature) - softmax(reference.logits / temperature)).max()
    return float(diff)


def _export(model, card: Any, path: Path) -> None:
    import torch

    from torch import nn

    class ExportWrapper(nn.Module):
        """Returns ``(logits, features_0, ..., member_logits_0, ...)``: the model's output, each member
        head's input and each member head's output."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            with tap.capture() as captured:
                logits = self.model(x)
            features, member_logits = tap.split(captured)
            return (logits, *features, *member_logits)

    tap = _FeatureTap(model, card_taps(card))
    wrapper = ExportWrapper().eval()
    output_names = ["logits", *[f"features_{j}" for j in range(len(tap.layers))],
                    *[f"member_logits_{i}" for i in range(tap.heads)]]
    example = torch.zeros(2, 3, card.input_size, card.input_size)
    with torch.no_grad():
        try:
            # The TorchScript exporter: a fifth of the dynamo exporter's time on these CNNs.
            torch.onnx.export(wrapper, (example,), str(path), input_names=["input"], output_names=output_names,
                              dynamic_axes={name: {0: "batch"} for name in ["input", *output_names]},
                              opset_version=17, dynamo=False)
        except Exception:  # noqa: BLE001 - older/newer torch without the TorchScript exporter
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(wrapper, (example,), str(path), input_names=["input"], output_names=output_names,
                              dynamic_shapes=({0: batch},), dynamo=True)
        finally:
            tap.remove()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (then float32), stable for large logits."""
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = shifted - shifted.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def _onnxruntime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def resolve_engine(requested: str | None) -> str:
    """The engine to use: ``requested``, overridden by ``$COVIDSCAN_ENGINE`` when that is set."""
    choice = os.environ.get(ENGINE_ENV) or requested or "torch"
    if choice not in ENGINES:
        from covidscan.errors import CovidscanError

        raise CovidscanError(f"Unknown inference engine '{choice}'. Choose one of: {', '.join(ENGINES)}.")
    return choice


def onnx_or_none(card: Any, bundle_path: Path, device: str, model_loader: Callable[[], Any]) -> OnnxEngine | None:
    """A cached ONNX engine, else a fresh export of ``model_loader()``'s model, else None."""
    engine = load_cached_onnx(card, bundle_path, device)
    if engine is None:
        engine = export_onnx(model_loader(), card, bundle_path, device)
    return engine
