"""The CLI through its real entry point: help, exit codes and messages."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from medseg.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from tests.conftest import REPO

CONSOLE_SCRIPT = Path(sys.executable).parent / "medseg"


def test_console_script_is_installed_and_answers_help() -> None:
    assert CONSOLE_SCRIPT.is_file(), "install the package (pip install -e .) so the `medseg` command exists"
    result = subprocess.run([str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("run", "validate", "verify", "manifest"):
        assert command in result.stdout


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EXIT_USAGE
    assert "usage: medseg" in capsys.readouterr().out


def test_validate_ok_and_typo(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert main(["validate", "configs/demo_segmentation.yaml"]) == EXIT_OK
    assert "valid" in capsys.readouterr().out
    assert main(["validate", "configs/demo_segmentation.yaml", "--set", "model.chanels=[8,16]"]) == EXIT_USAGE
    assert "did you mean 'model.channels'" in capsys.readouterr().err


def test_validate_rejects_an_impossible_model(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert main(["validate", "configs/demo_segmentation.yaml", "--set", "patch.size=[30,48,32]"]) == EXIT_USAGE
    assert "must be divisible by 8" in capsys.readouterr().err


def test_run_with_a_missing_manifest_explains_how_to_build_one(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    code = main(["run", "configs/demo_segmentation.yaml", "--set", f"data.manifest={tmp_path / 'none.csv'}",
                 "--set", f"output_dir={tmp_path / 'runs'}"])
    assert code == EXIT_USAGE
    assert "medseg manifest build" in capsys.readouterr().err


def test_run_with_a_missing_data_root_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    code = main(["run", "configs/demo_segmentation.yaml", "--set", f"data.root={tmp_path / 'missing'}",
                 "--set", f"output_dir={tmp_path / 'runs'}"])
    assert code == EXIT_FAILED
    err = capsys.readouterr().err
    assert str(tmp_path / "missing") in err and "MEDSEG_DATA_ROOT" in err


def test_verify_the_shipped_demo_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    report = tmp_path / "report.json"
    code = main(["verify", "data_manifests/demo_hippocampus.csv", "--config", "configs/demo_segmentation.yaml",
                 "--report", str(report), "--no-progress"])
    assert code == EXIT_OK
    assert "40 cases, 0 error(s)" in capsys.readouterr().out
    assert report.is_file()


def test_progress_bars_only_on_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --no-progress, a command whose stderr is a file or a pipe (a log) draws no bar."""
    monkeypatch.chdir(REPO)
    code = main(["verify", "data_manifests/demo_hippocampus.csv", "--config", "configs/demo_segmentation.yaml",
                 "--report", str(tmp_path / "report.json")])
    captured = capsys.readouterr()
    assert code == EXIT_OK and "40 cases, 0 error(s)" in captured.out
    assert "it/s" not in captured.err and "case/s" not in captured.err and "%|" not in captured.err



def _subparser(*command: str) -> argparse.ArgumentParser:
    from medseg.cli import build_parser

    parser = build_parser()
    for name in command:  # walk down to the subparser
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


@pytest.mark.parametrize("command", [("run",), ("plan",), ("predict",), ("evaluate",), ("serve",),
                                     ("manifest", "build"), ("model", "check")])
def test_each_command_help_ends_with_an_example_and_every_option_is_explained(command: tuple[str, ...]) -> None:
    parser = _subparser(*command)
    assert f"medseg {' '.join(command)}" in parser.format_help().split("examples:")[1]
    unexplained = [a.dest for a in parser._actions if not a.help and a.dest != "help"
                   and not isinstance(a, argparse._SubParsersAction)]
    assert unexplained == []


def test_help_shows_defaults_and_predict_takes_short_input_output_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert "(default: 0.2)" in _subparser("manifest", "build").format_help()
    predict_help = _subparser("predict").format_help()
    assert "-i INPUT, --input INPUT" in predict_help and "-o OUTPUT, --output OUTPUT" in predict_help
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    from medseg._version import __version__

    assert capsys.readouterr().out.strip() == __version__


def test_the_packaged_demo_config_and_manifest_are_the_repository_ones() -> None:
    """`medseg demo` ships copies inside the package (a plain pip install has no configs/): they must not drift."""
    demo = REPO / "medseg" / "demo"
    assert (demo / "demo_segmentation.yaml").read_bytes() == (REPO / "configs" / "demo_segmentation.yaml").read_bytes()
    assert (demo / "demo_hippocampus.csv").read_bytes() == (REPO / "data_manifests" / "demo_hippocampus.csv").read_bytes()


def test_demo_runs_from_any_folder_and_writes_only_under_its_out(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A newcomer's first command: from a folder that is not the repository, nothing written elsewhere."""
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    package = REPO / "medseg" / "demo"
    before = {p: p.stat().st_mtime_ns for p in package.rglob("*")}
    code = main(["demo", "-o", "first-run", "--set", "train.max_epochs=1", "--set", "train.max_minutes=null",
                 "--set", "train.val_interval=1", "--set", "validation.overlays=0", "--set", "tracking.system_metrics=false"])
    assert code == EXIT_OK
    printed = capsys.readouterr().out
    assert "finished: " in printed and "dice_mean" in printed and "model: " in printed
    assert sorted(p.name for p in elsewhere.iterdir()) == ["first-run"]
    assert (elsewhere / "first-run" / "mlflow.db").is_file() and list((elsewhere / "first-run" / "runs").iterdir())
    # the shipped real data trained and validated one epoch (the packaged config is the repository's one:
    # test_the_packaged_demo_config_and_manifest_are_the_repository_ones)
    (summary,) = (elsewhere / "first-run" / "runs").rglob("summary.json")
    metrics = json.loads(summary.read_text())["metrics"]
    assert set(metrics) >= {"val/dice/anterior", "val/dice/posterior", "best_val/dice_mean_per_case"}
    assert 0.0 <= metrics["val/dice_mean"] <= 1.0 and metrics["train/epochs"] == 1
    assert {p: p.stat().st_mtime_ns for p in package.rglob("*")} == before  # nothing written into the package


def test_demo_into_a_folder_that_cannot_be_made_names_it_and_the_fix(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["demo", "-o", str(blocker / "out")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert str(blocker / "out") in err and "-o/--out" in err


def test_future_warnings_are_hidden_by_the_package_that_raises_them_not_all(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    from medseg.cli import _quiet_third_parties

    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _quiet_third_parties()
        warnings.warn_explicit("argument deprecated", FutureWarning, "utils.py", 1, module="monai.metrics.utils")
        warnings.warn_explicit("my own deprecation", FutureWarning, "analysis.py", 1, module="analysis")
        warnings.warn_explicit("monaillike name", FutureWarning, "m.py", 1, module="monaill")

    assert [str(w.message) for w in seen] == ["my own deprecation", "monaillike name"]
    import os

    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING" and os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_quiet_and_verbose_are_one_choice_and_reach_the_distributed_workers() -> None:
    from medseg.cli import _run_argv, build_parser

    parser = build_parser()
    args = parser.parse_args(["-q", "run", "configs/demo_segmentation.yaml"])
    assert args.quiet and not args.verbose
    assert _run_argv(args)[:2] == ["--quiet", "run"]
    with pytest.raises(SystemExit):
        parser.parse_args(["-q", "-v", "run", "configs/demo_segmentation.yaml"])
