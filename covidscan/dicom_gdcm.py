"""A pydicom decoding plugin that lets GDCM decode 12-bit JPEG Extended pixel data.

pydicom's own GDCM plugin refuses JPEG Extended (Process 2 and 4) with 12-bit samples, and
Pillow cannot decode them either, so without this plugin the only decoder pydicom knows for
them is pylibjpeg-libjpeg (GPLv3, which this MIT project does not ship). python-gdcm 3.2
(Apache-2.0, wrapping BSD-licensed GDCM and its IJG libjpeg builds) decodes them: GDCM first
tries its 8-bit codec, then falls back to its 12-bit one. That fallback prints
"Unsupported JPEG data precision 12" on the process's native stderr, which is harmless.

Register it with :func:`register`; ``covidscan.images`` does so before decoding DICOM pixels.
"""
from __future__ import annotations

from pydicom import uid
from pydicom.pixels import get_decoder

try:
    import gdcm

    HAVE_GDCM = True
except ImportError:  # python-gdcm is a declared dependency, but decoding must fail clearly without it
    HAVE_GDCM = False

#: The label this plugin has in pydicom's decoder for JPEG Extended.
PLUGIN_LABEL = "covidscan-gdcm"

#: Required by pydicom's plugin interface: what the plugin needs, per transfer syntax.
DECODER_DEPENDENCIES = {uid.JPEGExtended12Bit: ("python-gdcm>=3.0.10",)}
_registered = False


def is_available(syntax: str) -> bool:
    """Whether this plugin can decode `syntax` here (pydicom's plugin interface).

    Args:
        syntax: a transfer syntax UID.

    Returns:
        True for JPEG Extended when python-gdcm is importable.
    """
    return HAVE_GDCM and syntax in DECODER_DEPENDENCIES


def decode_frame(src: bytes, runner) -> bytes:
    """Decode one JPEG Extended frame with GDCM (pydicom's plugin interface).

    Args:
        src: one frame's JPEG stream.
        runner: pydicom's ``DecodeRunner`` with the frame's rows, columns and pixel format.

    Returns:
        The frame's pixels, ``bits_allocated`` wide, in pydicom's expected layout.
    """
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    pixel_data = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    pixel_data.SetValue(fragments.__ref__())

    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(pixel_data)
    photometric = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(photometric))
    if runner.samples_per_pixel > 1:
        image.SetPlanarConfiguration(runner.planar_configuration)
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(runner.transfer_syntax))))
    image.SetPixelFormat(gdcm.PixelFormat(
        runner.samples_per_pixel, runner.bits_allocated, runner.bits_stored,
        runner.bits_stored - 1, runner.pixel_representation,
    ))
    # GDCM hands the buffer back as a str; surrogateescape recovers the raw bytes.
    frame = image.GetBuffer().encode("utf-8", "surrogateescape")
    if not frame:
        raise ValueError("GDCM could not decode the JPEG Extended frame")
    return frame


def register() -> None:
    """Add this plugin to pydicom's JPEG Extended decoder (once; later calls do nothing)."""
    global _registered
    if not _registered:
        get_decoder(uid.JPEGExtended12Bit).add_plugin(PLUGIN_LABEL, (__name__, "decode_frame"))
        _registered = True
