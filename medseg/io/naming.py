"""Output file names that every file system takes, however long the case's name.

A file name may hold at most 255 bytes on the usual file systems (ext4, XFS, btrfs, APFS, NTFS),
and medseg writes each output through a temporary file whose name is longer still
(:func:`medseg.io.atomic.temp_name_bytes`). A case named after a 230-character file, or after a
deep folder path, would otherwise fail with "File name too long". Such a case's files share one
shortened stem: the start of its name, ``-``, and the first 12 hex digits of the SHA-256 of the
whole name. The same name always gives the same stem (a rerun finds its outputs), two names
that differ anywhere give different ones, and the report keeps the full name as the case id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from medseg.errors import CaseError
from medseg.io.atomic import temp_name_bytes

#: Longest file name, in bytes, on the file systems medseg writes to.
NAME_MAX = 255
#: Longest path, in bytes (Linux's PATH_MAX, counting the final NUL).
PATH_MAX = 4095
#: Hex digits of the name's SHA-256 kept in a shortened stem.
DIGEST_CHARS = 12


def name_fits(name: str) -> bool:
    """Whether ``name`` and the temporary file it is written through both fit in :data:`NAME_MAX` bytes."""
    return len(name.encode()) <= NAME_MAX and temp_name_bytes(name) <= NAME_MAX


def output_stem(case_id: str, suffixes: Mapping[str, str] | list[str] | tuple[str, ...]) -> str:
    """The stem of a case's output names: ``case_id`` itself when every ``case_id + suffix`` fits,
    else its longest start for which ``<start>-<sha256[:12]> + suffix`` fits for every suffix.

    Raises:
        CaseError: not even the digest alone fits beside the longest suffix.
    """
    ends = list(suffixes.values()) if isinstance(suffixes, Mapping) else list(suffixes)
    if all(name_fits(case_id + end) for end in ends):
        return case_id
    tail = "-" + hashlib.sha256(case_id.encode()).hexdigest()[:DIGEST_CHARS]
    longest = max(ends, key=lambda end: temp_name_bytes(case_id + tail + end), default="")
    room = NAME_MAX - temp_name_bytes(tail + longest)  # bytes left for the start of the name
    if room < 0:
        raise CaseError(f"{case_id[:80]}…: no output name fits in {NAME_MAX} bytes with the suffix {longest!r}")
    start = case_id.encode()[:room].decode("utf-8", errors="ignore")  # never half a character
    return start + tail


def output_paths(output_dir: Path, case_id: str, suffixes: Mapping[str, str]) -> dict[str, Path]:
    """Every output of a case: report column -> ``output_dir / (stem + suffix)``, one stem for all
    (:func:`output_stem`), so a case's files sort together whatever their names' lengths.

    Args:
        output_dir: the output folder.
        case_id: the case's full name (kept as such in the report).
        suffixes: report column -> what follows the stem (``".nii.gz"``, ``"_probabilities.nii.gz"``).

    Raises:
        CaseError: no name fits, or the output folder's path is so long that no file in it can be
            written; the message says which and what to do.
    """
    stem = output_stem(case_id, suffixes)
    paths = {column: output_dir / f"{stem}{end}" for column, end in suffixes.items()}
    longest = max((temp_name_bytes(str(p.absolute())) for p in paths.values()), default=0)
    if longest > PATH_MAX:  # the temporary file's path, the longest one written
        raise CaseError(f"{case_id[:80]}{'…' if len(case_id) > 80 else ''}: its output path would be {longest} bytes "
                        f"long, near the {PATH_MAX}-byte limit of a path; choose an --output folder with a "
                        "shorter path")
    return paths
