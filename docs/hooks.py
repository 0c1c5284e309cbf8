"""mkdocs hooks (``hooks:`` in mkdocs.yml).

- The reference pages (``reference/cli.md``, ``config.md``, ``api.md``) are written from the code on
  every build by ``docs/gen_reference.py``, in a fresh process so that ``mkdocs serve`` picks up code
  changes. They exist only in the build, never in ``docs/``, so they cannot go stale.
- Every ``benchmarks/results/*.md`` must be included by a page under ``docs/results/``: a results
  file that no page shows is a warning, which ``mkdocs build --strict`` turns into a failure.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
RESULTS = REPO / "benchmarks" / "results"
GENERATOR = DOCS / "gen_reference.py"
GENERATED = ("reference/cli.md", "reference/config.md", "reference/api.md")

log = logging.getLogger("mkdocs.hooks.medseg")  # under "mkdocs", so --strict counts its warnings

_INCLUDE = re.compile(r'--8<--\s+"(benchmarks/results/[^":]+\.md)')


def on_files(files: Files, config: Any) -> Files:
    with tempfile.TemporaryDirectory(prefix="medseg-docs-") as tmp:
        done = subprocess.run([sys.executable, str(GENERATOR), tmp], cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise PluginError(f"{GENERATOR.relative_to(REPO)} failed (is medseg installed in {sys.executable}?):\n"
                              f"{done.stderr.strip()}")
        for uri in GENERATED:
            stale = files.get_file_from_path(uri)
            if stale is not None:  # a copy written into docs/ by hand: the build's own wins
                files.remove(stale)
            content = (Path(tmp) / uri).read_text(encoding="utf-8")
            files.append(File.generated(config, uri, content=content))
    _check_results_pages(files)
    return files


def _check_results_pages(files: Files) -> None:
    """Warn about each results file that no ``docs/results/`` page includes."""
    included = set()
    for file in files.documentation_pages():
        if file.src_uri.startswith("results/") and file.abs_src_path:
            included.update(_INCLUDE.findall(Path(file.abs_src_path).read_text(encoding="utf-8")))
    for path in sorted(RESULTS.glob("*.md")):
        rel = path.relative_to(REPO).as_posix()
        if rel not in included:
            log.warning(f"{rel} is on no page: add docs/results/{path.stem}.md with the line "
                        f'--8<-- "{rel}" (as docs/results/plan.md does) and list it under Results in mkdocs.yml')
