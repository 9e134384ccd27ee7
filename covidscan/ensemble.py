"""Ensembles: several trained bundles of one architecture combined into one bundle.

The members' logits are averaged (:class:`covidscan.models.Ensemble`), a temperature is fitted on the
validation split, and the result is saved as an ordinary bundle, so the Predictor, ``evaluate`` and
Grad-CAM use it like any model. Members are usually the same recipe trained with different seeds.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from covidscan.bundle import WEIGHTS_DTYPES, Bundle, ModelCard, load_bundle, round_to_stored, save_bundle
from covidscan.errors import ModelBundleError
from covidscan.datasets import load_split_for
from covidscan.evaluation import compute_metrics, fit_temperature, predict_logits
from covidscan.models import Ensemble

# Card fields every member must share: they fix how an image is prepared and what the outputs mean.
_SHARED_FIELDS = ("architecture", "classes", "modality", "input_size", "mean", "std", "window", "crop", "positive_class")


def check_members(cards: Sequence[ModelCard]) -> None:
    """Raise ModelBundleError unless the cards can form an ensemble (same architecture, classes, inputs)."""
    if len(cards) < 2:
        raise ModelBundleError("An ensemble needs at least 2 member bundles.")
    if any(card.ensemble_size != 1 for card in cards):
        raise ModelBundleError("Ensemble members must be single models, not ensembles.")
    first = cards[0]
    for card in cards[1:]:
        different = [name for name in _SHARED_FIELDS if getattr(card, name) != getattr(first, name)]
        if different:
            raise ModelBundleError(
                f"'{card.name}' cannot join an ensemble with '{first.name}': they differ in {', '.join(different)}."
            )


def build_ensemble(
    members: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    name: str,
    dataset: str | None = None,
    root: str | os.PathLike | None = None,
    split: str = "val",
    dataset_options: dict | None = None,
    calibrate: bool = True,
    weights_dtype: str = "float16",
    description: str = "",
    command: str = "",
    device: str = "cpu",
    card_overrides: dict | None = None,
    training_record: dict | None = None,
    gate: bool = True,
    gate_options: dict | None = None,
) -> ModelCard:
    """Combine member bundles into one ensemble bundle at ``out``.

    Args:
        members: paths of the member bundles (same architecture, classes and preprocessing).
        out: where to write the ensemble bundle.
        name: the ensemble's name.
        dataset, root, split: the validation data on which the temperature is fitted and the
            metrics in the card are measured (members and ensemble alike). Without them the
            ensemble keeps temperature 1 and its card has no metrics.
        calibrate: fit a temperature on the split.
        weights_dtype: ``float16`` (half the size) or ``float32``.
        description, command: recorded in the card.
        device: where to run the models.
        card_overrides: card fields set from elsewhere (cross-validation gives the temperature and
            the metrics from out-of-fold predictions instead of a split).
        training_record: entries added to the card's ``training`` record.
        gate: with a dataset, also fit the input gate (statistics on its ``train`` split, threshold
            and uncertainty summary on ``split``; see :func:`covidscan.gate.fit_gate_for_bundle`).
        gate_options: the gate fitter's ``taps``, ``combine``, ``score_head`` and ``pass_rate``.

    Returns:
        The saved ensemble's card.
    """
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ModelBundleError(f"Unknown weights type '{weights_dtype}'. Choose one of: {', '.join(WEIGHTS_DTYPES)}.")
    bundles = [load_bundle(path, device=device) for path in members]
    cards = [bundle.card for bundle in bundles]
    check_members(cards)
    first = cards[0]
    ensemble = Ensemble([bundle.model for bundle in bundles]).eval()
    member_records = [_member_record(bundle) for bundle in bundles]
    temperature, metrics, training_extra = 1.0, {}, {}
    if dataset is not None:
        if root is None:
            raise ModelBundleError("Give the dataset folder (root) to measure the ensemble on.")
        _, labels, images = load_split_for(first, dataset, root, split, dataset_options)
        member_logits = [predict_logits(b.model, images, first.mean, first.std, device) for b in bundles]
        full_precision = torch.stack(member_logits).mean(dim=0)  # what Ensemble.forward computes
        temperature = fit_temperature(full_precision, labels) if calibrate else 1.0
        for record, logits in zip(member_records, member_logits):
            record["metrics"] = {split: _summary(logits, labels, first, record["temperature"])}
        # Round the weights to the stored precision, so the ensemble measured here is the one saved;
        # the members' logits above are at full precision.
        round_to_stored(ensemble, weights_dtype)
        stored = predict_logits(ensemble, images, first.mean, first.std, device)
        metrics = {split: _summary(stored, labels, first, temperature)}
        change = _probabilities(stored, temperature) - _probabilities(full_precision, temperature)
        # The members' own training data (class counts per split) when they record it, as training does.
        member_data = first.training.get("data") if isinstance(first.training.get("data"), dict) else {}
        training_extra = {"dataset": dataset, "data": {**member_data, "root": Path(root).name, "val_split": split,
                                                       "options": dataset_options or {}},
                          # What storing the weights at lower precision does to the outputs, measured.
                          "stored_weights_max_probability_change": float(np.abs(change).max())}
    card = ModelCard(
        name=name, architecture=first.architecture, classes=list(first.classes), modality=first.modality,
        input_size=first.input_size, mean=list(first.mean), std=list(first.std), window=first.window, crop=first.crop,
        positive_class=first.positive_class, threshold=None, temperature=float(temperature),
        description=description or f"Ensemble of {len(bundles)} {first.architecture} models ({', '.join(first.classes)}).",
        ensemble_size=len(bundles), weights_dtype=weights_dtype,
        training={"command": command, "ensemble_of": member_records, **training_extra},
        metrics=metrics,
    )
    card.training.update(training_record or {})
    for key, value in (card_overrides or {}).items():
        setattr(card, key, value)
    save_bundle(ensemble, card, out)
    if dataset is not None and gate:
        from covidscan.gate import fit_gate_for_bundle

        # The members' training split gives the gate's statistics, the calibration split its threshold.
        card.gate = fit_gate_for_bundle(out, dataset, root, dataset_options, train_split="train", val_split=split,
                                        device=device, **(gate_options or {}))
    return card


def _member_record(bundle: Bundle) -> dict:
    card = bundle.card
    return {"name": card.name, "seed": card.training.get("seed"), "command": card.training.get("command", ""),
            "weights_sha256": card.weights_sha256, "temperature": card.temperature}


def _probabilities(logits: torch.Tensor, temperature: float) -> np.ndarray:
    return torch.softmax(logits.float() / float(temperature), dim=1).numpy()


def _summary(logits: torch.Tensor, labels: Sequence[int], card: ModelCard, temperature: float) -> dict:
    """The card's metrics for one split (as training records them: no ROC points, plus the loss)."""
    summary = compute_metrics(labels, _probabilities(logits, temperature), card.classes, card.positive_class)
    summary.pop("roc", None)
    # As training records it: the loss of the raw (uncalibrated) logits.
    summary["loss"] = float(torch.nn.functional.cross_entropy(logits.float(), torch.as_tensor(list(labels))))
    return summary
