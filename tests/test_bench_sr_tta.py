"""bench_sr's ``--tta``: an entry predicted with test-time augmentation says so on the page (the 3x
table's prediction column, its section's cost line, the best row's verdict), and what it costs is
counted from the SR model's own contract."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from torch import nn

from medseg.engine.model_format import write_model_folder
from tests.conftest import REPO
from tests.test_benchmarks import _bench

BENCHMARKS = REPO / "benchmarks"


def _bench_sr() -> ModuleType:
    return _bench("bench_sr")


def _table_rows(page: str, header_start: str) -> list[list[str]]:
    lines = page.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_a_tta_entry_is_marked_with_its_cost_and_the_plain_entries_as_plain(tmp_path: Path) -> None:
    sr = _bench_sr()
    (tmp_path / "report.json").write_text((BENCHMARKS / "results" / "super_resolution.json").read_text())
    report = sr.read_report(tmp_path / "report.json")
    base_key = next(k for k, f in report["factors"].items() if f["factor"] == 3 and not f.get("tta"))
    base = report["factors"][base_key]
    report["factors"]["3/with-tta"] = {
        **base, "variant": "with-tta", "tta": True, "tta_passes": 4, "dice_sr_minus_original": -0.0093,
        "cpu_s_per_volume": {**base["cpu_s_per_volume"], "sr": 0.1234, "sr_without_tta": 0.0411},
        "kinds": {**base["kinds"], "sr_without_tta": {**base["kinds"]["sr"], "dice_mean": 0.8700}}}
    page = sr.markdown(report)
    rows = {row[0]: row for row in _table_rows(page, "| SR setting |")}
    assert rows["with-tta"][-1] == "TTA (4 flips)" and rows["with-tta"][7] == "-0.0093"
    for entry in report["factors"].values():  # every other row: as its own entry was predicted
        if entry["factor"] == 3:
            expected = f"TTA ({entry['tta_passes']} flips)" if entry.get("tta") else "plain"
            assert rows[entry.get("variant") or "plain (config as committed)"][-1] == expected
    assert rows["with-tta"][4] == rows[base.get("variant") or "plain (config as committed)"][4]  # the segmenter column
    assert "Best: with-tta (segmenter `" in page and ", with --tta), SR - original -0.0093; the goal is met." in page
    section = page[page.index("## 3x through-plane — with-tta"):]
    assert "4 network passes per slice" in section and "CPU s / volume of SR 0.123 with TTA" in section
    assert "vs 0.041 without." in section
    assert f"Dice SR {base['kinds']['sr']['dice_mean']:.4f} with TTA vs 0.8700 without" in section
    own_table = _table_rows(section, "| input |")
    assert [row[0] for row in own_table] == [*sr.KINDS, "sr_without_tta"] and own_table[-1][1] == "0.8700"
    assert own_table[-1][-1] == "0.041" and own_table[1][-1] == "0.123"  # CPU s / volume without and with TTA
    with_tta = sum(1 for entry in report["factors"].values() if entry.get("tta"))
    assert page.count("SR predicted with `--tta`") == with_tta  # the plain sections say nothing of it


@pytest.mark.parametrize("axes,passes", [([0, 1], 4), ([1], 2), (None, 4)])
def test_tta_passes_counts_the_flips_the_models_contract_allows(tmp_path: Path, axes: list[int] | None,
                                                               passes: int) -> None:
    contract = {"task": "reconstruction", "spatial_dims": 2, **({} if axes is None else {"tta_axes": axes})}
    write_model_folder(tmp_path / "model", nn.Conv2d(1, 1, 1), {"task": "reconstruction", "name": "unet", "config": {}},
                       contract)
    assert _bench_sr().tta_passes(tmp_path / "model") == passes


def test_tta_is_refused_for_the_mni152_page(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _bench_sr().main(["--mni152", "--tta", "--factors", "3"])
    assert "--tta: judged on the hippocampus cases only; run --mni152 without it" in capsys.readouterr().err


def test_a_reused_runs_settings_are_checked_against_what_it_trained_with(tmp_path: Path) -> None:
    """``--sr-run`` with ``--set`` / ``--sr-minutes``: they label the entry, so they must be the run's own."""
    (tmp_path / "resolved_config.yaml").write_text("recon:\n  sr: {factor: 3, context: 2}\nloss: {name: l1}\n"
                                                   "train: {max_minutes: 50.0}\n")
    check = _bench_sr().check_reused_run
    check(tmp_path, ["recon.sr.context=2", "loss.name=l1"], 50.0)
    with pytest.raises(SystemExit, match=r"Expected loss.name=l1_ssim .* Got loss.name=l1 in .*resolved_config.yaml"):
        check(tmp_path, ["loss.name=l1_ssim"], 50.0)
    with pytest.raises(SystemExit, match=r"Expected train.max_minutes=4.0 .* Got train.max_minutes=50.0"):
        check(tmp_path, [], 4.0)
