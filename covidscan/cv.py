"""Cross-validated training: K grouped folds, out-of-fold predictions, an honest estimate, one ensemble.

``cross_validate(config, options, out_dir)`` pools a dataset's train and val images (never test),
draws K folds grouped by patient / source / near-duplicate picture (:mod:`covidscan.folds`), and
for each fold trains ``config``'s recipe on the other folds, choosing its best epoch on a grouped
inner validation carve of those, never on the held-out fold. The held-out fold's logits are its
out-of-fold (OOF) predictions. The temperature is fitted on OOF predictions, cross-fitted (each
fold's from the other folds) for the estimate and on all of them for the shipped ensemble; decisions
are the argmax, so no threshold is chosen on the data the estimate is made from.

The output folder holds ``cv.json`` (options and groups), ``splits/`` (one split file per fold),
one training run directory per fold, ``oof.csv``, ``progress.json`` and ``model/``: the fold models
as one ensemble bundle whose card carries ``metrics.estimate`` and whose ``oof.csv`` reproduces it,
or, with ``refit``, the recipe trained once more on all pooled images (:mod:`covidscan.refit`).
A rerun into the same folder keeps the runs already finished with the same recipe and split.
The OOF rows, their CSV and the estimate made from them live in :mod:`covidscan.oof`.
"""
from __future__ import annotations

import copy
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from covidscan.datasets import open_dataset, write_split_file
from covidscan.errors import TrainingError
from covidscan.estimate import DEFAULT_BOOTSTRAP
from covidscan.folds import NEAR_DUPLICATE_DISTANCE, assign_folds, dataset_groups, inner_validation
from covidscan.gate import COMBINES, DEFAULT_PASS_RATE
from covidscan.oof import (OOF_FILE, OOFRow, cross_fitted_probabilities, estimate_of_stored, oof_csv,
                            per_image, read_oof_csv)
from covidscan.pretrain import PretrainConfig
from covidscan.sources import describe_sources
from covidscan.training.config import option
from covidscan.utils import atomic_write_text, failure_recorded, resolve_device, sigterm_stops

HOLDOUT = "holdout"


@dataclass
class CVOptions:
    """How the folds are drawn and the estimate is made (``covidscan cv``'s options come from these fields)."""

    folds: int = option(5, "number of folds")
    repeats: int = option(1, "repeat with reshuffled folds")
    seed: int = option(0, "seed of the fold assignment", option="cv-seed")
    inner_val_fraction: float = option(0.2, "share of each fold's training images used to choose its epoch")
    near_duplicate_distance: int | None = option(
        NEAR_DUPLICATE_DISTANCE, "pHash bits within which two images count as one picture (-1: do not merge)", cli_none=-1)
    bootstrap: int = option(DEFAULT_BOOTSTRAP, "bootstrap resamples for intervals")
    weights_dtype: str = option("float16", "precision of the ensemble's stored weights", choices=("float16", "float32"))
    # The ensemble's input gate (see covidscan.gate): mid-network taps, how groups combine, pass rate.
    # Their options are the gate's own (covidscan.cli.common.add_gate_options, prefixed gate-).
    gate_taps: tuple[str, ...] = option((), cli=False)
    gate_combine: str = option(COMBINES[0], cli=False)
    gate_taps_only: bool = option(False, cli=False)
    gate_pass_rate: float = option(DEFAULT_PASS_RATE, cli=False)
    # Candidate inference sizes (px) for the fold models; empty: the training size. A model trained on
    # random crops often scores better a little above its training size (FixRes); the size is chosen
    # out of fold, cross-fitted, like the temperature (see choose_input_size).
    eval_sizes: tuple[int, ...] = option(
        (), "a candidate inference size (repeatable): every held-out fold is scored at each, and the size is chosen "
            "out of fold, cross-fitted (default: the training size)", option="eval-size", metavar="PX")
    refit: bool = option(False, "after the folds, train the recipe once more on all pooled images and ship that one "
                                "model instead of the fold ensemble (the estimate stays the fold models' out-of-fold one)")
    # Self-supervised pretraining per fold (covidscan.pretrain, SimCLR): each fold model starts from a
    # backbone contrastively pretrained on that fold's own training images (labels unused), never on its
    # held-out fold, so the estimate stays inductive. The other pretraining options are covidscan
    # pretrain's defaults; arch, ImageNet start, window, device and loader workers are the recipe's.
    ssl_epochs: int = option(0, "SimCLR-pretrain each fold's backbone for this many epochs on that fold's own training "
                                "images (labels unused; never its held-out fold) before fine-tuning; 0: off")
    ssl_image_size: int | None = option(None, "SimCLR view size in pixels (default: the training size)")
    ssl_batch_size: int = option(PretrainConfig.batch_size, "SimCLR images per step (two views each)")
    ssl_lr: float = option(PretrainConfig.lr, "SimCLR AdamW learning rate (cosine-decayed)")
    ssl_temperature: float = option(PretrainConfig.temperature, "SimCLR NT-Xent temperature")

    def validate(self) -> None:
        """Raise TrainingError for options out of range."""
        problems = [message for ok, message in [
            (self.folds >= 2, "folds must be at least 2"),
            (self.repeats >= 1, "repeats must be at least 1"),
            (0 < self.inner_val_fraction <= 0.5, "the inner validation fraction must lie in (0, 0.5]"),
            (self.bootstrap >= 100, "use at least 100 bootstrap samples"),
            (0.5 <= self.gate_pass_rate < 1, "the gate's pass rate must lie in [0.5, 1)"),
            (bool(self.gate_taps) or not self.gate_taps_only, "a gate scoring only taps needs at least one tap"),
            (all(16 <= int(s) <= 1024 for s in self.eval_sizes), "inference sizes must lie between 16 and 1024 px"),
            (self.ssl_epochs >= 0, "SimCLR epochs cannot be negative"),
            (self.ssl_image_size is None or 16 <= self.ssl_image_size <= 1024,
             "the SimCLR view size must lie between 16 and 1024 px"),
            (self.ssl_batch_size >= 2, "the SimCLR batch size must be at least 2"),
            (self.ssl_lr > 0, "the SimCLR learning rate must be positive"),
            (self.ssl_temperature > 0, "the SimCLR temperature must be positive"),
        ] if not ok]
        if problems:
            raise TrainingError("Invalid cross-validation options: " + "; ".join(problems) + ".")


@dataclass
class CVResult:
    """What a cross-validation run produced."""

    state: str  # succeeded | cancelled
    out_dir: Path
    bundle_path: Path | None
    estimate: dict | None
    folds_run: int
    refit_check: dict | None = None  # with --refit: the refit against the fold models on its watch carve


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


class _Progress:
    """progress.json for the whole run (the fold being trained, its own progress, the estimate)."""

    def __init__(self, out_dir: Path, total: int, callback: Callable[[dict], None] | None) -> None:
        self.path, self.callback = out_dir / "progress.json", callback
        self.record = {"state": "running", "fold": 0, "folds": total, "message": "grouping images", "run": None,
                       "run_progress": None, "started": time.time()}

    def update(self, **changes) -> None:
        self.record.update(changes, updated=time.time())
        _write_json(self.path, self.record)
        if self.callback:
            self.callback(dict(self.record))


def cross_validate(
    config,
    options: CVOptions,
    out_dir: str | os.PathLike,
    progress_callback: Callable[[dict], None] | None = None,
    stop_event: threading.Event | None = None,
) -> CVResult:
    """Train ``config``'s recipe once per fold and estimate it from out-of-fold predictions.

    Args:
        config: a :class:`covidscan.training.TrainConfig` (its dataset, recipe and seed).
        options: folds, repeats, grouping and bootstrap settings.
        out_dir: the output folder (created).
        progress_callback: called with the run's progress record whenever it changes.
        stop_event: set it (or send SIGTERM) to stop after the current training step.

    Returns:
        The result; ``state`` is "succeeded" or "cancelled" (no ensemble is written when cancelled).

    Raises:
        CovidscanError: bad data or options (recorded as failed in progress.json).
    """
    options.validate()
    config.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = _Progress(out_dir, options.folds * options.repeats, progress_callback)
    with sigterm_stops(stop_event or threading.Event()) as stop, \
            failure_recorded(lambda message: progress.update(state="failed", message=message)):
        return _run(config, options, out_dir, progress, stop)


def pooled_dataset(config):
    """The dataset's train and val images together (its test split, if any, left out).

    A ``split_file`` in the config's dataset options decides the splits (nested cross-validation
    pools an outer fold's training images that way).
    """
    dataset = open_dataset(config.dataset, config.root, **config.dataset_options)
    keep = {config.train_split, config.val_split}
    kept = [i for i, item in enumerate(dataset.items) if item.split in keep]
    if dataset.raw_metadata:  # aligned with items: filter both by the same indices
        dataset.raw_metadata = [dataset.raw_metadata[i] for i in kept]
    dataset.items = [dataset.items[i] for i in kept]
    if not dataset.items:
        raise TrainingError(f"The {config.dataset} dataset at {config.root} has no train or val images to pool.")
    return dataset


def _run(config, options: CVOptions, out_dir: Path, progress: _Progress, stop_event: threading.Event) -> CVResult:
    progress.update(message="grouping images (patients, sources, near-duplicates)")
    dataset = pooled_dataset(config)
    labels = dataset.labels()
    groups = dataset_groups(dataset, options.near_duplicate_distance)
    _write_json(out_dir / "cv.json", {
        "options": asdict(options), "train_config": {k: v for k, v in asdict(config).items()},
        "images": len(labels), "groups": len(set(groups)), "classes": dataset.classes,
        "class_counts": dataset.class_counts(), "source_counts": dataset.source_counts()})
    sources = describe_sources(pooled=dataset) if len(dataset.sources) > 1 else None
    sizes = sorted({int(s) for s in options.eval_sizes}) or [config.resolved_sizes()[-1]]
    rows_by_size: dict[int, list[OOFRow]] = {size: [] for size in sizes}
    bundles: list[Path] = []
    done = 0
    for repeat in range(options.repeats):
        folds = assign_folds(labels, groups, options.folds, seed=options.seed + 1000 * repeat)
        for fold in range(options.folds):
            if stop_event.is_set():
                return _cancelled(out_dir, progress, done)
            name = f"r{repeat}-f{fold}"
            splits = _fold_splits(labels, groups, folds, fold, options.inner_val_fraction, options.seed + fold)
            progress.update(fold=done + 1, run=name, message=f"training fold {done + 1} of {progress.record['folds']}")
            bundle, fold_config = _train_run(config, dataset, splits, out_dir, name, config.seed + 100 * repeat + fold,
                                             progress, stop_event, options)
            if bundle is None:
                return _cancelled(out_dir, progress, done)
            bundles.append(bundle)
            for size, fold_rows in _holdout_rows(bundle, fold_config, dataset, groups, repeat, fold, sizes,
                                                 options.weights_dtype).items():
                rows_by_size[size].extend(fold_rows)
            done += 1
    refit = None
    if options.refit:
        from covidscan.refit import REFIT_RUN, refit_splits

        progress.update(run=REFIT_RUN, message="refitting the recipe on all pooled images")
        splits = refit_splits(labels, groups, options.inner_val_fraction, options.seed + options.folds)
        refit, _ = _train_run(config, dataset, splits, out_dir, REFIT_RUN, config.seed, progress, stop_event, options)
        if refit is None:
            return _cancelled(out_dir, progress, done)
    progress.update(message="estimating from out-of-fold predictions")
    return _finish(config, options, out_dir, dataset.classes, rows_by_size, bundles, progress, sources, refit)


def _train_run(config, dataset, splits: list[str], out_dir: Path, name: str, seed: int, progress: _Progress,
               stop_event: threading.Event, options: CVOptions):
    """Train ``config``'s recipe on one split of the pooled images into ``out_dir/name``.

    With ``options.ssl_epochs`` the run starts from a backbone SimCLR-pretrained on the split's
    train and val images (``out_dir/ssl/<name>.safetensors``). A run or pretraining already finished
    with the same recipe, seed and split is kept (a rerun resumes).

    Returns:
        (the run's bundle, or None when cancelled; the run's config).
    """
    from covidscan.training import train

    split_path = out_dir / "splits" / f"{name}.json"
    before = split_path.read_bytes() if split_path.is_file() else None
    split_file = write_split_file(split_path, dataset, splits)
    same_split = before == split_path.read_bytes()
    run_config = copy.deepcopy(config)
    run_config.dataset_options = {**config.dataset_options, "split_file": str(split_file)}
    run_config.train_split, run_config.val_split = "train", "val"
    run_config.seed = seed
    run_config.name = f"{config.name or 'cv'}-{name}"
    if options.ssl_epochs:
        weights = _fold_pretraining(run_config, options, out_dir / "ssl" / f"{name}.safetensors", same_split,
                                    progress, stop_event)
        if weights is None:
            return None, run_config
        run_config.init_weights = str(weights)
    if same_split and _finished_run(out_dir / name, run_config):
        return out_dir / name / "model", run_config
    result = train(run_config, out_dir / name, stop_event=stop_event,
                   progress_callback=lambda record: progress.update(run_progress=record))
    if result.state != "succeeded" or result.bundle_path is None:
        return None, run_config
    return result.bundle_path, run_config


def _fold_pretrain_config(run_config, options: CVOptions) -> PretrainConfig:
    """The SimCLR pretraining of one fold run: its own train and val images (never the held-out fold), the
    recipe's architecture, ImageNet start, seed, window, device and workers, the ``ssl_*`` options."""
    return PretrainConfig(
        dataset=run_config.dataset, root=run_config.root, split=f"{run_config.train_split}+{run_config.val_split}",
        arch=run_config.arch, pretrained=run_config.pretrained, epochs=options.ssl_epochs,
        image_size=options.ssl_image_size or run_config.resolved_sizes()[-1], batch_size=options.ssl_batch_size,
        lr=options.ssl_lr, temperature=options.ssl_temperature, seed=run_config.seed, device=run_config.device,
        num_workers=run_config.num_workers, dataset_options=dict(run_config.dataset_options), window=run_config.window,
        crop=run_config.crop, command=f"covidscan cv: SimCLR pretraining of {run_config.name}")


def _fold_pretraining(run_config, options: CVOptions, out_path: Path, same_split: bool, progress: _Progress,
                      stop_event: threading.Event) -> Path | None:
    """Pretrain (or keep, when finished with the same options on the same split) one fold's backbone.

    Returns:
        The backbone weights, or None when cancelled.
    """
    from covidscan.pretrain import pretrain, record_path

    pretrain_config = _fold_pretrain_config(run_config, options)
    try:
        done = {**json.loads(record_path(out_path).read_text())["config"], "command": None}
    except (OSError, ValueError, KeyError, TypeError):
        done = None
    if same_split and out_path.is_file() and done == _as_recorded(pretrain_config, command=None):
        return out_path
    progress.update(message=f"SimCLR pretraining for {run_config.name}")
    result = pretrain(pretrain_config, out_path, stop_event=stop_event,
                      progress_callback=lambda record: progress.update(run_progress={**record, "stage": "pretraining"}))
    return result.out_path if result.state == "succeeded" else None


def _finished_run(run_dir: Path, config) -> bool:
    """Whether ``run_dir`` holds a succeeded training run of ``config`` (its command, description and split
    file's path aside: they do not change the training, and a rerun's command or a copied folder differs)."""
    from covidscan.training import TrainConfig

    try:
        progress = json.loads((run_dir / "progress.json").read_text())
        done = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError, TypeError, TrainingError):
        return False

    def recorded(config) -> dict:
        # The split file's content was compared by the caller; its path differs in a copied run folder.
        options = {k: v for k, v in config.dataset_options.items() if k != "split_file"}
        return _as_recorded(config, command=None, description=None, dataset_options=options)

    return (progress.get("state") == "succeeded" and recorded(done) == recorded(config)
            and (run_dir / "model" / "card.json").is_file())


def _as_recorded(config, **blanked) -> dict:
    """A config dataclass as its JSON record reads back (``blanked`` fields replaced), to tell whether a
    finished run or pretraining was made with the same options."""
    return json.loads(json.dumps({**asdict(config), **blanked}, default=str))


def _fold_splits(labels, groups, folds: np.ndarray, fold: int, inner_fraction: float, seed: int) -> list[str]:
    """holdout for the fold, a grouped inner val carve of the rest (epoch choice), train for the remainder."""
    splits = [HOLDOUT if f == fold else "train" for f in folds]
    rest = [i for i, f in enumerate(folds) if f != fold]
    inner = inner_validation([labels[i] for i in rest], [groups[i] for i in rest], inner_fraction, seed)
    for index, is_val in zip(rest, inner):
        if is_val:
            splits[index] = "val"
    return splits


def _holdout_rows(bundle_path: Path, fold_config, dataset, groups, repeat: int, fold: int,
                  sizes: Sequence[int], weights_dtype: str = "float32") -> dict[int, list[OOFRow]]:
    """The held-out fold's OOF rows at each inference size (the split opened once, decoded per size).

    The fold model scores with its weights rounded to ``weights_dtype``, as the shipped ensemble
    stores them, so the estimate is exactly that of the stored weights (float16 rounding alone moved
    a 3-class fold partition's macro F1 by up to 0.01).
    """
    from covidscan.bundle import load_bundle, round_to_stored
    from covidscan.evaluation import load_split_for, load_split_images, predict_logits
    device = resolve_device(fold_config.device)
    bundle = load_bundle(bundle_path, device=device)
    round_to_stored(bundle.model, weights_dtype)
    held, y_true, images = load_split_for(bundle.card, fold_config.dataset, fold_config.root, HOLDOUT,
                                          fold_config.dataset_options, size=sizes[0])
    group_of = {str(item.path): group for item, group in zip(dataset.items, groups)}
    rows = {}
    for size in sizes:
        if size != sizes[0]:
            images = load_split_images(held, size, window=bundle.card.dicom_window, crop=bundle.card.crop)
        logits = predict_logits(bundle.model, images, bundle.card.mean, bundle.card.std, device).numpy()
        rows[size] = [OOFRow(path=held.item_key(item), group=group_of[str(item.path)], label_index=int(label),
                             repeat=repeat, fold=fold, logits=[float(v) for v in row])
                      for item, label, row in zip(held.items, y_true, logits)]
    return rows


def _cancelled(out_dir: Path, progress: _Progress, done: int) -> CVResult:
    progress.update(state="cancelled", message="cancelled by the user")
    return CVResult("cancelled", out_dir, None, None, done)


def ranking_score(rows: Sequence[OOFRow]) -> float:
    """The AUC :func:`~covidscan.evaluation.compute_metrics` reports for OOF rows (binary; macro
    one-vs-rest for more classes), from their softmax probabilities; NaN when it is undefined."""
    import torch

    from covidscan.evaluation import compute_metrics

    probs = torch.softmax(torch.tensor([row.logits for row in rows], dtype=torch.float64), dim=1).numpy()
    auc = compute_metrics([row.label_index for row in rows], probs, [str(c) for c in range(probs.shape[1])])["auc"]
    return float("nan") if auc is None else float(auc)


def suggested_eval_sizes(image_size: int) -> list[int]:
    """Candidate inference sizes for a model trained at ``image_size``: from it up to 10/7 of it, multiples of 8.

    For 224 px: 224, 256, 288, 320 (the shipped CT recipe's candidates).
    """
    return sorted({max(16, round(image_size * step / 7 / 8) * 8) for step in (7, 8, 9, 10)})


def choose_input_size(rows_by_size: dict[int, list[OOFRow]]) -> tuple[list[OOFRow], int, dict]:
    """Choose the inference size out of fold, cross-fitted so the estimate does not select on itself.

    Each fold's OOF rows are taken at the size with the best :func:`ranking_score` on the other folds
    of its repeat (ties: the smaller size); the shipped size is the best on all OOF rows.

    Args:
        rows_by_size: size -> OOF rows of every fold at that size (same images, same order).

    Returns:
        (the cross-fitted OOF rows in the original order, the shipped size, a record of the choice).
    """
    sizes = sorted(rows_by_size)
    first = rows_by_size[sizes[0]]
    keys = sorted({(row.repeat, row.fold) for row in first})

    def best(keep) -> int:
        scores = {size: ranking_score([r for r in rows_by_size[size] if keep((r.repeat, r.fold))]) for size in sizes}
        return max(sizes, key=lambda size: (np.nan_to_num(scores[size], nan=-1.0), -size))

    per_fold = {key: best(lambda k, key=key: k[0] == key[0] and k != key) for key in keys}
    chosen = [rows_by_size[per_fold[(row.repeat, row.fold)]][index] for index, row in enumerate(first)]
    shipped = best(lambda k: True)
    record = {"candidates": sizes, "shipped": shipped,
              "per_fold": {f"r{r}-f{f}": size for (r, f), size in per_fold.items()},
              "score": "AUC of the out-of-fold probabilities (macro one-vs-rest for more than two classes)",
              "oof_score": {str(size): ranking_score(rows_by_size[size]) for size in sizes}}
    return chosen, shipped, record


def oof_estimates_by_source(cv_dir: str | os.PathLike, root: str | os.PathLike | None = None,
                            samples: int | None = None, seed: int | None = None) -> dict[str, dict]:
    """A cross-validation run's out-of-fold estimate for all images and for each data source.

    The probabilities are the run's own (temperature cross-fitted on all OOF rows, repeats averaged);
    only the images scored differ. Each image's source comes from re-opening the run's dataset
    (``cv.json``; no pixels are decoded), e.g. ``folder`` (the Kaggle 3-class X-rays, the subset
    comparable to their held-back test split) and ``ieee8023`` added by ``--extra-source``.

    Args:
        cv_dir: a :func:`cross_validate` output folder (``cv.json`` and ``oof.csv``).
        root: the dataset folder, when it has moved since the run (default: the one in ``cv.json``).
        samples, seed: bootstrap settings (default: the run's).

    Returns:
        ``{"all": estimate, source: estimate, ...}`` (see :func:`covidscan.estimate.estimates_by`).

    Raises:
        TrainingError: not a finished cross-validation folder, or OOF images its dataset lacks.
    """
    from covidscan.estimate import estimates_by
    from covidscan.training import TrainConfig

    cv_dir = Path(cv_dir)
    try:
        record = json.loads((cv_dir / "cv.json").read_text())
        rows, classes = read_oof_csv(cv_dir / OOF_FILE)
        cv_options, train_config = record["options"], dict(record["train_config"])
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        raise TrainingError(f"{cv_dir} is not a finished cross-validation folder ({exc}).") from None
    if root is not None:
        train_config["root"] = str(root)
    dataset = pooled_dataset(TrainConfig.from_dict(train_config))
    source_of = {dataset.item_key(item): dataset.source_of(item) for item in dataset.items}
    paths, labels, probs, groups = per_image(rows, cross_fitted_probabilities(rows))
    unknown = [p for p in paths if p not in source_of]
    if unknown:
        raise TrainingError(f"{len(unknown)} out-of-fold images (first: {unknown[0]}) are not in the run's dataset: "
                            "give --root if the folder moved.")
    # The ensemble's card (absent while a run is unfinished) names the positive class and the protocol.
    card_file = cv_dir / "model" / "card.json"
    card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    protocol = (card.get("metrics") or {}).get("estimate", {}).get("protocol") or f"Out-of-fold predictions of {cv_dir.name}."
    return estimates_by([source_of[p] for p in paths], labels, probs, groups, classes, protocol, card.get("positive_class"),
                        samples or cv_options.get("bootstrap", DEFAULT_BOOTSTRAP),
                        cv_options.get("seed", 0) if seed is None else seed)


def fold_ensemble_sentence(repeats: int = 1) -> str:
    """How a fold ensemble's figures relate to the shipped model: the protocol's last sentence."""
    models = "one fold model" if repeats == 1 else f"{repeats} fold models per image (one per fold partition)"
    return f"Figures are for {models}; the shipped ensemble averages all fold models."


FOLD_ENSEMBLE_SENTENCE = fold_ensemble_sentence()


def _protocol(config, options: CVOptions, images: int, groups: int, size_choice: dict | None = None) -> str:
    from covidscan.refit import protocol_sentence

    sizing = ""
    if size_choice:
        sizing = (f"inference size chosen among {'/'.join(map(str, size_choice['candidates']))} px, each fold's from "
                  "the other folds' out-of-fold AUC (cross-fitted); ")
    repeats = f", repeated {options.repeats}x (each image's probabilities averaged over repeats)" if options.repeats > 1 else ""
    inner = f"a grouped {options.inner_val_fraction:.0%} inner validation carve of its training folds"
    epoch_choice = (f"each fold model kept its final epoch ({inner} was only watched, not used to choose)"
                    if config.monitor == "last" else f"each fold model chose its epoch on {inner}")
    stored = ("each fold model scored with its weights rounded to float16, as the ensemble stores them; "
              if options.weights_dtype == "float16" else "")
    ssl = (f"each fold model's backbone SimCLR-pretrained ({options.ssl_epochs} epochs) on its own training folds' "
           "images, never its held-out fold; " if options.ssl_epochs else "")
    return (f"{options.folds}-fold cross-validation{repeats} over the pooled {config.train_split}+{config.val_split} "
            f"images ({images} images in {groups} groups: patient, source and near-duplicate pictures never straddle "
            f"folds); {ssl}{epoch_choice}; {sizing}{stored}decisions by argmax; temperature cross-fitted on "
            f"the other folds' out-of-fold predictions; intervals: group bootstrap, {options.bootstrap} resamples. "
            + (f"Figures are for one fold model; {protocol_sentence(options.folds, options.inner_val_fraction)}"
               if options.refit else fold_ensemble_sentence(options.repeats)))


def _store_oof(model_dir: Path, text: str) -> None:
    (model_dir / OOF_FILE).write_text(text)
    os.chmod(model_dir / OOF_FILE, 0o644)


def _finish(config, options: CVOptions, out_dir: Path, classes: list[str], rows_by_size: dict[int, list[OOFRow]],
            bundles: list[Path], progress: _Progress, sources: dict | None = None,
            refit: Path | None = None) -> CVResult:
    import torch

    from covidscan.bundle import read_card
    from covidscan.ensemble import build_ensemble
    from covidscan.evaluation import fit_temperature

    first = read_card(bundles[0])
    size_choice = None
    if len(rows_by_size) > 1:
        for size, size_rows in rows_by_size.items():  # every candidate's OOF predictions, for the record
            (out_dir / f"oof-{size}px.csv").write_text(oof_csv(size_rows, classes))
        rows, shipped_size, size_choice = choose_input_size(rows_by_size)
    else:
        (shipped_size, rows), = rows_by_size.items()
    text = oof_csv(rows, classes)
    (out_dir / OOF_FILE).write_text(text)
    protocol = _protocol(config, options, len({r.path for r in rows}), len({r.group for r in rows}), size_choice)
    result, rows, _ = estimate_of_stored(text, first.positive_class, protocol, options.bootstrap, options.seed)
    # The shipped model's own temperature: fitted on all OOF logits at once, at the shipped size.
    shipped_rows = rows_by_size[shipped_size]
    logits = torch.tensor([row.logits for row in shipped_rows], dtype=torch.float32)
    temperature = fit_temperature(logits, [row.label_index for row in shipped_rows])
    model_dir, check = out_dir / "model", None
    card_overrides = {"temperature": float(temperature), "threshold": None, "input_size": int(shipped_size),
                      "metrics": {"estimate": result}}
    training_record = {"cross_validation": {**asdict(options), "protocol": protocol,
                                            **({"input_size_choice": size_choice} if size_choice else {})},
                       "dataset": config.dataset,
                       "data": {"root": Path(config.root).name, "pooled_splits": [config.train_split, config.val_split],
                                "options": {k: v for k, v in config.dataset_options.items() if k != "split_file"},
                                **({"sources": sources} if sources else {})}}
    gate_options = {"taps": options.gate_taps, "combine": options.gate_combine,
                    "score_head": not options.gate_taps_only, "pass_rate": options.gate_pass_rate}
    if refit is not None:
        from covidscan.refit import REFIT_RUN, watch_carve_check, write_refit_model

        split_file = out_dir / "splits" / f"{REFIT_RUN}.json"
        progress.update(message="checking the refit against the fold models on its watch carve")
        check = watch_carve_check(refit, split_file, config, rows, classes, first.positive_class, shipped_size,
                                  float(temperature), options.bootstrap, options.seed, options.weights_dtype)
        progress.update(message="writing the refitted model and fitting its input gate on its watch carve")
        write_refit_model(refit, split_file, model_dir, config, card_overrides, training_record,
                          options.weights_dtype, gate_options, resolve_device(config.device), check)
        _store_oof(model_dir, text)
    elif len(bundles) >= 2:
        progress.update(message="writing the fold models as one ensemble")
        build_ensemble(
            bundles, model_dir, name=config.name or f"cv-{config.arch}", weights_dtype=options.weights_dtype,
            description=config.description or f"{len(bundles)} cross-validation fold models of {config.arch}, logits averaged.",
            command=config.command or "covidscan cv (Python API)",
            card_overrides=card_overrides, training_record=training_record)
        _store_oof(model_dir, text)  # the out-of-fold gate fit reads it
        progress.update(message="fitting the input gate on out-of-fold features")
        from covidscan.cv_gate import fit_cv_gate

        fit_cv_gate(out_dir, device=resolve_device(config.device), **gate_options)
    progress.update(state="succeeded", message="finished", estimate={k: result.get(k) for k in
                                                                     ("n", "auc", "accuracy", "macro_f1", "ci95")})
    shipped = refit is not None or len(bundles) >= 2
    return CVResult("succeeded", out_dir, model_dir if shipped else None, result, len(bundles), check)
