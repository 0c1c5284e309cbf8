"""Scans named by URI in a table of cases: ``file:///data/scan.nii.gz`` is the local path it names;
any other scheme fsspec knows (``s3://``, ``gs://``, ``az://``, ``memory://``...) is fetched to a
local temporary file when the case is read (by the worker that reads it, on Ray), because the image
readers (nibabel, ITK, pydicom) read local files.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from urllib.parse import unquote, urlparse

from medseg.errors import CaseError, UsageError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
#: The fsspec package that reads each common scheme, for the message when it is missing.
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "abfss": "adlfs", "http": "aiohttp", "https": "aiohttp"}


def uri_scheme(text: str) -> str | None:
    """The scheme of ``text`` if it is a URI (``s3://...``), else None (a path)."""
    match = _SCHEME.match(text)
    return match.group(1).lower() if match else None


def file_uri_path(uri: str, where: str) -> Path:
    """The local path a ``file://`` URI names.

    Raises:
        UsageError: the URI names another host, naming it and the fix.
    """
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise UsageError(f"{where}: {uri}: a file:// URI names a file on this machine (file:///path), not on host "
                         f"{parsed.netloc!r}; use file:///{parsed.netloc}{parsed.path} if that is a local folder, or "
                         "a path on a file system every worker mounts")
    return Path(unquote(parsed.path))


def check_uri(uri: str, where: str, use: str = "reading") -> None:
    """Refuse a URI no installed fsspec file system reads (or, ``use="writing"``, writes), before any
    case runs.

    Raises:
        UsageError: names the URI, what was expected and the package to install (or the fix).
    """
    scheme = uri_scheme(uri) or ""
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
    except ImportError as err:
        package = BACKENDS.get(scheme, f"the fsspec package for {scheme}://")
        instead = "local paths" if use == "reading" else "a local folder"
        raise UsageError(f"{where}: {uri}: {use} {scheme}:// URIs needs {package} ({err}); install it "
                         f"(pip install {package.split()[0] if scheme in BACKENDS else 'fsspec[full]'}) on the "
                         f"driver and every worker, or give {instead}") from None
    except ValueError:
        fix = "fix the table's row" if use == "reading" else f"fix {where}"
        raise UsageError(f"{where}: {uri}: unknown URI scheme {scheme!r}; expected a path, a file:// URI or a "
                         f"scheme fsspec reads (s3://, gs://, az://, memory://...); {fix}") from None


def uri_name(uri: str) -> str:
    """The file name a URI ends with (``s3://b/x/ct.nii.gz`` -> ``ct.nii.gz``)."""
    return unquote(urlparse(uri).path.rstrip("/").rsplit("/", 1)[-1]) or "case"


@contextmanager
def fetched(uri: str) -> Iterator[Path]:
    """A local copy of the object at ``uri`` (same file name, so its format is recognised), removed on exit.

    Raises:
        CaseError: the object cannot be fetched: names the URI, what is wrong and the fix.
    """
    import fsspec

    with TemporaryDirectory(prefix="medseg-fetch-") as folder:
        local = Path(folder) / uri_name(uri)
        try:
            with fsspec.open(uri, "rb") as source, open(local, "wb") as target:
                shutil.copyfileobj(source, target, 16 << 20)
        except FileNotFoundError:
            raise CaseError(f"{uri}: no such object; expected a scan at that URI: check the bucket, key and "
                            "endpoint, or the table's row") from None
        except PermissionError as err:
            raise CaseError(f"{uri}: access denied ({err}); give this worker credentials that can read it "
                            "(AWS_PROFILE, AWS_ACCESS_KEY_ID..., or the cluster's role)") from None
        except (OSError, ValueError) as err:
            raise CaseError(f"{uri}: could not be fetched ({type(err).__name__}: {err}); check the URI and the "
                            "storage's endpoint and credentials") from None
        yield local


def local_folder(text: str | Path, flag: str) -> Path:
    """A folder argument as a path: a path as it is, a ``file://`` URI as the path it names.

    Raises:
        UsageError: another URI scheme: predict searches its ``--input`` folder on a file system (every
            worker's, on Ray); an ``--output`` URI is :func:`medseg.io.remote_folder.remote_folder`'s.
    """
    scheme = uri_scheme(str(text))
    if scheme is None:
        return Path(text)
    if scheme == "file":
        return file_uri_path(str(text), flag)
    raise UsageError(f"{flag} {text}: expected a folder or file on a file system every worker mounts (its scans are "
                     f"searched there); got a {scheme}:// URI. List scans named by URI in a table (--input cases.csv "
                     "with a 'path' column, one URI per row), or mount the bucket (s3fs-fuse, gcsfuse, a CSI driver "
                     "on Kubernetes) and give its path")
