"""decode_image attacked with hostile uploads: huge declared sizes, other formats, broken files.

Every image here is a real file, built by Pillow or byte by byte, and decoded
by the real Pillow and zxing-cpp. Memory is measured in a subprocess, from the
kernel's own counters, so the test process's own history cannot blur it.
"""

from __future__ import annotations

import io
import json
import math
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, features
from test_label import INFO, PAYLOADS, png_bytes

from meter.errors import BarcodeError, InvalidInput
from meter.label import (
    DEFAULT_MAX_PIXELS,
    decode_image,
    decode_images,
    encode_datamatrix,
    encode_pdf417,
    render_label,
)

DATA = PAYLOADS["ecdsa-148"]
MiB = 1024 * 1024
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type: samples per pixel


# --- hostile files, built cheaply ---------------------------------------------------------


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_ihdr(width: int, height: int, bit_depth: int, color_type: int) -> bytes:
    return png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    )


def zero_png(width: int, height: int, *, bit_depth: int = 8, color_type: int = 0) -> bytes:
    """A valid PNG of all-zero rows (black), whose IDAT is zlib-compressed zeros.

    Deflating 676 MB of zeros for a 13000 x 13000 RGBA takes seconds, so one
    part of rows is deflated and its bytes repeated: after a full flush the
    deflater starts afresh, so each identical part deflates to identical bytes.
    The stream ends with an empty final block and the Adler-32 of all zeros.
    """
    row = 1 + math.ceil(width * _CHANNELS[color_type] * bit_depth / 8)  # filter byte + samples
    rows_per_part = math.gcd(height, 100)
    part = bytes(row * rows_per_part)
    deflater = zlib.compressobj(9)
    first = deflater.compress(part) + deflater.flush(zlib.Z_FULL_FLUSH)
    header, body = first[:2], first[2:]  # zlib's 2-byte header, then the part's blocks
    total = row * height
    adler = (total % 65521) << 16 | 1  # Adler-32 of zeros: A stays 1, B gains 1 a byte
    stream = header + body * (height // rows_per_part) + b"\x03\x00" + struct.pack(">I", adler)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_ihdr(width, height, bit_depth, color_type)
        + png_chunk(b"IDAT", stream)
        + png_chunk(b"IEND", b"")
    )


def tiff_with_sizes(frames: list[Image.Image], sizes: dict[int, tuple[int, int]]) -> bytes:
    """A TIFF of `frames`, with the width and length tags of some IFDs (by index) rewritten."""
    out = io.BytesIO()
    frames[0].save(out, "TIFF", save_all=True, append_images=frames[1:])
    data = bytearray(out.getvalue())
    assert data[:4] == b"II*\x00"
    offset, index = struct.unpack_from("<I", data, 4)[0], 0
    while offset:
        (count,) = struct.unpack_from("<H", data, offset)
        for entry in range(offset + 2, offset + 2 + 12 * count, 12):
            tag, kind = struct.unpack_from("<HH", data, entry)
            if index in sizes and tag in (256, 257):  # ImageWidth, ImageLength
                value = sizes[index][tag - 256]
                struct.pack_into("<I" if kind == 4 else "<H", data, entry + 8, value)
        offset = struct.unpack_from("<I", data, offset + 2 + 12 * count)[0]
        index += 1
    return bytes(data)


def saved(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def run_python(code: str, *args: str) -> dict[str, Any]:
    """Run `code` in a fresh interpreter; it prints one JSON object as its last line."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_zero_png_is_a_valid_png() -> None:
    # The builder itself, on a size small enough to decode: Pillow reads every row.
    for width, height, depth, kind in ((300, 200, 1, 0), (130, 300, 8, 6)):
        with Image.open(
            io.BytesIO(zero_png(width, height, bit_depth=depth, color_type=kind))
        ) as im:
            im.load()
            assert im.size == (width, height)
            assert im.getextrema() in ((0, 0), ((0, 0),) * 4)


# --- huge declared sizes: refused from the header -------------------------------------------


HOSTILE_PNGS = {
    # 32 KB-class: 1-bit grey 12000 x 12000 (144 Mpx, 980 MiB and 15 s before the cap)
    "grey-1bit-12000": (12000, 12000, 1, 0),
    # 684 KB-class: RGBA 13000 x 13000 (169 Mpx, 3.5 GiB and 21 s before the cap)
    "rgba-13000": (13000, 13000, 8, 6),
}


@pytest.fixture(scope="module")
def hostile_pngs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    paths = {}
    for name, (width, height, depth, kind) in HOSTILE_PNGS.items():
        paths[name] = folder / f"{name}.png"
        paths[name].write_bytes(zero_png(width, height, bit_depth=depth, color_type=kind))
    return paths


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name", sorted(HOSTILE_PNGS))
def test_hostile_png_refused_from_header(name: str, hostile_pngs: dict[str, Path]) -> None:
    width, height = HOSTILE_PNGS[name][:2]
    body = hostile_pngs[name].read_bytes()
    assert len(body) < 1024 * 1024  # tiny files declaring 144 and 169 Mpx
    cap = f"{DEFAULT_MAX_PIXELS:,}"
    expected = f"{width} x {height} = {width * height:,} pixels, more than the cap of {cap}"
    with pytest.raises(BarcodeError, match=expected):
        decode_image(body)
    with pytest.raises(BarcodeError, match=expected):
        decode_image(hostile_pngs[name])


def test_hostile_pngs_allocate_nothing_big(hostile_pngs: dict[str, Path]) -> None:
    """In a fresh process, both refusals leave the peak RSS near what the imports take."""
    result = run_python(
        """
        import json, sys, warnings
        warnings.simplefilter("ignore")
        from meter.errors import BarcodeError
        from meter.label import decode_image

        def high_water_kib():
            # VmHWM is this process's own peak; ru_maxrss would carry over the peak of
            # the process that forked it (Linux keeps it across exec): a big pytest.
            with open("/proc/self/status") as status:
                line = next(x for x in status if x.startswith("VmHWM:"))
            return int(line.split()[1])

        imported = high_water_kib()
        refused = []
        for path in sys.argv[1:]:
            with open(path, "rb") as file:
                body = file.read()
            for source in (body, path):
                try:
                    decode_image(source)
                except BarcodeError as exc:
                    refused.append(str(exc))
        peak = high_water_kib()
        print(json.dumps({"refused": refused, "imported_kib": imported, "peak_kib": peak}))
        """,
        *(str(p) for p in hostile_pngs.values()),
    )
    assert len(result["refused"]) == 4
    assert all("more than the cap" in message for message in result["refused"])
    # Decoding either would take ~1 GiB or more; refusing it, nothing beyond the imports.
    assert result["peak_kib"] * 1024 < 250 * MiB, result
    assert (result["peak_kib"] - result["imported_kib"]) * 1024 < 64 * MiB, result


def test_beyond_pillows_own_guard() -> None:
    # 65535 x 65535 (4.3 Gpx): Pillow raises its DecompressionBombError; ours says the cap.
    header_only = b"\x89PNG\r\n\x1a\n" + png_ihdr(65535, 65535, 8, 0) + png_chunk(b"IEND", b"")
    cap = f"{DEFAULT_MAX_PIXELS:,}"
    with pytest.raises(BarcodeError, match=rf"more than the cap of {cap} pixels .*4294836225"):
        decode_image(header_only)


def test_tiny_tiff_declaring_a_huge_page() -> None:
    small = encode_pdf417(DATA)
    with pytest.raises(BarcodeError, match=r"7000 x 7000 = 49,000,000 pixels, more than the cap"):
        decode_image(tiff_with_sizes([small], {0: (7000, 7000)}))
    with pytest.raises(BarcodeError, match=rf"more than the cap of {DEFAULT_MAX_PIXELS:,} pixels"):
        decode_image(tiff_with_sizes([small], {0: (65535, 65535)}))


def test_tiny_png_declaring_under_the_cap_but_truncated() -> None:
    # 6000 x 6000 under the cap, but the IDAT ends after 1000 rows: a clear error, not zeros.
    whole = zero_png(6000, 6000)
    idat = whole.index(b"IDAT")
    cut = whole[: idat + 4 + 2000]
    with pytest.raises(BarcodeError, match="corrupt"):
        decode_image(cut)


# --- the cap itself -------------------------------------------------------------------------


def test_exactly_the_cap_is_accepted_one_more_refused() -> None:
    image = encode_pdf417(DATA)
    body = png_bytes(image)
    cap = image.width * image.height
    assert decode_image(body, max_pixels=cap) == DATA
    assert decode_image(image, max_pixels=cap) == DATA
    over = f"{image.width} x {image.height} = {cap:,} pixels, more than the cap of {cap - 1:,}"
    with pytest.raises(BarcodeError, match=over):
        decode_image(body, max_pixels=cap - 1)
    with pytest.raises(BarcodeError, match=over):
        decode_image(image, max_pixels=cap - 1)  # a PIL image is held to the cap too


def test_decode_images_applies_the_cap_per_image() -> None:
    small = png_bytes(encode_pdf417(DATA))
    big = zero_png(3000, 3000)
    results = decode_images([small, big, small], max_pixels=2_000_000)
    assert results[0] == DATA and results[2] == DATA
    assert isinstance(results[1], BarcodeError)
    assert "3000 x 3000 = 9,000,000 pixels, more than the cap of 2,000,000" in str(results[1])


@pytest.mark.parametrize("cap", [0, -1, True, 1.5, "40000000", None])
def test_bad_cap_refused(cap: Any) -> None:
    with pytest.raises(InvalidInput, match="max_pixels"):
        decode_image(png_bytes(encode_pdf417(DATA)), max_pixels=cap)
    with pytest.raises(InvalidInput, match="max_pixels"):
        decode_images([], max_pixels=cap)


# --- only PNG, JPEG and TIFF ----------------------------------------------------------------


def other_formats() -> dict[str, bytes]:
    label = encode_pdf417(DATA)  # a real, decodable symbol in each: refused for its format
    bodies = {
        "GIF": saved(label, "GIF"),
        "BMP": saved(label, "BMP"),
        "ICO": saved(label.resize((256, 128)), "ICO"),
        "EPS": saved(label, "EPS"),
        "PPM": saved(label, "PPM"),
        "WEBP": saved(label, "WEBP", lossless=True),
    }
    if features.check("jpg_2000"):
        bodies["JPEG2000"] = saved(label, "JPEG2000")
    return bodies


OTHER_FORMATS = other_formats()


@pytest.mark.parametrize("fmt", sorted(OTHER_FORMATS))
def test_other_formats_refused_by_name(fmt: str, tmp_path: Path) -> None:
    body = OTHER_FORMATS[fmt]
    message = rf"a {fmt} image; only PNG, JPEG or TIFF images are accepted"
    with pytest.raises(BarcodeError, match=message):
        decode_image(body)
    # A name that lies about the content changes nothing.
    lying = tmp_path / "label.png"
    lying.write_bytes(body)
    with pytest.raises(BarcodeError, match=message):
        decode_image(lying)


def test_pdf_and_unknown_bodies_refused_naming_the_formats() -> None:
    pdf = render_label(DATA, INFO).pdf
    for body in (
        pdf,
        b"%!PS-Adobe-3.0\n",
        b"\x00" * 64,
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
    ):
        with pytest.raises(BarcodeError, match=r"PNG, JPEG or TIFF"):
            decode_image(body)


# --- broken files ---------------------------------------------------------------------------


def test_truncated_png() -> None:
    good = png_bytes(encode_pdf417(DATA))
    # In the signature, IHDR, IDAT, its checksum, the IEND chunk's length or type.
    for length in (8, 20, 33, 60, len(good) // 2, len(good) - 13, len(good) - 12, len(good) - 8):
        with pytest.raises(BarcodeError, match="corrupt"):
            decode_image(good[:length])
    # Known and left: once IEND's type is read, Pillow stops; a cut in IEND's own
    # CRC (which guards no data: IEND is always empty) goes unnoticed.
    assert decode_image(good[:-4]) == DATA


@pytest.mark.parametrize("chunk", [b"IHDR", b"tEXt", b"IDAT"])
def test_png_with_a_bad_crc(chunk: bytes) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "a label")
    good = saved(encode_pdf417(DATA), "PNG", pnginfo=info)
    assert decode_image(good) == DATA
    start = good.index(chunk) - 4
    (length,) = struct.unpack_from(">I", good, start)
    crc_at = start + 8 + length
    broken = bytearray(good)
    broken[crc_at] ^= 0xFF  # the pixels are intact; only the checksum is wrong
    with pytest.raises(BarcodeError, match=r"corrupt"):
        decode_image(bytes(broken))


def test_tiff_with_many_frames_reads_only_the_first() -> None:
    label = encode_pdf417(DATA)
    blank = Image.new("L", label.size, 255)
    first = saved(label, "TIFF", save_all=True, append_images=[blank] * 199)
    assert decode_image(first) == DATA
    later = saved(blank, "TIFF", save_all=True, append_images=[label] * 3)
    with pytest.raises(BarcodeError, match="no barcode found"):
        decode_image(later)
    # Later frames are not even parsed: one declaring 4.3 Gpx does not matter.
    huge_second = tiff_with_sizes([label, blank], {1: (65535, 65535)})
    assert decode_image(huge_second) == DATA


@pytest.mark.parametrize("symbology", ["pdf417", "datamatrix"])
def test_jpeg_label_still_decodes(symbology: str) -> None:
    label = render_label(DATA, INFO, symbology=symbology)
    with Image.open(io.BytesIO(label.png)) as page:
        jpeg = saved(page.convert("RGB"), "JPEG", quality=75)
    assert jpeg[:3] == b"\xff\xd8\xff"
    assert decode_image(jpeg) == DATA


def test_tiff_label_decodes() -> None:
    image = encode_datamatrix(DATA)
    assert decode_image(saved(image, "TIFF", compression="tiff_deflate")) == DATA


# --- memory given back -------------------------------------------------------------------


def test_memory_returns_after_a_large_image(tmp_path: Path) -> None:
    """RSS after two 35 Mpx RGBA decodes in threads (as the service runs them) falls back.

    Without giving freed memory back, about 300-500 MiB stay in the process.
    """
    page = Image.new("RGBA", (7000, 5000), (255, 255, 255, 255))
    page.paste(encode_pdf417(DATA).convert("RGBA"), (3000, 2000))
    path = tmp_path / "scan.png"
    page.save(path, compress_level=1)
    del page
    result = run_python(
        """
        import json, sys
        from meter.label import decode_image, decode_images, encode_pdf417

        def rss_kib():
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])

        with open(sys.argv[1], "rb") as file:
            body = file.read()
        decode_images([encode_pdf417(b"warm up"), encode_pdf417(b"the pool")])
        baseline = rss_kib()
        results = decode_images([body, body])
        after = rss_kib()
        print(json.dumps({"ok": [r == bytes.fromhex(sys.argv[2]) for r in results],
                          "baseline_kib": baseline, "after_kib": after}))
        """,
        str(path),
        DATA.hex(),
    )
    assert result["ok"] == [True, True]
    grown = (result["after_kib"] - result["baseline_kib"]) * 1024
    assert grown < 150 * MiB, result
