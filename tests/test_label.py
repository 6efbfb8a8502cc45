"""Barcodes and labels with the real libraries: pdf417gen, zxing-cpp, Pillow, reportlab, poppler."""

from __future__ import annotations

import dataclasses
import io
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest
import zxingcpp
from PIL import Image

from meter.errors import BarcodeError, InvalidInput
from meter.label import (
    LabelInfo,
    RenderedLabel,
    check_printable,
    decode_image,
    decode_images,
    encode_pdf417,
    render_label,
    write_label,
)

_RANDOM = random.Random(20261122)
PAYLOADS = {
    "ecdsa-148": _RANDOM.randbytes(148),
    "rsa-340": _RANDOM.randbytes(340),
    "all-256": bytes(range(256)),
    "all-256-reversed-148": bytes(range(255, 107, -1)),
    "zeros-148": bytes(148),
    "text-like": b"PM01 12345 0000000000 ABCDEFGHIJ 1234567890",
}
INFO = LabelInfo(
    postage="$0.730",
    date_of_mailing="2026-11-22",
    origin_zip="12345",
    device_serial="10000001",
    sequence="42",
    rate="First-Class Mail letter",
    destination_lines=("JANE Q PUBLIC", "123 ELM ST APT 4B", "SPRINGFIELD IL 62704-1234"),
    sender_lines=("John Sender", "1 Main St", "Anytown NY 12345"),
)


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def zxing_image(content: str, fmt: zxingcpp.BarcodeFormat) -> Image.Image:
    # zxingcpp.Image is an 8-bit grey buffer, (rows, columns); its stub omits the buffer protocol.
    raw = memoryview(cast(Any, zxingcpp.create_barcode(content, fmt).to_image(scale=6)))
    height, width = cast(tuple[int, int], raw.shape)
    return Image.frombytes("L", (width, height), raw.tobytes())


def rasterize(pdf: bytes, tmp_path: Path, dpi: int = 300) -> Path:
    """The PDF's one page as a PNG, by poppler's pdftoppm: skipped without it, except in CI."""
    exe = shutil.which("pdftoppm")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("pdftoppm (Debian package poppler-utils) is required in CI")
        pytest.skip("pdftoppm not installed (Debian package poppler-utils)")
    source = tmp_path / "raster-in.pdf"
    source.write_bytes(pdf)
    prefix = tmp_path / f"raster-{dpi}"
    cmd = [exe, "-r", str(dpi), "-gray", "-png", "-singlefile", str(source), str(prefix)]
    subprocess.run(cmd, check=True, capture_output=True)
    return prefix.with_suffix(".png")


@pytest.fixture(scope="module")
def label_148() -> RenderedLabel:
    return render_label(PAYLOADS["ecdsa-148"], INFO)


# --- encode and decode ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_round_trip_exact_bytes(name: str) -> None:
    data = PAYLOADS[name]
    image = encode_pdf417(data)
    assert decode_image(image) == data
    assert decode_image(png_bytes(image)) == data


@pytest.mark.parametrize("level", [5, 6, 7, 8])
def test_round_trip_every_allowed_level(level: int) -> None:
    data = PAYLOADS["rsa-340"]
    assert decode_image(encode_pdf417(data, security_level=level)) == data


def test_round_trip_from_path_and_explicit_columns(tmp_path: Path) -> None:
    data = PAYLOADS["all-256"]
    path = tmp_path / "code.png"
    encode_pdf417(data, columns=12, module_px=2).save(path)
    assert decode_image(path) == data
    assert decode_image(str(path)) == data


def test_symbols_have_printable_aspect() -> None:
    for name in ("ecdsa-148", "rsa-340"):
        image = encode_pdf417(PAYLOADS[name])
        assert 1.5 <= image.width / image.height <= 2.5, (name, image.size)


def test_every_byte_value_round_trips_at_each_length() -> None:
    for length in (1, 5, 6, 7, 12, 83, 148, 340):
        data = bytes(_RANDOM.randrange(256) for _ in range(length))
        assert decode_image(encode_pdf417(data)) == data, length


@pytest.mark.parametrize("level", [-1, 0, 1, 2, 3, 4])
def test_refuses_error_correction_below_5(level: int) -> None:
    with pytest.raises(InvalidInput, match="error correction level"):
        encode_pdf417(PAYLOADS["ecdsa-148"], security_level=level)


def test_refuses_bad_parameters() -> None:
    with pytest.raises(InvalidInput):
        encode_pdf417(PAYLOADS["ecdsa-148"], security_level=9)
    with pytest.raises(InvalidInput):
        encode_pdf417(PAYLOADS["ecdsa-148"], columns=31)
    with pytest.raises(InvalidInput):
        encode_pdf417(PAYLOADS["ecdsa-148"], module_px=0)
    with pytest.raises(InvalidInput):
        encode_pdf417(b"")


def test_data_too_large_for_one_symbol() -> None:
    with pytest.raises(BarcodeError, match="do not fit"):
        encode_pdf417(bytes(1200))


def test_data_matrix_is_accepted() -> None:
    image = zxing_image("PIM-1 in a Data Matrix", zxingcpp.BarcodeFormat.DataMatrix)
    assert decode_image(image) == b"PIM-1 in a Data Matrix"


def test_transparent_background_png() -> None:
    data = PAYLOADS["ecdsa-148"]
    bars = encode_pdf417(data)
    # Black everywhere, the symbol only in the alpha channel: read as if on white paper.
    clear = Image.new("LA", bars.size, 0)
    clear.putalpha(bars.point(lambda v: 255 - v))
    assert decode_image(png_bytes(clear)) == data


def test_sixteen_bit_grey_png() -> None:
    data = PAYLOADS["ecdsa-148"]
    deep = encode_pdf417(data).convert("I").point(lambda v: v * 257).convert("I;16")
    assert decode_image(png_bytes(deep)) == data


def test_decode_images_keeps_order_and_errors() -> None:
    sources = [png_bytes(encode_pdf417(PAYLOADS[n])) for n in ("ecdsa-148", "rsa-340")]
    results = decode_images([sources[0], b"not an image", sources[1]])
    assert results[0] == PAYLOADS["ecdsa-148"]
    assert isinstance(results[1], BarcodeError)
    assert results[2] == PAYLOADS["rsa-340"]


# --- what is not a readable indicium ------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BarcodeError, match="no such file"):
        decode_image(tmp_path / "absent.png")


def test_corrupt_png_bytes() -> None:
    good = png_bytes(encode_pdf417(PAYLOADS["ecdsa-148"]))
    with pytest.raises(BarcodeError, match="corrupt"):
        decode_image(good[: len(good) // 2])
    # Pillow skips the IDAT checksums, so this reaches zxing-cpp as damaged bars.
    broken = bytearray(good)
    broken[len(good) // 2 : len(good) // 2 + 64] = bytes(64)
    with pytest.raises(BarcodeError, match=r"corrupt|damaged PDF417"):
        decode_image(bytes(broken))


def test_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(BarcodeError, match="not an image"):
        decode_image(b"%PDF-1.4 this is no picture")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(BarcodeError, match="not an image"):
        decode_image(text)


def test_blank_image() -> None:
    with pytest.raises(BarcodeError, match="no barcode"):
        decode_image(Image.new("L", (600, 400), 255))


def test_qr_code_instead() -> None:
    with pytest.raises(BarcodeError, match="QRCode, not a PDF417"):
        decode_image(zxing_image("https://example.org/", zxingcpp.BarcodeFormat.QRCode))


def test_two_pdf417_symbols() -> None:
    one = encode_pdf417(PAYLOADS["ecdsa-148"])
    two = encode_pdf417(PAYLOADS["zeros-148"])
    both = Image.new("L", (one.width + two.width, max(one.height, two.height) * 2), 255)
    both.paste(one, (0, 0))
    both.paste(two, (one.width, one.height))
    with pytest.raises(BarcodeError, match="2 PDF417/Data Matrix symbols"):
        decode_image(both)


# --- labels -----------------------------------------------------------------------------


def test_label_png_round_trip(label_148: RenderedLabel) -> None:
    assert decode_image(label_148.png) == PAYLOADS["ecdsa-148"]
    with Image.open(io.BytesIO(label_148.png)) as page:
        assert page.size == (1200, 1800)
        assert round(page.info["dpi"][0]) == 300


def test_label_340_bytes_with_markings() -> None:
    info = LabelInfo(
        postage="$0.000",
        date_of_mailing="2026-11-22",
        origin_zip="12345",
        device_serial="18446744073709551615",
        sequence="4294967295",
        rate="First-Class Mail large envelope (flat)",
        destination_lines=("MÜLLER & SØN — ŁÓDZ IMPORTS", "1 RUE DE L'ÉGLISE"),
        specimen=True,
        correction=True,
    )
    label = render_label(PAYLOADS["rsa-340"], info)
    assert decode_image(label.png) == PAYLOADS["rsa-340"]


@pytest.mark.parametrize("dpi", [300, 200])
def test_label_pdf_round_trip(label_148: RenderedLabel, tmp_path: Path, dpi: int) -> None:
    assert label_148.pdf.startswith(b"%PDF-")
    assert len(re.findall(rb"/Type\s*/Page\b(?!s)", label_148.pdf)) == 1
    assert decode_image(rasterize(label_148.pdf, tmp_path, dpi)) == PAYLOADS["ecdsa-148"]


def test_label_pdf_round_trip_340(tmp_path: Path) -> None:
    label = render_label(PAYLOADS["rsa-340"], INFO)
    assert decode_image(rasterize(label.pdf, tmp_path)) == PAYLOADS["rsa-340"]


def test_label_refuses_what_it_cannot_print() -> None:
    with pytest.raises(InvalidInput, match="U\\+5317"):
        render_label(PAYLOADS["ecdsa-148"], _replace(destination_lines=("北京", "CHINA")))
    with pytest.raises(InvalidInput, match="U\\+000A"):
        check_printable("two\nlines")
    with pytest.raises(InvalidInput, match="too long"):
        render_label(PAYLOADS["ecdsa-148"], _replace(destination_lines=("X" * 300,)))
    with pytest.raises(InvalidInput, match="no lines"):
        _replace(destination_lines=())
    with pytest.raises(InvalidInput, match="at most 8"):
        _replace(destination_lines=("LINE",) * 9)


def _replace(**changes: Any) -> LabelInfo:
    return dataclasses.replace(INFO, **changes)


def test_write_label_atomic(label_148: RenderedLabel, tmp_path: Path) -> None:
    png, pdf = tmp_path / "piece.png", tmp_path / "piece.pdf"
    png.write_bytes(b"old label")
    write_label(label_148, png, pdf)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["piece.pdf", "piece.png"]
    assert png.read_bytes() == label_148.png
    assert pdf.read_bytes() == label_148.pdf
    assert decode_image(png) == PAYLOADS["ecdsa-148"]
    raster_dir = tmp_path / "raster"
    raster_dir.mkdir()
    assert decode_image(rasterize(pdf.read_bytes(), raster_dir)) == PAYLOADS["ecdsa-148"]


def test_write_label_failure_leaves_nothing(label_148: RenderedLabel, tmp_path: Path) -> None:
    png = tmp_path / "piece.png"
    with pytest.raises(OSError):
        write_label(label_148, png, tmp_path / "no-such-dir" / "piece.pdf")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InvalidInput):
        write_label(label_148, png, png)
