"""Frozen-prefix (cached-feature) training: the prefix stays exactly as initialised, the tail learns."""
from __future__ import annotations

import pytest
import torch

from covidscan.bundle import load_bundle
from covidscan.errors import TrainingError
from covidscan.models import create_model
from covidscan.training import train
from covidscan.utils import seed_everything
from test_training import folder, tiny_config  # noqa: F401 - the shared fixture


def test_frozen_prefix_run_keeps_the_prefix_and_trains_the_tail(folder, tmp_path):  # noqa: F811
    result = train(tiny_config(folder, frozen_blocks=2, feature_views=2, balance="sampler"), tmp_path / "run")
    assert result.state == "succeeded" and result.epochs_run == 2
    trained = load_bundle(tmp_path / "run" / "model").model.state_dict()
    seed_everything(3)  # the run's seed, set right before it builds the model
    initial = create_model("tiny_cnn", 2).state_dict()
    prefix = [k for k in initial if k.startswith(("features.0.", "features.1."))]
    assert prefix and all(torch.equal(trained[k], initial[k]) for k in prefix)
    assert not torch.equal(trained["classifier.weight"], initial["classifier.weight"])


def test_frozen_prefix_is_refused_for_an_unsupported_architecture(folder, tmp_path):  # noqa: F811
    with pytest.raises(TrainingError, match="not supported for resnet18"):
        train(tiny_config(folder, arch="resnet18", frozen_blocks=2), tmp_path / "run")
