"""Data Matrix labels, with the real writer (zxing-cpp's zint), reader (zxing-cpp) and poppler."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any, cast

import _vectors
import pytest
import zxingcpp
from click.testing import CliRunner
from PIL import Image
from test_cli import run
from test_label import INFO, PAYLOADS, png_bytes, rasterize

from meter.cli.home import Home
from meter.cli.main import cli
from meter.cli.workflows import label_info
from meter.errors import BarcodeError, InvalidInput
from meter.indicium import decode
from meter.label import (
    SYMBOLOGIES,
    LabelInfo,
    decode_image,
    encode_datamatrix,
    encode_pdf417,
    render_label,
)
from meter.label.datamatrix import DATAMATRIX_QUIET_MODULES, datamatrix_symbol

# ECC 200 square sizes (ISO/IEC 16022 table 7), modules per side.
ECC200_SQUARES = {10, 12, 14, 16, 18, 20, 22, 24, 26, 32, 36, 40, 44, 48}
ECC200_SQUARES |= {52, 64, 72, 80, 88, 96, 104, 120, 132, 144}
_RANDOM = random.Random(16022)


def vector_indicia() -> dict[str, bytes]:
    """The postal authority's valid indicia: ECDSA and Ed25519 (148 bytes), RSA-PSS (340)."""
    wanted = ("ecdsa-valid", "ed25519-valid", "rsa-pss-valid")
    by_name = {v["name"]: bytes.fromhex(v["indicium_hex"]) for v in _vectors.load()["vectors"]}
    return {name: by_name[name] for name in wanted}


VECTORS = vector_indicia()


def read_all(image: Image.Image, **options: Any) -> list[zxingcpp.Barcode]:
    return list(zxingcpp.read_barcodes(image, **options))


def zxing_default_datamatrix(data: bytes) -> Image.Image:
    """zxing-cpp's writer with its defaults (ECI 899 for bytes, DMRE allowed), 4 px a module."""
    barcode = zxingcpp.create_barcode(data, zxingcpp.BarcodeFormat.DataMatrix)
    raw = memoryview(cast(Any, barcode.to_image(scale=4)))
    height, width = cast(tuple[int, int], raw.shape)
    return Image.frombytes("L", (width, height), raw.tobytes())


# --- the symbol ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_round_trip_exact_bytes(name: str) -> None:
    data = PAYLOADS[name]
    image = encode_datamatrix(data)
    assert decode_image(image) == data
    assert decode_image(png_bytes(image)) == data
    assert [b.format for b in read_all(image)] == [zxingcpp.BarcodeFormat.DataMatrix]


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_indicia_round_trip(name: str) -> None:
    data = VECTORS[name]
    assert decode_image(encode_datamatrix(data, module_px=3)) == data


def test_every_length_round_trips() -> None:
    for length in (1, 2, 5, 48, 147, 148, 149, 249, 250, 251, 340, 555, 1555):
        data = _RANDOM.randbytes(length)
        assert decode_image(encode_datamatrix(data, module_px=2)) == data, length


def test_squares_of_ecc200_sizes() -> None:
    for length in (1, 20, 100, 148, 149, 250, 340, 800, 1555):
        symbol = datamatrix_symbol(_RANDOM.randbytes(length))
        assert symbol.width == symbol.height, length  # no DMRE rectangle
        assert symbol.width in ECC200_SQUARES, (length, symbol.width)
    # Random bytes are all Base256: 148 of them take 150 codewords of a 48 x 48's 174.
    assert datamatrix_symbol(PAYLOADS["ecdsa-148"]).width == 48
    assert datamatrix_symbol(PAYLOADS["rsa-340"]).width == 72
    # A real indicium's zero bytes and ASCII magic pack tighter (ASCII mode, still exact).
    assert datamatrix_symbol(VECTORS["ecdsa-valid"]).width <= 48
    assert datamatrix_symbol(VECTORS["rsa-pss-valid"]).width <= 72


def test_image_has_its_quiet_zone_and_module_size() -> None:
    image = encode_datamatrix(PAYLOADS["ecdsa-148"], module_px=5)
    side = (48 + 2 * DATAMATRIX_QUIET_MODULES) * 5
    assert image.size == (side, side)
    quiet = DATAMATRIX_QUIET_MODULES * 5
    inner = image.crop((quiet, quiet, side - quiet, side - quiet))
    assert image.getextrema() == (0, 255)
    # Every dark module lies inside the quiet zone, and the symbol reaches its edges.
    dark = Image.eval(image, lambda v: 255 - v)
    assert dark.getbbox() == (quiet, quiet, side - quiet, side - quiet)
    # The L-shaped finder: the left column and the bottom row are all dark.
    assert inner.crop((0, 0, 5, inner.height)).getextrema() == (0, 0)
    assert inner.crop((0, inner.height - 5, inner.width, inner.height)).getextrema() == (0, 0)


def test_no_eci_designator_in_the_symbol() -> None:
    """PIM-1's barcode holds the indicium and nothing else: no ECI 899 (binary) designator."""
    data = VECTORS["ecdsa-valid"]
    # zxing-cpp's text in ECI mode spells each ECI the symbol declares as \\000nnn.
    ours = read_all(encode_datamatrix(data), text_mode=zxingcpp.TextMode.ECI)
    theirs = read_all(zxing_default_datamatrix(data), text_mode=zxingcpp.TextMode.ECI)
    assert "\\000899" in theirs[0].text  # the probe sees a designator when there is one
    assert "\\000899" not in ours[0].text
    assert bytes(ours[0].bytes) == data


def test_refuses_bad_input() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        encode_datamatrix(b"")
    with pytest.raises(InvalidInput, match="must be bytes"):
        encode_datamatrix(cast(Any, "text, not bytes"))
    with pytest.raises(InvalidInput, match="module size"):
        encode_datamatrix(PAYLOADS["ecdsa-148"], module_px=0)
    # 1555 random bytes fill a 144 x 144 (1558 codewords) to the last codeword.
    assert datamatrix_symbol(_RANDOM.randbytes(1555)).width == 144
    with pytest.raises(BarcodeError, match="1556 bytes do not fit one Data Matrix"):
        encode_datamatrix(_RANDOM.randbytes(1556))


def inverted(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    damaged = image.copy()
    damaged.paste(Image.eval(image.crop(box), lambda v: 255 - v), box[:2])
    return damaged


def test_damage_within_error_correction_still_exact() -> None:
    data = PAYLOADS["ecdsa-148"]
    image = encode_datamatrix(data, module_px=4)
    corner = DATAMATRIX_QUIET_MODULES * 4 + 40  # 10 modules in
    # 6 x 6 modules, about 5 codewords of the 34 that a 48 x 48 symbol corrects.
    assert decode_image(inverted(image, (corner, corner, corner + 24, corner + 24))) == data


def test_damaged_symbol_is_reported() -> None:
    image = encode_datamatrix(PAYLOADS["ecdsa-148"], module_px=4)
    # Half the data region inverted: far beyond what Reed-Solomon corrects, finder intact.
    quiet = DATAMATRIX_QUIET_MODULES * 4
    box = (quiet + 8, quiet + 8, image.width // 2, image.height - quiet - 8)
    with pytest.raises(BarcodeError, match=r"damaged DataMatrix symbol \(checksum error\)"):
        decode_image(inverted(image, box))


def test_pdf417_and_data_matrix_together_are_two_symbols() -> None:
    pdf417 = encode_pdf417(PAYLOADS["ecdsa-148"])
    matrix = encode_datamatrix(PAYLOADS["ecdsa-148"])
    both = Image.new("L", (pdf417.width + matrix.width, max(pdf417.height, matrix.height)), 255)
    both.paste(pdf417, (0, 0))
    both.paste(matrix, (pdf417.width, 0))
    with pytest.raises(BarcodeError, match="2 PDF417/Data Matrix symbols"):
        decode_image(both)


# --- the label --------------------------------------------------------------------------


def vector_label(name: str) -> tuple[bytes, bytes, bytes]:
    """(indicium, PNG, PDF) of a Data Matrix label laid out as `meter issue` lays it out."""
    data = VECTORS[name]
    label = render_label(data, label_info(decode(data), _vectors.ADDRESS), symbology="datamatrix")
    return data, label.png, label.pdf


@pytest.fixture(scope="module", params=sorted(VECTORS))
def dm_label(request: pytest.FixtureRequest) -> tuple[bytes, bytes, bytes]:
    return vector_label(cast(str, request.param))


def test_label_png_round_trip(dm_label: tuple[bytes, bytes, bytes]) -> None:
    data, png, _ = dm_label
    assert decode_image(png) == data
    with Image.open(io.BytesIO(png)) as page:
        assert page.size == (1200, 1800)
        assert [b.format for b in read_all(page)] == [zxingcpp.BarcodeFormat.DataMatrix]


@pytest.mark.parametrize("dpi", [300, 203])
def test_label_pdf_round_trip(
    dm_label: tuple[bytes, bytes, bytes], tmp_path: Path, dpi: int
) -> None:
    data, _, pdf = dm_label
    assert pdf.startswith(b"%PDF-")
    assert decode_image(rasterize(pdf, tmp_path, dpi)) == data


def test_label_png_printed_at_203_dpi() -> None:
    """The 300 dpi PNG as a 203 dpi printer reproduces it: resampled, each module 4.06 dots."""
    data, png, _ = vector_label("rsa-pss-valid")
    with Image.open(io.BytesIO(png)) as page:
        small = page.resize((round(1200 * 203 / 300), round(1800 * 203 / 300)))
    assert decode_image(small) == data


def test_label_with_markings_and_long_values() -> None:
    info = LabelInfo(
        postage="$0.000",
        date_of_mailing="2026-12-31",
        origin_zip="12345",
        device_serial="18446744073709551615",
        sequence="4294967295",
        rate="First-Class Mail large envelope (flat)",
        destination_lines=("MÜLLER & SØN", "1 RUE DE L'ÉGLISE"),
        specimen=True,
        correction=True,
    )
    label = render_label(PAYLOADS["rsa-340"], info, symbology="datamatrix")
    assert decode_image(label.png) == PAYLOADS["rsa-340"]


def test_default_symbology_is_still_pdf417() -> None:
    label = render_label(PAYLOADS["ecdsa-148"], INFO)
    with Image.open(io.BytesIO(label.png)) as page:
        assert [b.format for b in read_all(page)] == [zxingcpp.BarcodeFormat.PDF417]
    assert SYMBOLOGIES == ("pdf417", "datamatrix")


@pytest.mark.parametrize("symbology", ["qrcode", "PDF417", "", "data matrix", None, 417])
def test_unknown_symbology_refused(symbology: Any) -> None:
    with pytest.raises(InvalidInput, match=r"unknown symbology .*pdf417, datamatrix"):
        render_label(PAYLOADS["ecdsa-148"], INFO, symbology=symbology)


def test_indicium_too_large_for_the_label() -> None:
    # 1000 bytes make a 120 x 120 symbol: 744 px high, more than the indicium box holds.
    with pytest.raises(BarcodeError, match="does not fit"):
        render_label(bytes(range(256)) * 4, INFO, symbology="datamatrix")


# --- meter issue --symbology ------------------------------------------------------------


def test_cli_issues_a_data_matrix_label_the_post_office_verifies(running: Home) -> None:
    h = running.path
    run(h, "credit", "5.00", role="provider")
    base = ["issue", "--postage", "0.73", "--from-zip", "94043", "--to-zip", "62704"]
    issued = run(h, *base, "--to", "Jane|1 Main St", "--symbology", "datamatrix", role="customer")
    png = Path(str(issued["label_png"]))
    with Image.open(png) as page:
        assert [b.format for b in read_all(page)] == [zxingcpp.BarcodeFormat.DataMatrix]
    assert decode_image(png).hex() == issued["indicium_hex"]
    assert run(h, "verify", "--image", str(png))["verdict"] == "VALID"
    # An unknown symbology is refused before the device spends a piece.
    args = ["--home", str(h), *base, "--to", "X", "--symbology", "qrcode"]
    refused = CliRunner().invoke(cli, args, obj={})
    assert refused.exit_code == 2
    assert "'qrcode' is not one of 'pdf417', 'datamatrix'" in refused.output
    assert run(h, "psd-status", role="customer")["piece_count"] == 1
