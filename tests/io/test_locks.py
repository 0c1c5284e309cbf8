"""Lock files opened without following links (filelock's CVE-2025-68146)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medseg.errors import RunError
from medseg.io.locks import open_lock_file, read_holder, write_holder


def test_a_link_planted_as_the_lock_is_refused_naming_it_and_its_target_is_untouched(tmp_path: Path) -> None:
    canary = tmp_path / "precious.txt"
    canary.write_text("keep me\n")
    lock = tmp_path / "shared" / ".x.lock"
    lock.parent.mkdir()
    lock.symlink_to(canary)
    with pytest.raises(RunError, match=rf"{lock}: the lock file of the folder is a symbolic link \(to {canary}\)"
                                       r".*Remove the link"):
        open_lock_file(lock, "the folder")
    assert canary.read_text() == "keep me\n"


def test_a_dangling_link_creates_nothing_at_its_target(tmp_path: Path) -> None:
    target = tmp_path / "would_be_created"
    lock = tmp_path / ".x.lock"
    lock.symlink_to(target)
    with pytest.raises(RunError, match="symbolic link"):
        open_lock_file(lock, "the folder")
    assert not target.exists()


def test_a_hard_link_or_a_fifo_is_refused(tmp_path: Path) -> None:
    canary = tmp_path / "precious.txt"
    canary.write_text("keep me\n")
    hard = tmp_path / ".hard.lock"
    os.link(canary, hard)
    with pytest.raises(RunError, match="2 names"):
        open_lock_file(hard, "the folder")
    fifo = tmp_path / ".fifo.lock"
    os.mkfifo(fifo)
    with pytest.raises(RunError, match="not a plain file"):
        open_lock_file(fifo, "the folder")  # and does not hang
    assert canary.read_text() == "keep me\n"


def test_a_plain_lock_is_created_private_and_its_content_kept_until_the_holder_writes(tmp_path: Path) -> None:
    lock = tmp_path / ".x.lock"
    fd = open_lock_file(lock, "the folder")
    try:
        assert oct(os.stat(lock).st_mode & 0o777) == oct(0o600 & ~_umask())
        write_holder(fd, "medseg predict (pid 1) and a long tail")
        write_holder(fd, "pid 2")
        assert read_holder(fd) == "pid 2"
    finally:
        os.close(fd)
    fd = open_lock_file(lock, "the folder")  # reopened: not truncated
    try:
        assert lock.read_text() == "pid 2"
    finally:
        os.close(fd)


def _umask() -> int:
    from medseg.io.atomic import current_umask

    return current_umask()
