"""Reading images and DICOM files from a path or from bytes, with a de-identified description.

Formats are identified by content, never by file name. Every failure raises
:class:`~covidscan.errors.ImageReadError` with a message a clinician can act on.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from covidscan.errors import ImageReadError

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

MAX_PIXELS = 50_000_000
MIN_SIDE = 32
SUPPORTED_TEXT = "PNG, JPEG, BMP, TIFF, GIF or DICOM"


@dataclass(frozen=True)
class Window:
    """A display window in Hounsfield units (or stored values for non-CT)."""

    center: float
    width: float

    def describe(self, name: str | None = None) -> str:
        label = f"C {self.center:g} / W {self.width:g}"
        return f"{name} ({label})" if name else label


WINDOW_PRESETS: dict[str, Window] = {
    "lung": Window(-600, 1500),
    "mediastinum": Window(40, 400),
    "bone": Window(400, 1800),
}
#: Asking for this window name uses the DICOM file's own WindowCenter/WindowWidth.
FILE_WINDOW = "file"
DEFAULT_CT_WINDOW = "lung"


#: pydicom decoding plugins tried, in order, for each compressed DICOM transfer syntax. Every one is
#: permissively licensed: "pillow" (libjpeg-turbo, OpenJPEG inside Pillow), "gdcm" and "covidscan-gdcm"
#: (python-gdcm), "pyjpegls" (CharLS), "pylibjpeg" only for JPEG 2000 (pylibjpeg-openjpeg) and
#: "pydicom" (its own RLE decoder). pylibjpeg-libjpeg (GPLv3) is never used, even where installed.
DICOM_DECODERS: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.1.2.5": ("pydicom",),  # RLE Lossless
    "1.2.840.10008.1.2.4.50": ("pillow", "gdcm"),  # JPEG Baseline (8-bit)
    "1.2.840.10008.1.2.4.51": ("pillow", "covidscan-gdcm"),  # JPEG Extended (Pillow: 8-bit only)
    "1.2.840.10008.1.2.4.57": ("gdcm",),  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": ("gdcm",),  # JPEG Lossless, first-order prediction (SV1)
    "1.2.840.10008.1.2.4.80": ("pyjpegls", "gdcm"),  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": ("pyjpegls", "gdcm"),  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": ("pylibjpeg", "gdcm", "pillow"),  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": ("pylibjpeg", "gdcm", "pillow"),  # JPEG 2000
}
#: The PyPI package each decoding plugin needs (for the message when none is installed).
DECODER_PACKAGES = {
    "pydicom": "pydicom", "pillow": "pillow", "gdcm": "python-gdcm", "covidscan-gdcm": "python-gdcm",
    "pyjpegls": "pyjpegls", "pylibjpeg": "pylibjpeg-openjpeg",
}


@dataclass
class ImageInfo:
    """What the app may show about an input: never patient name, ID or birth date."""

    format: str
    width: int
    height: int
    bit_depth: int
    color: str  # "grayscale" or "color"
    modality: str | None = None
    window: str | None = None
    pixel_spacing: tuple[float, float] | None = None
    body_part: str | None = None
    view_position: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedImage:
    """Decoded pixels (uint8, H x W x 3, RGB) and their de-identified description."""

    pixels: np.ndarray
    info: ImageInfo

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the decoded image."""
        return self.info.width, self.info.height


def read_image(
    source: ImageSource,
    *,
    window: str | Window | tuple[float, float] | None = None,
) -> LoadedImage:
    """Read a raster image or DICOM file.

    Args:
        source: a path, the file's bytes, or a binary file object (e.g. a Streamlit upload).
        window: for DICOM only. A preset name (``"lung"``, ``"mediastinum"``, ``"bone"``),
            ``"file"`` for the DICOM's own window, a :class:`Window` or ``(center, width)``.
            ``None`` means lung for CT, and the file's own window (or the full range) otherwise.

    Returns:
        The decoded image as RGB uint8 pixels and an :class:`ImageInfo`.

    Raises:
        ImageReadError: with a message that says what is wrong with the file.
    """
    data = _read_bytes(source)
    if not data:
        raise ImageReadError("The file is empty.")
    if _looks_like_dicom(data):
        return _read_dicom(data, window)
    try:
        return _read_raster(data)
    except _NotRaster:
        pass
    dataset = _try_dicom_without_preamble(data)
    if dataset is not None:
        return _dicom_to_image(dataset, window)
    raise ImageReadError(f"This file is not an image or DICOM file (supported: {SUPPORTED_TEXT}).")


def _read_bytes(source: ImageSource) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageReadError(f"File not found: {path}")
        if path.is_dir():
            raise ImageReadError(f"{path} is a folder, not an image file.")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ImageReadError(f"The file {path.name} could not be opened ({exc.strerror}).") from None
    if hasattr(source, "getvalue"):
        return bytes(source.getvalue())
    if hasattr(source, "read"):
        if hasattr(source, "seek"):
            source.seek(0)
        return bytes(source.read())
    raise ImageReadError(f"Cannot read an image from a {type(source).__name__}.")


# ---------------------------------------------------------------- raster formats


class _NotRaster(Exception):
    pass


_BIT_DEPTH = {"1": 1, "L": 8, "P": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "LA": 8, "PA": 8, "YCbCr": 8,
              "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}


def _read_raster(data: bytes) -> LoadedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise _NotRaster() from None
        raise ImageReadError(f"The image is too large (the limit is {MAX_PIXELS // 1_000_000} megapixels).") from None
    except Exception:  # noqa: BLE001 - any decoder failure means "not an image we can read"
        raise _NotRaster() from None
    fmt = image.format or "image"
    width, height = image.size
    _check_size(width, height)
    notes: list[str] = []
    if getattr(image, "n_frames", 1) > 1:
        notes.append(f"The file holds {image.n_frames} frames; the first one is used.")
    mode = image.mode
    try:
        image.seek(0)
        image.load()
    except Exception:  # noqa: BLE001 - truncated or corrupt data
        raise ImageReadError("The image file is damaged or incomplete and could not be decoded.") from None
    pixels, color = _to_rgb_uint8(image)
    _check_not_blank(pixels)
    info = ImageInfo(format=fmt, width=width, height=height, bit_depth=_BIT_DEPTH.get(mode, 8),
                     color=color, notes=notes)
    return LoadedImage(pixels=pixels, info=info)


def _to_rgb_uint8(image: Image.Image) -> tuple[np.ndarray, str]:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        gray = _rescale_to_uint8(np.asarray(image, dtype=np.float64))
        return np.repeat(gray[..., None], 3, axis=2), "grayscale"
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "PA"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        # Composite on black: transparent margins of a scan are background, not tissue.
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    if image.mode in ("1", "L"):
        gray = np.asarray(image.convert("L"))
        return np.repeat(gray[..., None], 3, axis=2), "grayscale"
    rgb = np.asarray(image.convert("RGB"))
    is_gray = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return np.ascontiguousarray(rgb), "grayscale" if is_gray else "color"


def _rescale_to_uint8(values: np.ndarray) -> np.ndarray:
    low, high = float(np.min(values)), float(np.max(values))
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip((values - low) * (255.0 / (high - low)) + 0.5, 0, 255).astype(np.uint8)


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageReadError(
            f"The image is too large ({width}x{height} pixels, {width * height / 1e6:.0f} megapixels; "
            f"the limit is {MAX_PIXELS // 1_000_000} megapixels)."
        )
    if min(width, height) < MIN_SIDE:
        raise ImageReadError(
            f"The image is too small ({width}x{height} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed)."
        )


def _check_not_blank(pixels: np.ndarray) -> None:
    if int(pixels.max()) == int(pixels.min()):
        raise ImageReadError("The image is blank: every pixel has the same value.")


# ---------------------------------------------------------------- DICOM


def _looks_like_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _read_dicom(data: bytes, window) -> LoadedImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, Exception):  # noqa: BLE001 - any parse failure
        raise ImageReadError("The DICOM file is damaged and could not be read.") from None
    return _dicom_to_image(dataset, window)


def _try_dicom_without_preamble(data: bytes):
    """Old DICOM files may lack the 128-byte preamble; accept them only if they parse as DICOM."""
    import pydicom

    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:  # noqa: BLE001
        return None
    known = ("SOPClassUID", "Modality", "PixelData", "Rows", "StudyInstanceUID")
    try:
        if not any(keyword in dataset for keyword in known):
            return None
    except Exception:  # noqa: BLE001
        return None
    if "TransferSyntaxUID" not in dataset.file_meta:
        # Without file meta the decoder needs the transfer syntax the parser detected.
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = dataset.original_encoding
        syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        dataset.file_meta = dataset.file_meta or FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = syntax
    return dataset


def _dicom_to_image(dataset, window) -> LoadedImage:
    if "PixelData" not in dataset and "FloatPixelData" not in dataset and "DoubleFloatPixelData" not in dataset:
        raise ImageReadError("The DICOM file has no pixel data (it may be a report or a structured document).")
    rows, cols = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    _check_size(cols, rows)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if rows * cols * frames > 4 * MAX_PIXELS:
        raise ImageReadError(f"The DICOM file is too large ({frames} frames of {cols}x{rows} pixels).")
    # Only the middle frame is decoded: it is the one shown.
    array = _decode_pixels(dataset, frames // 2 if frames > 1 else None)

    notes: list[str] = []
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        notes.append(f"The file holds {frames} frames; the middle one is used.")
    modality = str(dataset.get("Modality", "") or "") or None
    bit_depth = int(dataset.get("BitsStored", dataset.get("BitsAllocated", 8)) or 8)
    if samples == 3:
        pixels = np.ascontiguousarray(array.astype(np.uint8) if array.dtype != np.uint8 else array)
        if pixels.ndim != 3:
            raise ImageReadError("The DICOM file's colour pixel data has an unexpected shape.")
        window_text = None
        color = "color"
    else:
        pixels_gray, window_text = _window_grayscale(dataset, array, modality, window, notes)
        if photometric == "MONOCHROME1":
            pixels_gray = 255 - pixels_gray
            notes.append("MONOCHROME1 image inverted for display.")
        pixels = np.repeat(pixels_gray[..., None], 3, axis=2)
        color = "grayscale"
    _check_not_blank(pixels)
    info = ImageInfo(
        format="DICOM",
        width=int(pixels.shape[1]),
        height=int(pixels.shape[0]),
        bit_depth=bit_depth,
        color=color,
        modality=modality,
        window=window_text,
        pixel_spacing=_pixel_spacing(dataset),
        body_part=str(dataset.get("BodyPartExamined", "") or "") or None,
        view_position=str(dataset.get("ViewPosition", "") or "") or None,
        notes=notes,
    )
    return LoadedImage(pixels=pixels, info=info)


def _transfer_syntax(dataset):
    return getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)


def _decode_pixels(dataset, frame: int | None) -> np.ndarray:
    """Decode the pixel data (one frame when `frame` is given) with the permissively licensed plugins."""
    from pydicom.pixels import get_decoder

    from covidscan import dicom_gdcm

    dicom_gdcm.register()  # pydicom's GDCM plugin refuses 12-bit JPEG Extended; this one decodes it
    syntax = _transfer_syntax(dataset)
    name = getattr(syntax, "name", None) or str(syntax or "unknown")
    plugins = DICOM_DECODERS.get(str(syntax)) if syntax else None
    if plugins is None:  # uncompressed (or a syntax only pydicom's defaults know): no choice to make
        candidates = [""]
    else:
        available = get_decoder(syntax).available_plugins
        candidates = [plugin for plugin in plugins if plugin in available]
        if not candidates:
            raise ImageReadError(
                f"The DICOM file's image is compressed in a way that cannot be decoded here ({name}); "
                f"decoding it needs {' or '.join(dict.fromkeys(DECODER_PACKAGES[plugin] for plugin in plugins))}."
            )
    for plugin in candidates:
        try:
            dataset.pixel_array_options(index=frame, decoding_plugin=plugin)
            return dataset.pixel_array
        except Exception as exc:  # noqa: BLE001 - this plugin cannot decode it: try the next one
            failure = exc
    if plugins is None and any(word in str(failure).lower() for word in ("missing", "plugin", "decoder")):
        raise ImageReadError(f"The DICOM file's image is compressed in a way that cannot be decoded here ({name}).")
    raise ImageReadError("The DICOM file's pixel data is damaged and could not be decoded.")


def _window_grayscale(dataset, array: np.ndarray, modality: str | None, window, notes: list[str]):
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(array, dataset).astype(np.float64)
    chosen, text = _resolve_window(dataset, modality, window, notes)
    if chosen is None:
        return _rescale_to_uint8(values), "full range"
    low = chosen.center - chosen.width / 2.0
    scaled = (values - low) * (255.0 / max(chosen.width, 1e-6))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8), text


def _resolve_window(dataset, modality, window, notes) -> tuple[Window | None, str | None]:
    if isinstance(window, Window):
        return window, window.describe("custom")
    if isinstance(window, tuple):
        custom = Window(float(window[0]), float(window[1]))
        return custom, custom.describe("custom")
    if window is not None and window != FILE_WINDOW:
        name = str(window).lower()
        if name not in WINDOW_PRESETS:
            choices = ", ".join([*WINDOW_PRESETS, FILE_WINDOW])
            raise ImageReadError(f"Unknown window preset '{window}' (choose one of: {choices}).")
        return WINDOW_PRESETS[name], WINDOW_PRESETS[name].describe(name)
    own = _file_window(dataset)
    if window == FILE_WINDOW and own is None:
        notes.append("The DICOM file has no window of its own; the default window is used.")
    if own is not None and (window == FILE_WINDOW or modality != "CT"):
        return own, own.describe("from file")
    if modality == "CT":
        preset = WINDOW_PRESETS[DEFAULT_CT_WINDOW]
        return preset, preset.describe(DEFAULT_CT_WINDOW)
    return None, None


def _file_window(dataset) -> Window | None:
    center, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        center = float(center[0] if _is_multi(center) else center)
        width = float(width[0] if _is_multi(width) else width)
    except (TypeError, ValueError):
        return None
    return Window(center, width) if width > 0 else None


def _is_multi(value) -> bool:
    return not isinstance(value, (str, bytes)) and hasattr(value, "__getitem__") and hasattr(value, "__len__")


def _pixel_spacing(dataset) -> tuple[float, float] | None:
    spacing = dataset.get("PixelSpacing") or dataset.get("ImagerPixelSpacing")
    try:
        return (float(spacing[0]), float(spacing[1])) if spacing else None
    except (TypeError, ValueError, IndexError):
        return None


# Truncated JPEGs must fail loudly, not decode to grey bars.
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
