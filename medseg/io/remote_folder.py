"""An output folder at an fsspec URI (``s3://bucket/prefix``, ``gs://...``, ``az://...``, ``memory://...``).

Writers (nibabel, ITK, highdicom) write local files, so an output is written to a local staging
file first and then put whole at its destination: on an object store (S3, GCS, Azure) an object
appears only when its upload completes, so one put is atomic; on any other file system (SFTP,
HDFS, fsspec's memory file system) the put goes to a hidden temporary name beside the destination
and is then renamed onto it, as :mod:`medseg.io.atomic` does on a local disk. Either way a reader
sees a file whole or not at all, which is what tells a rerun that a case is finished.
"""

from __future__ import annotations

import secrets
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import UsageError
from medseg.io.atomic import atomic_path
from medseg.io.uris import check_uri, uri_scheme

#: Schemes of object stores: an object appears whole when its upload completes (and a rename
#: would be a second, non-atomic copy), so an output is put under its final name at once.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})


@dataclass(frozen=True)
class RemoteFolder:
    """A folder at ``uri`` on an fsspec file system, written one whole file at a time.

    Attributes:
        uri: the folder's URI as the user gave it, without a trailing slash (report rows name
            ``<uri>/<file name>``).
        fs: the fsspec file system (credentials from the environment, as fsspec reads them).
        root: the folder's path on ``fs``.
    """

    uri: str
    fs: Any
    root: str

    @classmethod
    def open(cls, uri: str, flag: str = "--output") -> RemoteFolder:
        """The folder at ``uri``.

        Raises:
            UsageError: no installed fsspec file system writes that scheme (naming the package to
                install), or the URI is not one.
        """
        import fsspec

        check_uri(uri, flag, use="writing")
        uri = uri.rstrip("/")
        try:
            fs, root = fsspec.core.url_to_fs(uri)
        except (ValueError, TypeError) as err:
            raise UsageError(f"{flag} {uri}: not a folder URI fsspec can open ({type(err).__name__}: {err}); "
                             "expected e.g. s3://bucket/prefix or gs://bucket/prefix") from None
        return cls(uri, fs, str(root).rstrip("/"))

    @property
    def object_store(self) -> bool:
        return (uri_scheme(self.uri) or "") in OBJECT_STORES

    def uri_of(self, name: str) -> str:
        """The URI of the file ``name`` (a path relative to the folder, ``/``-separated)."""
        return f"{self.uri}/{name}"

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(f"{self.root}/{name}"))

    def put(self, local: Path, name: str) -> str:
        """Put the local file ``local`` at ``name``, whole or not at all; returns its URI.

        Raises:
            OSError (or the file system's own error): the upload failed; nothing is left under ``name``.
        """
        target = f"{self.root}/{name}"
        if self.object_store:
            self.fs.put_file(str(local), target)
            return self.uri_of(name)
        parent, _, base = target.rpartition("/")
        # the same hidden temporary name as a local atomic write (.<name>.<random>.tmp), so the
        # sweep of a killed batch's temporaries finds it
        temp = f"{parent}/.{base}.{secrets.token_hex(4)}.tmp"
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.put_file(str(local), temp)
        try:
            self.fs.mv(temp, target)
        except BaseException:
            with suppress(Exception):  # the rename's error is the one to report
                self.fs.rm(temp)
            raise
        return self.uri_of(name)

    def fetch(self, name: str, local: Path) -> bool:
        """Copy ``name`` to the local file ``local`` (written atomically); False when it does not exist."""
        try:
            with atomic_path(local) as temp:
                self.fs.get_file(f"{self.root}/{name}", str(temp))
        except FileNotFoundError:
            return False
        return True

    def remove_temporaries(self, names: set[str] | None = None) -> None:
        """Remove the temporaries of puts that a killed batch left for the files ``names`` (None: every
        file's; none on an object store, whose puts have none). Only for files no live batch is putting."""
        if self.object_store or not self.fs.exists(self.root):
            return
        for path in self.fs.glob(f"{self.root}/.*.tmp"):
            base = str(path).rsplit("/", 1)[-1]
            if names is None or base[1:].rsplit(".", 2)[0] in names:
                self.fs.rm(path)


def remote_folder(text: str | Path, flag: str = "--output") -> RemoteFolder | None:
    """The :class:`RemoteFolder` that ``text`` names, or None for a path or a ``file://`` URI (a local
    folder, written as it always was).

    Raises:
        UsageError: see :meth:`RemoteFolder.open`.
    """
    scheme = uri_scheme(str(text))
    if scheme is None or scheme == "file":
        return None
    return RemoteFolder.open(str(text), flag)
