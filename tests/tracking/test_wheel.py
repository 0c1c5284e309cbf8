"""medseg's wheel bundled with each logged model, when medseg was installed from a wheel: the
installed files are packed back into one, without pip's bookkeeping or compiled caches."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from importlib import metadata
from pathlib import Path

from medseg.tracking.wheel import medseg_wheel, private_folder, repack_installed, source_digest, source_root

RECORD_OF_AN_INSTALL = """\
medseg/__init__.py,sha256=x,10
medseg/__pycache__/__init__.cpython-311.pyc,,
medseg/io/reader.py,sha256=y,20
medseg-9.9.9.dist-info/METADATA,sha256=z,40
medseg-9.9.9.dist-info/WHEEL,sha256=w,50
medseg-9.9.9.dist-info/entry_points.txt,sha256=v,30
medseg-9.9.9.dist-info/INSTALLER,sha256=u,4
medseg-9.9.9.dist-info/REQUESTED,,
medseg-9.9.9.dist-info/direct_url.json,sha256=t,60
medseg-9.9.9.dist-info/RECORD,,
../../../bin/medseg,sha256=s,200
"""


def _installed(site: Path) -> metadata.Distribution:
    """A site-packages holding medseg 9.9.9 as pip leaves it."""
    files = {"medseg/__init__.py": "VERSION = 1\n", "medseg/__pycache__/__init__.cpython-311.pyc": "\0pyc",
             "medseg/io/reader.py": "def read(): ...\n",
             "medseg-9.9.9.dist-info/METADATA": "Metadata-Version: 2.4\nName: medseg\nVersion: 9.9.9\n",
             "medseg-9.9.9.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             "medseg-9.9.9.dist-info/entry_points.txt": "[console_scripts]\nmedseg = medseg.cli:main\n",
             "medseg-9.9.9.dist-info/INSTALLER": "pip\n", "medseg-9.9.9.dist-info/REQUESTED": "",
             "medseg-9.9.9.dist-info/direct_url.json": '{"url": "file:///home/someone/medseg.whl"}',
             "medseg-9.9.9.dist-info/RECORD": RECORD_OF_AN_INSTALL}
    for name, text in files.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(text, encoding="utf-8")
    return metadata.Distribution.at(site / "medseg-9.9.9.dist-info")


def test_the_installed_files_become_a_wheel_with_a_fresh_record(tmp_path: Path) -> None:
    site, scratch = tmp_path / "site-packages", tmp_path / "scratch"
    scratch.mkdir()
    dist = _installed(site)

    wheel = repack_installed(scratch, dist)

    assert wheel == scratch / "medseg-9.9.9-py3-none-any.whl"
    archive = zipfile.ZipFile(wheel)
    assert sorted(archive.namelist()) == sorted([
        "medseg/__init__.py", "medseg/io/reader.py", "medseg-9.9.9.dist-info/METADATA",
        "medseg-9.9.9.dist-info/WHEEL", "medseg-9.9.9.dist-info/entry_points.txt", "medseg-9.9.9.dist-info/RECORD"])
    record = dict(line.split(",", 1) for line in archive.read("medseg-9.9.9.dist-info/RECORD").decode().splitlines())
    source = (site / "medseg/io/reader.py").read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(source).digest()).rstrip(b"=").decode()
    assert record["medseg/io/reader.py"] == f"sha256={digest},{len(source)}"
    assert record["medseg-9.9.9.dist-info/RECORD"] == ","
    assert archive.read("medseg/io/reader.py") == source


def test_an_install_without_a_record_logs_the_model_without_a_wheel(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    dist = _installed(site)
    (site / "medseg-9.9.9.dist-info" / "RECORD").unlink()

    assert repack_installed(tmp_path, dist) is None
    assert not list(tmp_path.glob("*.whl"))


def test_a_cached_wheel_is_handed_out_as_a_private_copy_another_build_cannot_change(tmp_path: Path) -> None:
    """Two runs logging models at once: one finds the cached wheel while the other replaces it with a
    wheel built a moment later (other zip times). The first must bundle the bytes it hashed."""
    from medseg import __version__

    root = source_root()
    assert root is not None  # the tests run from the checkout
    cached = private_folder(tmp_path / "cache" / f"{__version__}-{source_digest(root)[:24]}") / "medseg-0-py3-none-any.whl"
    cached.write_bytes(b"built first")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    wheel = medseg_wheel(tmp_path / "cache", scratch)
    assert wheel is not None and wheel.parent == scratch and wheel.read_bytes() == b"built first"
    cached.write_bytes(b"built again by another process")
    assert wheel.read_bytes() == b"built first"
