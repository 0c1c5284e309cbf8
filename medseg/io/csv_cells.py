"""CSV cells that a spreadsheet shows as text, never runs as a formula.

A cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is taken by Excel,
LibreOffice and Google Sheets as the start of a formula: a case named ``=HYPERLINK(...)`` or
``@SUM(...)`` in a report would run when the report is opened (CSV or formula injection). As
OWASP advises, such a text cell is written with a single quote in front, which spreadsheets
show as text and hide; a number (``-0.5``, ``+3``) is left as it is. :func:`unescape_cell`
undoes it for medseg's own readers (a resumed batch reads its earlier report back).

:func:`csv_text` is medseg's one CSV writer (reports, manifests, target tables): ``\n`` line ends,
missing cells empty, every cell escaped.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

#: First characters that make a spreadsheet read a cell as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _needs_quote(text: str) -> bool:
    # Quotes already in front count too, so that unescape_cell(escape_cell(x)) == x for every x.
    bare = text.lstrip("'")
    if not bare.startswith(FORMULA_STARTS):
        return False
    if bare is text:
        try:
            float(text)
            return False  # a number: -0.5 stays a number
        except ValueError:
            return True
    return True


def escape_cell(value: Any) -> Any:
    """``value`` as a spreadsheet must show it: a text cell that would start a formula gets a ``'`` in front."""
    if isinstance(value, str) and _needs_quote(value):
        return "'" + value
    return value


def unescape_cell(value: str) -> str:
    """The text :func:`escape_cell` was given."""
    if value.startswith("'") and _needs_quote(value[1:]):
        return value[1:]
    return value


def escape_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Every cell of a CSV row escaped (:func:`escape_cell`)."""
    return {key: escape_cell(value) for key, value in row.items()}


def unescape_row(row: Mapping[str, str | None]) -> dict[str, str | None]:
    """Every cell of a row read back from a CSV medseg wrote, unescaped."""
    return {key: unescape_cell(value) if isinstance(value, str) else value for key, value in row.items()}


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], header: bool = True) -> str:
    """Rows as CSV text (``\n`` line ends, missing cells empty, cells outside ``columns`` left out,
    every cell escaped with :func:`escape_cell`)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", restval="", extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows(escape_row(row) for row in rows)
    return buffer.getvalue()
