"""The shape of the code, checked: imports point one way, tasks stay in their packages, the
installed packages are the ones listed, and medseg type-checks."""

from __future__ import annotations

import ast
import graphlib
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def test_import_layers_and_task_independence_hold() -> None:
    """import-linter's contracts in pyproject.toml: cli -> api -> tasks -> engine -> data/tracking -> ..."""
    # UTF-8 mode: the sources hold non-ASCII comments, whatever locale the test process inherited
    done = subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=REPO, capture_output=True, encoding="utf-8",
                          env={**os.environ, "PYTHONUTF8": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


def test_medseg_has_no_import_cycles() -> None:
    """grimp's import graph of medseg (what import-linter reads) sorts topologically: no module
    imports, directly or through others, a module that imports it. Imports under TYPE_CHECKING are
    left out; lazy imports inside functions count (they are cycles that merely wait)."""
    import grimp

    graph = grimp.build_graph("medseg", exclude_type_checking_imports=True)
    edges = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None


def test_no_function_in_medseg_is_longer_than_80_lines() -> None:
    """One job per function: the offenders listed with their length (split them, do not raise the bar)."""
    offenders = [f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                 for path in sorted((REPO / "medseg").rglob("*.py"))
                 for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and (node.end_lineno or node.lineno) - node.lineno + 1 > 80]
    assert offenders == []


def test_the_public_names_are_listed_once() -> None:
    """``medseg/__init__.py``: ``_EXPORTS`` is the list; ``__all__`` is made from it and the
    TYPE_CHECKING imports (for type checkers) name the same modules."""
    import medseg

    tree = ast.parse((REPO / "medseg" / "__init__.py").read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    typed = {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert typed == medseg._EXPORTS
    assert sorted(medseg.__all__) == sorted(["__version__", *medseg._EXPORTS])
    assert all(getattr(medseg, name) is not None for name in medseg.__all__)


def test_no_task_branches_outside_the_task_packages() -> None:
    """A new task is a new package plus one registry entry: nothing else may ask which task it is."""
    pattern = re.compile(r"\btask\s*(==|!=)|\.task\s+in\s|\bTask\.(SEGMENTATION|CLASSIFICATION|RECONSTRUCTION)\b")
    offenders = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
                 for path in (REPO / "medseg").rglob("*.py") if "tasks" not in path.relative_to(REPO / "medseg").parts
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_the_engine_owns_the_stages_and_tasks_only_supply_pieces() -> None:
    """No task overrides train, evaluate or package: each supplies pieces (network, transforms,
    loss, validation, scoring, contract) and the engine runs the stages over them."""
    from medseg.tasks.base import TaskBase
    from medseg.tasks.registry import get_task, list_tasks

    stages = ("train", "evaluate", "package")
    overridden = {name: [s for s in stages if getattr(type(get_task(name)), s) is not getattr(TaskBase, s)]
                  for name in list_tasks()}
    assert set(overridden) >= {"segmentation", "classification", "reconstruction"}
    assert all(stages_ == [] for stages_ in overridden.values()), overridden


def test_nothing_in_medseg_unpickles_except_the_explicit_conversion() -> None:
    """Models, checkpoints and caches are read as tensors and JSON; the one unpickling call is
    ``medseg model convert`` (``medseg.api.convert_model``), which a user runs knowingly."""
    pattern = re.compile(r"\btorch\.load\(|\bpickle\.loads?\(|mlflow\.pytorch\.load_model\(|jit\.load\(|"
                         r"allow_pickle\s*=\s*True|weights_only\s*=\s*False|cloudpickle")
    found = [f"{path.relative_to(REPO)}:{n}" for path in (REPO / "medseg").rglob("*.py")
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    convert = (REPO / "medseg" / "api.py").read_text(encoding="utf-8").split("def convert_model(")[1].split("\ndef ")[0]
    assert len(found) == 2 and all(f.startswith("medseg/api.py:") for f in found), found
    assert "torch.load(path" in convert and "mlflow.pytorch.load_model(" in convert


def test_every_package_is_installed_and_pipelines_is_not_a_top_level_name() -> None:
    block = re.search(r"^packages = \[(.*?)\]", (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.S | re.M)
    assert block, "pyproject.toml lists no [tool.setuptools] packages"
    listed = set(re.findall(r'"([\w.]+)"', block.group(1)))
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "medseg").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert "pipelines" not in listed and "medseg_pipelines" in listed


def test_mypy_is_clean_on_medseg() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "medseg"], cwd=REPO,
                          capture_output=True, encoding="utf-8", timeout=600)
    assert done.returncode == 0, done.stdout[-6000:]
