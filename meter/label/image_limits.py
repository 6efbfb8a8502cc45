"""Opening label images from strangers within bounds: three formats, a pixel cap, memory given back.

The post office decodes images that anyone may upload. Left to itself Pillow
opens any format it knows whatever the upload claims to be (EPS runs
Ghostscript where installed), and allocates the size a header declares before
it reads a pixel: a 32 KB PNG can declare 144 megapixels, and Pillow's own
guard starts only near 179. So only PNG, JPEG and TIFF are opened, the size is
checked from the header before anything is decoded, only a file's first frame
is ever decoded, and after a large image the freed memory goes back to the OS.
"""

from __future__ import annotations

import ctypes
import io
import os
import struct
from collections.abc import Callable
from functools import lru_cache
from typing import TypeAlias

from PIL import Image, UnidentifiedImageError

from meter.errors import BarcodeError, InvalidInput

ImageSource: TypeAlias = str | os.PathLike[str] | bytes | Image.Image
# An image file, by its path or its bytes.
_Encoded: TypeAlias = bytes | bytearray | memoryview | str | os.PathLike[str]

# A 600 dpi US letter page is 33.7 Mpx (300 dpi: 8.4 Mpx): every honest scan of a
# label fits, and the worst accepted image costs a few hundred MB, not gigabytes.
DEFAULT_MAX_PIXELS = 40_000_000
ACCEPTED_FORMATS = ("PNG", "JPEG", "TIFF")
# Below this (a 300 dpi letter page is 8.4 Mpx) the next image reuses what one left in
# the heap; trimming after each would cost such a page a third more time.
_TRIM_FROM_PIXELS = 12_000_000
_ACCEPTED_NAMES = "PNG, JPEG or TIFF"
_PREFIX_BYTES = 16  # what Pillow's format checks look at, as Image.open reads it


def check_max_pixels(max_pixels: int) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise InvalidInput(f"max_pixels must be a positive whole number, not {max_pixels!r}")


def describe(source: ImageSource) -> str:
    """How messages name an image: its path, or its size for uploaded bytes."""
    if isinstance(source, str | os.PathLike):
        return f"image {os.fspath(source)!r}"
    if isinstance(source, bytes | bytearray | memoryview):
        return f"image of {len(source)} bytes"
    return "image"


def open_image(source: ImageSource, max_pixels: int) -> Image.Image:
    """The image decoded in memory (its first frame), or BarcodeError before any pixel is decoded.

    A PIL image given by the caller is only checked against the cap and returned
    as it is. Raises BarcodeError for a missing file, a format other than PNG,
    JPEG or TIFF, more than `max_pixels` pixels, or a damaged file.
    """
    what = describe(source)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, what, max_pixels)
        return source
    if not isinstance(source, bytes | bytearray | memoryview | str | os.PathLike):
        raise InvalidInput(f"cannot read an image from a {type(source).__name__}")
    try:
        image = _open_header(source, what, max_pixels)
        if image.format == "PNG":
            # Pillow checks the CRCs of the chunks after IHDR only when asked, and
            # its check consumes the file: verify, then open again to decode.
            try:
                image.verify()
            finally:
                image.close()
            image = _open_header(source, what, max_pixels)
    except BarcodeError:
        raise
    except FileNotFoundError as exc:
        raise BarcodeError(f"{what}: no such file") from exc
    except UnidentifiedImageError as exc:
        raise BarcodeError(f"{what}: {_unopened(source)}") from exc
    except Image.DecompressionBombError as exc:
        raise BarcodeError(f"{what}: more than the cap of {max_pixels:,} pixels ({exc})") from exc
    # Pillow's decoders report a damaged file with any of these.
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise BarcodeError(f"{what}: unreadable or corrupt ({exc})") from exc
    try:
        # Only the current frame, the first, is decoded: a TIFF's other pages are never read.
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        image.close()
        raise BarcodeError(f"{what}: unreadable or corrupt ({exc})") from exc
    return image


def _open_header(source: _Encoded, what: str, max_pixels: int) -> Image.Image:
    """The image opened in an accepted format and within the cap, nothing decoded yet."""
    image = Image.open(_file(source), formats=ACCEPTED_FORMATS)
    try:
        _check_pixels(image.size, what, max_pixels)
    except BarcodeError:
        image.close()
        raise
    return image


def _file(source: _Encoded) -> io.BytesIO | str | os.PathLike[str]:
    return io.BytesIO(source) if isinstance(source, bytes | bytearray | memoryview) else source


def release_memory(pixels: int) -> None:
    """Hand the heap's free pages back to the OS after an image of `pixels` pixels.

    Pillow allocates large images in 16 MB blocks from malloc; once glibc has
    freed one such block it raises its mmap threshold, so later blocks come
    from the heap, above all in the arenas of worker threads, and stay in the
    process after they are freed: two 35 Mpx RGBA scans decoded in two threads
    left 320 to 580 MiB behind. malloc_trim(0) gives them back (none left).
    Pillow's own block cache holds nothing unless PILLOW_BLOCKS_MAX asks it to.
    A no-op where the C library has no malloc_trim (musl, macOS).
    """
    if pixels < _TRIM_FROM_PIXELS:
        return
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    function: Callable[[int], int] = trim
    return function


def _check_pixels(size: tuple[int, int], what: str, max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise BarcodeError(
            f"{what}: {width} x {height} = {width * height:,} pixels, "
            f"more than the cap of {max_pixels:,}"
        )


def _unopened(source: _Encoded) -> str:
    """Why Pillow could not open an image in the accepted formats, from the file's first bytes."""
    kind = _identify(_prefix(source))
    if kind in ACCEPTED_FORMATS:
        return f"unreadable or corrupt {kind} image"
    if kind is not None:
        return f"a {kind} image; only {_ACCEPTED_NAMES} images are accepted"
    return f"not an image file ({_ACCEPTED_NAMES} expected)"


def _prefix(source: _Encoded) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source[:_PREFIX_BYTES])
    try:
        with open(source, "rb") as file:
            return file.read(_PREFIX_BYTES)
    except OSError:
        return b""


def _identify(prefix: bytes) -> str | None:
    """The format whose signature the prefix carries, by Pillow's own checks: nothing is decoded."""
    Image.init()
    for name in Image.ID:
        _, accept = Image.OPEN[name]
        if accept is None:
            continue
        try:
            # A string answer is Pillow's "this format, but unsupported": still this format.
            if accept(prefix):
                return name
        # What Image.open itself takes from a check as "not this format" (a short prefix).
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
    return None
