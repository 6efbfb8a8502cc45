"""Barcodes and printed labels: the only package that imports barcode and drawing libraries."""

from meter.label.barcode import decode_image, decode_images, encode_pdf417
from meter.label.datamatrix import encode_datamatrix
from meter.label.image_limits import ACCEPTED_FORMATS, DEFAULT_MAX_PIXELS
from meter.label.layout import (
    SYMBOLOGIES,
    LabelInfo,
    RenderedLabel,
    check_printable,
    render_label,
    write_label,
)

__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "SYMBOLOGIES",
    "LabelInfo",
    "RenderedLabel",
    "check_printable",
    "decode_image",
    "decode_images",
    "encode_datamatrix",
    "encode_pdf417",
    "render_label",
    "write_label",
]
