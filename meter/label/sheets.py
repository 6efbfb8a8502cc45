"""Many labels in one print-ready PDF: one 4 x 6 inch label a page, or several a letter page.

Laying a label out (its barcode encoded by pdf417gen or the Data Matrix encoder,
its texts fitted) is most of its cost, and is independent of every other label,
so it runs in a process pool on every core (`layout.plan_label`). The parent
draws the planned labels into the one document in order (the texts need the
document: its embedded font subsets; each barcode arrives as a compressed form the
parent only references), then writes it atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from reportlab import rl_config
from reportlab.pdfgen import canvas

from meter.durable import write_atomically
from meter.errors import InvalidInput
from meter.label.layout import LabelInfo, LabelPlan, draw_label, plan_label

__all__ = ["LAYOUTS", "SheetLabel", "SheetResult", "Slot", "write_sheets"]

_LABEL_PT = (288.0, 432.0)  # 4 x 6 inch
_LETTER_PT = (612.0, 792.0)  # 8.5 x 11 inch
_CHUNK = 8  # labels a worker plans per task: few enough to keep the progress bar moving


@dataclass(frozen=True)
class Slot:
    """Where a label goes on its page: its bottom-left corner, turned and scaled."""

    x: float
    y: float
    rotate: int = 0  # degrees counter-clockwise, 0 or 90
    scale: float = 1.0


@dataclass(frozen=True)
class _Sheet:
    page: tuple[float, float]
    slots: tuple[Slot, ...]


def _letter_2x2() -> _Sheet:
    # Four to a page in its quarters (4.25 x 5.5 inch): each label scaled by 11/12, so
    # the PDF417 module is 0.0092 inch instead of 0.010, still well over what scanners read.
    scale = min(_LETTER_PT[0] / 2 / _LABEL_PT[0], _LETTER_PT[1] / 2 / _LABEL_PT[1])
    w, h = _LABEL_PT[0] * scale, _LABEL_PT[1] * scale
    qw, qh = _LETTER_PT[0] / 2, _LETTER_PT[1] / 2
    slots = [
        Slot(col * qw + (qw - w) / 2, row * qh + (qh - h) / 2, 0, scale)
        for row in (1, 0)  # top row first, in reading order
        for col in (0, 1)
    ]
    return _Sheet(_LETTER_PT, tuple(slots))


def _letter_2up() -> _Sheet:
    # Two full-size labels turned on their side, one in each half sheet (8.5 x 5.5 inch).
    w, h = _LABEL_PT[1], _LABEL_PT[0]  # as turned: 6 x 4 inch
    half = _LETTER_PT[1] / 2
    x = (_LETTER_PT[0] - w) / 2
    slots = [Slot(x + w, top * half + (half - h) / 2, 90) for top in (1, 0)]
    return _Sheet(_LETTER_PT, tuple(slots))


LAYOUTS: dict[str, _Sheet] = {
    "4x6": _Sheet(_LABEL_PT, (Slot(0.0, 0.0),)),
    "letter-2up": _letter_2up(),
    "letter-2x2": _letter_2x2(),
}


@dataclass(frozen=True)
class SheetLabel:
    """One label to lay out: the indicium as printed, the texts beside it, its barcode."""

    indicium: bytes
    info: LabelInfo
    symbology: str = "pdf417"


@dataclass(frozen=True)
class SheetResult:
    path: Path
    labels: int
    pages: int
    layout: str
    workers: int


def write_sheets(
    labels: Sequence[SheetLabel],
    out: Path,
    *,
    layout: str = "4x6",
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> SheetResult:
    """Lay ``labels`` out on ``workers`` processes (every core by default), draw them in
    order into one PDF and write it atomically to ``out``; ``progress(n)`` after each n
    labels drawn. InvalidInput for an unknown layout; a label that cannot be laid out
    raises what `render_label` would, and nothing is written."""
    if layout not in LAYOUTS:
        raise InvalidInput(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not labels:
        raise InvalidInput("no labels to write")
    sheet = LAYOUTS[layout]
    count = workers or os.cpu_count() or 1
    buffer = io.BytesIO()
    # invariant: no creation date or random id, so the same labels give the same bytes.
    pdf = canvas.Canvas(buffer, pagesize=sheet.page, invariant=1)
    pdf.setTitle(f"Postage labels ({len(labels)})")
    per_page = len(sheet.slots)
    for index, plan in enumerate(_plans(labels, count)):
        slot = sheet.slots[index % per_page]
        pdf.saveState()
        pdf.translate(slot.x, slot.y)
        if slot.rotate:
            pdf.rotate(slot.rotate)
        if slot.scale != 1.0:
            pdf.scale(slot.scale, slot.scale)
        draw_label(pdf, plan, f"barcode{index}")
        pdf.restoreState()
        if index % per_page == per_page - 1 or index == len(labels) - 1:
            pdf.showPage()
        if progress is not None:
            progress(1)
    with _binary_streams():
        pdf.save()
    write_atomically(Path(out), buffer.getvalue(), mode=0o644)
    pages = -(-len(labels) // per_page)
    return SheetResult(Path(out), len(labels), pages, layout, count)


def _plans(labels: Sequence[SheetLabel], workers: int) -> Iterator[LabelPlan]:
    """Every label's plan, in order, made on ``workers`` processes (in this one for 1)."""
    chunks = [labels[i : i + _CHUNK] for i in range(0, len(labels), _CHUNK)]
    if workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            yield from _plan_chunk(chunk)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for plans in pool.map(_plan_chunk, chunks):
            yield from plans


def _plan_chunk(labels: Sequence[SheetLabel]) -> list[LabelPlan]:
    return [plan_label(x.indicium, x.info, symbology=x.symbology) for x in labels]


@contextmanager
def _binary_streams() -> Iterator[None]:
    """Page streams compressed but not ASCII85-encoded: ASCII85 only makes a stream 7-bit
    clean, for 25 % more bytes and, with reportlab's pure-Python encoder, most of the
    time a document of many pages takes to write; a PDF file is binary anyway."""
    saved = rl_config.useA85
    rl_config.useA85 = 0
    try:
        yield
    finally:
        rl_config.useA85 = saved
