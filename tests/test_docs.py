"""The documentation site (issue #28) builds with ``mkdocs build --strict``: no broken link or
anchor, no page missing from the navigation, every ``benchmarks/results/*.md`` on a page (docs/hooks.py
warns otherwise), and the reference pages generated from the code cover every command and config key."""

from __future__ import annotations

import argparse
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import medseg
from medseg.cli import build_parser
from medseg.tasks.classification.config import ClassificationConfig
from medseg.tasks.reconstruction.config import ReconstructionConfig
from medseg.tasks.regression.config import RegressionConfig
from medseg.tasks.segmentation.config import SegmentationConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The site built once for this module, and what went wrong ("" when nothing did)."""
    out = tmp_path_factory.mktemp("docs") / "site"
    mkdocs = Path(sys.executable).with_name("mkdocs")
    if not mkdocs.is_file():
        return out, (f"mkdocs is not installed beside {sys.executable}; "
                     "install the dev extras: pip install -e '.[dev]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about MkDocs 2.0
    done = subprocess.run([str(mkdocs), "build", "--strict", "-d", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    problem = "" if done.returncode == 0 else f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out, problem


def _built(build: tuple[Path, str]) -> Path:
    """The site folder; a missing mkdocs or a failed build fails the test calling this (not a setup error)."""
    out, problem = build
    if problem:
        pytest.fail(problem)
    return out


def _page(site: Path, name: str) -> str:
    return html.unescape((site / name / "index.html").read_text(encoding="utf-8"))


def _commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every command parser below ``parser``, nested ones (``medseg model check``) included."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += [child, *_commands(child)]
    return found


def test_cli_reference_has_every_command(build: tuple[Path, str]) -> None:
    site = _built(build)
    page = _page(site, "reference/cli")
    commands = _commands(build_parser())
    assert len(commands) >= 14
    for command in commands:
        assert f"{command.prog} {{" not in page  # the heading's id was consumed by attr_list
        assert command.prog in page, f"{command.prog} is not on the CLI reference page"
        for action in command._actions:  # every option, as --help prints it
            for flag in action.option_strings:
                assert flag in page, f"{command.prog} {flag} is not on the CLI reference page"


def test_config_reference_has_every_key(build: tuple[Path, str]) -> None:
    site = _built(build)
    page = _page(site, "reference/config")
    assert "train.max_minutes" in page
    for config_cls in (SegmentationConfig, ClassificationConfig, ReconstructionConfig, RegressionConfig):
        for section, field in config_cls.model_fields.items():
            assert section in page
            sub = getattr(field.annotation, "model_fields", {})
            for key in sub:
                assert f"{section}.{key}" in page, f"{section}.{key} is not on the config reference page"


def test_api_reference_has_every_public_name(build: tuple[Path, str]) -> None:
    site = _built(build)
    page = _page(site, "reference/api")
    for name in medseg.__all__:
        if name != "__version__":
            assert f"medseg.{name}" in page


def test_every_results_file_is_included_on_a_page(build: tuple[Path, str]) -> None:
    site = _built(build)
    for path in sorted((REPO / "benchmarks" / "results").glob("*.md")):
        assert (site / "results" / path.stem / "index.html").is_file(), f"{path.name} has no page in docs/results/"
        text = re.sub(r"<[^>]+>", "", _page(site, f"results/{path.stem}"))
        header = next(line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("|"))
        cells = [cell.strip().replace("`", "").replace("*", "") for cell in header.strip("|").split("|")]
        longest = max(cells, key=len)
        assert longest in text, f"{path.name}'s table ({longest!r}) is not on its page"
