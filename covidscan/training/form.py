"""The Train page's form described from :class:`TrainConfig`'s fields, so the page only lays widgets out.

:func:`form_fields` lists the fields with their label, help, widget kind and bounds (common fields,
or the "Advanced" ones); :func:`config_from_form` turns the widgets' values back into a config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from covidscan.cli.fields import field_type
from covidscan.errors import TrainingError
from covidscan.training.config import TrainConfig, infer_modality


@dataclass(frozen=True)
class FormField:
    """One TrainConfig field as a form widget.

    Attributes:
        name: the field name.
        label, help: what the widget shows.
        kind: "toggle", "select", "radio", "number", "sizes" (comma-separated numbers) or "text".
        choices: the options of a select/radio.
        number_type: int or float for a number input.
        optional: whether the field may be empty (None).
        default: the field's default.
        hints: min, max, step, format (number inputs).
    """

    name: str
    label: str
    help: str
    kind: str
    choices: tuple = ()
    number_type: type | None = None
    optional: bool = False
    default: Any = None
    hints: tuple = ()

    def hint(self, key: str, default: Any = None) -> Any:
        """A UI hint from the field's metadata (min, max, step, format)."""
        return dict(self.hints).get(key, default)


def _form_field(f: dataclasses.Field) -> FormField:
    kind_type = field_type(TrainConfig, f)
    default = f.default if f.default is not dataclasses.MISSING else None
    optional = "None" in str(f.type)
    choices = tuple(f.metadata.get("choices") or f.metadata.get("choices_hint") or ())
    if kind_type is bool:
        kind = "toggle"
    elif choices:
        kind = "radio" if f.metadata.get("widget") == "radio" else "select"
    elif kind_type in (int, float):
        kind = "number"
    elif kind_type == list[int]:
        kind = "sizes"
    else:
        kind = "text"
    hints = tuple((k, f.metadata[k]) for k in ("min", "max", "step", "format") if k in f.metadata)
    return FormField(f.name, f.metadata.get("label") or f.name.replace("_", " ").capitalize(),
                     f.metadata.get("help", ""), kind, choices, kind_type if kind == "number" else None, optional,
                     default, hints)


def form_fields(advanced: bool | None = None) -> list[FormField]:
    """The form's fields in declaration order: the common ones (``advanced=False``), the advanced ones, or all."""
    return [_form_field(f) for f in dataclasses.fields(TrainConfig) if f.metadata.get("form", True)
            and (advanced is None or bool(f.metadata.get("advanced")) == advanced)]


def field_by_name(name: str) -> FormField:
    """One form field by its TrainConfig name."""
    return next(f for f in form_fields() if f.name == name)


def default_modality(dataset: str) -> str | None:
    """The modality preselected for a dataset layout: its own (covid-ct, ieee8023), none for a plain folder."""
    return infer_modality(dataset)


def config_from_form(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from form values keyed by field name (not yet validated).

    Blank texts become None (or "" for a text field that is not optional), ``progressive_resize``
    is parsed from "128,224", and a missing modality is an error that says to choose one.

    Raises:
        TrainingError: a value that cannot be read, or no modality for a class-per-folder dataset.
    """
    data: dict[str, Any] = {}
    for spec in form_fields():
        if spec.name not in values:
            continue
        value = values[spec.name]
        if isinstance(value, str):
            value = value.strip()
            if spec.kind == "sizes":
                try:
                    value = [int(part) for part in value.split(",") if part.strip()] or None
                except ValueError:
                    raise TrainingError(f"{spec.label} wants sizes like 128,224, not '{values[spec.name]}'.") from None
            elif value == "" and spec.optional:
                value = None
        elif spec.kind == "number" and value is not None:
            value = spec.number_type(value)
        data[spec.name] = value
    if data.get("modality") is None:
        raise TrainingError("Choose the modality (CT or X-ray) of this dataset: a class-per-folder dataset can hold "
                            "either, and the model card records it.")
    return TrainConfig.from_dict(data)
