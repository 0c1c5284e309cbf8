"""What a served model lets a client touch: the operator's limits, and paths kept inside the roots.

A client of a served model is not trusted. Everything it can make the server do is bounded by
:class:`ServeLimits` (set by the operator, never by a request), and in path mode every path it
names goes through :func:`resolve_inside`, which refuses anything outside the operator's root
with one message whether or not the file exists, so refusals are no existence oracle.

Both ``medseg serve`` and ``mlflow models serve`` of a medseg model use these names.

Environment variables (each optional; a command-line flag wins over its variable):

==================================  ======================  =====================================
variable                            default                 meaning
==================================  ======================  =====================================
``MEDSEG_SERVE_MAX_BODY_MB``        256                     request body (413 above)
``MEDSEG_SERVE_MAX_VOXELS``         134217728 (512³)        voxels of one scan, from its header
``MEDSEG_SERVE_MAX_DECOMPRESSED_MB`` 1024                   what a .gz or .zip upload may unpack to
``MEDSEG_SERVE_MAX_ZIP_MEMBERS``    4096                    files in a zipped DICOM series
``MEDSEG_SERVE_MAX_CONCURRENT``     0 (from memory)         predictions running at once
``MEDSEG_SERVE_QUEUE``              8                       requests waiting for a slot (429 above)
``MEDSEG_SERVE_TIMEOUT_S``          300                     one request's prediction (504 after)
``MEDSEG_SERVE_MAX_ROWS``           100000                  paths in one path-mode request
``MEDSEG_SERVE_WORK_DIR``           (system temp)/medseg-serve-<uid>  0700 folder for uploads
``MEDSEG_SERVE_INPUT_ROOT``         unset                   path mode: files requests may name
``MEDSEG_SERVE_OUTPUT_ROOT``        unset                   path mode: where request folders go
``MEDSEG_SERVE_DEVICE``             auto                    ``mlflow models serve`` only: the device
                                                            (``medseg serve`` takes ``--device``)
==================================  ======================  =====================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from medseg.errors import UsageError

#: Prefix of every environment variable :meth:`ServeLimits.from_env` reads.
ENV_PREFIX = "MEDSEG_SERVE_"
MIB = 1024 * 1024
#: Longest client path looked at; longer ones are refused unread (PATH_MAX on Linux).
MAX_CLIENT_PATH = 4096


class PathRefused(UsageError):
    """A client path that is not a readable file inside the operator's root (HTTP 403).

    The message is the same for a missing file, a folder, a link out of the root and a path
    outside it: it never says which, so a client cannot probe what exists on the server.
    """


@dataclass(frozen=True)
class ServeLimits:
    """The operator's bounds on what one client can make a served model do.

    Attributes:
        max_body_mb: request body size in MiB (413 above it; counted while reading, not trusted
            from ``Content-Length``).
        max_voxels: voxels of one scan (channels x spatial), checked from its header before the
            image is read.
        max_decompressed_mb: what a gzip or zip upload may unpack to, in MiB (gzip and zip bombs).
        max_zip_members: files in a zipped DICOM series.
        max_concurrent: predictions running at once; 0 sizes it from available memory and the
            model's per-image estimate.
        queue: requests that may wait for a free slot; one more is answered 429.
        timeout_s: seconds one request's prediction may take; the worker running it is then killed
            (the work really stops) and the client gets 504.
        max_rows: paths in one path-mode request.
        work_dir: the 0700 folder under which each request gets its private temporary folder;
            None: ``<system temp>/medseg-serve-<uid>``.
        input_root: path mode: the folder requests may name files in (None: no path mode).
        output_root: path mode: the folder each request's fresh output folder is made in.
    """

    max_body_mb: float = 256.0
    max_voxels: int = 512 ** 3
    max_decompressed_mb: float = 1024.0
    max_zip_members: int = 4096
    max_concurrent: int = 0
    queue: int = 8
    timeout_s: float = 300.0
    max_rows: int = 100_000
    work_dir: Path | None = None
    input_root: Path | None = None
    output_root: Path | None = None

    def __post_init__(self) -> None:
        positive = ("max_body_mb", "max_voxels", "max_decompressed_mb", "max_zip_members", "timeout_s", "max_rows")
        bad = [f"{name}={getattr(self, name)}" for name in positive if not getattr(self, name) > 0]
        bad += [f"{name}={getattr(self, name)}" for name in ("max_concurrent", "queue") if getattr(self, name) < 0]
        if bad:
            raise UsageError(f"serve limits {', '.join(bad)}: sizes, counts and the timeout must be positive "
                             "(max_concurrent 0 means 'from memory', queue 0 means 'no waiting')")
        if (self.input_root is None) != (self.output_root is None):
            raise UsageError("path mode needs both --input-root and --output-root (MEDSEG_SERVE_INPUT_ROOT and "
                             "MEDSEG_SERVE_OUTPUT_ROOT), or neither")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MIB)

    @property
    def max_decompressed_bytes(self) -> int:
        return int(self.max_decompressed_mb * MIB)

    @property
    def path_mode(self) -> bool:
        return self.input_root is not None and self.output_root is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> ServeLimits:
        """Limits from ``MEDSEG_SERVE_*`` variables (see the module docstring), then ``overrides``
        (the command line's flags; a None value leaves the variable's or the default).

        Raises:
            UsageError: a variable that is not a number of the right kind, or a bad combination.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for item in fields(cls):
            raw = environ.get(ENV_PREFIX + _env_name(item.name))
            if raw is not None and raw.strip() != "":
                values[item.name] = _parse(item.name, raw.strip())
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("work_dir", "input_root", "output_root"):
            if values.get(key) is not None:
                values[key] = Path(str(values[key]))
        return cls(**values)  # type: ignore[arg-type]


def _env_name(field_name: str) -> str:
    return {"timeout_s": "TIMEOUT_S"}.get(field_name, field_name.upper())


def _parse(name: str, raw: str) -> object:
    if name in ("work_dir", "input_root", "output_root"):
        return Path(raw)
    kind = int if name in ("max_voxels", "max_zip_members", "max_concurrent", "queue", "max_rows") else float
    try:
        return kind(raw)
    except ValueError:
        raise UsageError(f"${ENV_PREFIX}{_env_name(name)}={raw!r}: expected {'an integer' if kind is int else 'a number'}, "
                         f"e.g. {ENV_PREFIX}{_env_name(name)}={getattr(ServeLimits(), name)}") from None


def refusal(client_path: object) -> str:
    """The one message for every refused path (never says whether it exists)."""
    shown = repr(client_path)[:200]
    return (f"path {shown} refused: expected a file inside the server's input root, named relative to it; "
            "found none such that may be read (folders, links leading out of the root, '..' out of it and absolute "
            "paths elsewhere are refused alike); fix: name a file under the input root, e.g. 'case_001.nii.gz'")


def resolve_inside(root: Path, client_path: str) -> Path:
    """The file ``client_path`` names inside ``root``, with every symbolic link followed.

    Args:
        root: the operator's input root (an existing folder).
        client_path: what the client sent: relative to ``root`` (an absolute path is accepted only
            when it resolves inside ``root``).

    Returns:
        The resolved path of a regular file inside the resolved ``root``.

    Raises:
        PathRefused: not a string, empty, too long, a NUL byte, outside the root once links are
            followed, missing, or not a regular file; all with the same message.
    """
    if not isinstance(client_path, str) or not client_path or len(client_path) > MAX_CLIENT_PATH \
            or "\x00" in client_path:
        raise PathRefused(refusal(client_path))
    base = Path(root).resolve(strict=True)
    try:
        # Containment is decided on the fully resolved path before anything outside is looked at.
        target = (base / client_path).resolve(strict=False)
    except (OSError, RuntimeError, ValueError):  # a link loop, a name too long for the system
        raise PathRefused(refusal(client_path)) from None
    if not target.is_relative_to(base) or target == base:
        raise PathRefused(refusal(client_path))
    try:
        is_file = target.is_file()
    except (OSError, ValueError):
        is_file = False
    if not is_file:
        raise PathRefused(refusal(client_path))
    return target
