"""A fresh MLflow SQLite store for each test, made by copying one instead of migrating each.

MLflow builds a new SQLite store by running its alembic migrations one by one: 3-10 s on this
2-core host, against 0.15 s to open an existing store, and the suite makes well over a hundred
fresh stores (a tmp_path each). Here the first new store of a run is built by MLflow itself and
kept as a template (one file per MLflow version, shared by every xdist worker and child process);
every later new store gets the template's pages through SQLite's backup API, which leaves the same
database MLflow's migrations would. Installed in the test process by tests/conftest.py and in the
test's child processes (CLI runs, torchrun workers, servers) by tests/site/sitecustomize.py, which
conftest puts on their PYTHONPATH. Tests of MLflow's own store creation opt out (conftest).
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

#: Folder of the template; empty disables the copy (a test of MLflow's own store creation).
TEMPLATE_DIR_ENV = "MEDSEG_TEST_MLFLOW_TEMPLATE_DIR"


def _template(original: Any) -> Path:
    import mlflow
    import sqlalchemy

    folder = Path(os.environ[TEMPLATE_DIR_ENV])
    path = folder / f"mlflow-{mlflow.__version__}.db"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        fd, scratch = tempfile.mkstemp(suffix=".db", dir=folder)
        os.close(fd)
        engine = sqlalchemy.create_engine(f"sqlite:///{scratch}")
        original(engine)
        engine.dispose()
        os.replace(scratch, path)  # atomic: a concurrent builder's copy is just as good
    return path


def install() -> None:
    """Wrap MLflow's table initialisation (idempotent)."""
    import mlflow.store.db.utils as utils

    original = utils._initialize_tables
    if getattr(original, "medseg_template", False):
        return

    def initialize_tables(engine: Any) -> None:
        database = engine.url.database
        if not os.environ.get(TEMPLATE_DIR_ENV) or engine.url.get_backend_name() != "sqlite" or \
                database in (None, "", ":memory:"):
            original(engine)
            return
        source = sqlite3.connect(_template(original))
        raw = engine.raw_connection()
        try:
            source.backup(raw.driver_connection)
        finally:
            raw.close()
            source.close()

    initialize_tables.medseg_template = True  # type: ignore[attr-defined]
    utils._initialize_tables = initialize_tables


class _InstallAfterImport:
    """A meta-path finder that wraps ``mlflow.store.db.utils`` once it is imported, so a child process
    that never uses MLflow never imports it."""

    target = "mlflow.store.db.utils"

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.target:
            return None
        sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec(name)
        if spec is not None and spec.loader is not None:
            loader, execute = spec.loader, spec.loader.exec_module

            def exec_module(module: Any) -> None:
                execute(module)
                install()

            loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install_after_import() -> None:
    if os.environ.get(TEMPLATE_DIR_ENV) and "mlflow.store.db.utils" not in sys.modules:
        sys.meta_path.insert(0, _InstallAfterImport())
    elif os.environ.get(TEMPLATE_DIR_ENV):
        install()
