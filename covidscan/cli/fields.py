"""Command-line options generated from a dataclass's fields (the idea of transformers' HfArgumentParser).

Each field becomes ``--field-name`` with the field's type, ``metadata["help"]`` and
``metadata["choices"]``; a bool defaulting to False is a flag (``--pretrained``), one defaulting to
True a ``--no-...`` flag (``--no-calibrate``); ``list[int]`` takes comma-separated numbers
(``--progressive-resize 128,224``) and ``tuple[int, ...]`` a repeatable option (``--eval-size 224
--eval-size 256``). Options are parsed with ``argparse.SUPPRESS`` defaults, so
:func:`given_options` returns only what was typed, to lay over a saved config or the defaults.
Fields with ``metadata["cli"]`` False get no option; ``metadata["cli_default"]`` is the command
line's default where it differs from the field's (see :func:`cli_defaults`); ``metadata["option"]``
names the option where the field's name would clash or read badly (``cv-seed``, ``eval-size``);
``metadata["cli_none"]`` is the value typed for None (``-1``). :func:`dataclass_arguments` is the
inverse: the options that reproduce a dataclass value, for a job's command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

# First words of a help text that read right after "do not " (for ``--no-...`` flags).
NEGATABLE_VERBS = ("fit ", "store ", "keep ", "use ", "choose ", "save ", "write ")


def field_type(cls: type, f: dataclasses.Field) -> type:
    """The field's type without ``| None`` (``int | None`` -> int, ``list[int] | None`` -> list[int])."""
    hint = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def option_name(name: str, negated: bool = False) -> str:
    """``--field-name`` (``--no-field-name`` for a flag that turns a default-True bool off)."""
    return "--" + ("no-" if negated else "") + name.replace("_", "-")


def field_option(f: dataclasses.Field, negated: bool = False) -> str:
    """The field's option: ``metadata["option"]`` where given, else :func:`option_name` of its name."""
    return option_name(f.metadata.get("option", f.name), negated)


def _dest(f: dataclasses.Field) -> str:
    return f.metadata.get("option", f.name).replace("-", "_")


def _is_tuple(kind: Any) -> bool:
    return typing.get_origin(kind) is tuple


def cli_fields(cls: type, skip: typing.Collection[str] = ()) -> list[dataclasses.Field]:
    """The fields of ``cls`` that have a command-line option."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name not in skip]


def _default(f: dataclasses.Field, cli: bool = False) -> Any:
    if cli and "cli_default" in f.metadata:
        return f.metadata["cli_default"]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _comma_separated(item_type: type, name: str):
    def parse(text: str) -> list:
        try:
            return [item_type(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option_name(name)} wants comma-separated numbers like 128,224, "
                                             f"not '{text}'") from None

    return parse


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: typing.Collection[str] = (),
                          help_overrides: dict[str, str] | None = None, config_option: bool = False) -> None:
    """Add one option per field of ``cls`` (see the module doc).

    Args:
        parser: the (sub-)command's parser.
        cls: a dataclass whose fields carry ``metadata`` (help, choices, cli).
        skip: fields to leave out.
        help_overrides: help texts replacing the fields' own, by field name.
        config_option: the command also takes ``--config FILE`` (required fields may come from it).
    """
    for f in cli_fields(cls, skip):
        kind = field_type(cls, f)
        default = _default(f, cli=True)
        # argparse %-formats help texts (for %(default)s): a literal % in a field's help must be doubled.
        text = ((help_overrides or {}).get(f.name) or f.metadata.get("help", "")).replace("%", "%%")
        if kind is bool:
            negated = default is True
            # A --no-... flag turns off what the field's help describes, so its help must say so.
            if negated:
                text = f"do not {text}" if text.startswith(NEGATABLE_VERBS) else f"turn off (on by default): {text}"
            parser.add_argument(field_option(f, negated), dest=_dest(f), action="store_false" if negated else "store_true",
                                default=argparse.SUPPRESS, help=text)
            continue
        shown = f.metadata.get("cli_none") if default is None else default
        if shown not in (None, "", (), dataclasses.MISSING) and f.metadata.get("show_default", True):
            text += f" (default: {shown})"
        elif default is dataclasses.MISSING:
            text += " (required unless --config gives it)" if config_option else ""
        kwargs: dict[str, Any] = {"dest": _dest(f), "default": argparse.SUPPRESS, "help": text.strip(),
                                  "required": default is dataclasses.MISSING and not config_option}
        if typing.get_origin(kind) is list:
            kwargs["type"] = _comma_separated(typing.get_args(kind)[0], f.name)
            kwargs["metavar"] = "N,N,..."
        elif _is_tuple(kind):
            kwargs.update(action="append", type=typing.get_args(kind)[0], metavar=f.metadata.get("metavar", "N"))
        elif kind in (int, float, str):
            kwargs["type"] = kind
        if "choices" in f.metadata:
            kwargs["choices"] = list(f.metadata["choices"])
        parser.add_argument(field_option(f), **kwargs)


def cli_defaults(cls: type) -> dict[str, Any]:
    """The command line's own defaults (``metadata["cli_default"]``), to apply before what was typed."""
    return {f.name: f.metadata["cli_default"] for f in dataclasses.fields(cls) if "cli_default" in f.metadata}


def given_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The field values typed on the command line (options left out are absent, not defaulted)."""
    values = {}
    for f in cli_fields(cls):
        if not hasattr(args, _dest(f)):
            continue
        value = getattr(args, _dest(f))
        if "cli_none" in f.metadata and value == f.metadata["cli_none"]:
            value = None
        values[f.name] = tuple(value) if _is_tuple(field_type(cls, f)) else value
    return values


def dataclass_arguments(value: Any, skip: typing.Collection[str] = ()) -> list[str]:
    """The options that reproduce ``value`` (a dataclass) when parsed: one per field that differs from its default.

    Args:
        value: an instance of a dataclass whose options :func:`add_dataclass_options` adds.
        skip: fields to leave out (e.g. those another option group carries).

    Returns:
        Command-line arguments such as ``["--folds", "4", "--eval-size", "224", "--eval-size", "288"]``.
    """
    cls = type(value)
    arguments: list[str] = []
    for f in cli_fields(cls, skip):
        current, default = getattr(value, f.name), _default(f, cli=True)
        if current == default:
            continue
        kind = field_type(cls, f)
        if kind is bool:
            arguments.append(field_option(f, negated=default is True))
        elif current is None:
            arguments += [field_option(f), str(f.metadata["cli_none"])]
        elif typing.get_origin(kind) is list:
            arguments += [field_option(f), ",".join(str(item) for item in current)]
        elif _is_tuple(kind):
            for item in current:
                arguments += [field_option(f), str(item)]
        else:
            arguments += [field_option(f), str(current)]
    return arguments


def missing_required(cls: type, values: dict[str, Any]) -> list[str]:
    """Option names of required fields (no default) that ``values`` lacks."""
    return [field_option(f) for f in dataclasses.fields(cls)
            if _default(f) is dataclasses.MISSING and values.get(f.name) in (None, "")]
