"""Lock files opened so that a link planted in their place cannot redirect them.

A lock file lives in a folder that others may write to (a shared output folder, the folder of
an MLflow store). Opened the ordinary way (``open(path, "a+")``, then truncated), a symbolic
link planted under its name makes the opener empty and overwrite the link's target: filelock's
CVE-2025-68146. Here the file is opened with ``O_NOFOLLOW`` (a link is refused, whatever it
points to), never with ``O_TRUNC``, and it must be a plain file with one name: a FIFO, a
device or a hard link to another file is refused too.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from medseg.errors import RunError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # absent on Windows, where planting links needs privileges
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO planted under the name must not hang the open


def open_lock_file(path: Path, what: str) -> int:
    """Open (creating it, mode 0600) the lock file ``path`` for reading and writing; its content is kept.

    Args:
        path: the lock file.
        what: what the lock guards, for messages ("the output folder /data/out").

    Returns:
        The file descriptor; the caller closes it.

    Raises:
        RunError: ``path`` is a symbolic link, or not a plain file with one name; the message names
            it, says what it found and how to fix it.
        OSError: the file cannot be opened or created for another reason (permissions, a missing folder).
    """
    flags = os.O_RDWR | os.O_CREAT | _NOFOLLOW | _NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EMLINK) and path.is_symlink():
            raise RunError(_link_message(path, what)) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            found = (f"a file with {info.st_nlink} names (a hard link)" if stat.S_ISREG(info.st_mode)
                     else "not a plain file (a FIFO, socket or device)")
            raise RunError(f"{path}: the lock file of {what} is {found}. Expected a plain file that only medseg "
                           f"creates, or none. Remove it (`rm {path}`) and run again; if others can write into "
                           f"{path.parent}, use a folder only you can write to.")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _link_message(path: Path, what: str) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return (f"{path}: the lock file of {what} is a symbolic link (to {target}). Expected a plain file that only "
            f"medseg creates, or none; a link could make medseg write into {target}, so it is not followed. "
            f"Remove the link (`rm {path}`) and run again; if others can write into {path.parent}, use a folder "
            "only you can write to.")


def write_holder(fd: int, text: str) -> None:
    """Replace the lock file's content by ``text`` (who holds it), once the lock is held."""
    data = text.encode("utf-8")
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def read_holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it ("" if nothing readable)."""
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
    except OSError:
        return ""
