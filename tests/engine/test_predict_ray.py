"""The Ray engine's tests (tests/engine/ray_cases.py), each time in a pytest process of its own.

Those tests make the test process a Ray driver: ``ray.init`` starts a C++ core worker inside it,
with its own threads, a SIGTERM handler and an exit hook, and Ray ends a process whose core worker
it finds shut down (``QuickExit``, no Python traceback) -- ray-project/ray#65184 fixed one such
race after ``ray.shutdown()``. In an xdist worker that lives on for many more test files, one such
exit takes the worker down in the middle of whatever test runs next ("node down: Not properly
terminated", as in a CI run of this suite whose cause nothing recorded). In a child process of
their own, a driver's end is the child's, and the tests run exactly as they do on their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TRAINED_SEGMENTATION_ENV

CASES = REPO / "tests" / "engine" / "ray_cases.py"


def _run_cases(marker: str, trained_segmentation: dict[str, str]) -> None:
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'medseg[ray]' (the dev extra has it)")
    # The cases use this process's tiny model (and its MLflow store) rather than training their own.
    env = {**os.environ, TRAINED_SEGMENTATION_ENV: json.dumps(trained_segmentation)}
    run = subprocess.run([sys.executable, "-m", "pytest", str(CASES), "-n", "0", "-m", marker, "-q", "-rA",
                          "-p", "no:cacheprovider", "--durations=5"], cwd=REPO, capture_output=True, text=True,
                         env=env)
    output = run.stdout + run.stderr
    print(output[-6000:])  # the cases' own report, shown with -s or -rA
    failures = output.find("= FAILURES =")  # the failing cases' reports come first, the passes' output after
    shown = output[failures:failures + 12000] if failures >= 0 else output[-12000:]
    assert run.returncode == 0, f"{CASES.name} -m {marker!r} exited {run.returncode}:\n{shown}"
    assert " passed" in output, output[-12000:]  # exit 0 with nothing run (all deselected) is not a pass


@pytest.mark.timeout(1500)
def test_the_ray_engine_cases_pass_in_a_process_of_their_own(trained_segmentation: dict[str, str]) -> None:
    _run_cases("not slow", trained_segmentation)


@pytest.mark.slow
def test_the_slow_ray_engine_cases_pass_in_a_process_of_their_own(trained_segmentation: dict[str, str]) -> None:
    _run_cases("slow", trained_segmentation)
