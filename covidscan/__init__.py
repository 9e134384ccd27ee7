"""covidscan: COVID-19 findings on chest CT and X-ray, with Grad-CAM explanations.

Research and teaching use only: not a medical device, not for diagnosis.

The public API is imported lazily so that light commands (``covidscan jobs list``) start fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "read_image": "covidscan.images",
    "LoadedImage": "covidscan.images",
    "ImageInfo": "covidscan.images",
    "Window": "covidscan.images",
    "WINDOW_PRESETS": "covidscan.images",
    "create_model": "covidscan.models",
    "list_architectures": "covidscan.models",
    "ModelCard": "covidscan.bundle",
    "Bundle": "covidscan.bundle",
    "save_bundle": "covidscan.bundle",
    "load_bundle": "covidscan.bundle",
    "Predictor": "covidscan.predictor",
    "Prediction": "covidscan.predictor",
    "Explanation": "covidscan.predictor",
    "ModelEntry": "covidscan.catalog",
    "available_models": "covidscan.catalog",
    "find_model": "covidscan.catalog",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'covidscan' has no attribute {name!r}")
