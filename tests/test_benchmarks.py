"""The benchmarks read each other's files: a change of shape in one must not break another unseen
(`make bench` once failed after 14 minutes on a KeyError in bench_perf reading bench_predict's JSON).

Every script a ``make bench*`` target runs has a ``--tiny`` mode (benchmarks/tiny.py): all its code
paths on toy inputs, into a folder of the test's. Each runs as its own process (they tune threads, the
allocator and MLflow's tracking URI, which must not leak into the test session), two at a time: a tiny
run is mostly one core's imports and Python, and the host has two. Each test checks the shape of
everything its script wrote: the JSON keys the Markdown table and the other scripts read, and the
table's rows. A renamed key, a dropped workload or a changed signature in medseg fails here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import REPO, require

BENCHMARKS = REPO / "benchmarks"
#: The scripts the Makefile's bench targets run, each covered by a tiny test below; the longest first.
TINY_SCRIPTS = ("bench_perf", "bench_ddp", "bench_predict", "check_precision", "bench_lineage", "bench_classification",
                "bench_recon", "bench_memory", "cost_model", "bench_sr", "bench_recon_downstream",
                "bench_detection", "bench_detection_brain_tumour", "bench_translation")
#: Tiny runs of a script with arguments of their own: name -> (script, arguments); ``{root}`` is the runs' folder.
TINY_VARIANTS = {"bench_detection_brain_tumour": ("bench_detection", ["--dataset", "brain_tumour", "--tracking-uri",
                                                                      "sqlite:///{root}/detection-mlflow.db"])}
#: Seconds one tiny run may take on a loaded 2-core host before it counts as hung.
TINY_TIMEOUT_S = 900


def _bench(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their siblings (interleaved, tiny)
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


class TinyRuns:
    """``python benchmarks/<script>.py --tiny --out <root>/<script> --work <root>/<script>-work`` for each
    script asked for, two processes at a time, in the order given; :meth:`wait` returns a run's folder."""

    def __init__(self, root: Path, scripts: list[str]) -> None:
        self.root, self.pending = root, list(scripts)
        self.running: dict[str, tuple[subprocess.Popen, float]] = {}
        self.exit_codes: dict[str, int] = {}

    def _command(self, script: str) -> list[str]:
        work = ["--work", str(self.root / f"{script}-work")] if script == "bench_perf" else []
        source, arguments = TINY_VARIANTS.get(script, (script, []))
        return [sys.executable, str(BENCHMARKS / f"{source}.py"), "--tiny", "--out", str(self.root / script), *work,
                *(a.replace("{root}", str(self.root)) for a in arguments)]

    def _poll(self) -> None:
        for script, (proc, started) in list(self.running.items()):
            if proc.poll() is None and time.monotonic() - started > TINY_TIMEOUT_S:
                proc.kill()
            if proc.poll() is not None:
                self.exit_codes[script] = proc.wait()
                del self.running[script]
        while self.pending and len(self.running) < 2:
            script = self.pending.pop(0)
            with open(self.root / f"{script}.log", "w", encoding="utf-8") as log:
                proc = subprocess.Popen(self._command(script), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            self.running[script] = (proc, time.monotonic())

    def wait(self, script: str) -> Path:
        """The run's output folder once it has ended; fails the test with its log if it failed."""
        if script in self.pending:  # asked for before its turn (a test run on its own): next
            self.pending.remove(script)
            self.pending.insert(0, script)
        while script not in self.exit_codes:
            self._poll()
            time.sleep(0.2)
        if self.exit_codes[script] != 0:
            log = (self.root / f"{script}.log").read_text(encoding="utf-8")
            pytest.fail(f"{' '.join(self._command(script))} exited {self.exit_codes[script]} (killed after "
                        f"{TINY_TIMEOUT_S} s if negative):\n{log[-5000:]}")
        return self.root / script

    def close(self) -> None:
        for proc, _ in self.running.values():  # only the processes this object started
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tiny_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyRuns]:
    """The tiny runs of the tests selected in this module (their ``script`` parameter), started together."""
    require(REPO.parent / "shared" / "data" / "msd_task04_hippocampus")
    selected = {item.callspec.params["script"] for item in request.session.items
                if "tiny_runs" in getattr(item, "fixturenames", ()) and hasattr(item, "callspec")}
    runs = TinyRuns(tmp_path_factory.mktemp("tiny"), [s for s in TINY_SCRIPTS if s in selected])
    yield runs
    runs.close()


def _keys(obj: Any, expected: set[str] | list[str], where: str) -> None:
    assert isinstance(obj, dict), f"{where}: expected an object, got {type(obj).__name__}"
    missing = set(expected) - set(obj)
    assert not missing, f"{where}: missing {sorted(missing)}; it has {sorted(obj)}"


def _numbers(obj: dict, names: set[str] | list[str], where: str) -> None:
    _keys(obj, names, where)
    for name in names:
        assert isinstance(obj[name], (int, float)) and not isinstance(obj[name], bool), f"{where}.{name}: {obj[name]!r}"


def _table(md: Path) -> list[list[str]]:
    """The body rows of the Markdown table in ``md``, as lists of cells."""
    assert md.is_file() and md.stat().st_size > 0, f"{md} was not written"
    lines = [line for line in md.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    assert len(lines) >= 3 and re.fullmatch(r"\|(---\|)+", lines[1]), f"{md}: no table:\n{md.read_text(encoding='utf-8')}"
    width = lines[0].count("|")
    assert all(line.count("|") == width for line in lines), f"{md}: rows of unequal width:\n{md.read_text(encoding='utf-8')}"
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _tables(md: Path) -> list[list[list[str]]]:
    """The body rows of each Markdown table in ``md`` (tables parted by other lines), as lists of cells."""
    blocks: list[list[str]] = [[]]
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.startswith("|"):
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    found = []
    for lines in (block for block in blocks if block):
        assert len(lines) >= 3 and re.fullmatch(r"\|(---\|)+", lines[1]), f"{md}: not a table:\n{lines}"
        assert all(line.count("|") == lines[0].count("|") for line in lines), f"{md}: rows of unequal width:\n{lines}"
        found.append([[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]])
    return found


# ----------------------------------------------------------------------------------- bench_predict


def _check_predict(predicted: dict, workloads: set[str]) -> None:
    """predict.json: the keys bench_predict's table and bench_perf's W4 rows read."""
    _keys(predicted, {"rows", "fastest_medseg_backend", "hippocampus_model", "machine", "raw"}, "predict.json")
    assert {r["workload"] for r in predicted["rows"]} == workloads == set(predicted["fastest_medseg_backend"])
    for i, row in enumerate(predicted["rows"]):
        where = f"predict.json rows[{i}]"
        _numbers(row, {"cases", "repeats", "s_per_case", "vs_medseg_torch", "vs_plain_monai", "peak_rss_mb"}, where)
        _keys(row, {"workload", "path", "min_dice_vs_torch"}, where)
        assert row["cases"] >= 1 and row["s_per_case"] > 0, where
        exported = row["path"].startswith("medseg-")
        assert (row["min_dice_vs_torch"] is not None) == exported, f"{where}: min_dice_vs_torch {row}"
    for workload in workloads:
        paths = [r["path"] for r in predicted["rows"] if r["workload"] == workload]
        assert paths[0] == "medseg" and paths[-1] == "monai", f"{workload}: paths {paths}"
        assert len(paths) >= 3, f"{workload}: tiny mode runs an exported backend too (dev extras), got {paths}"


@pytest.mark.parametrize("script", ["bench_predict"])
def test_bench_predict_tiny_writes_every_workload_and_path(tiny_runs: TinyRuns, script: str) -> None:
    out = tiny_runs.wait(script)

    predicted = json.loads((out / "predict.json").read_text(encoding="utf-8"))
    _check_predict(predicted, {"hippocampus", "ct512"})
    rows = _table(out / "predict.md")
    assert len(rows) == len(predicted["rows"]) and all(len(r) == 8 for r in rows)
    # what bench_perf makes of this file: one W4 row per medseg backend
    assert len(_bench("bench_perf")._folder_inference_rows(predicted)) == len(predicted["rows"]) // 2 - 1


def test_bench_perf_names_every_path_bench_predict_runs() -> None:
    assert set(_bench("bench_predict").PATHS) == set(_bench("bench_perf")._PREDICT_PATHS)


def test_bench_perf_reads_the_folder_inference_rows_bench_predict_writes() -> None:
    predicted = json.loads((REPO / "benchmarks" / "results" / "predict.json").read_text(encoding="utf-8"))
    rows = _bench("bench_perf")._folder_inference_rows(predicted)

    hippocampus = [r for r in predicted["rows"] if r["workload"] == "hippocampus" and r["path"] != "monai"]
    assert len(rows) == len(hippocampus) >= 1
    for row, source in zip(rows, hippocampus):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 4 and cells[3] == f"**{source['vs_plain_monai']:.2f}x**"


def test_profile_predict_tiny_times_every_stage_of_both_paths(tmp_path: Path) -> None:
    """benchmarks/profile_predict.py: each stage of medseg's predict path and of the tutorial loop is
    reached (a medseg function renamed or no longer called leaves its stage at 0 s), and the stages of
    a run add up to its wall time (nothing is timed twice or missed)."""
    require(REPO.parent / "shared" / "data" / "msd_task04_hippocampus")
    runs = TinyRuns(tmp_path, ["profile_predict"])  # not a `make bench*` script, so not in TINY_SCRIPTS
    try:
        out = runs.wait("profile_predict")
    finally:
        runs.close()

    report = json.loads((out / "predict_stages.json").read_text(encoding="utf-8"))
    _keys(report, {"runs", "stages"}, "predict_stages.json")
    run = report["runs"]["current"]
    _keys(run, {"commit", "model", "threads", "masks_equal_across_runs", "load_before", "load_after", "raw"}, "run")
    assert run["masks_equal_across_runs"] and len(run["load_before"]) == len(run["load_after"]) == 3
    for threads, summary in run["threads"].items():
        for path in ("monai", "medseg"):
            seconds = summary[path]["s_per_case"]
            _numbers(seconds, report["stages"]["all"], f"threads {threads} {path}")
            assert all(s > 0 for s in seconds.values()), f"{path}: a stage never timed: {seconds}"
            assert sum(seconds.values()) == pytest.approx(summary[path]["total_s_per_case"])
            for result in run["raw"][threads][path]:
                timed = result["load_s"] + result["batch_s"] + sum(c["total"] for c in result["cases"])
                assert timed == pytest.approx(result["wall_s"], rel=0.02, abs=0.005), (path, timed, result["wall_s"])
    rows = _table(out / "predict_stages.md")
    assert [r[0] for r in rows] == [*report["stages"]["all"], "**total**"] and all(len(r) == 6 for r in rows)


# ----------------------------------------------------------------------------------- bench_perf


def _check_perf(report: dict) -> None:
    _keys(report, {"machine", "repeats", "w1", "w2", "w3", "w4", "seconds"}, "perf.json")
    w1 = report["w1"]
    for path in ("plain_dataset", "plain_cache", "medseg"):
        _numbers(w1["summary"][path], {"first_epoch", "steady"}, f"w1.summary.{path}")
        for run in w1["runs"][path]:
            _keys(run, {"path", "epochs", "cache_build_s"}, f"w1.runs.{path}")
            for epoch in run["epochs"]:
                _numbers(epoch, {"seconds", "patches", "patches_per_s"}, f"w1.runs.{path}.epochs")
    w2 = report["w2"]
    _numbers(w2["peak"], {"conv3d_gflops_float32", "conv3d_gflops_bfloat16", "step_gflop"}, "w2.peak")
    for path in ("plain", "medseg", "medseg_bf16"):
        _numbers(w2["summary"][path], {"step_s", "samples_per_s", "gflops", "fraction_of_peak"}, f"w2.summary.{path}")
        assert all(r["step_s"] for r in w2["runs"][path]), f"w2.runs.{path}: no timed step"
    for volume, paths in (("ct192", ("plain", "medseg", "medseg_bf16")), ("ct512", ("plain", "medseg"))):
        _keys(report["w3"][volume], {"runs", "summary"}, f"w3.{volume}")
        for path in paths:
            _numbers(report["w3"][volume]["summary"][path],
                     {"seconds", "peak_rss_mb", "dice_vs_plain_fp32", "foreground_voxels"}, f"w3.{volume}.{path}")
    w4 = report["w4"]
    _keys(w4, {"runs", "summary", "folder_inference"}, "w4")
    for path in ("plain", "medseg"):
        _numbers(w4["summary"][path], {"first_epoch_s", "steady_epoch_s"}, f"w4.summary.{path}")
        assert len(w4["runs"][path][0]["epoch_s"]) == 2, f"w4.runs.{path}: {w4['runs'][path]}"
    _check_predict(w4["folder_inference"], {"hippocampus"})


@pytest.mark.parametrize("script", ["bench_perf"])
def test_bench_perf_tiny_runs_every_workload_and_writes_its_table(tiny_runs: TinyRuns, script: str) -> None:
    """`make bench`'s whole chain, W1-W4 with bench_predict.py inside, on toy inputs."""
    out = tiny_runs.wait(script)

    report = json.loads((out / "perf.json").read_text(encoding="utf-8"))
    _check_perf(report)
    predicted = json.loads((out.parent / "bench_perf-work" / "predict" / "predict.json").read_text(encoding="utf-8"))
    assert report["w4"]["folder_inference"] == predicted
    rows = _table(out / "perf.md")
    backends = [r for r in report["w4"]["folder_inference"]["rows"] if r["path"] != "monai"]
    labels = [r[0] for r in rows]
    assert len(labels) == 2 + 2 + 3 + 1 + len(backends), labels  # W1 x2, W2 x2, W3 x3, W4 epoch, W4 per backend
    for prefix, count in (("W1 ", 2), ("W2 ", 2), ("W3 ", 3), ("W4 hippocampus training", 1),
                          ("W4 folder inference", len(backends))):
        assert sum(label.startswith(prefix) for label in labels) == count, (prefix, labels)
    assert all(len(r) == 4 and re.fullmatch(r"\*\*\d+\.\d\dx\*\*", r[3].split(" / ")[-1]) for r in rows), rows


# ----------------------------------------------------------------------------------- the others


@pytest.mark.parametrize("script", ["bench_ddp"])
def test_bench_ddp_tiny_writes_every_variant(tiny_runs: TinyRuns, script: str) -> None:
    out = tiny_runs.wait(script)

    report = json.loads((out / "ddp.json").read_text(encoding="utf-8"))
    _keys(report, {"machine", "config", "epochs", "repeats", "rows"}, "ddp.json")
    ddp = _bench("bench_ddp")
    variants = ddp.VARIANTS
    assert [r["variant"] for r in report["rows"]] == list(ddp.TINY_VARIANTS)
    for row in report["rows"]:
        _numbers(row, {"processes", "batch_per_process", "global_batch", "epoch_s_median", "speedup_vs_1_process"},
                 row["variant"])
        assert (row["processes"], row["batch_per_process"]) == variants[row["variant"]]
        _keys(row, {"val_dice_mean", "runs"}, row["variant"])
        for run in row["runs"]:
            _numbers(run, {"epoch_s", "wall_s"}, f"{row['variant']} run")
    assert len(_table(out / "ddp.md")) == len(ddp.TINY_VARIANTS)


@pytest.mark.parametrize(("script", "name", "rate"), [("bench_classification", "classification", "samples_per_s"),
                                                       ("bench_recon", "recon", "slices_per_s")])
def test_training_data_path_benchmark_tiny_writes_both_paths(tiny_runs: TinyRuns, script: str, name: str,
                                                             rate: str) -> None:
    out = tiny_runs.wait(script)

    report = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
    _keys(report, {"workload", "repeats", "epochs", "unit", "runs", "summary", "ratio_first_epoch", "ratio_steady"},
          f"{name}.json")
    assert report["epochs"] == 2
    _numbers(report, {"ratio_first_epoch", "ratio_steady"}, f"{name}.json")
    for path in ("medseg", "plain"):
        _numbers(report["summary"][path], {"first_epoch", "steady"}, f"{name}.summary.{path}")
        for run in report["runs"][path]:
            assert [e["samples"] > 0 for e in run["epochs"]] == [True, True], run
            for epoch in run["epochs"]:
                _numbers(epoch, {"seconds", "samples", rate}, f"{name}.runs.{path}")
    rows = _table(out / f"{name}.md")
    assert [r[0] for r in rows] == ["plain MONAI (Dataset, 2 workers)", "medseg", "**ratio medseg / plain**"]


@pytest.mark.parametrize("script", ["bench_lineage"])
def test_bench_lineage_tiny_sizes_times_and_scores_every_network(tiny_runs: TinyRuns, script: str) -> None:
    out = tiny_runs.wait(script)
    lineage = _bench("bench_lineage")

    report = json.loads((out / "lineage.json").read_text(encoding="utf-8"))
    _keys(report, {"entries", "host", "command"}, "lineage.json")
    assert list(report["entries"]) == list(lineage.TINY_DATASETS)
    for dataset, entries in report["entries"].items():
        assert list(entries) == list(lineage.TINY_NETWORKS), dataset
        for network, entry in entries.items():
            where = f"lineage.json entries.{dataset}.{network}"
            _numbers(entry, {"parameters", "flops", "budget_s", "wall_s"}, where)
            assert entry["parameters"] > 0 and entry["flops"] > 0 and entry["overrides"] == lineage.NETWORKS[network]
            [seed] = entry["seeds"]
            _numbers(seed, {"epochs", "last_epoch_s", "test_auc", "test_acc", "test_cases"}, where)
            assert seed["epochs"] == 1 and seed["test_cases"] == lineage.TINY_IMAGES["test"], where
            assert 0 <= seed["test_auc"] <= 1, f"{where}: both classes are in the tiny test split"
    tables = _tables(out / "lineage.md")
    assert [[row[0] for row in table] for table in tables] == [list(lineage.TINY_NETWORKS)] * len(lineage.TINY_DATASETS)


@pytest.mark.parametrize("script", ["bench_detection"])
def test_bench_detection_tiny_scores_both_arms_the_same_way(tiny_runs: TinyRuns, script: str) -> None:
    out = tiny_runs.wait(script)
    detection = _bench("bench_detection")
    report = json.loads((out / "detection.json").read_text(encoding="utf-8"))
    _keys(report, {"arms", "host", "command"}, "detection.json")
    assert list(report["arms"]) == [f"{arm}, 4 min" for arm in detection.ARMS]  # arm, budget
    for arm, entry in report["arms"].items():
        where = f"detection.json arms.{arm}"
        _numbers(entry, {"sensitivity_at_1fp", "sensitivity_at_2fp", "sensitivity_at_4fp", "froc", "map_iou0.1",
                         "map_iou0.5", "reference_boxes", "predicted_boxes_per_scan", "epochs", "wall_s"}, where)
        assert entry["epochs"] == 1 and entry["test_scans"] == 1 and entry["reference_boxes"] > 0, where
        assert 0 <= entry["froc"] <= 1 and 0 <= entry["map_iou0.1"] <= 1, where
    [table] = _tables(out / "detection.md")
    assert [row[0] for row in table] == list(report["arms"])


BRAIN_TUMOUR_DATA = REPO.parent / "shared" / "data" / "tcia_brain_tumor_progression_pgbm001"


@pytest.mark.parametrize("script", ["bench_detection_brain_tumour"])
def test_bench_detection_tiny_brain_tumour_scores_the_held_out_scan(tiny_runs: TinyRuns, script: str) -> None:
    require(BRAIN_TUMOUR_DATA)
    out = tiny_runs.wait(script)
    detection = _bench("bench_detection")
    report = json.loads((out / "detection.json").read_text(encoding="utf-8"))
    assert list(report["arms"]) == [f"brain_tumour: {arm}, 4 min" for arm in detection.ARMS]
    for arm, entry in report["arms"].items():
        where = f"detection.json arms.{arm}"
        assert entry["dataset"] == "brain_tumour" and entry["epochs"] == [1] and entry["test_scans"] == 1, where
        _numbers(entry, {"froc", "map_iou0.1", "map_iou0.5", "reference_boxes", "predicted_boxes_per_scan"}, where)
        [(held_out, fold)] = entry["folds"].items()  # tiny: PGBM-001's fold only
        assert held_out == "PGBM-001" and fold["trained_on"] == ["brain1", "brain2"], where
        assert fold["reference_boxes"] == entry["reference_boxes"] == 1, f"{where}: PGBM-001 has one tumour"
        assert 0 <= entry["froc"] <= 1 and 0 <= entry["map_iou0.1"] <= 1, where
        # --tracking-uri: each fold's run is in the store given, under its arm's experiment
        from mlflow import MlflowClient

        store = f"sqlite:///{tiny_runs.root}/detection-mlflow.db"
        assert fold["tracking_uri"] == store, where
        run = MlflowClient(store).get_run(fold["run_id"])
        assert MlflowClient(store).get_experiment(run.info.experiment_id).name == "bench-detection-brain-tumour"
    tables = _tables(out / "detection.md")
    assert [row[0] for row in tables[0]] == list(report["arms"])
    assert [(row[0], row[1]) for row in tables[1]] == [(arm, "PGBM-001") for arm in report["arms"]]


def test_bench_detection_brain_tumour_references_read_nrrd_and_dicom_through_the_registry() -> None:
    """The reference tumours of the three scans, each mask read by medseg's reader registry (NRRD; PGBM-001 a
    DICOM Secondary Capture series folder): brain1 has its tumour and a 2.4 mL satellite, brain2 and PGBM-001
    one tumour each (PGBM-001's 60 specks of at most 17 voxels are under the minimum)."""
    require(BRAIN_TUMOUR_DATA)
    detection = _bench("bench_detection")
    root = detection.BRAIN_TUMOUR["root"]
    scans = [(case, root / image, root / label) for case, (image, label) in detection.BRAIN_TUMOUR["cases"].items()]
    brain1, brain2, pgbm = detection._references(scans, [1], detection.BRAIN_TUMOUR_MIN_VOLUME_MM3)
    assert (len(brain1), len(brain2), len(pgbm)) == (2, 1, 1)
    # brain2's tumour is PyRadiomics' baseline box (x 205-224, y 155-169, z 8-10): the voxels as stored, the
    # LPS -> RAS turn being the affine's, as in the boxes medseg predict writes
    assert brain2.corners.tolist() == [[205, 155, 8, 225, 170, 11]]
    assert pgbm.corners[0, 2:6:3].tolist() == [13, 21]  # slices 13-20, as the data kit's README says


@pytest.mark.parametrize("script", ["bench_sr"])
def test_bench_sr_tiny_judges_every_kind_of_input_downstream(tiny_runs: TinyRuns, script: str) -> None:
    out = tiny_runs.wait(script)
    sr = _bench("bench_sr")

    report = json.loads((out / "super_resolution.json").read_text(encoding="utf-8"))
    _keys(report, {"factors", "segmenter", "command", "host", "host_note", "segmenter_origin"}, "super_resolution.json")
    [factor] = report["factors"].values()
    _keys(factor, {"factor", "cases", "sr_model", "kinds", "cpu_s_per_volume", "dice_sr_minus_original", "segmenter",
                   "segmenter_origin", "host_note"}, "factors.3")
    assert factor["factor"] == 3 and factor["cases"] == 2
    assert factor["segmenter"]["model_uri"] == report["segmenter"]["model_uri"]  # the one that judged it
    assert list(factor["kinds"]) == list(sr.KINDS)
    for kind in ("sr", "trilinear", "bspline"):  # the original's PSNR is infinite (None): itself
        _numbers(factor["kinds"][kind], {"dice_mean", "dice/anterior", "dice/posterior", "psnr", "ssim"}, kind)
    _numbers(factor["cpu_s_per_volume"], {"sr", "trilinear", "bspline"}, "cpu_s_per_volume")
    assert [row[0] for row in _table(out / "super_resolution.md")] == list(sr.KINDS)
    page = (out / "super_resolution.md").read_text(encoding="utf-8")
    assert page.count("Frozen segmenter: `") == 1 and f"Host: {factor['host_note']}." in page  # the section's own


def test_bench_sr_page_names_the_segmenter_that_judged_each_entry(tmp_path: Path) -> None:
    """Entries written before the per-entry record get the page's segmenter when read; an entry judged later by
    another segmenter keeps its own, in its section and in the 3x table's row (its 'Dice original' is that one's)."""
    sr = _bench("bench_sr")
    report = json.loads((BENCHMARKS / "results" / "super_resolution.json").read_text(encoding="utf-8"))
    old = {"model_uri": "models:/m-01d0000000000", "run_id": "r1", "test/dice_mean": 0.87}
    for entry in report["factors"].values():
        for key in ("segmenter", "segmenter_origin", "host_note"):
            entry.pop(key, None)
    report.update(segmenter=old, segmenter_origin="given with --segmenter", host_note="shared with five")
    (tmp_path / "super_resolution.json").write_text(json.dumps(report))
    report = sr.read_report(tmp_path / "super_resolution.json")
    assert all(entry["segmenter"] == old and entry["host_note"] == "shared with five"
               for entry in report["factors"].values())
    three = next(key for key in report["factors"] if report["factors"][key]["factor"] == 3)
    report["segmenter"] = {"model_uri": "models:/m-2e10000000000", "run_id": "r2", "test/dice_mean": 0.88}
    report["factors"]["3/later"] = {**report["factors"][three], "variant": "later", "segmenter": report["segmenter"]}
    (tmp_path / "page.md").write_text(sr.markdown(report), encoding="utf-8")
    goal_rows = _tables(tmp_path / "page.md")[0]
    assert {row[0]: row[4] for row in goal_rows}["later"] == "`m-2e100000` (0.8800)"
    assert {row[4] for row in goal_rows if row[0] != "later"} == {"`m-01d00000` (0.8700)"}
    page = (tmp_path / "page.md").read_text(encoding="utf-8")
    assert page.count("Frozen segmenter: `models:/m-2e1") == 1
    assert page.count("Frozen segmenter: `models:/m-01d") == len(report["factors"]) - 1


@pytest.mark.parametrize("script", ["bench_recon_downstream"])
def test_bench_recon_downstream_tiny_judges_reconstructions_beside_zero_filled(tiny_runs: TinyRuns, script: str) -> None:
    out = tiny_runs.wait(script)
    bench = _bench("bench_recon_downstream")

    report = json.loads((out / "recon_downstream.json").read_text(encoding="utf-8"))
    _keys(report, {"accelerations", "segmenter", "command", "host", "host_note", "segmenter_origin"},
          "recon_downstream.json")
    assert list(report["accelerations"]) == ["4", "8"]
    for key, entry in report["accelerations"].items():
        _keys(entry, {"acceleration", "cases", "recon_model", "kinds", "delta_dice", "goal_delta_dice", "segmenter",
                      "segmenter_origin"}, key)
        assert entry["cases"] == 2 and entry["goal_delta_dice"] == bench.GOALS[int(key)]
        assert entry["segmenter"]["model_uri"] == report["segmenter"]["model_uri"]  # the one that judged it
        assert list(entry["kinds"]) == list(bench.KINDS)
        for kind in ("reconstructed", "zero_filled"):  # the fully sampled image's PSNR is infinite: itself
            _numbers(entry["kinds"][kind], {"dice_mean", "dice/anterior", "dice/posterior", "psnr", "ssim"}, kind)
        _numbers(entry["delta_dice"], {"reconstructed", "zero_filled"}, f"{key}.delta_dice")
    page = (out / "recon_downstream.md").read_text(encoding="utf-8")
    assert [[row[0] for row in rows] for rows in _tables(out / "recon_downstream.md")] == [list(bench.KINDS)] * 2
    assert "shared" in page and page.count("Frozen segmenter: `") == 2  # each section names its judge


@pytest.mark.parametrize("script", ["bench_translation"])
def test_bench_translation_tiny_scores_the_network_beside_histogram_matching(tiny_runs: TinyRuns, script: str) -> None:
    out = tiny_runs.wait(script)
    translation = _bench("bench_translation")

    report = json.loads((out / "translation.json").read_text(encoding="utf-8"))
    _keys(report, {"datasets", "command", "host", "host_note"}, "translation.json")
    assert list(report["datasets"]) == list(translation.DATASETS)
    for name, entry in report["datasets"].items():
        _keys(entry, {"cases", "channels", "translation", "run_id", "model_uri", "trust_threshold", "test"}, name)
        assert entry["cases"] == {"train": 1 if name == "pgbm001" else 2, "val": 1, "test": 1}, name
        _numbers(entry["test"], {"psnr", "ssim", "mae", "histmatch_psnr", "histmatch_ssim", "histmatch_mae",
                                 "uncertainty_mean", "trusted_fraction"}, f"{name}.test")
    methods, trust = _tables(out / "translation.md")
    assert [row[3] for row in methods] == ["network (U-Net, L1 + SSIM)", "histogram matching"] * 2
    assert [row[0] for row in trust] == list(translation.DATASETS)
    assert "shared" in (out / "translation.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("script", ["check_precision"])
def test_check_precision_tiny_scores_every_setting(tiny_runs: TinyRuns, script: str) -> None:
    out = tiny_runs.wait(script)

    report = json.loads((out / "precision.json").read_text(encoding="utf-8"))
    _keys(report, {"run_dir", "rows"}, "precision.json")
    settings = _bench("check_precision").SETTINGS
    assert list(report["rows"]) == list(settings)
    for name, row in report["rows"].items():
        _numbers(row, {"seconds", "val/dice_mean", "val/dice/anterior", "val/dice/posterior"}, name)
    rows = _table(out / "precision.md")
    assert [r[0] for r in rows] == list(settings) and all(len(r) == 6 for r in rows)
    assert "2 validation cases" in (out / "precision.md").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------- bench_memory, cost_model


def _check_memory(report: dict) -> None:
    """memory.json: the keys bench_memory's table and cost_model.py read."""
    _keys(report, {"head", "workloads", "machine"}, "memory.json")
    _keys(report["machine"], {"platform", "cpus", "torch", "note"}, "memory.json machine")
    _keys(report["workloads"], {"ct300", "wb1000"}, "memory.json workloads")
    for name, paths in (("ct300", {"head", "full", "bounded"}), ("wb1000", {"bounded"})):
        workload = report["workloads"][name]
        _keys(workload, {"shape", "classes", "model", "runs", "seconds", "peak_rss_mb"}, name)
        _numbers(workload["seconds"], paths, f"{name}.seconds")
        _numbers(workload["peak_rss_mb"], paths, f"{name}.peak_rss_mb")
        assert set(workload["runs"]) == paths and all(workload["runs"].values()), f"{name}.runs: {workload['runs']}"
    for key in ("bounded_vs_full", "bounded_vs_head"):
        compared = report["workloads"]["ct300"][key]
        _keys(compared, {"voxels", "differ", "same_affine", "label_counts"}, key)
        # slab by slab gives the full buffer's labels bitwise, the old code's too (HEAD's in tiny mode)
        assert compared["bitwise_equal"] and compared["differ"] == 0, f"{key}: {compared}"


@pytest.mark.parametrize("script", ["bench_memory"])
def test_bench_memory_tiny_runs_every_path_and_the_cost_model_reads_it(tiny_runs: TinyRuns, script: str,
                                                                       tmp_path: Path) -> None:
    out = tiny_runs.wait(script)

    report = json.loads((out / "memory.json").read_text(encoding="utf-8"))
    _check_memory(report)
    assert report["workloads"]["ct300"]["shape"] == list(_bench("bench_memory").TINY_CT[0])
    rows = _table(out / "memory.md")
    assert [r[1] for r in rows] == ["head", "full", "bounded", "bounded"] and all(len(r) == 6 for r in rows)
    # the cost model on this memory.json beside the committed ray.json and predict.json
    for name in ("ray.json", "predict.json"):
        (tmp_path / name).write_bytes((BENCHMARKS / "results" / name).read_bytes())
    (tmp_path / "memory.json").write_bytes((out / "memory.json").read_bytes())
    _bench("cost_model").main(["--tiny", "--results", str(tmp_path), "--out", str(tmp_path / "model")])
    model = json.loads((tmp_path / "model" / "cost_model.json").read_text(encoding="utf-8"))
    assert model["inputs"]["ct_shape"]["value"] == report["workloads"]["ct300"]["shape"]
    assert model["derived"]["ct_voxels_measured"] == math.prod(_bench("bench_memory").TINY_CT[0])


def _at(data: object, path: list) -> object:
    """The value at a cost-model input's key path, followed here independently of cost_model.py."""
    for step in path:
        if isinstance(step, dict):
            assert isinstance(data, list), (path, step)
            rows = [r for r in data if all(r.get(k) == v for k, v in step.items())]
            assert len(rows) == 1, f"{step} selects {len(rows)} rows"
            data = rows[0]
        else:
            assert isinstance(data, dict) and step in data, (path, step)
            data = data[step]
    return data


def _check_cost_model(model: dict, results: Path) -> None:
    """cost_model.json: every input traced to its file and key, every figure derived from them."""
    _keys(model, {"command", "cluster", "inputs", "derived", "per_case", "gpu", "projection", "assumptions"},
          "cost_model.json")
    for name, figure in model["inputs"].items():
        _keys(figure, {"value", "unit", "file", "key", "path"}, f"inputs.{name}")
        source = json.loads((results / figure["file"]).read_text(encoding="utf-8"))
        assert _at(source, figure["path"]) == figure["value"], f"inputs.{name} is not {figure['file']}'s {figure['key']}"
    cases = {c["case"] for c in model["per_case"].values()}
    assert cases == {"CT", "hippocampus"}, cases
    for name, case in model["per_case"].items():
        _numbers(case, {"core_seconds", "cases_per_hour_per_core", "actor_mib"}, f"per_case.{name}")
        assert case["cases_per_hour_per_core"] == pytest.approx(3600 / case["core_seconds"])
    assert model["gpu"]["cases_per_hour_per_gpu"] is None and "No committed results file" in model["gpu"]["why"]
    cohort, startup = model["projection"]["cohort"], model["derived"]["ray_startup_s"]
    for name, p in model["projection"]["scenarios"].items():
        _numbers(p, {"core_seconds_per_case", "core_hours", "actor_mib", "actors_per_machine", "cluster_cases_per_hour",
                     "wall_hours", "mask_bytes_per_case", "mask_terabytes"}, f"projection.{name}")
        assert p["core_hours"] == pytest.approx(cohort * p["core_seconds_per_case"] / 3600)
        assert p["wall_hours"] == pytest.approx(cohort / p["cluster_cases_per_hour"] + startup / 3600)
    for assumption in model["assumptions"]:
        _keys(assumption, {"option", "value", "says"}, "assumptions[]")


@pytest.mark.parametrize("script", ["cost_model"])
def test_cost_model_tiny_traces_every_figure_to_a_committed_file(tiny_runs: TinyRuns, script: str) -> None:
    out = tiny_runs.wait(script)

    model = json.loads((out / "cost_model.json").read_text(encoding="utf-8"))
    _check_cost_model(model, BENCHMARKS / "results")
    assert set(model["projection"]["scenarios"]) == {"ct_predict", "ct_memory"}  # the committed predict.json has a CT
    assert model["cluster"]["cohort"] == 100_000
    per_case, projection, inputs = _tables(out / "cost_model.md")
    assert len(per_case) == len(model["per_case"]) and len(projection) == len(model["projection"]["scenarios"])
    assert [row[0] for row in inputs] == list(model["inputs"])


def _results_copy(folder: Path) -> Path:
    folder.mkdir()
    for name in ("ray.json", "predict.json", "memory.json"):
        (folder / name).write_bytes((BENCHMARKS / "results" / name).read_bytes())
    return folder


def test_cost_model_without_a_ct_in_predict_json_projects_from_memory_json_alone(tmp_path: Path) -> None:
    results = _results_copy(tmp_path / "results")
    predicted = json.loads((results / "predict.json").read_text(encoding="utf-8"))
    predicted["rows"] = [r for r in predicted["rows"] if r["workload"] != "ct512"]
    (results / "predict.json").write_text(json.dumps(predicted), encoding="utf-8")

    _bench("cost_model").main(["--results", str(results), "--out", str(tmp_path / "out")])

    model = json.loads((tmp_path / "out" / "cost_model.json").read_text(encoding="utf-8"))
    _check_cost_model(model, results)
    assert list(model["projection"]["scenarios"]) == ["ct_memory"]
    assert "ct_predict_s_per_case" not in model["inputs"]


def test_cost_model_bounds_actors_by_memory_and_scales_a_larger_ct(tmp_path: Path) -> None:
    """An odd CT (twice the voxels, odd sides) on machines with little memory: memory binds, time doubles."""
    results = _results_copy(tmp_path / "results")
    cost_model = _bench("cost_model")
    cost_model.main(["--results", str(results), "--out", str(tmp_path / "base"), "--cohort", "777"])
    cost_model.main(["--results", str(results), "--out", str(tmp_path / "big"), "--cohort", "777",
                     "--ct-shape", "512,512,600", "--memory-gb", "7", "--cores", "5", "--machines", "3"])

    base, big = (json.loads((tmp_path / d / "cost_model.json").read_text(encoding="utf-8")) for d in ("base", "big"))
    for name, small in base["projection"]["scenarios"].items():
        large = big["projection"]["scenarios"][name]
        assert large["core_seconds_per_case"] == pytest.approx(2 * small["core_seconds_per_case"])
        assert small["actors_bound_by"] == "cores" and large["actors_bound_by"] == "memory"
        assert large["actors_per_machine"] == int(7 * 1024 * 0.7 // large["actor_mib"]) < 5
        assert small["actor_mib"] < large["actor_mib"] < 2 * small["actor_mib"]  # the process's fixed part is not doubled
        assert large["mask_bytes_per_case"] == 2 * small["mask_bytes_per_case"]
    assert "--ct-shape 512,512,600" in (tmp_path / "big" / "cost_model.md").read_text(encoding="utf-8")


def test_cost_model_names_a_missing_results_file_and_the_command_that_writes_it(tmp_path: Path) -> None:
    results = _results_copy(tmp_path / "results")
    (results / "ray.json").unlink()

    with pytest.raises(SystemExit, match=r"ray\.json: missing.*bench_ray\.py"):
        _bench("cost_model").main(["--results", str(results), "--out", str(tmp_path / "out")])


def test_cost_model_names_a_key_the_file_lacks(tmp_path: Path) -> None:
    results = _results_copy(tmp_path / "results")
    report = json.loads((results / "memory.json").read_text(encoding="utf-8"))
    del report["workloads"]["ct300"]["peak_rss_mb"]["bounded"]
    (results / "memory.json").write_text(json.dumps(report), encoding="utf-8")

    with pytest.raises(SystemExit, match=r"memory\.json: expected a value at workloads\.ct300\.peak_rss_mb\.bounded"):
        _bench("cost_model").main(["--results", str(results), "--out", str(tmp_path / "out")])


# ----------------------------------------------------------------------------------- the Makefile


def test_tiny_mode_never_writes_into_the_committed_results() -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").glob("recon.*")}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_recon.py"), "--tiny", "--out",
                           str(BENCHMARKS / "results")], cwd=REPO, capture_output=True, text=True, timeout=120)

    assert done.returncode != 0
    assert "must not replace the committed ones in benchmarks/results" in done.stderr
    assert before == {p.name: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").glob("recon.*")}


def test_every_bench_target_runs_a_script_with_a_tiny_test_and_passes_bench_args() -> None:
    """`make bench BENCH_ARGS=--tiny` (and every bench-* target) runs the tiny modes tested here."""
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    recipes = re.findall(r"^(bench[\w-]*):[^\n]*\n((?:\t[^\n]*\n)+)", makefile, flags=re.M)
    assert {target for target, _ in recipes} >= {"bench", "bench-predict", "bench-ddp"}
    scripts = set()
    for target, recipe in recipes:
        for line in recipe.splitlines():
            found = re.search(r"benchmarks/(\w+)\.py", line)
            if found:
                scripts.add(found.group(1))
                assert line.rstrip().endswith("$(BENCH_ARGS)"), f"make {target}: {line.strip()} ignores BENCH_ARGS"
    covered = {TINY_VARIANTS.get(name, (name, []))[0] for name in TINY_SCRIPTS}  # a variant runs its script
    assert scripts == covered, (
        f"bench targets run {sorted(scripts)}; tiny tests cover {sorted(covered)}: give a new benchmark "
        "--tiny (benchmarks/tiny.py) and a test here that checks what it writes")


# ----------------------------------------------------------------------------------- bench_pretrain


@pytest.mark.slow
def test_bench_pretrain_tiny_pretrains_once_and_scores_both_arms_per_case_count(tmp_path: Path) -> None:
    """benchmarks/bench_pretrain.py --tiny: one pretraining run whose encoder every pretrained arm loads,
    both arms per case count, and the table and text curve built from them (not a `make bench*` script:
    it trains a dozen minutes at full size, so it is run by hand and not in TINY_SCRIPTS)."""
    require(REPO.parent / "shared" / "data" / "msd_task04_hippocampus")
    runs = TinyRuns(tmp_path, ["bench_pretrain"])
    try:
        out = runs.wait("bench_pretrain")
    finally:
        runs.close()
    report = json.loads((out / "pretrain.json").read_text(encoding="utf-8"))
    _keys(report, {"arms", "pretraining", "host", "command"}, "pretrain.json")
    _numbers(report["pretraining"], {"tensors", "images", "minutes", "epochs"}, "pretrain.json pretraining")
    assert report["pretraining"]["images"] == 8 and report["pretraining"]["tensors"] > 0
    assert set(report["arms"]) == {f"{arm}/{cases}" for arm in ("scratch", "pretrained") for cases in ("2", "all")}
    for name, entry in report["arms"].items():
        _numbers(entry, {"cases", "total_minutes", "fine_tune_minutes", "epochs", "test_dice_mean"}, name)
        assert entry["cases"] == (2 if name.endswith("/2") else 4) and 0 <= entry["test_dice_mean"] <= 1, name
        assert (entry["loaded_tensors"] == report["pretraining"]["tensors"]) == name.startswith("pretrained"), name
    rows = _table(out / "pretrain.md")
    assert [row[0] for row in rows] == ["2", "4"]
    assert "The host was shared" in (out / "pretrain.md").read_text(encoding="utf-8")
