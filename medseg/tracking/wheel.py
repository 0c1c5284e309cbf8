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


def medseg_wheel(cache: Path) -> Path | None:
    """The wheel of the running medseg source, built with ``pip wheel --no-deps`` into
    ``cache/<version>-<source digest>/`` the first time (offline: no index, no build isolation).

    Returns:
        The wheel, or None when medseg does not run from a source checkout or the build fails (the
        model is then logged without it, and names no medseg requirement at all).
    """
    root = source_root()
    if root is None:
        log.warning("medseg is not running from a source checkout: the logged model bundles no medseg wheel; "
                    "install medseg where it is served")
        return None
    folder = private_folder(cache / f"{__version__}-{source_digest(root)[:24]}")
    found = sorted(folder.glob("medseg-*.whl"))
    if found:
        return found[0]
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
    return folder / built[0].name
