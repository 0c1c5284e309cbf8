"""The wheel a `pip install` user gets: licence, type marker, the demo data, one version, no setuptools warnings."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import medseg
from medseg._version import __version__

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: the venv's setuptools (>= 77, as pyproject asks) builds it, with no index lookup
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("medseg-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], proc.stdout + proc.stderr


def test_wheel_carries_licence_type_marker_and_demo(built_wheel: tuple[Path, str]) -> None:
    wheel, _ = built_wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "medseg/py.typed" in names
    assert "medseg/demo/hippocampus/dataset.json" in names
    assert sum(n.startswith("medseg/demo/hippocampus/imagesTr/") for n in names) >= 2
    assert any(n.startswith("medseg_pipelines/") for n in names)


def test_metadata_has_one_version_and_spdx_licence(built_wheel: tuple[Path, str]) -> None:
    wheel, _ = built_wheel
    archive = zipfile.ZipFile(wheel)
    metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert f"Version: {__version__}\n" in metadata
    assert medseg.__version__ == __version__
    assert "License-Expression: Apache-2.0" in metadata
    assert "Classifier: Typing :: Typed" in metadata


def test_build_prints_no_ignored_package_warning(built_wheel: tuple[Path, str]) -> None:
    _, log = built_wheel
    assert "would be ignored" not in log
    assert "License classifiers are deprecated" not in log
