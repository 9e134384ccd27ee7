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


def prediction_record(file: str, prediction: Any, cam: str | None = None, explanation: Any | None = None) -> dict:
    """The record of one classified file.

    Args:
        file: how the caller named the input (a path on the command line, the upload's name over HTTP).
        prediction: a :class:`covidscan.predictor.Prediction`.
        cam: where a CAM overlay was written, or None.
        explanation: the :class:`covidscan.predictor.Explanation` when a CAM was made (its method,
            faithfulness and share inside the lungs join the record; null without one).

    Returns:
        ``{"file", **prediction.to_dict(), "cam", "cam_method", "cam_faithfulness", "cam_in_lungs"}``.
    """
    from covidscan.cams import record_fields

    return {"file": file, **prediction.to_dict(), "cam": cam, **record_fields(explanation)}


def error_record(file: str, error: Exception) -> dict:
    """The record of a file that could not be classified: ``{"file", "error"}``."""
    return {"file": file, "error": str(error)}


def predict_inputs(predictor: Any, inputs: Sequence[tuple[str, ImageSource]], window=None,
                   batch_size: int = PREDICT_BATCH) -> list[tuple[str, Any | None, str | None]]:
    """Classify named inputs in batches; a bad input gets its error and the others carry on.

    Args:
        predictor: a :class:`covidscan.predictor.Predictor`.
        inputs: ``(name, source)`` pairs; a source is a path, bytes or a binary file object.
        window: the DICOM window (None: the model card's for CT).
        batch_size: inputs per forward pass.

    Returns:
        ``(name, prediction, None)`` or ``(name, None, error message)`` per input, in the order given.
    """
    results: list[tuple[str, Any | None, str | None]] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        slots: list[tuple[str, Any | None, str | None]] = []
        loaded, loaded_slots = [], []
        for name, source in chunk:
            try:
                loaded.append(predictor.load(source, window=window))
                loaded_slots.append(len(slots))
                slots.append((name, None, None))
            except CovidscanError as exc:
                slots.append((name, None, str(exc)))
        predictions = predictor.predict(loaded) if loaded else []
        for slot, prediction in zip(loaded_slots, predictions):
            slots[slot] = (slots[slot][0], prediction, None)
        results.extend(slots)
    return results


def predict_records(predictor: Any, inputs: Sequence[tuple[str, ImageSource]], window=None,
                    batch_size: int = PREDICT_BATCH) -> list[dict]:
    """:func:`predict_inputs` as records: one per input, in the order given (errors as ``{"file", "error"}``)."""
    return [prediction_record(name, prediction) if prediction is not None else {"file": name, "error": error}
            for name, prediction, error in predict_inputs(predictor, inputs, window, batch_size)]
