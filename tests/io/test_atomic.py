"""Atomic writes: a failed write must never clobber the previous output or leave litter behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.io.atomic import atomic_path, atomic_write_text, atomic_write_with


class WriterCrashed(RuntimeError):
    """Stands in for a writer dying half-way (disk full, bug, Ctrl-C)."""


def test_atomic_write_text_writes_content(tmp_path: Path) -> None:
    """The folder is created on demand and only the final file is left in it."""
    path = tmp_path / "nested" / "report.json"
    assert atomic_write_text(path, '{"dice": 0.9}\n') == path
    assert path.read_text() == '{"dice": 0.9}\n'
    assert list(path.parent.iterdir()) == [path]

    atomic_write_text(path, "replaced\n")
    assert path.read_text() == "replaced\n"
    assert list(path.parent.iterdir()) == [path]


def test_temp_file_sits_beside_destination_with_its_suffix(tmp_path: Path) -> None:
    """Same folder keeps ``os.replace`` atomic (one filesystem); the suffix lets writers sniff the format."""
    destination = tmp_path / "case.nii.gz"
    with atomic_path(destination) as tmp:
        assert tmp.parent == destination.parent
        assert tmp.name.endswith(".nii.gz")
        assert tmp != destination
        tmp.write_bytes(b"payload")
    assert destination.read_bytes() == b"payload"


def test_failure_inside_atomic_path_keeps_old_content_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    path.write_text("previous good output\n")

    with pytest.raises(WriterCrashed, match="half-way"):
        with atomic_path(path) as tmp:
            tmp.write_text("partial")
            raise WriterCrashed("died half-way")

    assert path.read_text() == "previous good output\n"
    assert list(tmp_path.iterdir()) == [path], "temp file left behind"


def test_failure_inside_atomic_write_with_keeps_old_content_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "labels.nii.gz"
    path.write_bytes(b"previous")

    def writer(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise WriterCrashed("died half-way")

    with pytest.raises(WriterCrashed, match="half-way"):
        atomic_write_with(path, writer)

    assert path.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [path], "temp file left behind"


def test_outputs_get_the_umask_mode_not_mkstemps_private_one(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "shared.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_atomic_writes_never_change_the_process_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting the umask to read it would give files other threads create meanwhile mode 0666."""
    import os

    from medseg.io import atomic

    expected = atomic.current_umask()

    def forbidden(mask: int) -> int:
        raise AssertionError(f"os.umask({mask:o}) called while writing")

    monkeypatch.setattr(os, "umask", forbidden)
    path = atomic.atomic_write_text(tmp_path / "out.txt", "x")
    assert (path.stat().st_mode & 0o777) == 0o666 & ~expected
