"""medseg's own wheel, built from the running source, to bundle with each logged model.

A logged model that required ``medseg==<version>`` would make MLflow's environment managers ask
the package index for a name this project does not hold, and install whatever is published
under it. The model carries the wheel instead (``wheels/medseg-*.whl``, named by its relative
path in ``requirements.txt``), built once per medseg version and source content and kept in
a private cache folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from medseg._version import __version__
from medseg.io.atomic import atomic_path

log = logging.getLogger(__name__)

#: What the wheel is built from, relative to the source checkout (pyproject.toml's packages).
SOURCE_ITEMS = ("pyproject.toml", "README.md", "medseg", "pipelines")


def cache_root() -> Path:
    """medseg's cache (``$MEDSEG_CACHE_DIR``, else ``~/.cache/medseg``): exported graphs, built wheels."""
    return Path(os.environ.get("MEDSEG_CACHE_DIR") or Path.home() / ".cache" / "medseg")


def source_root() -> Path | None:
    """The checkout medseg runs from (a folder with medseg's ``pyproject.toml``), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "medseg"' in pyproject.read_text(encoding="utf-8", errors="replace"):
        return root
    return None


def source_digest(root: Path) -> str:
    """A sha256 over the names and bytes of every file the wheel is built from (caches excluded)."""
    sha = hashlib.sha256()
    for item in SOURCE_ITEMS:
        path = root / item
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            rel = file.relative_to(root).as_posix()
            if "__pycache__" in rel or rel.endswith((".pyc", ".pyo")) or ".egg-info/" in rel:
                continue
            sha.update(rel.encode() + b"\0")
            sha.update(file.read_bytes())
            sha.update(b"\0")
    return sha.hexdigest()


def private_folder(path: Path) -> Path:
    """``path`` created as a folder only this user may enter (0700), and refused if someone else owns it.

    Raises:
        PermissionError: the folder is a link, belongs to another user, or others may write to it
            and it cannot be made private.
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
        raise PermissionError(f"{path}: expected a folder of this user's; found a link or another user's folder. "
                              "Remove it, or set MEDSEG_CACHE_DIR to a folder of your own")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def medseg_wheel(cache: Path, scratch: Path) -> Path | None:
    """The wheel of the running medseg.

    From a source checkout it is built with ``pip wheel --no-deps`` into
    ``cache/<version>-<source digest>/`` the first time (offline: no index, no build isolation).
    From a ``pip install``, the installed files are packed back into a wheel in ``scratch``
    (nothing is written to the cache: an installed medseg writes only where it is told).

    Returns:
        The wheel, or None when neither works (the model is then logged without it, and names no
        medseg requirement at all).
    """
    root = source_root()
    if root is None:
        return repack_installed(scratch)
    folder = private_folder(cache / f"{__version__}-{source_digest(root)[:24]}")
    found = sorted(folder.glob("medseg-*.whl"))
    if found:
        return _snapshot(found[0], scratch)
    with tempfile.TemporaryDirectory(prefix="medseg-wheel-") as tmp:
        # a copy: setuptools' build/ folder in the checkout keeps files that were since deleted
        source = Path(tmp) / "src"
        source.mkdir()
        for item in SOURCE_ITEMS:
            path = root / item
            if path.is_dir():
                shutil.copytree(path, source / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
            elif path.is_file():
                shutil.copy2(path, source / item)
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                               "--wheel-dir", str(Path(tmp) / "out"), str(source)],
                              capture_output=True, text=True, timeout=600, check=False)
        built = sorted((Path(tmp) / "out").glob("medseg-*.whl"))
        if done.returncode != 0 or not built:
            log.warning("building medseg's wheel failed (pip exit %d): %s; the logged model bundles none",
                        done.returncode, (done.stderr or done.stdout)[-1500:])
            return None
        with atomic_path(folder / built[0].name) as target:
            shutil.copyfile(built[0], target)
    return _snapshot(folder / built[0].name, scratch)


def _snapshot(wheel: Path, scratch: Path) -> Path:
    """A private copy of the cached wheel: another process building the same wheel at the same moment
    replaces the cached file with bytes of its own (a wheel's zip holds build times), and a model must
    bundle exactly the bytes its manifest's hash was computed from."""
    copy = scratch / wheel.name
    shutil.copyfile(wheel, copy)
    return copy


#: Files pip adds to an installed distribution that are not part of the wheel it came from.
_INSTALLER_FILES = frozenset({"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"})


def _from_the_wheel(relative: str) -> bool:
    """Whether a RECORD entry of an installed medseg was in its wheel (not a script pip wrote
    outside site-packages, a compiled cache, or pip's own bookkeeping)."""
    parts = relative.split("/")
    if relative.startswith("..") or "__pycache__" in parts or relative.endswith((".pyc", ".pyo")):
        return False
    return not (len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] in _INSTALLER_FILES)


def repack_installed(scratch: Path, distribution: Any = None) -> Path | None:
    """The installed medseg packed back into ``scratch/medseg-<version>-<tag>.whl``.

    pip installs a wheel's files verbatim and lists them in RECORD, so the same files, with a
    fresh RECORD, are the wheel again; console scripts come back from ``entry_points.txt``.
    Returns None (with a warning) when the installation lists no files or misses one.
    """
    import base64
    import zipfile
    from importlib import metadata

    dist = distribution or metadata.distribution("medseg")
    entries = [str(f).replace("\\", "/") for f in (dist.files or []) if _from_the_wheel(str(f).replace("\\", "/"))]
    info = next((e.split("/")[0] for e in entries if e.split("/")[0].endswith(".dist-info")), None)
    if info is None or not entries:
        log.warning("the installed medseg lists no files (no RECORD): the logged model bundles no medseg wheel; "
                    "install medseg where it is served")
        return None
    site = Path(str(dist.locate_file("")))
    tag = next((line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
                if line.startswith("Tag:")), "py3-none-any")
    target = scratch / f"medseg-{dist.version}-{tag}.whl"
    record = []
    try:
        with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for entry in sorted(entries):
                data = (site / entry).read_bytes()
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                archive.writestr(entry, data)
                record.append(f"{entry},sha256={digest},{len(data)}")
            record.append(f"{info}/RECORD,,")
            archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    except OSError as err:
        log.warning("packing the installed medseg into a wheel failed (%s): the logged model bundles none; "
                    "install medseg where it is served", err)
        return None
    return target
