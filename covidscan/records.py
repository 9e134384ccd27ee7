"""The one JSON record of a prediction, shared by ``covidscan predict --json`` and the REST API.

Every key a prediction carries (``Prediction.to_dict``) reaches both the command line and HTTP
through :func:`prediction_record`, so a field added to predictions appears in both at once.
Torch-free: importing this module never imports PyTorch.
"""
from __future__ import annotations

from typing import Any, Sequence

from covidscan.errors import CovidscanError
from covidscan.images import ImageSource

#: Files classified in one forward pass (bounded so a long file list never holds every image in memory).
PREDICT_BATCH = 32


def prediction_record(file: str, prediction: Any, cam: str | None = None) -> dict:
    """The record of one classified file.

    Args:
        file: how the caller named the input (a path on the command line, the upload's name over HTTP).
        prediction: a :class:`covidscan.predictor.Prediction`.
        cam: where a CAM overlay was written, or None.

    Returns:
        ``{"file", **prediction.to_dict(), "cam"}``.
    """
    return {"file": file, **prediction.to_dict(), "cam": cam}


def error_record(file: str, error: Exception) -> dict:
    """The record of a file that could not be classified: ``{"file", "error"}``."""
    return {"file": file, "error": str(error)}


def predict_records(predictor: Any, inputs: Sequence[tuple[str, ImageSource]], window=None,
                    batch_size: int = PREDICT_BATCH) -> list[dict]:
    """Classify named inputs in batches; a bad input gets its error record and the others carry on.

    Args:
        predictor: a :class:`covidscan.predictor.Predictor`.
        inputs: ``(name, source)`` pairs; a source is a path, bytes or a binary file object.
        window: the DICOM window (None: the model card's for CT).
        batch_size: inputs per forward pass.

    Returns:
        One record per input, in the order given.
    """
    records: list[dict] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        slots: list[dict | None] = []
        loaded, loaded_slots = [], []
        for name, source in chunk:
            try:
                loaded.append(predictor.load(source, window=window))
                loaded_slots.append(len(slots))
                slots.append(None)
            except CovidscanError as exc:
                slots.append(error_record(name, exc))
        predictions = predictor.predict(loaded) if loaded else []
        for slot, prediction in zip(loaded_slots, predictions):
            slots[slot] = prediction_record(chunk[slot][0], prediction)
        records.extend(slots)  # type: ignore[arg-type]
    return records
