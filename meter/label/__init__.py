"""Barcodes and printed labels: the only package that imports barcode and drawing libraries."""

from meter.label.barcode import decode_image, decode_images, encode_pdf417
from meter.label.layout import (
    LabelInfo,
    RenderedLabel,
    check_printable,
    render_label,
    write_label,
)

__all__ = [
    "LabelInfo",
    "RenderedLabel",
    "check_printable",
    "decode_image",
    "decode_images",
    "encode_pdf417",
    "render_label",
    "write_label",
]
