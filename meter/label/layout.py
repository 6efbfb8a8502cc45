"""The printed postage label: a 4 x 6 inch page, as a 300 dpi PNG and a one-page PDF.

One layout, planned in 300 dpi pixels as a short list of boxes, texts and the
barcode (PDF417, or Data Matrix on request), is drawn twice: by Pillow for the
PNG and by reportlab for the PDF, so both look the same. Both use Bitstream
Vera, which reportlab ships: Pillow's own default font has ASCII only (no dash
for the specimen marking, no accented letters for addresses). In the PDF the
barcode is vector rectangles in one path, so it stays sharp and decodable at
every rasterizing resolution.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw, ImageFont
from reportlab.pdfbase import pdfdoc, pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen import canvas

from meter.durable import remove_abandoned, stage, sync_directory
from meter.errors import BarcodeError, InvalidInput
from meter.label.barcode import Symbol, pdf417_symbol
from meter.label.datamatrix import datamatrix_symbol

DPI = 300
PAGE_PX = (4 * DPI, 6 * DPI)  # 4 x 6 inch shipping-label stock, portrait
MODULE_PX = 3  # PDF417 X-dimension 0.010 inch at 300 dpi
# Data Matrix X-dimension 0.020 inch: 4 dots of a 203 dpi printer, and a 340-byte
# symbol (72 x 72 modules) still fits the indicium box.
DATAMATRIX_MODULE_PX = 6
SYMBOLOGIES = ("pdf417", "datamatrix")
SPECIMEN_TEXT = "SPECIMEN \u2014 NO POSTAGE VALUE"
CORRECTION_TEXT = "CORRECTION"

_PT_PER_PX = 72 / DPI
_MARGIN = 45  # 0.15 inch: inside what label printers can reach
_PAD = 24
_MAX_SENDER_LINES = 5
_MAX_DESTINATION_LINES = 8
_FONTS = {False: "Vera.ttf", True: "VeraBd.ttf"}
_BARS = re.compile("1+")
# Each symbology's encoder and the size of its module on the page.
_ENCODERS: dict[str, tuple[Callable[[bytes], Symbol], int]] = {
    "pdf417": (pdf417_symbol, MODULE_PX),
    "datamatrix": (datamatrix_symbol, DATAMATRIX_MODULE_PX),
}

Align = Literal["l", "r", "m"]


@dataclass(frozen=True)
class LabelInfo:
    """What the label prints in words beside the barcode; the caller formats each value."""

    postage: str  # e.g. "$0.730"
    date_of_mailing: str  # e.g. "2026-11-22"
    origin_zip: str
    device_serial: str
    sequence: str
    rate: str  # e.g. "First-Class Mail letter"
    destination_lines: tuple[str, ...]  # the recipient's address as printed
    sender_lines: tuple[str, ...] = ()
    specimen: bool = False  # prints SPECIMEN_TEXT in large letters
    correction: bool = False  # prints CORRECTION_TEXT

    def __post_init__(self) -> None:
        for name in (
            "postage",
            "date_of_mailing",
            "origin_zip",
            "device_serial",
            "sequence",
            "rate",
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidInput(f"label: {name} must be printed, got {value!r}")
        if not self.destination_lines:
            raise InvalidInput("label: the destination address has no lines")
        if len(self.destination_lines) > _MAX_DESTINATION_LINES:
            raise InvalidInput(
                f"label: the destination address has {len(self.destination_lines)} lines, "
                f"at most {_MAX_DESTINATION_LINES} fit"
            )
        if len(self.sender_lines) > _MAX_SENDER_LINES:
            raise InvalidInput(
                f"label: the sender address has {len(self.sender_lines)} lines, "
                f"at most {_MAX_SENDER_LINES} fit"
            )


@dataclass(frozen=True)
class RenderedLabel:
    png: bytes
    pdf: bytes


def check_printable(text: str) -> None:
    """Raise InvalidInput unless the label font can print every character of `text`.

    Lets a caller check an address before it issues the indicium that the label carries.
    """
    if not isinstance(text, str):
        raise InvalidInput(f"label text must be str, not {type(text).__name__}")
    glyphs = _glyphs()
    for ch in text:
        if not ch.isprintable() or ord(ch) not in glyphs:
            raise InvalidInput(f"label text {text!r}: character U+{ord(ch):04X} cannot be printed")


def render_label(indicium: bytes, info: LabelInfo, *, symbology: str = "pdf417") -> RenderedLabel:
    """The label for one piece: PNG (1200 x 1800 px, 300 dpi) and a one-page PDF, 4 x 6 inch.

    Top, in a box under a "U.S. POSTAGE" heading bar: the indicium as a PDF417
    symbol (X-dimension 0.010 inch, 4-module quiet zone) or, with
    `symbology="datamatrix"`, a square Data Matrix (0.020 inch, 2-module quiet
    zone), with the postage, date of mailing, origin ZIP, device serial and
    piece sequence beside it. Below: the rate category band, the SPECIMEN /
    CORRECTION markings when set, the sender's address at the left and the
    destination address block.
    Raises InvalidInput for an unknown symbology or when a text has characters
    the font lacks or is too long for its place, BarcodeError when the
    indicium does not fit a symbol or its symbol does not fit the label.
    """
    if not isinstance(symbology, str) or symbology not in _ENCODERS:
        raise InvalidInput(
            f"label: unknown symbology {symbology!r}; choose one of {', '.join(SYMBOLOGIES)}"
        )
    for text in _texts(info):
        check_printable(text)
    encode, module_px = _ENCODERS[symbology]
    ops = _plan(_Code(0, 0, encode(indicium), module_px), info)
    return RenderedLabel(png=_draw_png(ops), pdf=_draw_pdf(ops))


def write_label(label: RenderedLabel, png_path: Path, pdf_path: Path) -> None:
    """Write both files atomically: each appears complete under its name, or not at all.

    Both are written and synced to temporary files beside their targets first,
    then renamed over the targets. OSError from the file system passes through.
    """
    png_path, pdf_path = Path(png_path), Path(pdf_path)
    if png_path.resolve() == pdf_path.resolve():
        raise InvalidInput(f"label: PNG and PDF would both be written to {png_path}")
    for directory in {png_path.parent, pdf_path.parent}:
        remove_abandoned(directory)  # what a writer killed mid-label left behind
    staged: list[tuple[Path, Path]] = []
    try:
        for data, path in ((label.png, png_path), (label.pdf, pdf_path)):
            staged.append((stage(path, data), path))
        for temp, path in staged:
            os.replace(temp, path)
    except BaseException:
        for temp, _ in staged:
            Path(temp).unlink(missing_ok=True)
        raise
    for directory in {png_path.parent, pdf_path.parent}:
        sync_directory(directory)


def _texts(info: LabelInfo) -> Iterable[str]:
    yield from (info.postage, info.date_of_mailing, info.origin_zip, info.device_serial)
    yield from (info.sequence, info.rate, *info.destination_lines, *info.sender_lines)


# --- the plan: what goes where, in 300 dpi pixels from the top left -------------------


@dataclass(frozen=True)
class _Text:
    x: int
    baseline: int
    text: str
    size: int
    bold: bool = False
    align: Align = "l"
    grey: int = 0  # 0 black .. 255 white


@dataclass(frozen=True)
class _Box:
    x0: int
    y0: int
    x1: int
    y1: int
    grey: int | None = 0  # fill, None for none
    line: int = 0  # outline width inside the box, 0 for none


@dataclass(frozen=True)
class _Code:
    x: int  # top left of the quiet zone
    y: int
    symbol: Symbol
    module_px: int

    @property
    def size(self) -> tuple[int, int]:
        """Width and height in pixels, quiet zone included."""
        quiet = 2 * self.symbol.quiet_modules
        return (
            (self.symbol.width + quiet) * self.module_px,
            (self.symbol.height + quiet) * self.module_px,
        )


_Op = _Text | _Box | _Code


def _plan(code: _Code, info: LabelInfo) -> list[_Op]:
    width, height = PAGE_PX
    left, right = _MARGIN, width - _MARGIN
    ops: list[_Op] = []

    # Indicium box: heading bar, then barcode with the five required values beside it.
    ops.append(_Box(left, _MARGIN, right, _MARGIN + 80))
    ops.append(_Text(left + _PAD, _MARGIN + 58, "U.S. POSTAGE", 50, bold=True, grey=255))
    top = _MARGIN + 80 + _PAD
    code_w, code_h = code.size
    column = left + _PAD + code_w + 30
    if right - _PAD - column < 300 or code_h > 480:
        raise BarcodeError(f"label: a barcode of {code_w} x {code_h} px does not fit")
    text, text_bottom = _indicium_text(info, column, right - _PAD, top)
    y = max(top + code_h, text_bottom)
    # Centred beside the text.
    ops.append(dataclasses.replace(code, x=left + _PAD // 2, y=(top + y - code_h) // 2))
    ops += text
    y += _PAD
    ops.append(_Box(left, _MARGIN, right, y, grey=None, line=4))

    # Rate band between two heavy rules, as carriers print the service.
    y += 20
    rate = info.rate.upper()
    size = _fit(rate, 60, True, right - left - 2 * _PAD, "rate")
    band = 8 + 50 + size
    ops.append(_Box(left, y, right, y + 8))
    ops.append(_Text(width // 2, _baseline(y + 8, y + band, size), rate, size, True, "m"))
    ops.append(_Box(left, y + band, right, y + band + 8))
    y += band + 8

    for flag, marking in ((info.specimen, SPECIMEN_TEXT), (info.correction, CORRECTION_TEXT)):
        if flag:
            y += 24
            size = _fit(marking, 72, True, right - left - 4 * _PAD, "marking")
            band = size + 60
            ops.append(_Box(left, y, right, y + band, grey=None, line=8))
            ops.append(_Text(width // 2, _baseline(y, y + band, size), marking, size, True, "m"))
            y += band

    # Addresses: sender small at the left, destination large, indented, low on the page.
    y += 16
    for line in info.sender_lines:
        y += 38
        size = _fit(line, 30, False, right - left - 2 * _PAD, "sender address")
        ops.append(_Text(left + _PAD, y, line, size))
    step = 62
    block = len(info.destination_lines) * step
    first = max(y + 70, (y + height - _MARGIN - block) // 2) + 48  # first baseline
    if first - 48 + block > height - _MARGIN:
        raise InvalidInput("label: the addresses do not fit on the page")
    indent = left + 190
    ops.append(_Text(left + _PAD, first, "SHIP TO:", 28, bold=True, grey=60))
    for i, line in enumerate(info.destination_lines):
        size = _fit(line, 48, True, right - _PAD - indent, "destination address")
        ops.append(_Text(indent, first + i * step, line, size, bold=True))
    return ops


def _indicium_text(info: LabelInfo, x: int, x1: int, top: int) -> tuple[list[_Op], int]:
    """The human-readable values the spec puts beside the barcode; returns them and their bottom."""
    span = x1 - x
    ops: list[_Op] = []
    size = _fit(info.postage, 72, True, span, "postage")
    y = top + size * 3 // 4
    ops.append(_Text(x, y, info.postage, size, bold=True))
    rows = (
        ("DATE OF MAILING", info.date_of_mailing),
        ("ORIGIN ZIP", info.origin_zip),
        ("DEVICE SERIAL", info.device_serial),
        ("PIECE SEQUENCE", info.sequence),
    )
    for caption, value in rows:
        y += 36
        ops.append(_Text(x, y, caption, 20, grey=90))
        size = _fit(value, 32, True, span, caption.lower())
        y += 36
        ops.append(_Text(x, y, value, size, bold=True))
    return ops, y + 10


def _baseline(top: int, bottom: int, size: int) -> int:
    """The baseline that centres capitals (Vera's cap height is 0.73 em) between two edges."""
    return (top + bottom + int(0.73 * size)) // 2


def _fit(text: str, size: int, bold: bool, span: int, what: str) -> int:
    """The largest font size up to `size` at which `text` fits `span` pixels."""
    length = _font(size, bold).getlength(text)
    if length <= span:
        return size
    fitted = int(size * span / length)
    while fitted >= 18 and _font(fitted, bold).getlength(text) > span:
        fitted -= 1
    if fitted < 18:  # 18 px is 4.3 pt: smaller is not reliably legible on a label printer
        raise InvalidInput(f"label: {what} {text!r} is too long to print")
    return fitted


# --- fonts ---------------------------------------------------------------------------


def _font_file(bold: bool) -> str:
    return str(resources.files("reportlab").joinpath("fonts", _FONTS[bold]))


@lru_cache(maxsize=64)
def _font(size: int, bold: bool) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(_font_file(bold), size)


@lru_cache(maxsize=1)
def _glyphs() -> frozenset[int]:
    faces = (TTFont(f"MeterVera{b}", _font_file(b)).face.charToGlyph for b in (False, True))
    regular, bold = faces
    return frozenset(regular) & frozenset(bold)


def _pdf_font(bold: bool) -> str:
    name = "MeterVera-Bold" if bold else "MeterVera"
    if name not in pdfmetrics.getRegisteredFontNames():
        pdfmetrics.registerFont(TTFont(name, _font_file(bold)))
    return name


# --- drawing ---------------------------------------------------------------------------


def _draw_png(ops: Sequence[_Op]) -> bytes:
    page = Image.new("L", PAGE_PX, 255)
    draw = ImageDraw.Draw(page)
    for op in ops:
        if isinstance(op, _Box):
            box = (op.x0, op.y0, op.x1 - 1, op.y1 - 1)
            draw.rectangle(box, fill=op.grey, outline=0 if op.line else None, width=op.line)
        elif isinstance(op, _Text):
            anchor = {"l": "ls", "r": "rs", "m": "ms"}[op.align]
            font = _font(op.size, op.bold)
            draw.text((op.x, op.baseline), op.text, fill=op.grey, font=font, anchor=anchor)
        else:
            page.paste(op.symbol.image(op.module_px), (op.x, op.y))
    out = io.BytesIO()
    page.save(out, "PNG", dpi=(DPI, DPI), compress_level=1)  # speed over ~15 KB
    return out.getvalue()


def _draw_pdf(ops: Sequence[_Op]) -> bytes:
    k = _PT_PER_PX
    page_h = PAGE_PX[1]
    out = io.BytesIO()
    # invariant: no creation date or random id, so the same label gives the same bytes.
    pdf = canvas.Canvas(out, pagesize=(PAGE_PX[0] * k, page_h * k), invariant=1)
    pdf.setTitle("Postage label")
    for op in ops:
        if isinstance(op, _Box):
            w, h = (op.x1 - op.x0) * k, (op.y1 - op.y0) * k
            x, y = op.x0 * k, (page_h - op.y1) * k
            if op.grey is not None:
                pdf.setFillGray(op.grey / 255)
                pdf.rect(x, y, w, h, stroke=0, fill=1)
            if op.line:
                # PDF strokes straddle the path; inset it to keep the line inside, as Pillow does.
                half = op.line * k / 2
                pdf.setLineWidth(op.line * k)
                pdf.setStrokeGray(0)
                pdf.rect(x + half, y + half, w - 2 * half, h - 2 * half, stroke=1, fill=0)
        elif isinstance(op, _Text):
            pdf.setFillGray(op.grey / 255)
            pdf.setFont(_pdf_font(op.bold), op.size * k)
            draw = {"l": pdf.drawString, "r": pdf.drawRightString, "m": pdf.drawCentredString}
            draw[op.align](op.x * k, (page_h - op.baseline) * k, op.text)
        else:
            _draw_pdf_symbol(pdf, op, page_h)
    pdf.showPage()
    pdf.save()
    return out.getvalue()


def _draw_pdf_symbol(pdf: canvas.Canvas, code: _Code, page_h: int) -> None:
    """The bars as one filled path: no seams between rows where a rasterizer anti-aliases.

    Drawn in module units (x) and row units (y) under one transform, so each bar
    is a rectangle with integer coordinates: exact, and fast to write.
    """
    k = _PT_PER_PX
    symbol, module = code.symbol, code.module_px
    rows = symbol.rows
    quiet = symbol.quiet_modules * module
    bottom = page_h - code.y - quiet - symbol.height * module
    bars = [
        f"{run.start()} {len(rows) - 1 - r} {run.end() - run.start()} 1 re"
        for r, row in enumerate(rows)
        for run in _BARS.finditer(row)
    ]
    pdf.saveState()
    pdf.transform(
        module * k, 0, 0, symbol.row_modules * module * k, (code.x + quiet) * k, bottom * k
    )
    pdf.setFillGray(0)
    pdf.addLiteral("\n".join([*bars, "f"]))
    pdf.restoreState()


# --- labels for multi-label documents (meter.label.sheets) ------------------------------


@dataclass(frozen=True)
class LabelPlan:
    """A label laid out for a PDF page, its barcode drawn already: everything but the texts,
    whose drawing needs the document (its font subsets). Picklable, so that other processes
    make it; the barcode is a compressed Form XObject stream, which no process touches again.
    """

    ops: tuple[_Text | _Box, ...]
    barcode: bytes  # Flate-compressed content: the bars as one path, in module units
    barcode_box: tuple[int, int]  # the form's width and height, in module units
    barcode_transform: tuple[float, float, float, float, float, float]  # to page points


def plan_label(indicium: bytes, info: LabelInfo, *, symbology: str = "pdf417") -> LabelPlan:
    """What `render_label` lays out, with its checks and errors, ready for `draw_label`."""
    if not isinstance(symbology, str) or symbology not in _ENCODERS:
        raise InvalidInput(
            f"label: unknown symbology {symbology!r}; choose one of {', '.join(SYMBOLOGIES)}"
        )
    for text in _texts(info):
        check_printable(text)
    encode, module_px = _ENCODERS[symbology]
    ops = _plan(_Code(0, 0, encode(indicium), module_px), info)
    (code,) = (op for op in ops if isinstance(op, _Code))
    k, page_h = _PT_PER_PX, PAGE_PX[1]
    symbol, module = code.symbol, code.module_px
    rows = symbol.rows
    quiet = symbol.quiet_modules * module
    bottom = page_h - code.y - quiet - symbol.height * module
    # The same path as _draw_pdf_symbol's, under the same transform.
    bars = [
        f"{run.start()} {len(rows) - 1 - r} {run.end() - run.start()} 1 re"
        for r, row in enumerate(rows)
        for run in _BARS.finditer(row)
    ]
    return LabelPlan(
        tuple(op for op in ops if not isinstance(op, _Code)),
        zlib.compress("\n".join(["0 g", *bars, "f"]).encode("ascii")),
        (symbol.width, len(rows)),
        (module * k, 0.0, 0.0, symbol.row_modules * module * k, (code.x + quiet) * k, bottom * k),
    )


def draw_label(pdf: canvas.Canvas, plan: LabelPlan, name: str) -> None:
    """Draw a planned label on the current page, its bottom left corner at the origin of the
    current coordinates (in points: a 4 x 6 inch label is 288 x 432), as `render_label`'s
    PDF draws it. ``name`` names its barcode's form in the document: one per label."""
    k = _PT_PER_PX
    page_h = PAGE_PX[1]
    for op in plan.ops:
        if isinstance(op, _Box):
            w, h = (op.x1 - op.x0) * k, (op.y1 - op.y0) * k
            x, y = op.x0 * k, (page_h - op.y1) * k
            if op.grey is not None:
                pdf.setFillGray(op.grey / 255)
                pdf.rect(x, y, w, h, stroke=0, fill=1)
            if op.line:
                half = op.line * k / 2  # inset: the stroke stays inside, as in _draw_pdf
                pdf.setLineWidth(op.line * k)
                pdf.setStrokeGray(0)
                pdf.rect(x + half, y + half, w - 2 * half, h - 2 * half, stroke=1, fill=0)
        else:
            pdf.setFillGray(op.grey / 255)
            pdf.setFont(_pdf_font(op.bold), op.size * k)
            draw = {"l": pdf.drawString, "r": pdf.drawRightString, "m": pdf.drawCentredString}
            draw[op.align](op.x * k, (page_h - op.baseline) * k, op.text)
    width, height = plan.barcode_box
    form = pdfdoc.PDFStream(
        pdfdoc.PDFDictionary(
            {
                "Type": pdfdoc.PDFName("XObject"),
                "Subtype": pdfdoc.PDFName("Form"),
                "FormType": 1,
                "BBox": pdfdoc.PDFArray([0, 0, width, height]),
                # Named: reportlab then writes the compressed bytes as they are.
                "Filter": pdfdoc.PDFArray([pdfdoc.PDFName("FlateDecode")]),
            }
        ),
        plan.barcode,
    )
    pdf._doc.addForm(name, form)
    pdf.saveState()
    pdf.transform(*plan.barcode_transform)
    pdf.doForm(name)
    pdf.restoreState()


def render_label_pdf(indicium: bytes, info: LabelInfo, *, symbology: str = "pdf417") -> bytes:
    """The one-page PDF of `render_label` alone, without the PNG."""
    if not isinstance(symbology, str) or symbology not in _ENCODERS:
        raise InvalidInput(
            f"label: unknown symbology {symbology!r}; choose one of {', '.join(SYMBOLOGIES)}"
        )
    for text in _texts(info):
        check_printable(text)
    encode, module_px = _ENCODERS[symbology]
    return _draw_pdf(_plan(_Code(0, 0, encode(indicium), module_px), info))


def check_label(info: LabelInfo, *, symbology: str = "pdf417", indicium_length: int = 340) -> None:
    """Raise what `render_label` would for ``info`` beside an indicium of that length (the
    widest, RSA-PSS-2048's, by default), without encoding a barcode per label: a caller
    checks a whole batch of addresses before the device issues any of it."""
    if not isinstance(symbology, str) or symbology not in _ENCODERS:
        raise InvalidInput(
            f"label: unknown symbology {symbology!r}; choose one of {', '.join(SYMBOLOGIES)}"
        )
    for text in _texts(info):
        check_printable(text)
    _plan(_placeholder_code(symbology, indicium_length), info)


@lru_cache(maxsize=8)
def _placeholder_code(symbology: str, length: int) -> _Code:
    encode, module_px = _ENCODERS[symbology]
    return _Code(0, 0, encode(bytes(length)), module_px)
