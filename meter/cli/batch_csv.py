"""The mailer's batch file: one CSV row per piece (docs/cli.md, "Batch issuing").

Every row is checked here before the device is asked for anything, and a bad
row is refused naming its row, its line in the file and its column: a batch
file is issued whole or not at all. The device checks every piece again.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from meter.cli.common import parse_date, parse_postage
from meter.errors import InvalidInput, MeterError
from meter.indicium import MAX_POSTAGE, RateCategory
from meter.protocol.issue import IssueRequest

__all__ = ["ADDRESS_COLUMNS", "COLUMNS", "MAX_ROWS", "BatchRow", "read_batch_csv"]

ADDRESS_COLUMNS = ("name", *(f"address{i}" for i in range(1, 8)))  # 8 lines fit a label
REQUIRED = ("rate", "from_zip", "to_zip")
# A row gives its postage, or its weight for the device to price from the installed signed
# rate table (docs/rates.md); with both, the postage must be one the table allows.
OPTIONAL = ("postage", "weight", "to_plus4", "delivery_point", "date")
COLUMNS = (*REQUIRED, *OPTIONAL, *ADDRESS_COLUMNS)
MAX_ROWS = 100_000  # a day's mailing for one meter; more is several files
MAX_FILE_BYTES = 64 * 1024 * 1024
_ZIP5 = re.compile(r"[0-9]{5}")
_MAX_CELL = 256


@dataclass(frozen=True)
class BatchRow:
    """One piece of the file: its request, and where it was in the file."""

    row: int  # 1 = the first row after the header
    line: int  # the file's line the row starts on
    request: IssueRequest
    weight_oz: Decimal | None

    def where(self) -> str:
        return f"row {self.row} (line {self.line})"


def read_batch_csv(path: Path) -> list[BatchRow]:
    """Every row of the file as a request; InvalidInput naming the first bad row and field."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InvalidInput(f"{path}: {size} bytes, more than a batch file may have")
        text = path.read_bytes().decode("utf-8-sig")  # a spreadsheet's byte order mark
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    return parse_batch_csv(text, str(path))


def parse_batch_csv(text: str, name: str = "the batch file") -> list[BatchRow]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise InvalidInput(
                f"{name} is empty: it needs a header row ({', '.join(REQUIRED)}, ...)"
            )
        columns = _columns(header, name)
        rows: list[BatchRow] = []
        line = reader.line_num + 1
        for cells in reader:
            if not any(c.strip() for c in cells):  # a blank line between rows
                line = reader.line_num + 1
                continue
            if len(rows) >= MAX_ROWS:
                raise InvalidInput(f"{name} has more than {MAX_ROWS} rows: split it")
            rows.append(_row(len(rows) + 1, line, columns, cells, name))
            line = reader.line_num + 1
    except csv.Error as exc:
        raise InvalidInput(f"{name}, line {reader.line_num}: not CSV ({exc})") from exc
    if not rows:
        raise InvalidInput(f"{name} has a header but no rows: nothing to issue")
    return rows


def _columns(header: Sequence[str], name: str) -> dict[str, int]:
    columns: dict[str, int] = {}
    for index, raw in enumerate(header):
        column = raw.strip().lower()
        if column not in COLUMNS:
            raise InvalidInput(
                f"{name}: unknown column {raw!r} in the header; the columns are "
                f"{', '.join(COLUMNS)}"
            )
        if column in columns:
            raise InvalidInput(f"{name}: column {column!r} appears twice in the header")
        columns[column] = index
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise InvalidInput(f"{name}: the header lacks the column(s) {', '.join(missing)}")
    if not any(c in columns for c in ADDRESS_COLUMNS):
        raise InvalidInput(
            f"{name}: the header has no address column ({', '.join(ADDRESS_COLUMNS)})"
        )
    if "postage" not in columns and "weight" not in columns:
        raise InvalidInput(f"{name}: the header has neither a postage nor a weight column")
    return columns


def _row(
    number: int, line: int, columns: dict[str, int], cells: Sequence[str], name: str
) -> BatchRow:
    where = f"{name}, row {number} (line {line})"
    if len(cells) > len(columns):
        raise InvalidInput(f"{where}: {len(cells)} cells, but the header names {len(columns)}")

    def cell(column: str) -> str:
        index = columns.get(column)
        value = cells[index].strip() if index is not None and index < len(cells) else ""
        if len(value) > _MAX_CELL:
            raise _bad(where, column, f"longer than {_MAX_CELL} characters")
        return value

    field = "rate"
    try:
        rate = RateCategory.parse(cell("rate"))
        field = "weight"
        weight, weight_unit = _weight(cell("weight"))
        field = "postage"
        postage_text = cell("postage")
        postage: int | None = None
        if postage_text:
            postage = parse_postage(postage_text)
            if not 0 < postage <= MAX_POSTAGE:
                raise InvalidInput(
                    f"{postage_text} is not between $0.001 and ${MAX_POSTAGE // 1000}.{MAX_POSTAGE % 1000:03d}"
                )
        elif weight is None:
            raise InvalidInput(
                "give a postage, or a weight for the device to price from its rate table"
            )
        field = "from_zip"
        origin = cell("from_zip")
        if not _ZIP5.fullmatch(origin):
            raise InvalidInput(f"origin ZIP '{origin}' must be 5 digits")
        field = "date"
        mailing = parse_date(cell("date") or None)
        address = [text for column in ADDRESS_COLUMNS if (text := cell(column))]
        field = "address"
        if not address:
            raise InvalidInput("no address line (name, address1, ...) is filled in")
        destination = {}
        for field, width, default in (
            ("to_zip", 5, None),
            ("to_plus4", 4, "0000"),
            ("delivery_point", 2, "00"),
        ):
            value = cell(field) or default or ""
            if len(value) != width or not value.isascii() or not value.isdigit():
                raise InvalidInput(f"'{value}' must be {width} digits")
            destination[field] = value
        request = IssueRequest(
            postage=postage,
            weight=None if weight is None else f"{weight}{weight_unit}",
            rate_category=rate,
            origin_zip=origin,
            destination_zip=destination["to_zip"],
            destination_plus4=destination["to_plus4"],
            delivery_point=destination["delivery_point"],
            address=address,
            date_of_mailing=mailing,
        )
    except InvalidInput as exc:
        raise _bad(where, field, str(exc)) from None
    except MeterError as exc:
        raise _bad(where, field, str(exc)) from exc
    ounces = None if weight is None else weight * 16 if weight_unit == "lb" else weight
    return BatchRow(number, line, request, ounces)


def _weight(text: str) -> tuple[Decimal | None, str]:
    """A weight cell: a number of ounces (``3.5``, ``3.5oz``) or of pounds (``2lb``)."""
    if not text:
        return None, "oz"
    lowered = text.lower()
    unit = "lb" if lowered.endswith("lb") else "oz"
    try:
        amount = Decimal(lowered.removesuffix(unit).strip())
    except InvalidOperation:
        raise InvalidInput(
            f"'{text}' is not a weight (ounces, e.g. 3.5, or pounds, e.g. 2lb)"
        ) from None
    if not amount.is_finite() or amount <= 0:
        raise InvalidInput(f"'{text}' is not a positive weight")
    return amount, unit


def _bad(where: str, field: str, why: str) -> InvalidInput:
    return InvalidInput(f"{where}, field '{field}': {why}; nothing was issued")
