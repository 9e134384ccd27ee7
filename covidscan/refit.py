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
                      training_record: dict, weights_dtype: str, gate_options: dict, device, check: dict) -> None:
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
        check: the :func:`watch_carve_check`, recorded in the card.
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
                     **training_record, "refit": {"run": REFIT_RUN, "watch_carve": "val", **own,
                                                  "watch_carve_check": check}}
    for key, value in card_overrides.items():
        setattr(card, key, value)
    save_bundle(bundle.model, card, model_dir)
    fit_gate_for_bundle(model_dir, config.dataset, config.root, {**config.dataset_options, "split_file": str(split_file)},
                        train_split="train", val_split="val", device=device, **gate_options)


def watch_carve_check(refit_bundle: Path, split_file: Path, config, rows, classes, positive_class: str | None,
                      input_size: int, temperature: float, samples: int, seed: int = 0,
                      weights_dtype: str = "float32") -> dict:
    """The refit against the fold models on the refit's watch carve, the images it never trained on.

    Each carve image is out of sample for both: the refit never trained on it, and its out-of-fold
    prediction came from the one fold model that never saw it. A refit is one training run; this
    says whether it is a good draw before it replaces the fold ensemble.

    Args:
        refit_bundle: the refit run's ``model/`` folder.
        split_file: the refit's split file (its ``val`` images are the carve).
        config: the cross-validated recipe (dataset, root and options).
        rows, classes: the out-of-fold rows as estimated (cross-fitted sizes) and the class names.
        positive_class, input_size, temperature: the shipped card's.
        samples, seed: the paired group bootstrap's.
        weights_dtype: the precision the refit is stored at; it is scored with its weights so rounded.

    Returns:
        ``{"n", "groups", "input_size", "refit": {metric: value}, "fold_models": {...},
        "refit_minus_fold_models": {metric: {"difference", "ci95", "share_above_zero"}}}``.
    """
    import torch

    from covidscan.bundle import load_bundle, round_to_stored
    from covidscan.oof import cross_fitted_probabilities, per_image
    from covidscan.datasets import load_split_for
    from covidscan.estimate import paired_differences
    from covidscan.evaluation import compute_metrics, predict_logits

    bundle = load_bundle(refit_bundle)
    round_to_stored(bundle.model, weights_dtype)
    carve, labels, images = load_split_for(bundle.card, config.dataset, config.root, "val",
                                           {**config.dataset_options, "split_file": str(split_file)}, size=input_size)
    logits = predict_logits(bundle.model, images, bundle.card.mean, bundle.card.std, "cpu")
    refit_probs = torch.softmax(logits / temperature, dim=1).numpy()
    paths, oof_labels, oof_probs, groups = per_image(rows, cross_fitted_probabilities(rows))
    index = {path: i for i, path in enumerate(paths)}
    chosen = [index[carve.item_key(item)] for item in carve.items]
    fold_probs, carve_groups = oof_probs[chosen], [groups[i] for i in chosen]
    names = ("auc", "accuracy", "macro_f1")

    def summary(probs) -> dict:
        metrics = compute_metrics(list(labels), probs, list(classes), positive_class)
        return {name: metrics.get(name) for name in names}

    return {"n": len(chosen), "groups": len(set(carve_groups)), "input_size": int(input_size),
            "refit": summary(refit_probs), "fold_models": summary(fold_probs),
            "refit_minus_fold_models": paired_differences(labels, refit_probs, fold_probs, carve_groups, classes,
                                                          positive_class, samples, seed, metrics=names)}


def check_sentence(check: dict) -> str:
    """The watch-carve check in one line, for the command line."""
    diff = check["refit_minus_fold_models"]
    parts = []
    for name in ("auc", "accuracy"):
        if name in diff and check["refit"].get(name) is not None:
            low, high = diff[name]["ci95"]
            parts.append(f"{name} {check['refit'][name]:.3f} vs {check['fold_models'][name]:.3f} "
                         f"(difference {diff[name]['difference']:+.3f}, 95% CI {low:+.3f} to {high:+.3f})")
    return (f"Refit vs fold models on its {check['n']}-image watch carve ({check['groups']} groups, never trained "
            "on by the refit; each image's fold model never saw it): " + "; ".join(parts))
