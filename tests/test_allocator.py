"""MEDSEG_ALLOCATOR: the tuned glibc default, leaving malloc alone, jemalloc or a clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medseg import allocator
from medseg.cli import EXIT_USAGE, main
from medseg.errors import UsageError


def _in_child(code: str, env_value: str | None) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("MEDSEG_ALLOCATOR", "LD_PRELOAD")}
    if env_value is not None:
        env["MEDSEG_ALLOCATOR"] = env_value
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_tuning_is_applied_by_default_and_skipped_when_asked() -> None:
    code = "from medseg.allocator import tune_allocator; print(tune_allocator())"
    assert _in_child(code, None) == "True"  # glibc accepted every setting
    assert _in_child(code, "system") == "False"


def test_unknown_settings_and_a_missing_jemalloc_are_usage_errors(monkeypatch, capsys) -> None:
    monkeypatch.setenv("MEDSEG_ALLOCATOR", "tcmallocc")
    with pytest.raises(UsageError, match="tuned, system, jemalloc"):
        allocator.allocator_setting()
    monkeypatch.setenv("MEDSEG_ALLOCATOR", "jemalloc")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    assert main(["validate", "configs/demo_segmentation.yaml"]) == EXIT_USAGE
    assert "apt install libjemalloc2" in capsys.readouterr().err


def test_jemalloc_environment_preloads_the_library_once(monkeypatch) -> None:
    monkeypatch.setenv("MEDSEG_ALLOCATOR", "jemalloc")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: "/opt/lib/libjemalloc.so.2")
    env = allocator.jemalloc_environment()
    assert env is not None and env["LD_PRELOAD"] == "/opt/lib/libjemalloc.so.2"
    assert "dirty_decay_ms:-1" in env["MALLOC_CONF"]  # keep freed pages, as the tuned glibc does
    monkeypatch.setenv("LD_PRELOAD", env["LD_PRELOAD"])
    assert allocator.jemalloc_environment() is None  # already running under it: no second re-run


@pytest.mark.skipif(allocator.find_jemalloc() is None, reason="jemalloc is not installed here")
def test_the_command_reruns_itself_under_jemalloc(tmp_path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["MEDSEG_ALLOCATOR"] = "jemalloc"
    done = subprocess.run([sys.executable, "-m", "medseg", "validate", "configs/demo_segmentation.yaml"],
                          capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "re-running under" in done.stderr and "valid" in done.stdout
