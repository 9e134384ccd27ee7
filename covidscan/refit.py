"""Refit: the cross-validated recipe trained once more, on all pooled images, and shipped alone.

Cross-validation estimates what the recipe gives when it trains on (K-1)/K of the images. What is
shipped can be the K fold models as one ensemble, or the same recipe refitted on all the images:
more data per model, one model's cost at inference. Nested cross-validation
(:mod:`covidscan.nested`) measures which is better for a recipe; on the shipped CT recipe the single
model trained on more images beat the ensemble of fold models out of fold.

The refit keeps a grouped watch carve of ``inner_val_fraction`` (as every fold model does): with
``--monitor last`` it chooses nothing, and it is where the refit model's input gate takes its
scale and threshold, from images the model never trained on. The temperature, inference size and
estimate come from the fold models' out-of-fold predictions, like the ensemble's.
"""
from __future__ import annotations

from pathlib import Path

from covidscan.folds import inner_validation

REFIT_RUN = "refit"


def refit_splits(labels, groups, fraction: float, seed: int) -> list[str]:
    """Every pooled image in ``train`` but a grouped, stratified ``fraction`` in ``val`` (the watch carve)."""
    carve = inner_validation(labels, groups, fraction, seed)
    return ["val" if is_val else "train" for is_val in carve]


def protocol_sentence(folds: int, fraction: float) -> str:
    """What the shipped refit model is, for the estimate's protocol (which describes one fold model)."""
    return (f"the shipped model is the same recipe refitted once on all pooled images but a grouped {fraction:.0%} "
            f"watch carve (where its input gate's threshold is set), so it trained on {folds / (folds - 1):.3g}x as "
            "many images as a fold model.")


def write_refit_model(refit_bundle: Path, split_file: Path, model_dir: Path, config, card_overrides: dict,
                      training_record: dict, weights_dtype: str, gate_options: dict, device) -> None:
    """Save the refit run's model as the shipped bundle, with the out-of-fold card fields and a gate.

    Args:
        refit_bundle: the refit training run's ``model/`` folder.
        split_file: the refit's split file (``train`` and the ``val`` watch carve).
        model_dir: where the shipped bundle goes (replaced).
        config: the cross-validated recipe (its dataset, name, description and command).
        card_overrides: temperature, threshold, input size and ``metrics`` from out of fold.
        training_record: entries added to the card's ``training`` record.
        weights_dtype: precision of the stored weights.
        gate_options: the gate fitter's ``taps``, ``combine``, ``score_head`` and ``pass_rate``.
        device: where the gate's features are computed.
    """
    from covidscan.bundle import load_bundle, save_bundle
    from covidscan.gate import fit_gate_for_bundle

    bundle = load_bundle(refit_bundle, device="cpu")
    card = bundle.card
    card.name = config.name or f"cv-{config.arch}"
    card.description = config.description or f"{config.arch} refitted on all cross-validated images."
    card.weights_dtype = weights_dtype
    # The refit run's own val metrics came from its watch carve; the out-of-fold estimate replaces them.
    card.metrics = {}
    own = {key: card.training[key] for key in ("data", "epochs_run", "seconds") if key in card.training}
    card.training = {**card.training, "command": config.command or "covidscan cv --refit (Python API)",
                     **training_record, "refit": {"run": REFIT_RUN, "watch_carve": "val", **own}}
    for key, value in card_overrides.items():
        setattr(card, key, value)
    save_bundle(bundle.model, card, model_dir)
    fit_gate_for_bundle(model_dir, config.dataset, config.root, {**config.dataset_options, "split_file": str(split_file)},
                        train_split="train", val_split="val", device=device, **gate_options)
