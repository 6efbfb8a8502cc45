"""Data Matrix (ECC 200) encoding, as the USPS IMI indicium and Royal Mail's Mailmark print it.

zxing-cpp's own writer (zint inside) makes the symbol, so no library is added
for it. The bytes go in as binary data: zint then picks for each stretch the
shortest encodation (Base256 for arbitrary bytes, ASCII where a stretch is
shorter so, e.g. runs of zero bytes), all of them lossless, and every reader
returns exactly the given bytes. Two choices differ from zxing-cpp's defaults:
squares only (its default also picks the DMRE rectangles of ISO/IEC 21471,
which older scanners do not read), and no ECI designator (by default binary
data is marked ECI 899, three codewords that are not the indicium; PIM-1's
barcode holds the indicium bytes and nothing else).
"""

from __future__ import annotations

from typing import Any, cast

import zxingcpp
from PIL import Image

from meter.errors import BarcodeError, InvalidInput
from meter.label.barcode import Symbol

__all__ = ["DATAMATRIX_QUIET_MODULES", "datamatrix_symbol", "encode_datamatrix"]

# ISO/IEC 16022 asks for 1 module; 2 leave room for a printer's registration drift.
DATAMATRIX_QUIET_MODULES = 2

# zxing-cpp turns these keyword arguments into zint's options. "eci" given as a
# number is zint's ECI setting itself, 0 for none.
_OPTIONS: dict[str, Any] = {"forceSquare": True, "eci": "0"}


def datamatrix_symbol(data: bytes) -> Symbol:
    """The smallest square ECC 200 symbol holding exactly `data` (1 to 1555 bytes).

    Raises InvalidInput for data that is not bytes or is empty, BarcodeError
    when it does not fit the largest symbol (144 x 144 modules).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInput(f"barcode data must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InvalidInput("barcode data is empty")
    try:
        barcode = zxingcpp.create_barcode(data, zxingcpp.BarcodeFormat.DataMatrix, **_OPTIONS)
    except ValueError as exc:  # zint's "Input too long" and the like
        raise BarcodeError(f"{len(data)} bytes do not fit one Data Matrix symbol ({exc})") from exc
    # One pixel per module, 0 for dark; zxingcpp.Image's stub omits the buffer protocol.
    modules = memoryview(cast(Any, barcode.to_image(scale=1, add_quiet_zones=False)))
    height, width = cast(tuple[int, int], modules.shape)
    dark = modules.tobytes().translate(bytes.maketrans(b"\x00\xff", b"10"))
    rows = tuple(dark[r * width : (r + 1) * width].decode("ascii") for r in range(height))
    return Symbol(rows, row_modules=1, quiet_modules=DATAMATRIX_QUIET_MODULES)


def encode_datamatrix(data: bytes, *, module_px: int = 6) -> Image.Image:
    """A greyscale image of the Data Matrix symbol holding exactly `data`, quiet zone included.

    148 bytes (an ECDSA indicium) give 48 x 48 modules, 340 bytes (RSA) 72 x 72.
    Raises InvalidInput for bad parameters, BarcodeError when the data does not fit.
    """
    if not 1 <= module_px <= 50:
        raise InvalidInput(f"module size must be 1 to 50 pixels, not {module_px}")
    return datamatrix_symbol(data).image(module_px)
