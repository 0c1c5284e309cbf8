"""Every exception medseg raises on purpose, in one place.

The CLI prints their message (which names the file or key, the problem and the fix) instead of a
traceback; :class:`UsageError` and its subclasses exit 2 ("bad usage"), the rest exit 1.
"""

from __future__ import annotations

import gzip
import zlib
from typing import Any


class MedsegError(Exception):
    """Base class for problems with the user's input, data or environment."""


class UsageError(MedsegError, ValueError):
    """A config, argument or manifest that cannot be used as given (CLI exit code 2)."""


class ConfigError(UsageError):
    """A config file or override that cannot be turned into a valid run config."""


class UnknownTaskError(UsageError):
    """A task name nobody registered; the message lists the known ones."""


class ManifestError(UsageError):
    """A manifest that cannot be read or built; the message names the file and the fix."""


class ModelError(UsageError):
    """Unknown model name or an impossible architecture for the input size."""


class PredictOptionError(UsageError):
    """A prediction option the model's task does not use (``--keep-largest`` for a classifier)."""


class ModelLoadError(MedsegError, RuntimeError):
    """A model that was found but could not be loaded (corrupt file, out of memory): not bad usage."""


class RunError(MedsegError, RuntimeError):
    """The run cannot start (bad data root, nothing to resume, ...)."""


class CaseError(MedsegError):
    """This case cannot be predicted; the message names the file and the problem."""


class VolumeReadError(MedsegError, RuntimeError):
    """A file or folder that cannot be read as an image volume; the message names it and the fix."""


class ImageValueError(MedsegError, ValueError):
    """An image that was read but cannot be used: NaN/Inf voxels, or one value everywhere."""


class DistributedRunError(MedsegError):
    """A worker of a distributed run failed; the message says which and where to look."""


class DataVerificationError(MedsegError, RuntimeError):
    """Verification found errors; the run stops before any training.

    Attributes:
        report: the :class:`~medseg.data.verify.VerifyReport` with every finding.
        report_path: where it was written, if it was.
    """

    def __init__(self, report: Any, report_path: Any = None):
        self.report = report
        self.report_path = report_path
        where = f" Full report: {report_path}" if report_path else ""
        shown = "\n".join(str(f) for f in report.errors[:10])
        more = f"\n... and {len(report.errors) - 10} more" if len(report.errors) > 10 else ""
        super().__init__(f"Data verification failed with {len(report.errors)} error(s).{where}\n{shown}{more}")


def root_cause(err: BaseException) -> BaseException:
    """The innermost explicit cause: MONAI wraps a reader's error in layers of "applying
    transform <LoadImaged object at 0x...>", which say nothing about the file."""
    seen = {id(err)}
    while err.__cause__ is not None and id(err.__cause__) not in seen:
        err = err.__cause__
        seen.add(id(err))
    return err


def medseg_cause(err: BaseException) -> MedsegError | None:
    """The medseg error behind ``err`` (itself, or the root cause), if there is one."""
    if isinstance(err, MedsegError):
        return err
    cause = root_cause(err)
    return cause if isinstance(cause, MedsegError) else None


def cause_text(err: BaseException) -> str:
    """One line saying what went wrong at the root of ``err``, for messages that name the file."""
    cause = root_cause(err)
    if isinstance(cause, (zlib.error, gzip.BadGzipFile, EOFError)):
        return f"its compressed data are damaged or cut short ({type(cause).__name__}: {cause})"
    if isinstance(cause, MemoryError):
        return "it needs more memory than this machine has (MemoryError)"
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1][:300] if lines else ''}"
