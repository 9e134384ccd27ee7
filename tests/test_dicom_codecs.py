"""Every DICOM transfer syntax read_image decodes, with permissively licensed decoders only.

The files are pydicom's bundled test files (offline, in the pydicom wheel) where one exists, else
files this test encodes itself (GDCM writes JPEG Lossless, pyjpegls writes JPEG-LS). pydicom's
pylibjpeg plugin (pylibjpeg-libjpeg, GPLv3) is taken out of the JPEG decoders for the whole module,
so these tests pass only if nothing depends on it, whether or not it is installed here.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from synthetic import ct_dicom_bytes

from covidscan import images
from covidscan.errors import ImageReadError
from covidscan.images import DECODER_PACKAGES, DICOM_DECODERS, read_image

# pydicom's pylibjpeg plugin uses pylibjpeg-libjpeg for these (and pylibjpeg-openjpeg for JPEG 2000).
LIBJPEG_SYNTAXES = (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
                    uid.JPEGLSLossless, uid.JPEGLSNearLossless)


@pytest.fixture(scope="module", autouse=True)
def without_libjpeg():
    """Decode as if pylibjpeg-libjpeg were not installed."""
    removed = []
    for syntax in LIBJPEG_SYNTAXES:
        decoder = get_decoder(syntax)
        try:
            decoder.remove_plugin("pylibjpeg")
            removed.append(decoder)
        except ValueError:  # pydicom never listed it here
            pass
    yield
    for decoder in removed:
        decoder.add_plugin("pylibjpeg", ("pydicom.pixels.decoders.pylibjpeg", "_decode_frame"))


def bundled(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom {pydicom.__version__} no longer bundles {name}"
    return path


def _gdcm_transcode(source: bytes, syntax: str, tmp_path) -> bytes:
    """Re-encode a DICOM file with GDCM (which has JPEG Lossless encoders that pydicom lacks)."""
    import gdcm

    names = {uid.JPEGLossless: gdcm.TransferSyntax.JPEGLosslessProcess14,
             uid.JPEGLosslessSV1: gdcm.TransferSyntax.JPEGLosslessProcess14_1}
    (tmp_path / "plain.dcm").write_bytes(source)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(tmp_path / "plain.dcm"))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(names[syntax]))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(tmp_path / "encoded.dcm"))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return (tmp_path / "encoded.dcm").read_bytes()


def _pydicom_compress(source: bytes, syntax: str, **options) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(source))
    dataset.compress(syntax, **options)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _ct_source() -> bytes:
    """A 12-bit CT slice with structure at every scale (lossless codecs must return it exactly)."""
    rows = np.linspace(-1000, 1500, 128)[:, None]
    waves = 200 * np.sin(np.arange(128) / 5)[None, :]
    return ct_dicom_bytes(rows + waves)


CT_WINDOW = (250, 2500)  # covers the synthetic slice's whole HU range, so coding errors show


# (transfer syntax, how to get the file, the uncompressed twin it must match, largest allowed difference)
CASES = [
    (uid.ExplicitVRLittleEndian, "MR_small.dcm", None, 0),
    (uid.ImplicitVRLittleEndian, "MR_small_implicit.dcm", "MR_small.dcm", 0),
    (uid.ExplicitVRBigEndian, "MR_small_bigendian.dcm", "MR_small.dcm", 0),
    (uid.DeflatedExplicitVRLittleEndian, "image_dfl.dcm", None, 0),
    (uid.RLELossless, "MR_small_RLE.dcm", "MR_small.dcm", 0),
    (uid.RLELossless, "SC_rgb_rle.dcm", None, 0),
    (uid.JPEGBaseline8Bit, "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", 8),  # YBR colour, lossy
    (uid.JPEGBaseline8Bit, "SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_rle.dcm", 4),
    (uid.JPEGExtended12Bit, "JPEG-lossy.dcm", "JPGExtended.dcm", 0),  # same stream, SOS marker quirk
    (uid.JPEGExtended12Bit, "JPGExtended.dcm", None, 0),
    (uid.JPEGLossless, "gdcm:JPEGLossless", "ct", 0),
    (uid.JPEGLosslessSV1, "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", 0),
    (uid.JPEGLosslessSV1, "gdcm:JPEGLosslessSV1", "ct", 0),
    (uid.JPEGLSLossless, "MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 0),
    (uid.JPEGLSLossless, "pyjpegls:JPEGLSLossless", "ct", 0),
    (uid.JPEGLSNearLossless, "SC_rgb_jls_lossy_line.dcm", "SC_rgb_rle.dcm", 2),
    (uid.JPEGLSNearLossless, "pyjpegls:JPEGLSNearLossless", "ct", 1),  # error 3 HU in a 2500 HU window
    (uid.JPEG2000Lossless, "MR_small_jp2klossless.dcm", "MR_small.dcm", 0),
    (uid.JPEG2000Lossless, "GDCMJ2K_TextGBR.dcm", None, 0),  # colour
    (uid.JPEG2000, "693_J2KI.dcm", None, 0),  # lossy CT, 14 bits stored
    (uid.JPEG2000, "JPEG2000.dcm", None, 0),
    (uid.JPEG2000, "SC_rgb_gdcm_KY.dcm", "SC_rgb_rle.dcm", 0),  # reversible coding in the lossy syntax
]


def _source(spec: str, tmp_path) -> tuple[bytes | str, dict]:
    """The file to decode and the read_image options that make it comparable to its twin."""
    tool, _, syntax_name = spec.partition(":")
    if not syntax_name:
        return bundled(spec), {}
    syntax = getattr(uid, syntax_name)
    if tool == "gdcm":
        return _gdcm_transcode(_ct_source(), syntax, tmp_path), {"window": CT_WINDOW}
    options = {"jls_error": 3} if syntax == uid.JPEGLSNearLossless else {}
    return _pydicom_compress(_ct_source(), syntax, **options), {"window": CT_WINDOW}


@pytest.mark.parametrize("syntax, spec, twin, tolerance", CASES, ids=[f"{c[0].name}-{c[1]}" for c in CASES])
def test_transfer_syntax_decodes(syntax, spec, twin, tolerance, tmp_path):
    source, options = _source(spec, tmp_path)
    header = pydicom.dcmread(source if isinstance(source, str) else io.BytesIO(source),
                             stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == syntax  # the fixture really is what the row says
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about quirks in some of its own test files
        image = read_image(source, **options)
        if twin is not None:
            reference = read_image(_ct_source() if twin == "ct" else bundled(twin), **options)
    assert image.info.format == "DICOM" and image.pixels.dtype == np.uint8
    assert image.pixels.std() > 5, "decoded to a flat image"
    if twin is not None:
        assert image.pixels.shape == reference.pixels.shape
        difference = np.abs(image.pixels.astype(int) - reference.pixels.astype(int))
        assert difference.max() <= tolerance, (difference.max(), difference.mean())


def test_every_compressed_syntax_has_a_row():
    assert set(DICOM_DECODERS) <= {str(row[0]) for row in CASES}


def test_twelve_bit_jpeg_extended_values_are_right():
    """JPEG-lossy.dcm and JPEG2000.dcm are lossy codings of one 12-bit image (Clunie's NM set):
    decoded by different libraries (GDCM, OpenJPEG) their stored values must agree."""
    extended = pydicom.dcmread(bundled("JPEG-lossy.dcm"))
    assert extended.BitsStored == 12
    image = read_image(bundled("JPEG-lossy.dcm"))
    assert image.info.bit_depth == 12
    images._decode_pixels(extended, None)  # the same decode read_image does, kept on the data set
    values = extended.pixel_array.astype(float)
    j2k = pydicom.dcmread(bundled("JPEG2000.dcm")).pixel_array.astype(float)
    assert values.shape == j2k.shape == (1024, 256)
    assert 200 < values.max() < 4096  # 12-bit values, not rescaled to 8 bits
    assert np.corrcoef(values.ravel(), j2k.ravel())[0, 1] > 0.9
    assert np.abs(values - j2k).mean() < 8


def test_libjpeg_is_never_a_chosen_decoder():
    for syntax in LIBJPEG_SYNTAXES:
        assert "pylibjpeg" not in DICOM_DECODERS[str(syntax)], syntax.name
    for plugins in DICOM_DECODERS.values():
        assert all(plugin in DECODER_PACKAGES for plugin in plugins)


@pytest.mark.parametrize("name, frames, plugin", [("examples_ybr_color.dcm", 30, "pillow"),  # baseline JPEG
                                                   ("SC_rgb_rle_2frame.dcm", 2, "pydicom")])
def test_multiframe_decodes_only_the_middle_frame_and_gets_it_right(name, frames, plugin):
    image = read_image(bundled(name))
    assert any(f"{frames} frames" in note for note in image.info.notes)
    dataset = pydicom.dcmread(bundled(name))
    dataset.pixel_array_options(decoding_plugin=plugin)
    everything = dataset.pixel_array
    assert everything.shape[0] == frames and not np.array_equal(everything[frames // 2], everything[0])
    np.testing.assert_array_equal(image.pixels, everything[frames // 2])


def test_missing_decoder_says_which_package_is_needed(monkeypatch):
    monkeypatch.setitem(DICOM_DECODERS, str(uid.JPEGLosslessSV1), ("pyjpegls",))  # no JPEG Lossless plugin
    with pytest.raises(ImageReadError, match=r"cannot be decoded here \(JPEG Lossless.*needs pyjpegls"):
        read_image(bundled("SC_rgb_jpeg_gdcm.dcm"))


def test_damaged_compressed_stream_is_refused_clearly():
    from pydicom.encaps import encapsulate

    dataset = pydicom.dcmread(bundled("MR_small_jpeg_ls_lossless.dcm"))
    dataset.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(range(256)) * 4])
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    with pytest.raises(ImageReadError, match="damaged"):
        read_image(buffer.getvalue())
