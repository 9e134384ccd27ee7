"""TrainConfig defined once: the train/lr-find/grid/pretrain options are generated from its fields,
``--config`` runs a saved config (including one written by the previous training code), and the
modality is inferred from the dataset or, for a class-per-folder dataset, required."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import pytest

from covidscan.cli import build_parser, main
from covidscan.cli.fields import add_dataclass_options, option_name
from covidscan.cli.train import add_training_options, config_from_args
from covidscan.errors import TrainingError
from covidscan.pretrain import PretrainConfig
from covidscan.training import TrainConfig
from jobs_helpers import make_dataset

OLD_CONFIG = Path(__file__).with_name("old_run_config.json")  # written by the single-module training code


def parse(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_training_options(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_every_field_has_an_option_and_untyped_options_keep_the_field_defaults():
    parser = argparse.ArgumentParser()
    add_training_options(parser)
    options = {opt for action in parser._actions for opt in action.option_strings}
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli", True):
            assert option_name(f.name, negated=f.default is True) in options, f.name
    config = parse("--dataset", "covid-ct", "--root", "/data/ct")
    defaults = TrainConfig(dataset="covid-ct", root="/data/ct")
    for f in dataclasses.fields(TrainConfig):
        if f.name != "command":
            assert getattr(config, f.name) == getattr(defaults, f.name), f.name


def test_todays_option_names_still_work():
    config = parse("--dataset", "folder", "--root", "/d", "--modality", "X-ray", "--no-calibrate", "--pretrained",
                   "--progressive-resize", "128,224", "--val-fraction", "0.25", "--split-seed", "7", "--tune-threshold",
                   "--lr", "3e-4", "--epochs", "3", "--patience", "2", "--schedule", "plateau", "--monitor", "val_f1",
                   "--frozen-blocks", "4", "--feature-views", "2", "--init-weights", "w.safetensors", "--name", "m")
    assert (config.calibrate, config.pretrained, config.tune_threshold) == (False, True, True)
    assert config.progressive_resize == [128, 224] and config.dataset_options == {"val_fraction": 0.25, "seed": 7}
    assert (config.lr, config.epochs, config.patience, config.schedule, config.monitor) == (3e-4, 3, 2, "plateau", "val_f1")
    assert (config.frozen_blocks, config.feature_views, config.init_weights, config.name) == (4, 2, "w.safetensors", "m")
    with pytest.raises(SystemExit):
        parse("--dataset", "folder", "--root", "/d", "--schedule", "weekly")


def test_a_no_flag_says_what_it_turns_off():
    @dataclasses.dataclass
    class Settings:
        calibrate: bool = dataclasses.field(default=True, metadata={"help": "fit a temperature on val"})
        mirror: bool = dataclasses.field(default=True, metadata={"help": "each image and its mirror averaged"})
        pretrained: bool = dataclasses.field(default=False, metadata={"help": "start from ImageNet weights"})

    parser = argparse.ArgumentParser()
    add_dataclass_options(parser, Settings)
    helps = {action.option_strings[0]: action.help for action in parser._actions if action.option_strings}
    assert helps["--no-calibrate"] == "do not fit a temperature on val"
    assert helps["--no-mirror"] == "turn off (on by default): each image and its mirror averaged"
    assert helps["--pretrained"] == "start from ImageNet weights"
    assert vars(parser.parse_args(["--no-calibrate"])) == {"calibrate": False}


def test_modality_is_inferred_from_the_dataset_and_required_for_a_folder(capsys):
    assert parse("--dataset", "covid-ct", "--root", "/d").modality == "CT"
    assert parse("--dataset", "ieee8023", "--root", "/d").modality == "X-ray"
    assert parse("--dataset", "ieee8023", "--root", "/d", "--modality", "CT").modality == "CT"
    with pytest.raises(TrainingError, match="--modality is required for --dataset folder: say CT or X-ray"):
        parse("--dataset", "folder", "--root", "/d")
    assert main(["train", "--dataset", "folder", "--root", "/d", "--out", "/tmp/never"]) == 2
    assert "--modality is required" in capsys.readouterr().err
    with pytest.raises(TrainingError, match="required: --dataset, --root"):
        parse("--epochs", "2")


def test_lr_find_grid_and_pretrain_options_come_from_the_fields():
    parser = build_parser()
    args = parser.parse_args(["lr-find", "--dataset", "covid-ct", "--root", "/d", "--steps", "5", "--label-smoothing", "0.1"])
    assert config_from_args(args).label_smoothing == 0.1 and args.steps == 5
    args = parser.parse_args(["grid", "--dataset", "covid-ct", "--root", "/d", "--out", "g", "--patience", "1"])
    assert config_from_args(args).patience == 1
    from covidscan.cli.pretrain import config_from_args as pretrain_config

    args = parser.parse_args(["pretrain", "--dataset", "folder", "--root", "/d", "--out", "w.safetensors",
                              "--temperature", "0.5", "--val-fraction", "0.3"])
    config = pretrain_config(args)
    assert config.temperature == 0.5 and config.pretrained is False  # the CLI flag keeps its default: off
    assert config.dataset_options == {"val_fraction": 0.3}
    assert config.epochs == PretrainConfig(dataset="x", root="y").epochs


def test_cv_options_come_from_the_fields_and_a_job_command_line_reproduces_them():
    from covidscan.cli.cv import cv_arguments, cv_options_from_args
    from covidscan.cli.fields import field_option
    from covidscan.cv import CVOptions

    parser = build_parser()
    base = ["cv", "--dataset", "covid-ct", "--root", "/d", "--out", "o"]
    options = {opt for action in parser._subparsers._actions[-1].choices["cv"]._actions for opt in action.option_strings}
    for f in dataclasses.fields(CVOptions):
        if f.metadata.get("cli", True):
            assert field_option(f) in options, f.name
    args = parser.parse_args(base)
    assert cv_options_from_args(args) == CVOptions()
    assert config_from_args(args).seed == TrainConfig(dataset="x", root="y").seed  # --cv-seed is not --seed
    chosen = CVOptions(folds=4, repeats=2, seed=3, inner_val_fraction=0.15, near_duplicate_distance=None,
                       bootstrap=200, weights_dtype="float32", gate_taps=("features.6",), gate_combine="mean",
                       gate_pass_rate=0.95, eval_sizes=(224, 288))
    typed = cv_arguments(chosen)
    assert typed[typed.index("--near-duplicate-distance") + 1] == "-1"
    assert typed.count("--eval-size") == 2 and "--seed" not in typed
    assert cv_options_from_args(parser.parse_args(base + typed)) == chosen
    assert cv_arguments(CVOptions()) == []


def test_old_config_json_loads_and_options_override_it(tmp_path):
    data = make_dataset(tmp_path / "data")
    saved = json.loads(OLD_CONFIG.read_text())
    saved["root"] = str(data)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    config = TrainConfig.load(path)
    assert (config.dataset, config.modality, config.lr, config.schedule, config.patience) == ("folder", "X-ray", 0.003,
                                                                                              "plateau", 3)
    assert config.dataset_options == {"val_fraction": 0.25, "seed": 5}
    overridden = parse("--config", str(path), "--epochs", "7", "--split-seed", "9")
    assert overridden.epochs == 7 and overridden.dataset_options == {"val_fraction": 0.25, "seed": 9}
    assert overridden.name == "old-xr" and overridden.augment == "strong"


def test_train_runs_a_saved_config(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data")
    saved = json.loads(OLD_CONFIG.read_text())
    saved.update(root=str(data), window=None)
    path = tmp_path / "old" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(saved))
    monkeypatch.setattr(sys, "argv", ["covidscan", "train", "--config", str(path)])
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "again")]) == 0
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert {k: written[k] for k in ("lr", "schedule", "augment", "dataset_options")} == {
        "lr": 0.003, "schedule": "plateau", "augment": "strong", "dataset_options": {"val_fraction": 0.25, "seed": 5}}
    assert (tmp_path / "again" / "model").is_dir()
    # Without --out the config's own folder is the run directory, unless it already holds a run.
    assert main(["train", "--config", str(path)]) == 0 and (path.parent / "model").is_dir()
    assert main(["train", "--config", str(path)]) == 2


def test_bad_config_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    with pytest.raises(TrainingError, match="not valid JSON"):
        parse("--config", str(bad))
    with pytest.raises(TrainingError, match="Cannot read the config file"):
        parse("--config", str(tmp_path / "none.json"))


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = {}
    for name, sub in action.choices.items():
        found[name] = sub
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            found.update({f"{name} {inner}": p for inner, p in _subcommands(sub).items()})
    return found


def test_every_command_prints_its_help():
    # argparse %-formats help texts: a field's help with a literal % (2-33% of the area) once made
    # `covidscan train --help` end in a traceback.
    commands = _subcommands(build_parser())
    assert {"train", "cv", "cv-nested", "pretrain", "gate fit"} <= set(commands)
    for name, parser in commands.items():
        assert parser.format_help().startswith("usage:"), name
