"""Builders of small synthetic inputs for tests: images, DICOM files and tiny model bundles."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

PHI = {"PatientName": "Doe^Jane", "PatientID": "MRN-0042-SECRET", "PatientBirthDate": "19700101"}


def gradient_image(width: int = 96, height: int = 80, seed: int = 0) -> np.ndarray:
    """An RGB uint8 image with structure (not blank): a gradient plus a bright disc."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    gray = (x * 200 // max(width - 1, 1) + rng.integers(0, 30, size=(height, width))).astype(np.float64)
    gray[(x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 4) ** 2] = 250
    gray = np.clip(gray, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def distinct_picture(seed: int, value: int, size: int = 64) -> np.ndarray:
    """A grayscale uint8 image of random bright rectangles over noise: each seed a different picture
    (perceptual hashes far apart, unlike :func:`gradient_image`'s shared layout), ``value`` their brightness."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 40, (size, size)).astype(np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, size * 3 // 4, 2)
        h, w = rng.integers(size // 10, size // 4, 2)
        pixels[y:y + h, x:x + w] = value
    return pixels


def tiny_train_config(root: Path, **changes):
    """A TrainConfig of tiny_cnn at 32 px on the CPU over a :func:`two_class_folder` dataset (X-ray, seed 1,
    one epoch), with ``changes`` applied: the recipe the cross-validation tests run in seconds."""
    from covidscan.training import TrainConfig

    options = dict(dataset="folder", root=str(root), arch="tiny_cnn", epochs=1, image_size=32, batch_size=8,
                   lr=0.01, device="cpu", modality="X-ray", window=None, seed=1, name="tiny-cv")
    return TrainConfig(**{**options, **changes})


def two_class_folder(root: Path, counts: dict[str, int], size: int = 48,
                     classes: tuple[str, str] = ("COVID", "Normal")) -> Path:
    """A ``folder`` dataset of two learnable classes (bright vs dim pictures from :func:`distinct_picture`).

    Args:
        root: the dataset folder to create.
        counts: images per class in each split, e.g. ``{"train": 10, "val": 4, "test": 3}``.

    Returns:
        ``root``, holding ``<split>/<class>/<class><i>.png``.
    """
    for split, count in counts.items():
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                picture = distinct_picture(1000 * k + 100 * len(split) + i, 230 - 150 * k, size=size)
                Image.fromarray(picture).save(folder / f"{name}{i}.png")
    return root


def encode(pixels: np.ndarray, fmt: str = "PNG", mode: str | None = None, **save) -> bytes:
    """Encode an array (optionally converted to a PIL mode first) and return the file bytes."""
    image = Image.fromarray(pixels)
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def ct_dicom_bytes(
    hu: np.ndarray | None = None,
    modality: str = "CT",
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    with_pixels: bool = True,
    preamble: bool = True,
) -> bytes:
    """A DICOM file whose stored values map to ``hu`` with slope 1 and intercept -1024, with PHI set."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    if hu is None:
        hu = np.linspace(-1000, 400, 64 * 64).reshape(64, 64)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("synthetic.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PixelSpacing = [0.7, 0.7]
    if with_pixels:
        stored = np.round(np.asarray(hu, dtype=np.float64) + 1024).astype(np.uint16)
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleSlope = 1
        ds.RescaleIntercept = -1024
        ds.PixelData = stored.tobytes()
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    buffer = io.BytesIO()
    if preamble:
        ds.save_as(buffer, enforce_file_format=True)
    else:
        # An old-style file: no preamble, no "DICM" prefix, no file meta; just the data set.
        from pydicom.filewriter import write_dataset
        from pydicom.filebase import DicomBytesIO

        raw = DicomBytesIO()
        raw.is_little_endian, raw.is_implicit_VR = True, False
        del ds.file_meta
        write_dataset(raw, ds)
        return raw.getvalue()
    return buffer.getvalue()


def tiny_bundle(path: Path, classes=("COVID", "NonCOVID"), modality: str = "CT", seed: int = 0, **card_fields) -> Path:
    """Save a randomly initialised ``tiny_cnn`` bundle (64 px) and return its path."""
    import torch

    from covidscan.bundle import ModelCard, save_bundle
    from covidscan.models import create_model

    torch.manual_seed(seed)
    model = create_model("tiny_cnn", num_classes=len(classes))
    card = ModelCard.for_architecture("tiny-test", "tiny_cnn", list(classes), modality, window="lung", **card_fields)
    return save_bundle(model.eval(), card, path)
