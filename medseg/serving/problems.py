"""The one error a served request can end in: an HTTP status and a body that explains it.

Every refusal reads the same way (the style of medseg's errors): what went wrong (``problem``),
what the server takes (``expected``), what it got (``found``) and what to do (``fix``). Bodies
never carry server paths: :func:`scrub` replaces a request's private folder by ``<upload>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Problem(Exception):
    """A request refused or failed, as its HTTP answer.

    Attributes:
        status: the HTTP status (4xx for the client's doing, 503/504 for the server's limits).
        problem: one sentence on what went wrong.
        expected: what the server takes.
        found: what this request had.
        fix: what the client (or, for 503, the operator) can do.
    """

    status: int
    problem: str
    expected: str = ""
    found: str = ""
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.status}: {self.problem}"

    def body(self) -> dict[str, Any]:
        return {"status": self.status, "problem": self.problem, "expected": self.expected, "found": self.found,
                "fix": self.fix}


def scrub(text: str, *folders: object) -> str:
    """``text`` with each private folder's path replaced by ``<upload>`` (a client never learns them)."""
    for folder in folders:
        if folder:
            text = text.replace(str(folder), "<upload>")
    return text
