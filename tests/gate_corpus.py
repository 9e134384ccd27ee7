"""Out-of-distribution inputs for the input gate's tests and benchmark, from offline public sources.

Natural photographs come from the sample images bundled with scikit-learn (china.jpg, flower.jpg;
CC-BY) and matplotlib (grace_hopper.jpg); DICOMs from pydicom's bundled test files; documents and
noise are generated. Nothing here comes from a held-back test split.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _photos() -> list[np.ndarray]:
    import matplotlib
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if hopper.is_file():
        photos.append(np.asarray(Image.open(hopper).convert("RGB")))
    return photos


def natural_images(count: int, grayscale: bool = False, seed: int = 0) -> list[bytes]:
    """``count`` random crops (PNG bytes) of the bundled photographs, in colour or grayscale."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w)))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((384, 384))
        if grayscale:
            crop = crop.convert("L").convert("RGB")
        out.append(_png(np.asarray(crop)))
    return out


def document_images(count: int, seed: int = 0) -> list[bytes]:
    """``count`` rendered text pages (black text on off-white paper, like a scanned letter)."""
    rng = np.random.default_rng(seed)
    words = ("patient report scan result normal findings the of and chest imaging department date "
             "signature radiology clinic hospital page summary impression history").split()
    out = []
    for i in range(count):
        paper = int(rng.integers(225, 256))
        page = Image.new("L", (600, 800), paper)
        draw = ImageDraw.Draw(page)
        size = int(rng.integers(14, 30))
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1 has one fixed-size default font
            font = ImageFont.load_default()
        y = int(rng.integers(20, 80))
        while y < 760:
            line = " ".join(rng.choice(words, size=int(rng.integers(3, 9))))
            draw.text((int(rng.integers(20, 60)), y), line, fill=int(rng.integers(0, 60)), font=font)
            y += int(size * rng.uniform(1.3, 2.2))
        array = np.asarray(page, dtype=np.float32) + rng.normal(0, 4, (800, 600))  # scanner noise
        out.append(_png(np.repeat(np.clip(array, 0, 255).astype(np.uint8)[..., None], 3, axis=2)))
    return out


def noise_images(count: int, seed: int = 0) -> list[bytes]:
    """``count`` noise images: uniform, Gaussian and salt-and-pepper, grayscale and colour."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        kind, colour = i % 3, (i // 3) % 2 == 1
        shape = (256, 256, 3) if colour else (256, 256, 1)
        if kind == 0:
            array = rng.integers(0, 256, shape)
        elif kind == 1:
            array = np.clip(rng.normal(128, 50, shape), 0, 255)
        else:
            array = np.where(rng.random(shape) < 0.5, 0, 255)
        array = np.broadcast_to(array, (256, 256, 3)).astype(np.uint8)
        out.append(_png(np.ascontiguousarray(array)))
    return out


def pydicom_test_files(exclude_modality: str | None = None) -> list[str]:
    """pydicom's bundled test DICOMs that hold pixel data our reader decodes, one per distinct image."""
    import pydicom
    from pydicom.data import get_testdata_files

    from covidscan.errors import CovidscanError
    from covidscan.images import read_image

    found, seen = [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(get_testdata_files("*.dcm")):
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - deliberately broken test files
                continue
            modality = str(getattr(header, "Modality", "") or "")
            if exclude_modality and modality.upper() == exclude_modality.upper():
                continue
            try:
                pixels = read_image(path).pixels
            except (CovidscanError, Exception):  # noqa: BLE001 - files our decoders do not handle
                continue
            key = (modality, pixels.shape, int(pixels[::8, ::8].sum()))
            if key not in seen:
                seen.add(key)
                found.append(path)
    return found


def other_modality_files(shared: Path, modality: str, count: int) -> list[str]:
    """Up to ``count`` images of the other modality from ../shared/data (train and val images only)."""
    if modality == "CT":
        files = sorted((shared / "covid19-image-dataset-3class").rglob("*.*"))
        files += sorted((shared / "covid-chestxray").rglob("*.*"))
    else:
        from covidscan.datasets import open_dataset

        # Only the images of the official train and val lists (the test list is held back).
        files = sorted(item.path for item in open_dataset("covid-ct", shared / "covid-ct").items)
    files = [f for f in files if f.suffix.lower() in (".png", ".jpg", ".jpeg")]
    rng = np.random.default_rng(0)
    picked = rng.choice(len(files), size=min(count, len(files)), replace=False) if files else []
    return [str(files[i]) for i in sorted(picked)]
