"""Input gate: know when not to answer.

A model only knows the images it was trained on. The gate scores how far an image's penultimate
features (the input of the final ``nn.Linear``; per member for an ensemble) lie from the training
images' features, as a Mahalanobis distance under a Ledoit-Wolf shrinkage covariance, and flags the
image as out of distribution (OOD) when the score passes a threshold chosen so that a set share
(99% by default) of held-in validation images pass.

Optional *taps* add mid-network features: the mean and standard deviation over space of a named
block's output in each member (e.g. ``features.6`` of a MobileNetV2). A fully fine-tuned model's
penultimate features can forget what the input looks like (a CT model maps X-rays among CT
slices), while its middle blocks still see the difference. Each tap is one more group of
per-member distances; the image's score combines the group scores (``"combine"``: their maximum
or mean; ``"score_head": false`` leaves the final layer's group out where it only adds noise). The
card's ``gate`` field lists the taps (``"taps"``), so loading, the inference engine and the explain
path hook the same layers (:func:`gate_taps`, :func:`feature_layers`).

Storage: ``gate.safetensors`` beside the weights (per member and tap: the feature mean, the top principal
directions of the shrunk covariance with their variances, and the mean variance of the remaining
directions), with its SHA-256, threshold and how it was fitted in the card's ``gate`` field.
The rank-r + isotropic-residual form keeps the file small (an exact 1280 x 1280 precision matrix
per member would not fit the shipped bundles' size limit).

Scoring (:meth:`InputGate.score`) is numpy only, so a torch-free (ONNX) predict path can call it
with features it computes itself. Feature extraction (:func:`feature_layers`,
:func:`capture_features`) is the only torch code here.

Uncertainty and the selective-prediction summary live in :mod:`covidscan.uncertainty` (re-exported here).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from covidscan.errors import ModelBundleError
from covidscan.uncertainty import (  # noqa: F401  (re-exported: the gate's public API predates the split)
    SELECTIVE_COVERAGES, UNCERTAIN_COVERAGE, member_disagreement, member_probabilities, prediction_uncertainty,
    selective_sentence, selective_summary,
)
from covidscan.utils import sha256_file

GATE_FILE = "gate.safetensors"
GATE_METHOD = "mahalanobis-ledoit-wolf"
# Share of held-in images that must pass the gate.
DEFAULT_PASS_RATE = 0.99
# Principal directions kept per member; the rest share one (mean) variance.
DEFAULT_RANK = 64
NO_GATE_REASON = "this model has no input gate"
#: How the groups' (final layer, then each tap) scores can be combined; the first is the default.
COMBINES = ("max", "mean")


# --------------------------------------------------------------------------- maths (numpy only)
@dataclass
class MemberGate:
    """One model's feature statistics: d2(x) = sum_j (v_j.z)^2 / l_j + (|z|^2 - sum_j (v_j.z)^2) / r."""

    mean: np.ndarray         # D
    components: np.ndarray   # R x D, orthonormal rows
    variances: np.ndarray    # R
    residual_variance: float
    scale: float = 1.0       # median calibration distance: makes members' scores comparable

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance (root of d2 / D, so it does not grow with the dimension) per row."""
        z = np.asarray(features, dtype=np.float64) - self.mean
        projected = z @ self.components.T.astype(np.float64)
        inside = (projected ** 2 / self.variances).sum(axis=1)
        residual = np.maximum((z ** 2).sum(axis=1) - (projected ** 2).sum(axis=1), 0.0)
        d2 = inside + residual / self.residual_variance
        return np.sqrt(d2 / z.shape[1])

    def score(self, features: np.ndarray) -> np.ndarray:
        """The distance divided by this member's typical in-distribution distance."""
        return self.distance(features) / self.scale


def fit_member(features: np.ndarray, rank: int = DEFAULT_RANK) -> MemberGate:
    """Fit one member's statistics on its training features (N x D).

    The covariance is sklearn's Ledoit-Wolf shrinkage estimate; its top ``rank`` eigen-directions
    are kept and the remaining ones replaced by their mean variance.
    """
    from sklearn.covariance import LedoitWolf

    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 3:
        raise ModelBundleError("The gate needs at least 3 training images' features to fit.")
    estimator = LedoitWolf().fit(features)
    eigenvalues, eigenvectors = np.linalg.eigh(estimator.covariance_)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = np.maximum(eigenvalues[order], 1e-12), eigenvectors[:, order]
    rank = int(min(rank, features.shape[1] - 1))
    rest = eigenvalues[rank:]
    return MemberGate(mean=estimator.location_.astype(np.float32),
                      components=eigenvectors[:, :rank].T.astype(np.float32),
                      variances=eigenvalues[:rank].astype(np.float64),
                      residual_variance=float(rest.mean()) if len(rest) else 1.0)


@dataclass
class InputGate:
    """Per-member feature statistics of the final layer (``members``) and of each tap (``taps``,
    one member list per tap name in ``tap_names``), and one threshold on the combined score."""

    members: list[MemberGate]
    threshold: float
    info: dict[str, Any] = field(default_factory=dict)
    taps: list[list[MemberGate]] = field(default_factory=list)
    tap_names: list[str] = field(default_factory=list)
    combine: str = COMBINES[0]
    score_head: bool = True  # False: only the taps' groups count (the final layer's is still computed)

    def group_scores(self, member_features: Sequence[np.ndarray]) -> np.ndarray:
        """Per group (final layer, then each tap) the mean of the members' normalised distances.

        Args:
            member_features: the feature arrays in :func:`feature_layers` order: one N x D array per
                member for the final layer, then one per member for each tap.

        Returns:
            G x N group scores.
        """
        groups = [self.members, *self.taps]
        expected = sum(len(group) for group in groups)
        if len(member_features) != expected:
            raise ModelBundleError(f"The gate scores {expected} feature set(s) ({len(self.members)} member(s), "
                                   f"{len(self.taps)} tap(s)), got {len(member_features)}.")
        out, start = [], 0
        for group in groups:
            chunk = member_features[start:start + len(group)]
            out.append(np.mean([member.score(f) for member, f in zip(group, chunk)], axis=0))
            start += len(group)
        return np.stack(out)

    def score(self, member_features: Sequence[np.ndarray]) -> np.ndarray:
        """OOD score per image (higher = further from the training images).

        Args:
            member_features: see :meth:`group_scores` (without taps: one N x D array per member,
                the inputs of each member's final linear layer, in member order).

        Returns:
            N scores: the maximum or mean (:attr:`combine`) of the scored groups' scores (without
            taps: the mean over members of each member's normalised distance).
        """
        groups = self.group_scores(member_features)
        if not self.score_head and len(groups) > 1:
            groups = groups[1:]
        return groups.max(axis=0) if self.combine == "max" else groups.mean(axis=0)

    def flagged(self, member_features: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Scores and whether each image is outside what the model was trained on."""
        scores = self.score(member_features)
        return scores, scores > self.threshold

    @property
    def feature_dim(self) -> int:
        return int(self.members[0].mean.shape[0])

    def tensors(self) -> dict[str, np.ndarray]:
        """The arrays stored in ``gate.safetensors`` (``member{i}.*``, and ``tap{t}.member{i}.*``)."""
        out: dict[str, np.ndarray] = {}
        for prefix, group in [("", self.members), *[(f"tap{t}.", g) for t, g in enumerate(self.taps)]]:
            for i, member in enumerate(group):
                out[f"{prefix}member{i}.mean"] = member.mean.astype(np.float32)
                out[f"{prefix}member{i}.components"] = member.components.astype(np.float32)
                out[f"{prefix}member{i}.variances"] = member.variances.astype(np.float64)
                out[f"{prefix}member{i}.scalars"] = np.array([member.residual_variance, member.scale], dtype=np.float64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], threshold: float, info: dict | None = None) -> "InputGate":
        """Rebuild a gate from :meth:`tensors` and its card field ``info`` (whose ``"taps"`` names
        the tap groups); raises ModelBundleError when they are inconsistent."""
        info = dict(info or {})
        tap_names = gate_taps(info)
        combine, score_head = info.get("combine", COMBINES[0]), info.get("score_head", True)
        if combine not in COMBINES or not isinstance(score_head, bool) or (not score_head and not tap_names):
            raise ModelBundleError("The model card's gate 'combine' or 'score_head' is not valid.")

        def group(prefix: str) -> list[MemberGate]:
            members = []
            count = len({key[len(prefix):].split(".")[0] for key in tensors
                         if key.startswith(prefix + "member")})
            for i in range(count):
                key = f"{prefix}member{i}"
                mean, components = tensors[f"{key}.mean"], tensors[f"{key}.components"]
                variances, scalars = tensors[f"{key}.variances"], tensors[f"{key}.scalars"]
                if (mean.ndim != 1 or components.ndim != 2 or components.shape[1] != mean.shape[0]
                        or variances.shape != (components.shape[0],) or scalars.shape != (2,)
                        or not np.all(variances > 0) or not np.all(scalars > 0)):
                    raise ValueError(f"{key} has inconsistent shapes or values")
                members.append(MemberGate(mean, components, variances.astype(np.float64),
                                          float(scalars[0]), float(scalars[1])))
            return members

        try:
            members = group("")
            taps = [group(f"tap{t}.") for t in range(len(tap_names))]
            stored_taps = {key.split(".")[0] for key in tensors if key.startswith("tap")}
            if len(stored_taps) != len(tap_names) or any(len(t) != len(members) for t in taps):
                raise ValueError(f"{len(stored_taps)} stored tap(s) for the card's {len(tap_names)}, "
                                 "or a tap without every member")
        except (KeyError, ValueError) as exc:
            raise ModelBundleError(f"The input gate file is malformed ({exc}).") from None
        if not members or not np.isfinite(threshold) or threshold <= 0:
            raise ModelBundleError("The input gate is empty or its threshold is not a positive number.")
        return cls(members=members, threshold=float(threshold), info=info, taps=taps, tap_names=tap_names,
                   combine=combine, score_head=score_head)


def _check_combine(combine: str, score_head: bool, taps: Sequence[str]) -> None:
    if combine not in COMBINES or (not score_head and not taps):
        raise ModelBundleError(f"combine must be one of {', '.join(COMBINES)}, and a gate that does not score "
                               "the final layer needs taps.")


def fit_gate(train_features: Sequence[np.ndarray], calibration_features: Sequence[np.ndarray],
             pass_rate: float = DEFAULT_PASS_RATE, rank: int = DEFAULT_RANK,
             taps: Sequence[str] = (), combine: str = COMBINES[0], score_head: bool = True) -> InputGate:
    """Fit the gate: statistics on the training features, scales and threshold on held-in ones.

    Args:
        train_features: the N_train x D training features (mean and covariance) in
            :func:`feature_layers` order: per member the final layer's, then per tap per member.
        calibration_features: per member, the N_cal x D features of held-in images that were not
            used for the statistics (the validation split): each member's scale is its median
            distance there, and the threshold is the ``pass_rate`` quantile of the combined score
            (the higher order statistic, so at least that share of them passes).
        pass_rate: share of held-in images that must pass.
        taps: the mid-network block names whose pooled outputs follow the final layer's features.
        combine: ``"max"`` or ``"mean"`` of the groups' scores.
        score_head: whether the final layer's group counts (False needs taps).

    Returns:
        The fitted gate; ``info`` records the taps, the calibration pass rate and sizes.
    """
    fitted = [fit_member(f, rank) for f in train_features]
    for member, cal in zip(fitted, calibration_features):
        member.scale = float(np.median(member.distance(cal))) or 1.0
    groups = len(taps) + 1
    if len(fitted) % groups:
        raise ModelBundleError(f"{len(fitted)} feature sets do not split into {groups} groups of members.")
    _check_combine(combine, score_head, taps)
    size = len(fitted) // groups
    gate = InputGate(members=fitted[:size], threshold=1.0,
                     taps=[fitted[size * (t + 1):size * (t + 2)] for t in range(len(taps))], tap_names=list(taps),
                     combine=combine, score_head=score_head)
    scores = gate.score(calibration_features)
    gate.threshold = float(np.quantile(scores, pass_rate, method="higher"))
    gate.info = {"method": GATE_METHOD, "rank": fitted[0].components.shape[0], "members": size,
                 "taps": list(taps), "combine": combine, "score_head": score_head,
                 "n_train": int(len(train_features[0])), "n_calibration": int(len(scores)),
                 "pass_rate_target": pass_rate,
                 "calibration_pass_rate": float((scores <= gate.threshold).mean())}
    return gate


def fit_gate_out_of_fold(fold_train: Sequence[Sequence[np.ndarray]], fold_holdout: Sequence[Sequence[np.ndarray]],
                         pass_rate: float = DEFAULT_PASS_RATE, rank: int = DEFAULT_RANK, taps: Sequence[str] = (),
                         combine: str = COMBINES[0], score_head: bool = True) -> InputGate:
    """Fit a cross-validation ensemble's gate so that its threshold comes from images no member saw.

    Member k's statistics come from its fold's training images and its scale from its held-out
    fold. Every pooled image was trained on by the other members, so no image gives an unseen
    ensemble score; the threshold is instead the ``pass_rate`` quantile of each held-out image's
    score under its own fold's member alone. A mean over members varies less than one member's
    score, so unseen in-distribution images pass at least about as often as that.

    Args:
        fold_train: per member, its G feature arrays (final layer, then each tap) of the images it
            was trained on (N_k x D each).
        fold_holdout: per member, the same G arrays of its held-out fold's images.
        pass_rate, rank, taps, combine, score_head: see :func:`fit_gate`.

    Returns:
        The gate, members in fold order; ``info["calibration"]`` says how the threshold was set.
    """
    groups = len(taps) + 1
    if len(fold_train) != len(fold_holdout) or not fold_train or any(
            len(f) != groups for f in [*fold_train, *fold_holdout]):
        raise ModelBundleError(f"Out-of-fold gate fitting needs, for each member, {groups} feature set(s) of its "
                               "training images and as many of its held-out fold.")
    _check_combine(combine, score_head, taps)
    fitted: list[list[MemberGate]] = []  # [member][group]
    scores = []
    for train, holdout in zip(fold_train, fold_holdout):
        member = [fit_member(features, rank) for features in train]
        for gate_member, features in zip(member, holdout):
            gate_member.scale = float(np.median(gate_member.distance(features))) or 1.0
        alone = InputGate(members=member[:1], threshold=1.0, taps=[[m] for m in member[1:]], tap_names=list(taps),
                          combine=combine, score_head=score_head)
        scores.append(alone.score(list(holdout)))
        fitted.append(member)
    scores = np.concatenate(scores)
    gate = InputGate(members=[m[0] for m in fitted], threshold=float(np.quantile(scores, pass_rate, method="higher")),
                     taps=[[m[g] for m in fitted] for g in range(1, groups)], tap_names=list(taps),
                     combine=combine, score_head=score_head)
    gate.info = {"method": GATE_METHOD, "rank": fitted[0][0].components.shape[0], "members": len(fitted),
                 "taps": list(taps), "combine": combine, "score_head": score_head,
                 "n_train": int(sum(len(train[0]) for train in fold_train)), "n_calibration": int(len(scores)),
                 "pass_rate_target": pass_rate, "calibration": "out-of-fold (each held-out image under its own fold's member)",
                 "calibration_pass_rate": float((scores <= gate.threshold).mean())}
    return gate


FLAGGED_STATEMENT = "Outside what this model was trained on: not assessed."
UNCERTAIN_STATEMENT = "Uncertain: this prediction is among the model's least sure (the 20% least sure of its held-out check images)."


def gate_reason(score: float, threshold: float) -> str:
    """The plain reason shown for an image the gate flags."""
    return (f"outside what this model was trained on (input-gate score {score:.2f} > threshold {threshold:.2f}): "
            "not assessed")


def ood_record(flagged: bool, score: float | None, threshold: float | None, reason: str | None) -> dict:
    """The ``ood`` object of a prediction record (JSON-ready)."""
    return {"flagged": bool(flagged), "score": None if score is None else float(score),
            "threshold": None if threshold is None else float(threshold), "reason": reason}


# --------------------------------------------------------------------------- storage
def load_gate(bundle_dir: str | os.PathLike, gate_field: dict | None) -> InputGate | None:
    """The bundle's gate from its card's ``gate`` field, checked like the weights.

    Returns:
        None when the card has no gate.

    Raises:
        ModelBundleError: the gate file is missing, changed after it was saved (checksum), or malformed.
    """
    if not gate_field:
        return None
    if not isinstance(gate_field, dict):
        raise ModelBundleError("The model card's 'gate' field is not an object.")
    name = gate_field.get("file", GATE_FILE)
    path = Path(bundle_dir) / str(name)
    if Path(str(name)).name != name or not path.is_file():
        raise ModelBundleError(f"The bundle {bundle_dir} names an input gate file '{name}' it does not have.")
    if not gate_field.get("sha256") or sha256_file(path) != gate_field["sha256"]:
        raise ModelBundleError(
            f"The input gate in {bundle_dir} does not match the model card (checksum differs): the bundle is "
            "damaged or was changed after it was saved."
        )
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelBundleError(f"The input gate file {name} is damaged ({exc}).") from None
    try:
        threshold = float(gate_field.get("threshold"))
    except (TypeError, ValueError):
        raise ModelBundleError("The model card's gate threshold is not a number.") from None
    return InputGate.from_tensors(tensors, threshold, gate_field)


def write_gate(bundle_dir: str | os.PathLike, gate: InputGate, extra: dict | None = None) -> dict:
    """Store ``gate`` in an existing bundle folder (weights untouched) and record it in the card.

    The gate file and the card are each written to a temporary file and renamed into place.

    Returns:
        The card's new ``gate`` field.
    """
    from safetensors.numpy import save_file

    bundle_dir = Path(bundle_dir)
    card_path = bundle_dir / "card.json"
    card = json.loads(card_path.read_text())
    staging = bundle_dir / f".{GATE_FILE}.tmp"
    save_file(gate.tensors(), str(staging))
    os.chmod(staging, 0o644)
    gate_field = {**gate.info, **(extra or {}), "file": GATE_FILE, "sha256": sha256_file(staging),
                  "threshold": float(gate.threshold)}
    card["gate"] = gate_field
    card_staging = bundle_dir / ".card.json.tmp"
    card_staging.write_text(json.dumps(card, indent=2) + "\n")
    os.chmod(card_staging, 0o644)
    os.replace(staging, bundle_dir / GATE_FILE)
    os.replace(card_staging, card_path)
    return gate_field


# --------------------------------------------------------------------------- features (torch)
def gate_taps(gate_field: dict | None) -> list[str]:
    """The tap names a card's ``gate`` field lists (none for a gate of the final layer only)."""
    taps = (gate_field or {}).get("taps") or []
    if not isinstance(taps, list) or not all(isinstance(t, str) and t for t in taps):
        raise ModelBundleError("The model card's gate 'taps' is not a list of layer names.")
    return list(taps)


def feature_layers(model, taps: Sequence[str] = ()) -> list:
    """The layers whose features the gate scores, in the order :meth:`InputGate.score` takes them:
    the final ``nn.Linear`` of each model (each member of an ``Ensemble``; its *input* is the
    feature), then for each tap name each member's submodule of that name (its *output*, pooled by
    :func:`pooled_features`). The inference engine and :func:`capture_features` hook these layers.

    Returns:
        The layers; the first ``members`` of them are the heads.
    """
    from covidscan.engine import final_linears
    from covidscan.models import Ensemble

    try:
        heads = final_linears(model)
    except ValueError:
        raise ModelBundleError("The model has no final linear layer to take gate features from.") from None
    members = list(model.members) if isinstance(model, Ensemble) else [model]
    layers = list(heads)
    for tap in taps:
        try:
            layers.extend(member.get_submodule(tap) for member in members)
        except AttributeError:
            raise ModelBundleError(f"The model has no layer '{tap}' that its input gate taps.") from None
    return layers


def pooled_features(output):
    """A tap's feature vector: the mean and the standard deviation over space of an N x C x H x W
    block output (N x 2C; the same torch ops in the ONNX export and in eager mode)."""
    import torch

    mean = output.mean(dim=(2, 3))
    std = (output - mean[:, :, None, None]).pow(2).mean(dim=(2, 3)).sqrt()
    return torch.cat([mean, std], dim=1)


def layer_feature(is_head: bool, inputs, output):
    """The gate feature a hooked layer gives: a head's input, or a tap's pooled output."""
    return inputs[0] if is_head else pooled_features(output)


@contextmanager
def capture_features(model, taps: Sequence[str] = ()) -> Iterator[dict[str, list]]:
    """While active, each forward pass appends the gate's features (N x D numpy, in
    :func:`feature_layers` order) to ``captured["features"][j]`` and each member's logits to
    ``captured["logits"][m]``."""
    layers = feature_layers(model, taps)
    heads = len(layers) // (len(taps) + 1)
    captured: dict[str, list] = {"features": [[] for _ in layers], "logits": [[] for _ in range(heads)]}

    def hook_for(index: int):
        def hook(_module, inputs, output):
            feature = layer_feature(index < heads, inputs, output)
            captured["features"][index].append(feature.detach().float().cpu().numpy())
            if index < heads:
                captured["logits"][index].append(output.detach().float().cpu().numpy())
        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def split_features(model, images_uint8, mean: Sequence[float], std: Sequence[float], device="cpu",
                   batch_size: int = 32, taps: Sequence[str] = ()) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The gate's features (:func:`feature_layers` order) and each member's logits of N x 3 x S x S uint8 images."""
    import torch

    from covidscan.transforms import model_input

    model.eval()
    with torch.inference_mode(), capture_features(model, taps) as captured:
        for start in range(0, len(images_uint8), batch_size):
            model(model_input(images_uint8[start:start + batch_size], mean, std, torch.device(device)))
    return ([np.concatenate(f) for f in captured["features"]], [np.concatenate(l) for l in captured["logits"]])


# --------------------------------------------------------------------------- fitting a bundle's gate
def fit_gate_for_bundle(bundle_dir: str | os.PathLike, dataset: str, root: str | os.PathLike,
                        dataset_options: dict | None = None, train_split: str = "train", val_split: str = "val",
                        pass_rate: float = DEFAULT_PASS_RATE, rank: int = DEFAULT_RANK,
                        device: str = "cpu", taps: Sequence[str] = (), combine: str = COMBINES[0],
                        score_head: bool = True) -> dict:
    """Fit a saved bundle's input gate and selective-prediction summary, and store both in it.

    Statistics come from the ``train_split`` images' features, each member's scale and the threshold
    from the ``val_split`` images (at least ``pass_rate`` of them pass). The uncertainty summary is
    measured on the same val predictions. The weights are not touched.

    Args:
        bundle_dir: a saved bundle folder.
        dataset, root, dataset_options: the bundle's own training data (see ``open_dataset``).
        taps: mid-network layers (names inside each member, e.g. ``features.6``) scored besides
            the final layer's features.
        combine, score_head: how the groups' scores combine (see :func:`fit_gate`).

    Returns:
        The card's new ``gate`` field.
    """
    from covidscan.bundle import load_bundle
    from covidscan.evaluation import decide, load_split_for

    bundle = load_bundle(bundle_dir, device=device)
    feature_layers(bundle.model, taps)  # an unknown tap fails before the (slow) data loading
    card = bundle.card
    _, _, train_images = load_split_for(card, dataset, root, train_split, dataset_options)
    _, val_labels, val_images = load_split_for(card, dataset, root, val_split, dataset_options)
    train_features, _ = split_features(bundle.model, train_images, card.mean, card.std, device, taps=taps)
    val_features, val_logits = split_features(bundle.model, val_images, card.mean, card.std, device, taps=taps)
    gate = fit_gate(train_features, val_features, pass_rate=pass_rate, rank=rank, taps=taps, combine=combine,
                    score_head=score_head)
    probs, members = member_probabilities(val_logits, card.temperature)
    uncertainty = prediction_uncertainty(probs, members)
    correct = decide(probs, card.classes, card.positive_class, card.threshold) == np.asarray(val_labels)
    selective = selective_summary(uncertainty, correct)
    extra = {"fit": {"dataset": dataset, "root": Path(root).name, "options": dataset_options or {},
                     "statistics_split": train_split, "threshold_split": val_split},
             "uncertainty": {"definition": "entropy of the members' mean probabilities / log C (mean member entropy + Jensen-Shannon disagreement)",
                             "selective": selective, "summary": selective_sentence(selective)}}
    return write_gate(bundle_dir, gate, extra)
