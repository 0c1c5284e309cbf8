"""Atomic writes: a temp file in the destination folder, then ``os.replace``.

An interrupted write therefore never leaves a half-written output under the final name.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    Args:
        path: final destination.
        suffix: suffix of the temp file (writers that sniff the format by name need it,
            e.g. ``.nii.gz``); defaults to the destination's format suffix (:func:`format_suffix`).
        durable: also flush the file and the rename to disk (``fsync``), so the new content
            survives a power cut or a crashed machine, not only a killed process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else format_suffix(path.name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); outputs should get the usual umask-based mode.
        os.chmod(tmp, 0o666 & ~current_umask())
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            try:
                _fsync(path.parent)  # makes the rename itself durable
            except OSError:  # some filesystems (and Windows) cannot fsync a folder; the data are safe
                pass
    finally:
        if tmp.exists():
            tmp.unlink()


#: Suffixes that say a file is compressed: the format is named by the suffix before them.
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
#: Characters :func:`atomic_path` adds to a destination's name for its temporary file, besides the
#: format suffix: the leading dot, the dot and 8 random characters of ``mkstemp``, and ``.tmp``.
TEMP_NAME_EXTRA = 1 + 1 + 8 + len(".tmp")


def format_suffix(name: str) -> str:
    """The suffix that names a file's format: ``.nii.gz``, ``.dcm``, ``.json`` (not every dotted part
    of ``sub.01.scan.nii.gz``: the temporary file's name must stay short)."""
    suffixes = Path(name).suffixes
    if not suffixes:
        return ""
    if suffixes[-1].lower() in _COMPRESSED and len(suffixes) > 1:
        return "".join(suffixes[-2:])
    return suffixes[-1]


def temp_name_bytes(name: str, suffix: str | None = None) -> int:
    """How long (in bytes) the name of :func:`atomic_path`'s temporary file for ``name`` is."""
    return len(name.encode()) + TEMP_NAME_EXTRA + len((format_suffix(name) if suffix is None else suffix).encode())


#: What :func:`atomic_path` names its temporary files: ``.<name>.<random>.tmp<suffix>``.
TEMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]+\.tmp.*")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writes killed before their rename left under ``folder``.

    Only for a folder no other process is writing into (a run directory being resumed): a live
    writer's temporary file looks the same.
    """
    removed = []
    for path in sorted(Path(folder).rglob(".*.tmp*")):
        if TEMP_NAME.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def current_umask() -> int:
    """This process's umask, read without changing it.

    ``os.umask`` can only be read by setting it; doing that while writing would give files other
    threads create at that moment mode 0666. Linux reports it in ``/proc/self/status``; elsewhere
    it is read once, at import, when no other thread of medseg's is writing yet.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _UMASK_AT_IMPORT


def _read_umask_once() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK_AT_IMPORT = _read_umask_once()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text atomically (UTF-8, whatever the locale says) and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_with(path: str | Path, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)
