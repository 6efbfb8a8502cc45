"""PDF417 encoding, the symbol both renderers draw, and barcode reading.

Encoding uses pdf417gen's row and error-correction code but does its own byte
compaction, so the symbol holds exactly the given bytes with no text or numeric
segments (Data Matrix encoding is in datamatrix.py). Reading uses zxing-cpp and
returns `Barcode.bytes`, the symbol's raw bytes before any character-set
interpretation, from images opened within the bounds of image_limits.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import zxingcpp
from pdf417gen.encoding import encode_rows
from pdf417gen.error_correction import compute_error_correction_code_words
from PIL import Image, ImageOps

from meter.errors import BarcodeError, InvalidInput
from meter.label.image_limits import (
    DEFAULT_MAX_PIXELS,
    ImageSource,
    check_max_pixels,
    describe,
    open_image,
    release_memory,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MIN_SECURITY_LEVEL",
    "QUIET_MODULES",
    "ROW_MODULES",
    "ImageSource",
    "Symbol",
    "decode_image",
    "decode_images",
    "encode_pdf417",
    "pdf417_symbol",
]

MIN_SECURITY_LEVEL = 5  # PIM-1: error correction level 5 or higher
QUIET_MODULES = 4  # ISO/IEC 15438 asks for at least 2 modules of quiet zone each side
ROW_MODULES = 3  # row height in modules; 3 is the standard's minimum recommendation

_MAX_CODEWORDS = 928  # data, length descriptor, padding and error correction together
_BYTE_LATCH = 901  # byte compaction, any length
_BYTE_LATCH_6 = 924  # byte compaction, length a multiple of 6
_PAD = 900
_TARGET_ASPECT = 2.0  # width : height; prints well beside the human-readable block
_WANTED = (zxingcpp.BarcodeFormat.PDF417, zxingcpp.BarcodeFormat.DataMatrix)
_PDF417 = zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.PDF417)
_DATAMATRIX = zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.DataMatrix)
_BOTH = zxingcpp.BarcodeFormats(_WANTED)
# 1 bits are bars (black), 0 bits spaces (white), as 8-bit grey levels.
_BITS_TO_GREY = bytes.maketrans(b"01", b"\xff\x00")


@dataclass(frozen=True)
class Symbol:
    """A 2D symbol as rows of modules, "1" for dark: shared by the PNG and PDF renderers.

    A PDF417 row is `ROW_MODULES` modules high; a Data Matrix row is one module.
    """

    rows: tuple[str, ...]
    row_modules: int = ROW_MODULES  # height of one row, in modules
    quiet_modules: int = QUIET_MODULES  # quiet zone on each side, in modules

    @property
    def width(self) -> int:
        """Width in modules, quiet zone excluded."""
        return len(self.rows[0])

    @property
    def height(self) -> int:
        """Height in modules, quiet zone excluded."""
        return len(self.rows) * self.row_modules

    def image(self, module_px: int) -> Image.Image:
        """A greyscale image, `module_px` pixels per module, with its quiet zone."""
        raw = "".join(self.rows).encode("ascii").translate(_BITS_TO_GREY)
        small = Image.frombytes("L", (self.width, len(self.rows)), raw)
        quiet = self.quiet_modules * module_px
        big = small.resize(
            (self.width * module_px, self.height * module_px), Image.Resampling.NEAREST
        )
        framed = Image.new("L", (big.width + 2 * quiet, big.height + 2 * quiet), 255)
        framed.paste(big, (quiet, quiet))
        return framed


def pdf417_symbol(
    data: bytes, *, security_level: int = MIN_SECURITY_LEVEL, columns: int | None = None
) -> Symbol:
    """The PDF417 symbol holding exactly `data` in byte compaction mode."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInput(f"barcode data must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InvalidInput("barcode data is empty")
    if not MIN_SECURITY_LEVEL <= security_level <= 8:
        raise InvalidInput(
            f"PDF417 error correction level {security_level} refused: "
            f"PIM-1 needs {MIN_SECURITY_LEVEL} to 8"
        )
    if columns is not None and not 1 <= columns <= 30:
        raise InvalidInput(f"PDF417 columns must be 1 to 30, not {columns}")
    words = _byte_compaction(data)
    ec_count = 2 ** (security_level + 1)
    total = 1 + len(words) + ec_count  # with the length descriptor
    if total > _MAX_CODEWORDS:
        raise BarcodeError(
            f"{len(data)} bytes do not fit one PDF417 symbol at error correction level "
            f"{security_level} ({total} codewords, at most {_MAX_CODEWORDS})"
        )
    cols = columns if columns is not None else _auto_columns(total)
    rows = math.ceil(total / cols)
    if not 3 <= rows <= 90:
        raise BarcodeError(f"{cols} columns give {rows} PDF417 rows; the standard allows 3 to 90")
    padding = [_PAD] * (rows * cols - total)
    head = [1 + len(words) + len(padding), *words, *padding]
    codewords = head + list(compute_error_correction_code_words(head, security_level))
    grid = [codewords[i : i + cols] for i in range(0, len(codewords), cols)]
    coded = encode_rows(grid, cols, security_level)
    # Every codeword starts with a bar, so its plain binary form has its full width.
    return Symbol(tuple("".join(format(cw, "b") for cw in row) for row in coded))


def encode_pdf417(
    data: bytes,
    *,
    security_level: int = MIN_SECURITY_LEVEL,
    columns: int | None = None,
    module_px: int = 3,
) -> Image.Image:
    """A greyscale image of the PDF417 symbol holding exactly `data`, quiet zone included.

    `columns=None` picks the column count giving a symbol about twice as wide as
    tall (7 columns for a 148-byte indicium, 9 for 340 bytes at level 5).
    Raises InvalidInput for a level below 5 or bad parameters, BarcodeError when
    the data does not fit one symbol.
    """
    if not 1 <= module_px <= 50:
        raise InvalidInput(f"module size must be 1 to 50 pixels, not {module_px}")
    return pdf417_symbol(data, security_level=security_level, columns=columns).image(module_px)


def decode_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The raw bytes held by the one PDF417 or Data Matrix symbol in an image.

    `source` is a path, the encoded bytes of a PNG, JPEG or TIFF file (only its
    first frame is read) or a PIL image. Raises BarcodeError when the image is
    of another format, has more than `max_pixels` pixels (checked from its
    header, before any pixel is decoded), cannot be read, holds no such symbol,
    holds more than one, or only barcodes of other formats; InvalidInput for a
    `max_pixels` that is not a positive integer.
    """
    check_max_pixels(max_pixels)
    image = open_image(source, max_pixels)
    pixels = image.width * image.height
    try:
        found = _read(image)
    finally:
        if image is not source:
            image.close()
    # After _read returns, its grey copy and zxing-cpp's buffers are freed: give them back.
    release_memory(pixels)
    return _pick(found, describe(source))


def decode_images(
    sources: Sequence[ImageSource], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[bytes | BarcodeError]:
    """decode_image over many images in parallel (zxing-cpp releases the GIL).

    Each result is the bytes or the BarcodeError for that image, in input order.
    At most one image per CPU is in memory at a time, each within `max_pixels`.
    """
    check_max_pixels(max_pixels)

    def one(source: ImageSource) -> bytes | BarcodeError:
        try:
            return decode_image(source, max_pixels=max_pixels)
        except BarcodeError as exc:
            return exc

    if len(sources) < 2:
        return [one(source) for source in sources]
    with ThreadPoolExecutor(max_workers=min(len(sources), os.cpu_count() or 1)) as pool:
        return list(pool.map(one, sources))


def _byte_compaction(data: bytes) -> list[int]:
    """Byte compaction codewords: 6 bytes become 5 base-900 digits, a tail 1 byte each."""
    whole = len(data) - len(data) % 6
    words = [_BYTE_LATCH_6 if whole == len(data) else _BYTE_LATCH]
    for i in range(0, whole, 6):
        n = int.from_bytes(data[i : i + 6], "big")
        words += [n // 900**k % 900 for k in range(4, -1, -1)]
    words += data[whole:]
    return words


def _auto_columns(total: int) -> int:
    """The column count whose symbol is closest to the target aspect ratio."""

    def misfit(cols: int) -> float:
        rows = math.ceil(total / cols)
        if not 3 <= rows <= 90:
            return math.inf
        width = 17 * cols + 69  # start, left indicator, data, right indicator, stop
        return abs(math.log(width / (rows * ROW_MODULES) / _TARGET_ASPECT))

    return min(range(1, 31), key=misfit)


def _read(image: Image.Image) -> list[zxingcpp.Barcode]:
    """The symbols found, by the cheapest search that finds a PDF417 or Data Matrix one.

    Each step runs only when the ones before found no such symbol: a straight
    label costs one detector at full resolution and no rotation (3.5 times
    faster than zxing-cpp's default search), a rotated or inverted scan costs
    the searches before the one that reads it, and an image that holds no such
    symbol gets the full search, whose findings (damaged symbols, other formats)
    explain why.
    """
    grey = _flatten(image)
    # 1. PDF417, the label's default: its detector reads it upright and upside down.
    found = _read_as_is(grey, _PDF417)
    if found:
        # A Data Matrix beside it would make two symbols (refused: which one is the
        # piece?). Looked for at half resolution, where the label's 6 px modules are
        # still 3 px: a third of the time of a full-resolution look.
        half = grey.reduce(2)
        return found + _read_as_is(half, _DATAMATRIX)
    # 2. Data Matrix, the other symbology, upright.
    found = _read_as_is(grey, _DATAMATRIX)
    if found:
        return found
    # 3. Both formats in every orientation (90 and 270 degrees; a Data Matrix upside down).
    found = list(zxingcpp.read_barcodes(grey, formats=_BOTH, try_downscale=False, try_invert=False))
    if found:
        return found
    # 4. Every trick and every format, failed symbols included, to find a symbol or
    # explain its absence.
    found = list(zxingcpp.read_barcodes(grey, return_errors=True))
    if any(b.valid and b.format in _WANTED for b in found):
        return found
    # 5. A negative scan: zxing-cpp's try_invert finds a light-on-dark Data Matrix
    # but not a PDF417, so the image itself is inverted.
    light_on_dark = list(
        zxingcpp.read_barcodes(
            ImageOps.invert(grey), formats=_BOTH, try_downscale=False, try_invert=False
        )
    )
    return light_on_dark if light_on_dark else found


def _read_as_is(image: Image.Image, formats: zxingcpp.BarcodeFormats) -> list[zxingcpp.Barcode]:
    """The cheapest search: the image as it is, at full resolution, in one orientation."""
    found = zxingcpp.read_barcodes(
        image, formats=formats, try_rotate=False, try_invert=False, try_downscale=False
    )
    return list(found)


def _pick(found: Sequence[zxingcpp.Barcode], what: str) -> bytes:
    good = [b for b in found if b.format in _WANTED and b.valid]
    if len(good) == 1:
        return bytes(good[0].bytes)
    if len(good) > 1:
        raise BarcodeError(f"{what}: {len(good)} PDF417/Data Matrix symbols, expected one")
    damaged = [b for b in found if not b.valid]
    if damaged:
        kind = damaged[0].error.type.name.lower() if damaged[0].error else "unknown"
        raise BarcodeError(
            f"{what}: a damaged {damaged[0].format.name} symbol ({kind} error); "
            "rescan or reprint it"
        )
    if found:
        names = sorted({b.format.name for b in found})
        raise BarcodeError(f"{what}: holds {', '.join(names)}, not a PDF417 or Data Matrix symbol")
    raise BarcodeError(f"{what}: no barcode found")


def _flatten(image: Image.Image) -> Image.Image:
    """The image as zxing-cpp reads it fastest: 8-bit grey, transparency put on white."""
    if image.mode == "L":
        return image  # taken as it is: no copy
    if image.mode == "I" or image.mode.startswith("I;16"):
        # 16-bit scans: Pillow's convert("L") would clip 0..65535 to 255, not scale it.
        return image.convert("I").point(lambda v: v / 257).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Composited in grey: a quarter of the memory of RGBA over white (~400 MB less at the cap).
        lum, alpha = image.convert("LA").split()
        return Image.composite(lum, Image.new("L", image.size, 255), alpha)
    # From RGB this costs ~2 ms for a 4 x 6 inch page and saves zxing-cpp ~25 ms.
    return image.convert("L")
