"""The per-case CSV of a batch (``predictions.csv``): one writer for every task.

While a batch runs, each finished case's row is appended and flushed, so the cost of the report
grows with the number of cases, not with its square, and a killed batch leaves every finished
row for its rerun. Once every case is done the file is written again whole, atomically, so the
report that stays is complete and consistent even if an append was cut short. Cells that a
spreadsheet would run as a formula are escaped (:mod:`medseg.io.csv_cells`).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from medseg.io.atomic import atomic_write_text
from medseg.io.csv_cells import csv_text, unescape_row

__all__ = ["ReportAppender", "csv_text", "finished_rows", "write_report"]


def write_report(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: Path) -> Path:
    """The whole report, written atomically."""
    return atomic_write_text(path, csv_text(rows, columns))


def finished_rows(path: Path) -> dict[str, dict[str, str]]:
    """Rows of an earlier run's report that finished (status ok or skipped), by case id; a row cut
    short by a kill (fewer cells than the header) is left out, so its case is done again."""
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [unescape_row(row) for row in csv.DictReader(fh)]
    return {str(row["case_id"]): {k: v or "" for k, v in row.items() if isinstance(k, str)} for row in rows
            if None not in row.values() and None not in row and row.get("status") in ("ok", "skipped")}


class ReportAppender:
    """``predictions.csv`` while a batch runs: the header at :meth:`__enter__`, one row per
    :meth:`append` (flushed, so a kill keeps it), and the whole report once at :meth:`finish`.

    Attributes:
        path: the report.
        columns: its columns, in order.
        bytes_written: the bytes given to the report so far (appends and whole writes).
    """

    def __init__(self, path: Path, columns: Sequence[str]):
        self.path = path
        self.columns = list(columns)
        self.bytes_written = 0
        self._handle: TextIO | None = None

    def __enter__(self) -> ReportAppender:
        self._write_whole([])
        self._handle = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115 - closed in __exit__
        return self

    def append(self, row: Mapping[str, Any]) -> None:
        """Add one finished case's row at the end and flush it to the file.

        Raises:
            OSError: the row could not be written (a full disk); the earlier rows stay.
        """
        if self._handle is None:
            raise RuntimeError("ReportAppender.append() outside its with block")
        text = csv_text([row], self.columns, header=False)
        self._handle.write(text)
        self._handle.flush()
        self.bytes_written += len(text.encode())

    def finish(self, rows: Sequence[Mapping[str, Any]]) -> Path:
        """Write the whole report (every row, in order) atomically in place of the appended one."""
        self._close()
        return self._write_whole(rows)

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self._close()

    def _write_whole(self, rows: Sequence[Mapping[str, Any]]) -> Path:
        text = csv_text(rows, self.columns)
        self.bytes_written += len(text.encode())
        return atomic_write_text(self.path, text)

    def _close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.close()
