"""decode_image's cheap first searches and its fallbacks, on real rendered labels.

The first search reads only an upright (or upside-down) PDF417, then an upright
Data Matrix; these tests hold the labels the fast searches cannot read, which
only the fallbacks can: turned 90, 180 and 270 degrees, inverted, and scanned
back at 200 dpi with noise, for both symbologies. Each must come back byte-exact.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable

import _vectors
import pytest
import zxingcpp
from PIL import Image, ImageFilter, ImageOps

from meter.cli.workflows import label_info
from meter.errors import BarcodeError
from meter.indicium import decode
from meter.label import SYMBOLOGIES, decode_image, encode_datamatrix, encode_pdf417, render_label

VECTORS = _vectors.load()
INDICIA = {v["name"]: bytes.fromhex(v["indicium_hex"]) for v in VECTORS["vectors"]}
# One ECDSA (148 bytes) and one RSA (340 bytes) indicium: the two symbol sizes.
CHOSEN = ("ecdsa-valid", "rsa-pss-valid")
_FAST = {"try_rotate": False, "try_invert": False, "try_downscale": False}
_FORMATS = {
    "pdf417": zxingcpp.BarcodeFormat.PDF417,
    "datamatrix": zxingcpp.BarcodeFormat.DataMatrix,
}


def scanned_200dpi(image: Image.Image, seed: int = 1) -> Image.Image:
    """The 300 dpi label as a 200 dpi scanner returns it: 2/3 size, skewed, blurred, noisy."""
    small = image.resize((image.width * 2 // 3, image.height * 2 // 3), Image.Resampling.BILINEAR)
    angle = random.Random(seed).uniform(-1.0, 1.0)
    skewed = small.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=255)
    noisy = Image.blend(skewed, Image.effect_noise(skewed.size, 24), 0.25)
    return noisy.filter(ImageFilter.GaussianBlur(0.6))


TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "rotated-90": lambda image: image.transpose(Image.Transpose.ROTATE_90),
    "rotated-180": lambda image: image.transpose(Image.Transpose.ROTATE_180),
    "rotated-270": lambda image: image.transpose(Image.Transpose.ROTATE_270),
    "inverted": ImageOps.invert,
    "scanned-200dpi": scanned_200dpi,
    "scanned-200dpi-rotated-90": lambda image: scanned_200dpi(image).transpose(
        Image.Transpose.ROTATE_90
    ),
    "scanned-200dpi-inverted": lambda image: ImageOps.invert(scanned_200dpi(image)),
}


def label(name: str, symbology: str) -> Image.Image:
    data = INDICIA[name]
    png = render_label(data, label_info(decode(data), _vectors.ADDRESS), symbology=symbology).png
    with Image.open(io.BytesIO(png)) as image:
        return image.convert("L")


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("name", CHOSEN)
@pytest.mark.parametrize("symbology", SYMBOLOGIES)
def test_straight_label(symbology: str, name: str) -> None:
    assert decode_image(png(label(name, symbology))) == INDICIA[name]


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("name", CHOSEN)
@pytest.mark.parametrize("symbology", SYMBOLOGIES)
def test_fallback_reads_hard_labels_exactly(symbology: str, name: str, transform: str) -> None:
    image = TRANSFORMS[transform](label(name, symbology))
    assert decode_image(png(image)) == INDICIA[name]
    assert decode_image(image) == INDICIA[name]


@pytest.mark.parametrize("symbology", SYMBOLOGIES)
@pytest.mark.parametrize("transform", ["rotated-90", "rotated-270", "inverted"])
def test_these_labels_need_the_fallback(symbology: str, transform: str) -> None:
    """The cheap search alone does not read them: the tests above do test the fallback."""
    image = TRANSFORMS[transform](label("ecdsa-valid", symbology))
    found = zxingcpp.read_barcodes(image, formats=_FORMATS[symbology], **_FAST)
    assert not [b for b in found if bytes(b.bytes) == INDICIA["ecdsa-valid"]]


def test_a_data_matrix_beside_a_pdf417_is_still_two_symbols() -> None:
    """The PDF417-first search still looks for a second symbol (at half resolution)."""
    data = INDICIA["ecdsa-valid"]
    page = label("ecdsa-valid", "pdf417")
    page.paste(encode_datamatrix(INDICIA["rsa-pss-valid"]), (700, 1300))  # the blank lower right
    with pytest.raises(BarcodeError, match="2 PDF417/Data Matrix symbols"):
        decode_image(page)
    assert decode_image(label("ecdsa-valid", "pdf417")) == data


def test_an_upside_down_pdf417_needs_no_fallback() -> None:
    """zxing-cpp's PDF417 detector reads 180 degrees itself: the first search suffices."""
    image = encode_pdf417(INDICIA["ecdsa-valid"]).transpose(Image.Transpose.ROTATE_180)
    found = zxingcpp.read_barcodes(image, formats=_FORMATS["pdf417"], **_FAST)
    assert [bytes(b.bytes) for b in found] == [INDICIA["ecdsa-valid"]]
    assert decode_image(image) == INDICIA["ecdsa-valid"]
