"""Several processes on one SQLite MLflow store: who creates it, and how writers share it.

MLflow creates and migrates a store's schema the first time a process opens it, with no lock: two
``medseg run`` started together on a fresh ``runs/mlflow.db`` both run the migrations and one dies
(``duplicate column name: step``). :func:`store_lock` serialises that first open across processes,
and :func:`use_wal` lets readers and writers of a live store proceed side by side. Writers that meet
another writer's transaction wait (MLflow sets a 20 s busy timeout on every session); a store that
stays locked longer than that is more than SQLite is made for, hence :func:`store_error_message`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from medseg.errors import RunError, UsageError
from medseg.io.locks import open_lock_file

try:
    import fcntl
except ImportError:  # Windows: no flock; a store opened by one process at a time still works
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"
LOCK_WAIT_S = 120.0  # a fresh store's migrations take seconds; minutes means a stopped process holds it


def server_hint(db: Path) -> str:
    return (f"for many processes writing at once, serve the store instead: `mlflow server --backend-store-uri "
            f"sqlite:///{db.resolve()} --host 127.0.0.1 --port 5000`, then run with "
            f"--set tracking.uri=http://127.0.0.1:5000")


def require_existing_store(tracking_uri: str, what: str) -> None:
    """Before a read from a SQLite store (a ``runs:/`` or ``models:/`` model, a parent run's
    children): MLflow opening a store that is not there creates an empty one (a read writing files)
    and then calls the model missing. Say where it looked instead; other stores are not checked.

    Args:
        tracking_uri: the store the read goes to.
        what: what is being read, for the message (``--model runs:/<id>/model``).

    Raises:
        UsageError: the store's file does not exist (its absolute path named, with the fix).
    """
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return
    database = Path(tracking_uri[len(SQLITE_PREFIX):])
    if database.is_file() or str(database) in ("", ":memory:"):
        return
    raise UsageError(
        f"{what}: the MLflow store is not there, and reading it would create an empty one. Expected: an existing "
        f"SQLite store at {tracking_uri}. Got: no file at {database.resolve()}"
        + ("" if database.is_absolute() else f" (a relative sqlite:/// path starts at the current folder, {Path.cwd()})")
        + ". Fix: pass --tracking-uri sqlite:////<absolute path>/mlflow.db (the tracking_uri in the run's "
        "summary.json) or set $MLFLOW_TRACKING_URI to it, or give the run folder (runs/<name>/<time>) as --model")


def store_error_message(db: Path, err: BaseException) -> str:
    """One clear line for an error from the store, instead of SQLAlchemy's traceback."""
    text = str(err).strip()
    first = text.splitlines()[0][:400] if text else type(err).__name__
    if "database is locked" in text:
        return f"the MLflow store {db} stayed locked by other processes for too long ({first}); {server_hint(db)}"
    return f"cannot use the MLflow store {db}: {first}"


@contextmanager
def store_lock(db: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<db>.lock`` (beside the database; the file stays) across processes.

    flock, not a lock inside SQLite: the race is MLflow's schema migration, which runs in several
    transactions of its own. Closing the file releases the lock, and the kernel closes it if its
    holder dies, so a crash leaves nothing stale. Where there is no flock at all, the store opens
    unlocked, as it did before. The lock file is opened without following links and never truncated
    (:mod:`medseg.io.locks`): a link planted beside a shared store cannot redirect it.

    Raises:
        RunError: the lock file is a link (or not a plain file), or another process holds it for
            longer than :data:`LOCK_WAIT_S`.
    """
    lock_path = db.with_name(db.name + ".lock")
    try:
        fd: int | None = open_lock_file(lock_path, f"the MLflow store {db}")
    except OSError as err:
        log.warning("cannot create %s (%s); opening the MLflow store unlocked", lock_path, err)
        fd = None
    if fd is None:
        yield
        return
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RunError(f"another process has held {lock_path} for {LOCK_WAIT_S:.0f} s while opening "
                                   f"the MLflow store {db} (a stopped `medseg run`?); end it, or "
                                   f"{server_hint(db)}") from None
                time.sleep(0.1)
            except OSError as err:  # a filesystem without flock (Lustre mounted without -o flock, ...)
                log.warning("cannot lock %s (%s); opening the MLflow store unlocked", lock_path, err)
                break
        yield
    finally:
        os.close(fd)


# Filesystems where SQLite's WAL is unsafe: its index is shared memory, which two machines do not share.
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
                       "afs", "9p", "fuse"}


def filesystem_type(path: Path, mounts: str | None = None) -> str:
    """Type of the filesystem holding ``path`` (``fuse.sshfs`` -> ``fuse``), from the Linux mount
    table; ``""`` where there is none to read."""
    try:
        mounts = Path("/proc/self/mounts").read_text() if mounts is None else mounts
    except OSError:
        return ""
    target, best, kind = str(path.resolve()), "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fields[2].split(".")[0]
    return kind


def use_wal(db: Path) -> None:
    """Switch the database to write-ahead logging, where readers (the MLflow UI, another run's
    queries) never block a writer and a writer never blocks them. The mode is stored in the file, so
    this is a no-op after the first time. Local disks only: on a network filesystem processes on
    other machines may share the file, which WAL does not allow. Best effort: where it cannot be set,
    SQLite's default journal still works, only with more waiting."""
    if filesystem_type(db.parent) in NETWORK_FILESYSTEMS:
        log.debug("%s is on a network filesystem: keeping SQLite's default journal", db)
        return
    try:
        with closing(sqlite3.connect(db, timeout=10)) as con:
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            log.debug("%s stays in journal mode %s", db, mode)
    except sqlite3.Error as err:
        log.debug("could not switch %s to WAL: %s", db, err)
