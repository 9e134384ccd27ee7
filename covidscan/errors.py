"""Typed errors whose messages are written for the person using the app or the CLI."""
from __future__ import annotations


class CovidscanError(Exception):
    """Base class: every error covidscan raises on purpose. ``str(err)`` is a user-facing message."""


class ImageReadError(CovidscanError):
    """An input file could not be read as an image or DICOM file."""


class ModelBundleError(CovidscanError):
    """A model bundle is missing, malformed, or does not match its model card."""


class ModelRegistryError(CovidscanError):
    """An unknown architecture, or pretrained weights that cannot be had."""


class DatasetError(CovidscanError):
    """A dataset folder or metadata file is missing, malformed, or lacks a requested split."""


class TrainingError(CovidscanError):
    """Training could not start or continue (bad configuration, no data, ...)."""


class JobError(CovidscanError):
    """A training job could not be submitted, found, or controlled."""
