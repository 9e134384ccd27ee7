"""Tests for covidscan.images: every reader path, DICOM windowing, and clear refusals."""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image
from synthetic import PHI, ct_dicom_bytes, encode, gradient_image

from covidscan.errors import ImageReadError
from covidscan.images import MAX_PIXELS, WINDOW_PRESETS, Window, read_image

PIXELS = gradient_image(96, 80)


@pytest.mark.parametrize(
    "fmt, mode",
    [("PNG", "L"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "LA"), ("PNG", "1"),
     ("JPEG", "L"), ("JPEG", "RGB"), ("JPEG", "CMYK"), ("BMP", "RGB"), ("TIFF", "L"), ("TIFF", "CMYK"), ("GIF", "P")],
)
def test_reads_raster_formats_and_modes(fmt, mode):
    source = Image.fromarray(PIXELS[..., 0]) if mode in ("P", "LA", "1") else Image.fromarray(PIXELS)
    buffer = io.BytesIO()
    source.convert(mode).save(buffer, format=fmt)
    image = read_image(buffer.getvalue())
    assert image.info.format == fmt
    assert image.pixels.shape == (80, 96, 3) and image.pixels.dtype == np.uint8
    if mode == "1":  # bilevel: only black and white survive
        assert set(np.unique(image.pixels)) <= {0, 255}
        return
    difference = np.abs(image.pixels.astype(int) - PIXELS.astype(int)).mean()
    assert difference < (8 if fmt == "JPEG" else 0.5), difference
    if mode != "CMYK":  # CMYK round trips may tint grey slightly
        assert image.info.color == "grayscale"


def test_colour_image_is_reported_as_colour():
    rgb = PIXELS.copy()
    rgb[..., 0] = 255 - rgb[..., 0]
    image = read_image(encode(rgb, "PNG"))
    assert image.info.color == "color"
    np.testing.assert_array_equal(image.pixels, rgb)


def test_sixteen_bit_png_is_rescaled_to_full_range():
    values = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 15).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    image = read_image(buffer.getvalue())
    assert image.info.bit_depth == 16
    assert image.pixels[0, 0, 0] == 0 and image.pixels[-1, -1, 0] == 255
    assert np.all(np.diff(image.pixels[..., 0].ravel().astype(int)) >= 0)  # order is preserved


def test_rgba_transparent_margin_becomes_black():
    rgba = np.dstack([PIXELS, np.full(PIXELS.shape[:2], 255, np.uint8)])
    rgba[:, :10, 3] = 0
    image = read_image(encode(rgba, "PNG"))
    assert image.pixels[:, :10].max() == 0
    np.testing.assert_array_equal(image.pixels[:, 10:], PIXELS[:, 10:])


def test_gif_uses_first_frame_and_says_so():
    frames = [Image.fromarray(PIXELS[..., 0]), Image.fromarray(255 - PIXELS[..., 0])]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    image = read_image(buffer.getvalue())
    assert any("2 frames" in note for note in image.info.notes)
    assert abs(int(image.pixels[..., 0].astype(int).mean()) - int(PIXELS[..., 0].mean())) <= 2


def test_format_comes_from_content_not_extension(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(encode(PIXELS, "JPEG"))
    assert read_image(path).info.format == "JPEG"


def test_reads_from_path_bytes_and_file_objects(tmp_path):
    data = encode(PIXELS, "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)

    class Upload(io.BytesIO):  # like Streamlit's UploadedFile: has getvalue()
        pass

    for source in (path, str(path), data, bytearray(data), io.BytesIO(data), Upload(data)):
        np.testing.assert_array_equal(read_image(source).pixels, PIXELS)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"hello, this is a text file, not a scan" * 10, "not an image or DICOM file"),
        (b"%PDF-1.4\n" + b"0" * 500, "not an image or DICOM file"),
    ],
)
def test_non_images_are_refused_clearly(data, message):
    with pytest.raises(ImageReadError, match=message):
        read_image(data)


def test_truncated_jpeg_is_refused():
    data = encode(gradient_image(256, 256), "JPEG")
    with pytest.raises(ImageReadError, match="damaged or incomplete"):
        read_image(data[: len(data) // 2])


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageReadError, match="File not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="folder"):
        read_image(tmp_path)


def test_decompression_bomb_is_refused_before_decoding():
    side = int(MAX_PIXELS**0.5) + 100
    data = encode(np.zeros((side, side), np.uint8), "PNG", optimize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageReadError, match="too large"):
            read_image(data)


def test_tiny_and_blank_images_are_refused():
    with pytest.raises(ImageReadError, match="too small"):
        read_image(encode(gradient_image(20, 100), "PNG"))
    with pytest.raises(ImageReadError, match="blank"):
        read_image(encode(np.full((64, 64), 7, np.uint8), "PNG"))


# ---------------------------------------------------------------- DICOM


def _hu_ramp() -> np.ndarray:
    hu = np.full((64, 64), -1000.0)
    hu[:, 16:32] = -600  # lung window centre
    hu[:, 32:48] = 40  # mediastinum window centre
    hu[:, 48:] = 1000
    return hu


def test_ct_dicom_is_windowed_in_hounsfield_units_lung_by_default():
    image = read_image(ct_dicom_bytes(_hu_ramp()))
    assert image.info.format == "DICOM" and image.info.modality == "CT"
    assert image.info.window.startswith("lung")
    row = image.pixels[0, :, 0]
    assert abs(int(row[0]) - round((-1000 + 1350) / 1500 * 255)) <= 1  # lung window spans -1350 .. 150 HU
    assert abs(int(row[20]) - 128) <= 1  # -600 HU is the lung window's centre
    assert row[40] > row[20] and row[60] == 255


def test_ct_dicom_mediastinum_window():
    image = read_image(ct_dicom_bytes(_hu_ramp()), window="mediastinum")
    row = image.pixels[0, :, 0]
    assert row[20] == 0 and abs(int(row[40]) - 128) <= 1 and row[60] == 255
    assert image.info.window == WINDOW_PRESETS["mediastinum"].describe("mediastinum")


def test_custom_window_and_unknown_preset():
    image = read_image(ct_dicom_bytes(_hu_ramp()), window=(40, 400))
    assert abs(int(image.pixels[0, 40, 0]) - 128) <= 1
    assert read_image(ct_dicom_bytes(_hu_ramp()), window=Window(40, 400)).info.window.startswith("custom")
    with pytest.raises(ImageReadError, match="Unknown window preset"):
        read_image(ct_dicom_bytes(_hu_ramp()), window="brain-ish")


def test_dicom_own_window_only_when_asked_for_ct():
    data = ct_dicom_bytes(_hu_ramp(), window=(40, 400))
    assert read_image(data).info.window.startswith("lung")
    own = read_image(data, window="file")
    assert own.info.window.startswith("from file")
    assert abs(int(own.pixels[0, 40, 0]) - 128) <= 1


def test_file_window_requested_but_absent_falls_back_with_a_note():
    image = read_image(ct_dicom_bytes(_hu_ramp()), window="file")
    assert image.info.window.startswith("lung")
    assert any("no window of its own" in note for note in image.info.notes)


def test_monochrome1_is_inverted():
    normal = read_image(ct_dicom_bytes(_hu_ramp()))
    inverted = read_image(ct_dicom_bytes(_hu_ramp(), photometric="MONOCHROME1"))
    np.testing.assert_array_equal(inverted.pixels, 255 - normal.pixels)


def test_dicom_without_preamble_is_read():
    image = read_image(ct_dicom_bytes(_hu_ramp(), preamble=False))
    assert image.info.format == "DICOM" and abs(int(image.pixels[0, 20, 0]) - 128) <= 1


def test_dicom_without_pixel_data():
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(ct_dicom_bytes(with_pixels=False))


def test_dicom_description_never_contains_phi(tmp_path):
    path = tmp_path / "ct.dcm"
    path.write_bytes(ct_dicom_bytes(_hu_ramp()))
    info = read_image(path).info
    text = json.dumps(info.to_dict())
    for value in PHI.values():
        assert value not in text
    assert info.pixel_spacing == (0.7, 0.7) and info.width == 64 and info.bit_depth == 12


@pytest.mark.parametrize(
    "name, modality, color",
    [
        ("CT_small.dcm", "CT", "grayscale"),
        ("MR_small.dcm", "MR", "grayscale"),
        ("MR_small_RLE.dcm", "MR", "grayscale"),
        ("MR_small_jp2klossless.dcm", "MR", "grayscale"),  # JPEG 2000 via pylibjpeg-openjpeg
        ("JPEG2000.dcm", "NM", "grayscale"),
        ("SC_rgb_jpeg_dcmtk.dcm", "OT", "color"),  # baseline JPEG, YBR colour
    ],
)
def test_pydicom_bundled_files(name, modality, color):
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom does not bundle {name} in this version")
    image = read_image(path)
    assert image.info.modality == modality and image.info.color == color
    assert image.pixels.dtype == np.uint8 and image.pixels.std() > 5


def test_pydicom_bundled_compressed_matches_uncompressed():
    from pydicom.data import get_testdata_file

    plain = read_image(get_testdata_file("MR_small.dcm")).pixels
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):
        np.testing.assert_array_equal(read_image(get_testdata_file(name)).pixels, plain)


def test_pydicom_bundled_file_without_pixels():
    from pydicom.data import get_testdata_file

    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(get_testdata_file("rtplan.dcm"))
