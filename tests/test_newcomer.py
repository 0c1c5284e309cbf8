"""A newcomer's first session, as docs/getting-started.md tells it, from a plain ``pip install`` of
the built wheel into a fresh venv (no checkout on the path): ``medseg demo``, ``medseg plan`` and
``run`` on an nnU-Net folder of real hippocampus scans, ``medseg predict``, ``medseg evaluate`` --
run from a folder that is not the repository, with a home of its own.

What a newcomer sees is checked whole: under 60 lines for the session, no warning from another
package, and nothing written outside the folders the session was given.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "msd_task04_hippocampus"
TRAIN_CASES, TEST_CASES = 10, 3

#: What the session may leave in its home: matplotlib's font cache (built once per machine, as
#: every matplotlib user gets). medseg's own cache is not used by a pip-installed medseg.
HOME_ALLOWED = (".cache", ".cache/matplotlib", ".config", ".config/matplotlib")
#: What the session writes in its working folder, each named by a command of the session.
WORK_EXPECTED = {"Dataset004_Hippocampus", "demo", "data_manifests", "hippocampus.yaml", "runs", "predictions",
                 "scores"}
#: Lines that are another package's warning, not medseg's.
FOREIGN_WARNING = re.compile(r"Warning\b|warnings\.warn|^\S*\s*WARNING (?!medseg)|^\d{4}/\d\d/\d\d .* (INFO|WARNING) mlflow")


def _nnunet_folder(target: Path) -> Path:
    """An nnU-Net v2 raw dataset of the first shared hippocampus cases: imagesTr/labelsTr, and
    imagesTs/labelsTs held out."""
    cases = sorted(p.name[: -len(".nii.gz")] for p in (HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))
    for index, case in enumerate(cases[: TRAIN_CASES + TEST_CASES]):
        part = "Tr" if index < TRAIN_CASES else "Ts"
        for folder in (f"images{part}", f"labels{part}"):
            (target / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HIPPOCAMPUS / "imagesTr" / f"{case}.nii.gz", target / f"images{part}" / f"{case}_0000.nii.gz")
        shutil.copyfile(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz", target / f"labels{part}" / f"{case}.nii.gz")
    description = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
                   "numTraining": TRAIN_CASES, "file_ending": ".nii.gz"}
    (target / "dataset.json").write_text(json.dumps(description, indent=1), encoding="utf-8")
    return target


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with only the built wheel installed (and what it requires, from the index)."""
    base = tmp_path_factory.mktemp("newcomer-venv")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(base / "wheel"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((base / "wheel").glob("medseg-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True, timeout=300)
    # --no-compile: pip byte-compiles every module of every package (torch's thousands) at install, two
    # thirds of the install's time here; Python compiles the few the session imports when it imports them.
    install = subprocess.run([str(base / "venv" / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile",
                              str(wheel)],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    return base / "venv"


def _session_env(home: Path, venv: Path) -> dict[str, str]:
    """A newcomer's shell: the venv's bin first, a home of its own, nothing of this test run's."""
    keep = {k: v for k, v in os.environ.items() if k in {"LANG", "LC_ALL", "PIP_FIND_LINKS", "PIP_CERT"}}
    return {**keep, "HOME": str(home), "PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin",
            "TMPDIR": str(home.parent / "tmp")}


def _run_session(work: Path, env: dict[str, str]) -> tuple[str, dict[str, int]]:
    """The commands of the session, in order; returns what they printed and each one's exit code."""
    commands = {
        "demo": ["medseg", "demo", "-o", "demo", "--set", "train.max_epochs=1"],
        "plan": ["medseg", "plan", "Dataset004_Hippocampus", "--budget", "20s", "--out", "hippocampus.yaml"],
        "run": ["medseg", "run", "hippocampus.yaml"],
        "predict": ["medseg", "predict", "--model", "RUN_DIR", "-i", "Dataset004_Hippocampus/imagesTs",
                    "-o", "predictions"],
        "evaluate": ["medseg", "evaluate", "predictions", "Dataset004_Hippocampus/labelsTs", "-o", "scores"],
    }
    printed, codes = [], {}
    for name, argv in commands.items():
        if "RUN_DIR" in argv:
            run_dir = next((work / "runs" / "dataset004_hippocampus").iterdir())
            argv = [str(run_dir.relative_to(work)) if a == "RUN_DIR" else a for a in argv]
        done = subprocess.run(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=900)
        printed.append(f"$ {' '.join(argv)}\n{done.stdout}")
        codes[name] = done.returncode
        if done.returncode != 0:
            break
    return "".join(printed), codes


def _written_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def test_a_newcomer_session_from_the_wheel_is_short_clean_and_stays_in_its_folders(
        fresh_venv: Path, tmp_path: Path) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    for folder in (home, work, tmp_path / "tmp"):
        folder.mkdir()
    _nnunet_folder(work / "Dataset004_Hippocampus")
    env = _session_env(home, fresh_venv)

    printed, codes = _run_session(work, env)

    assert all(code == 0 for code in codes.values()) and len(codes) == 5, f"{codes}\n{printed}"
    lines = [line for line in printed.splitlines() if not line.startswith("$ ")]
    assert len(lines) < 60, printed
    assert not [line for line in lines if FOREIGN_WARNING.search(line)], printed
    assert f"{TEST_CASES} ok, 0 failed" in printed, printed
    assert f"{TEST_CASES} cases scored" in printed, printed
    foreign = {p for p in _written_under(home) if p not in HOME_ALLOWED and not p.startswith(".cache/matplotlib/")}
    assert not foreign, foreign
    assert {p.name for p in work.iterdir()} == WORK_EXPECTED
    # torch's optimiser step creates its compile cache folder (empty: nothing is compiled) in $TMPDIR
    left = [p for p in (tmp_path / "tmp").iterdir()
            if not (p.name.startswith("torchinductor_") and not any(q.is_file() for q in p.rglob("*")))]
    assert not left, f"temporary files left behind: {left}"
    scores = json.loads((work / "scores" / "scores.json").read_text(encoding="utf-8"))
    assert scores["cases_scored"] == TEST_CASES and not scores["failed"]
    assert set(scores["labels"].values()) == {"Anterior", "Posterior"}, "names from the dataset's dataset.json"
    # the logged model carries medseg itself, packed from the installed files
    assert list((work / "runs").rglob("wheels/medseg-*.whl"))
