"""``medseg plan`` on real and synthetic datasets: plan from the data alone, train, score held out.

Each section runs ``medseg plan`` (fingerprint, rules, the probe on this machine) and then the
ordinary ``medseg run`` of the config it wrote, as child processes one after another, and merges
its record into ``benchmarks/results/plan.json`` (then renders ``plan.md``), so a section can be
rerun alone. Nothing is set by hand: the configs are the planner's, under ``configs/planned/``.

Sections:
    hippocampus   MSD Task04 from its training folder (labels and modality from dataset.json),
                  its 52 committed test cases held out, the other 208 in 5 folds, all of them
                  training (data_manifests/msd_hippocampus_folds.csv); --budget
                  minutes. Hand-tuned reference: hippocampus.md.
    medmnist      PneumoniaMNIST, BreastMNIST, AdrenalMNIST3D from their imported folders
                  (``make medmnist``), official splits, --seeds K; test AUC. Reference: medmnist.md.
    synthetic-ct  benchmarks/make_datasets.py's seeded CT-like set (0.7 x 0.7 x 5 mm, half DICOM
                  series + DICOM SEG, half NRRD; a rare lesion class); per-class test Dice.
    fingerprint   the 260 MSD Hippocampus cases fingerprinted afresh, timed.
    pyradiomics   ../shared/data/pyradiomics_testcases: plan and verify (too few cases to train).
    png           a class-per-folder PNG tree written from BreastMNIST: plan, train, predict PNGs.
    tumour        benchmarks/make_datasets.py's seeded BraTS-like set (FLAIR + T1c, necrosis inside an
                  enhancing rim inside edema, 6 training + 4 test cases): `medseg plan --race` (regions
                  found, raced against label-wise softmax) vs the planner's label-wise softmax candidate
                  at the same --budget; per-class and region Dice on the test cases.

Usage:
    python benchmarks/bench_plan.py hippocampus --budget 30
    python benchmarks/bench_plan.py medmnist --budget 5 --seeds 3
    python benchmarks/bench_plan.py synthetic-ct --budget 10
    python benchmarks/bench_plan.py pyradiomics
    python benchmarks/bench_plan.py fingerprint
    python benchmarks/bench_plan.py png --budget 4
    python benchmarks/bench_plan.py tumour --budget 20
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_results import REPO, Run, execute, git_state, machine  # noqa: E402

from medseg.io.atomic import atomic_write_text  # noqa: E402

log = logging.getLogger("bench_plan")
SHARED = REPO.parent / "shared" / "data"


def rel(path: Path) -> str:
    """``path`` relative to the repo (``../shared/data/...``, ``data/...``): what the planned configs record,
    so they run on any clone."""
    import os

    return os.path.relpath(path, REPO)
RESULTS = REPO / "benchmarks" / "results"
MEDMNIST = {"pneumonia": "pneumoniamnist", "breast": "breastmnist", "adrenal3d": "adrenalmnist3d"}


def medseg_cli(*args: str) -> str:
    """Run ``medseg ARGS`` in the repo; its stdout (also echoed). Raises SystemExit when it fails."""
    argv = [sys.executable, "-m", "medseg", *args]
    log.info("medseg %s", shlex.join(args))
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"`medseg {shlex.join(args)}` exited with {done.returncode}")
    return done.stdout


def plan_and_run(name: str, dataset: str, budget: float, plan_args: list[str], seeds: int = 0,
                 work: Path | None = None) -> dict[str, Any]:
    """``medseg plan DATASET --budget B --out configs/planned/<name>.yaml --home . --explain`` then ``medseg run``
    (``--home .``: the runs and their store in the repository's runs/, not beside the config)."""
    out = f"configs/planned/{name}.yaml"
    started = time.time()
    plan_cmd = ["plan", dataset, "--budget", f"{budget:g}m", "--out", out, "--home", ".", "--explain", "--no-progress",
                *plan_args]
    explained = medseg_cli(*plan_cmd)
    plan_seconds = time.time() - started
    location = [f"output_dir={work or REPO / 'runs' / 'planned'}/{name}"]
    record = execute(Run(config=out, seeds=seeds, title=name), [], location)
    planned = json.loads(json.dumps(_read_yaml(REPO / out)))
    return {"name": name, "plan_command": "medseg " + shlex.join(plan_cmd), "budget_minutes": budget,
            "plan_seconds": round(plan_seconds, 1), "explain": _explain_table(explained),
            "probe": _probe_lines(REPO / out), "planned_config": planned, "run": record,
            "race_table": [line for line in explained.splitlines() if line.startswith("|")]}


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def _probe_lines(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    inside = False
    found = []
    for line in lines:
        if line.startswith("# Probe"):
            inside = True
            continue
        if inside and line.startswith("#   "):
            found.append(line[4:].rstrip())
        elif inside:
            break
    return found


def _explain_table(text: str) -> list[str]:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("setting ")), None)
    if start is None:
        return []
    table = []
    for line in lines[start:]:
        if not line.strip() or line.startswith("config:"):
            break
        table.append(line.rstrip())
    return table


# ------------------------------------------------------------------------------------ sections


def hippocampus(args: argparse.Namespace) -> dict[str, Any]:
    folder = SHARED / "msd_task04_hippocampus"
    name = f"hippocampus_{args.budget:g}m" + ("_race" if args.race else "")
    # nnU-Net's split: the committed manifest's 52 test cases stay held out, the other 208 are spread over
    # 5 folds and all of them train (data_manifests/msd_hippocampus_folds.csv, medseg.data.manifest.with_folds)
    record = plan_and_run(name, rel(folder), args.budget, ["--manifest", "data_manifests/msd_hippocampus_folds.csv",
                                                           "--name", name, *(["--race"] if args.race else [])],
                          work=args.work)
    record["raced"] = args.race
    if args.test_time:
        record["test_time"] = _test_time_variants(Path(record["run"]["run_dir"]) / "model", folder,
                                                  REPO / "data_manifests" / "msd_hippocampus_folds.csv")
    return record


#: What ``--test-time`` scores on the held-out cases: the plain prediction, nnU-Net's mirroring over
#: every axis (the run's own test figure, recomputed, when the run mirrored: ``validation.tta``), and
#: keeping each label's largest component.
TEST_TIME_VARIANTS = {"plain": {}, "mirror TTA": {"tta": True}, "largest component": {"keep_largest": True},
                      "mirror TTA + largest component": {"tta": True, "keep_largest": True}}


def _test_time_variants(model: Path, root: Path, manifest: Path) -> dict[str, Any]:
    """The trained model on the manifest's test split under each of :data:`TEST_TIME_VARIANTS`,
    scored by ``medseg.evaluate`` against the references (Dice summed over cases, as runs report it)."""
    import os
    import tempfile

    import medseg
    from medseg.data.manifest import read_manifest

    cases = [c for c in read_manifest(manifest).cases if c.split == "test"]
    scores: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="test-time-") as tmp:
        references = Path(tmp) / "references"
        references.mkdir()
        for case in cases:
            label = case.label_path(root)
            os.symlink(label, references / label.name)
        for name, options in TEST_TIME_VARIANTS.items():
            out = Path(tmp) / re.sub(r"[^a-z]+", "_", name)
            started = time.perf_counter()
            predictor = medseg.Predictor.from_uri(str(model), device="cpu", **options)
            predictor.predict_paths([c.image_paths(root)[0] for c in cases], out)
            seconds = time.perf_counter() - started
            folder_scores = medseg.evaluate(out, references, labels={k: v for k, v in predictor.labels.items() if k})
            dice = {k: round(v, 4) for k, v in folder_scores.dice.items() if k != "dice_mean"}
            scores[name] = {"options": options, "backend": predictor.model.backend, "cases": folder_scores.scored,
                            "dice": dice, "dice_mean": round(sum(dice.values()) / len(dice), 4),
                            "seconds": round(seconds, 1)}
            log.info("test time %s: %s", name, scores[name])
    return scores


def medmnist(args: argparse.Namespace) -> dict[str, Any]:
    records = {}
    for short, stem in MEDMNIST.items():
        if args.only and short not in args.only:
            continue
        folder = REPO / "data" / stem
        if not (folder / "medmnist_import.json").is_file():
            raise SystemExit(f"{folder}: not imported; run `make medmnist` first")
        name = f"medmnist_{short}_{args.budget:g}m"
        record = plan_and_run(name, f"data/{stem}", args.budget,
                              ["--manifest", f"data_manifests/medmnist_{short}.csv", "--name", name],
                              seeds=args.seeds, work=args.work)
        records[short] = record
    return records


def synthetic_ct(args: argparse.Namespace) -> dict[str, Any]:
    data = REPO / "data" / "synthetic_ct"
    subprocess.run([sys.executable, "benchmarks/make_datasets.py", "synthetic-ct", "--out", str(data),
                    "--cases", str(args.cases), "--seed", "0", "--no-progress"], cwd=REPO, check=True)
    manifest = "data_manifests/synthetic_ct.csv"
    medseg_cli("manifest", "build", "--from", rel(data), "--out", manifest, "--val-fraction", "0.2",
               "--test-fraction", "0.2", "--seed", "0")
    name = f"synthetic_ct_{args.budget:g}m"
    return plan_and_run(name, rel(data), args.budget, ["--manifest", manifest, "--name", name], work=args.work)


def pyradiomics(args: argparse.Namespace) -> dict[str, Any]:
    folder = SHARED / "pyradiomics_testcases"
    manifest = "data_manifests/pyradiomics_testcases.csv"
    built = medseg_cli("manifest", "build", "--from", rel(folder), "--out", manifest, "--val-fraction", "0.25")
    out = "configs/planned/pyradiomics_testcases.yaml"
    explained = medseg_cli("plan", rel(folder), "--manifest", manifest, "--budget", "10m", "--out", out,
                           "--home", ".", "--explain", "--no-progress", "--no-probe")
    verified = medseg_cli("verify", manifest, "--config", out, "--no-progress")
    return {"name": "pyradiomics", "manifest_build": built.strip().splitlines(), "explain": _explain_table(explained),
            "verify": verified.strip().splitlines(), "planned_config": _read_yaml(REPO / out)}


def png(args: argparse.Namespace) -> dict[str, Any]:
    tree = REPO / "data" / "breast_png"
    subprocess.run([sys.executable, "benchmarks/make_datasets.py", "imagefolder", "--npz",
                    str(SHARED / "medmnist" / "breastmnist.npz"), "--out", str(tree), "--no-progress"],
                   cwd=REPO, check=True)
    name = f"breast_png_{args.budget:g}m"
    record = plan_and_run(name, rel(tree), args.budget, ["--manifest", "data_manifests/breast_png.csv",
                                                         "--name", name], work=args.work)
    model = record["run"]["model_uri"]
    outputs = (args.work or REPO / "runs" / "planned") / f"{name}_predict"
    predicted = medseg_cli("predict", "--model", model, "--input", str(tree / "test"), "--output", str(outputs),
                           "--no-progress", "--no-tracking", "--overwrite")
    summary = json.loads((outputs / "predict_summary.json").read_text())
    with open(outputs / "predictions.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "ok"]
    # the class folder each PNG came from is its true class: how many did predict get right
    right = sum(1 for r in rows if Path(r["input"]).parent.name == r["predicted_name"])
    record["predict"] = {"command": f"medseg predict --model {model} --input {tree / 'test'} --output {outputs}",
                         "printed": predicted.strip().splitlines()[:6], "cases": summary.get("cases"),
                         "counts": summary.get("counts"), "backend": summary.get("backend"),
                         "accuracy_vs_class_folders": round(right / max(1, len(rows)), 4)}
    return record


#: BraTS' evaluation regions on the synthetic tumours' labels (1 necrosis, 2 edema, 3 enhancing).
TUMOUR_REGIONS = {"whole_tumour": (1, 2, 3), "tumour_core": (1, 3), "enhancing": (3,)}


def tumour(args: argparse.Namespace) -> dict[str, Any]:
    """The seeded BraTS-like set: the plan as `medseg plan --race` makes it (regions found, raced
    against label-wise softmax, the winner on every case) against the planner's own label-wise
    softmax candidate for the whole budget; per-class and region Dice on the 4 test cases."""
    data = REPO / "data" / "synthetic_tumour"
    subprocess.run([sys.executable, "benchmarks/make_datasets.py", "tumour", "--out", str(data), "--train", "6",
                    "--test", "4", "--seed", "0", "--no-progress"], cwd=REPO, check=True)
    manifest = "data_manifests/synthetic_tumour.csv"
    name = f"tumour_{args.budget:g}m"
    planned = plan_and_run(name, rel(data), args.budget, ["--manifest", manifest, "--name", name, "--race"],
                           work=args.work)
    labels_name = f"tumour_labels_{args.budget:g}m"
    labels_cfg = _labels_candidate(f"configs/planned/{name}.yaml", labels_name, args.budget)
    location = [f"output_dir={args.work or REPO / 'runs' / 'planned'}/{labels_name}"]
    softmax = execute(Run(config=labels_cfg, title=labels_name), [], location)
    return {"name": name, "planned": planned, "labels_plan": {"config": labels_cfg, "run": softmax},
            "test": {"planned": _score_tumour_tests(planned["run"]["model_uri"], data),
                     "labels": _score_tumour_tests(softmax["model_uri"], data)}}


def _labels_candidate(planned_yaml: str, name: str, budget: float) -> str:
    """The planned config with the planner's label-wise softmax candidate instead of region targets,
    unraced, for the whole budget: the same network, patch and data, only the targets differ."""
    import yaml

    raw = _read_yaml(REPO / planned_yaml)
    raw.pop("regions", None)  # the "labels" candidate's override (segmentation/structures.py)
    raw["train"]["max_minutes"] = budget
    raw["output_dir"] = f"../../runs/{name}"  # a config's relative paths start at its folder, configs/planned
    raw["tracking"]["experiment"] = name
    out = f"configs/planned/{name}.yaml"
    header = (f"# {planned_yaml} with the planner's label-wise softmax candidate (regions removed), unraced, for "
              f"the whole {budget:g}-minute budget: the comparison run of `python benchmarks/bench_plan.py tumour`.\n")
    atomic_write_text(REPO / out, header + yaml.safe_dump(raw, sort_keys=False))
    return out


def _score_tumour_tests(model_uri: str, data: Path) -> dict[str, Any]:
    """Per-case Dice of each label and each BraTS region on imagesTs/labelsTs, then the mean over cases."""
    import nibabel as nib
    import numpy as np

    import medseg

    predictor = medseg.Predictor.from_uri(model_uri, tracking_uri=f"sqlite:///{REPO / 'runs' / 'mlflow.db'}")
    per_case: dict[str, dict[str, float]] = {}
    for label_path in sorted((data / "labelsTs").glob("*.nii.gz")):
        case = label_path.name.removesuffix(".nii.gz")
        channels = [nib.load(data / "imagesTs" / f"{case}_{c:04d}.nii.gz") for c in range(2)]
        image = np.stack([np.asarray(c.dataobj, dtype=np.float32) for c in channels])
        predicted = predictor.predict(image, affine=channels[0].affine, case_id=case).label_map
        truth = np.asarray(nib.load(label_path).dataobj).astype(np.int64)
        scores = {f"dice/{n}": _dice(predicted == v, truth == v) for v, n in ((1, "necrosis"), (2, "edema"),
                                                                            (3, "enhancing"))}
        scores.update({f"region/{n}": _dice(np.isin(predicted, m), np.isin(truth, m))
                       for n, m in TUMOUR_REGIONS.items()})
        per_case[case] = scores
    keys = next(iter(per_case.values())).keys()
    mean = {k: round(float(np.nanmean([c[k] for c in per_case.values()])), 4) for k in keys}
    return {"cases": len(per_case), "mean": mean, "per_case": per_case}


def _dice(pred: Any, truth: Any) -> float:
    """nnU-Net's per-case Dice: NaN when the reference is empty (absent, not wrong)."""
    reference = int(truth.sum())
    if reference == 0:
        return float("nan")
    return 2.0 * int((pred & truth).sum()) / (int(pred.sum()) + reference)


def fingerprint(args: argparse.Namespace) -> dict[str, Any]:
    """The fingerprint of the 260 MSD Hippocampus cases measured afresh (no cache), timed."""
    from medseg.data.manifest import read_manifest
    from medseg.planning.fingerprint import compute_fingerprint

    manifest = read_manifest(REPO / "data_manifests" / "msd_hippocampus.csv")
    started = time.perf_counter()
    fp = compute_fingerprint(manifest, SHARED / "msd_task04_hippocampus", channel_names=["MRI"],
                             labels={0: "background", 1: "Anterior", 2: "Posterior"}, progress=False, use_cache=False)
    seconds = time.perf_counter() - started
    return {"cases": len(fp.cases), "seconds": round(seconds, 2), "median_spacing": fp.median_spacing(),
            "median_shape": fp.median_shape(), "channels": [vars(c) for c in fp.channels],
            "classes": [vars(c) for c in fp.classes]}


SECTIONS = {"fingerprint": fingerprint, "hippocampus": hippocampus, "medmnist": medmnist, "synthetic-ct": synthetic_ct,
            "pyradiomics": pyradiomics, "png": png, "tumour": tumour}


# ------------------------------------------------------------------------------------ results


def merge(section: str, key: str, record: Any, command: str) -> dict[str, Any]:
    path = RESULTS / "plan.json"
    report = json.loads(path.read_text()) if path.is_file() else {"title": "medseg plan", "sections": {}}
    report["sections"].setdefault(section, {})[key] = {
        "command": command, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(), "machine": machine(), "record": record}
    atomic_write_text(path, json.dumps(report, indent=1, default=str))
    atomic_write_text(RESULTS / "plan.md", render(report))
    return report


def _epochs(value: Any) -> str:
    """Epochs of one run, or their mean over seeds (a float), to one decimal."""
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _m(metrics: dict[str, Any], key: str, digits: int = 3) -> str:
    value = metrics.get(key)
    return "n/a" if value is None else f"{value:.{digits}f}"


def _hand_tuned_medmnist(short: str) -> tuple[str, str, str]:
    """(seed-0 AUC, mean AUC, std) of the hand-tuned config, from benchmarks/results/medmnist.json."""
    path = REPO / "benchmarks" / "results" / "medmnist.json"
    runs = [r for r in json.loads(path.read_text())["runs"] if r["config"] == f"configs/medmnist_{short}.yaml"
            and not r.get("overrides")] if path.is_file() else []
    if not runs:
        return "n/a", "n/a", "n/a"
    m = runs[0]["metrics"]
    seed0 = next((c["metrics"].get("test/auc") for c in runs[0].get("children", []) if c.get("name") == "seed-0"), None)
    return (_m({"v": seed0}, "v"), _m(m, "test/auc"), _m(m, "test/auc_std"))


def _hand_tuned_hippocampus() -> str:
    """The committed hand-tuned 30-minute test Dice (benchmarks/results/hippocampus.json)."""
    path = REPO / "benchmarks" / "results" / "hippocampus.json"
    if not path.is_file():
        return "n/a"
    runs = [r for r in json.loads(path.read_text())["runs"] if "train.max_minutes=30" in r.get("overrides", [])
            and r.get("nproc", 1) == 1]
    return f"{runs[0]['metrics']['test/dice_mean']:.4f}" if runs else "n/a"


def render(report: dict[str, Any]) -> str:
    out = ["# `medseg plan`: configs planned from the data, the budget and this machine", "",
           "Written by `python benchmarks/bench_plan.py SECTION` (one command per section below). Every run is the",
           "planner's config, unedited; every figure is on held-out data (a test split the planner never reads).", ""]
    sections = report["sections"]
    hand_tuned = _hand_tuned_hippocampus()
    for _key, entry in sorted(sections.get("fingerprint", {}).items()):
        rec = entry["record"]
        out += ["## Fingerprint: MSD Hippocampus", "", f"`{entry['command']}`: {rec['cases']} cases measured in "
                f"**{rec['seconds']:.1f} s** ({entry['machine']['cpus_usable']} CPUs, no cache); median spacing "
                f"{rec['median_spacing']}, median shape {rec['median_shape']}.", "",
                "| class | voxel fraction | cases with | components per case | median component mm³ |",
                "|---|---|---|---|---|"]
        for c in rec["classes"]:
            out.append(f"| {c['name']} | {c['voxel_fraction']:.4f} | {c['cases_with']} | "
                       f"{c['components_per_case'] if c['components_per_case'] is not None else 'n/a'} | "
                       f"{c['component_mm3_median'] if c['component_mm3_median'] is not None else 'n/a'} |")
        out.append("")
    for _key, entry in sorted(sections.get("hippocampus", {}).items()):
        rec = entry["record"]
        m = rec["run"]["metrics"]
        title = f"## MSD Hippocampus, {rec['budget_minutes']:g}-minute budget"
        if any(a.get("name") == "flip" for a in rec.get("planned_config", {}).get("augment", [])):
            title += ", trained with nnU-Net's mirroring (every axis)"
        if rec.get("raced"):
            title += ", raced (`medseg plan --race`)"
        if entry.get("superseded"):
            title += " (superseded, kept for the record)"
        out += [title, "", *([f"Superseded: {entry['superseded']}.", ""] if entry.get("superseded") else []),
                f"`{entry['command']}` (commit {entry['git']['commit'][:12]}, {entry['date']}, "
                f"{entry['machine']['cpu']}, {entry['machine']['cpus_usable']} CPUs, torch {entry['machine']['torch']})",
                "", "| test cases | epochs | training min | Dice anterior | Dice posterior | mean Dice | hand-tuned config, "
                "30 min (hippocampus.json) |", "|---|---|---|---|---|---|---|",
                f"| {rec['run']['splits'].get('test', {}).get('cases')} | {rec['run']['epochs']} | "
                f"{rec['run']['train_minutes']:.1f} | {_m(m, 'test/dice/Anterior')} | {_m(m, 'test/dice/Posterior')} | "
                f"**{_m(m, 'test/dice_mean', 4)}** | {hand_tuned} |", "", *_mirrored_note(m),
                "What it planned (`--explain`):", "",
                "```", *rec["explain"], "```", "", "Probe:", "", "```", *rec["probe"], "```", "",
                *(["The race (successive halving on fold 0, held out; the winner then trains on every case for the "
                   "rest of the budget, starting from its race weights):", "", *rec["race_table"], ""]
                  if rec.get("raced") and rec.get("race_table") else []),
                *_render_test_time(rec.get("test_time"))]
    medmnist_rows = sections.get("medmnist", {})
    if medmnist_rows:
        out += ["## MedMNIST, planned from the imported folders", "",
                "Hand-tuned: the configs in `configs/`, 3 seeds, from `benchmarks/results/medmnist.json` (same "
                "machine); the issue's reference AUCs were 0.963 / 0.932 / 0.856.", "",
                "| dataset | budget min | planned network | epochs | augment | seeds | test AUC (mean ± std) | test ACC "
                "| hand-tuned seed 0 | hand-tuned mean ± std | command (commit) |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for _key, entry in sorted(medmnist_rows.items()):
            for short, rec in entry["record"].items():
                m = rec["run"]["metrics"]
                cfg = rec["planned_config"]
                std = m.get("test/auc_std")
                seed0, mean, spread = _hand_tuned_medmnist(short)
                out.append(f"| {short} | {rec['budget_minutes']:g} | resnet18 x{cfg['model']['widen_factor']} | "
                           f"{_epochs(rec['run'].get('epochs') or cfg['train']['max_epochs'])} | "
                           f"{', '.join(a['name'] for a in cfg['augment'])} | "
                           f"{len(rec['run']['seeds'])} | **{_m(m, 'test/auc')}**"
                           + (f" ± {std:.3f}" if std is not None else "") + f" | {_m(m, 'test/acc')} | "
                           f"{seed0} | {mean} ± {spread} | `{entry['command']}` ({entry['git']['commit'][:7]}) |")
        out.append("")
    for _key, entry in sorted(sections.get("synthetic-ct", {}).items()):
        rec = entry["record"]
        m = rec["run"]["metrics"]
        cfg = rec["planned_config"]
        out += [f"## Synthetic CT-like (0.7 x 0.7 x 5 mm; DICOM series + SEG and NRRD), {rec['budget_minutes']:g} min",
                "", f"`{entry['command']}`", "",
                f"Planned strides {cfg['model']['strides']}, patch {cfg['patch']['size']}, "
                f"sampler {cfg['patch']['sampler']}, intensity {cfg['preprocess']['intensity']['mode']}.", "",
                "| test cases | epochs | Dice organ | Dice vessel | Dice lesion (rare) | mean Dice |", "|---|---|---|---|---|---|",
                f"| {rec['run']['splits'].get('test', {}).get('cases')} | {rec['run']['epochs']} | "
                f"{_m(m, 'test/dice/organ')} | {_m(m, 'test/dice/vessel')} | {_m(m, 'test/dice/lesion')} | "
                f"**{_m(m, 'test/dice_mean')}** |", "", "```", *rec["explain"], "```", ""]
    for _key, entry in sorted(sections.get("tumour", {}).items()):
        out += _render_tumour(entry)
    for _key, entry in sorted(sections.get("pyradiomics", {}).items()):
        rec = entry["record"]
        out += ["## pyradiomics test cases: plan and verify", "", f"`{entry['command']}`", "", "```",
                *rec["manifest_build"], "", *rec["explain"], "", *rec["verify"], "```", ""]
    for _key, entry in sorted(sections.get("png", {}).items()):
        rec = entry["record"]
        m = rec["run"]["metrics"]
        out += ["## Class-per-folder PNGs (BreastMNIST written as an ImageFolder tree)", "",
                f"`{entry['command']}`", "", f"Test AUC **{_m(m, 'test/auc')}**, ACC {_m(m, 'test/acc')} (the run's "
                f"evaluation); `medseg predict` on the {rec['predict']['cases']} test PNGs: {rec['predict']['counts']}, "
                f"backend {rec['predict'].get('backend')}, predicted class = class folder for "
                f"{rec['predict'].get('accuracy_vs_class_folders')} of them.", "",
                "```", *rec["explain"], "```", "", "```", *rec["predict"]["printed"], "```", ""]
    return "\n".join(out) + "\n"


def _mirrored_note(metrics: dict[str, Any]) -> list[str]:
    """Whether the run scored its test split with mirroring TTA (``validation.tta``)."""
    count = metrics.get("test/predictions_per_case")
    if not count or count <= 1:
        return []
    return [f"The run scored its test split as nnU-Net does, with mirroring TTA ({count:g} predictions per case, "
            "`validation.tta` auto for a plan that mirrors every axis).", ""]


def _render_test_time(test_time: dict[str, Any] | None) -> list[str]:
    """The same model on the same test cases under each test-time variant (``--test-time``)."""
    if not test_time:
        return []
    out = ["Test-time variants of this model (`--test-time`: `medseg predict` options on the test split, scored "
           "by `medseg evaluate`, Dice summed over cases):", "",
           "| variant | cases | Dice anterior | Dice posterior | mean Dice | predict s |", "|---|---|---|---|---|---|"]
    for name, v in test_time.items():
        dice = list(v["dice"].values())
        out.append(f"| {name} | {v['cases']} | {dice[0]:.3f} | {dice[1]:.3f} | {v['dice_mean']:.4f} | {v['seconds']} |")
    return [*out, ""]


def _render_tumour(entry: dict[str, Any]) -> list[str]:
    rec = entry["record"]
    planned, labels = rec["planned"], rec["labels_plan"]
    budget = planned["budget_minutes"]
    cfg = planned["planned_config"]
    race = (planned.get("race_table") or [])
    keys = ["dice/necrosis", "dice/edema", "dice/enhancing", "region/whole_tumour", "region/tumour_core",
            "region/enhancing"]
    out = [f"## Synthetic BraTS-like tumours (FLAIR + T1c, nested labels), {budget:g} min, nothing set by hand", "",
           f"`{entry['command']}` (commit {entry['git']['commit'][:12]}, {entry['date']}, {entry['machine']['cpu']}, "
           f"{entry['machine']['cpus_usable']} CPUs). 6 training cases (5 folds, all trained on), 4 test cases from "
           "imagesTs/labelsTs; Dice per case (NaN where the reference is empty), mean over the test cases.", "",
           "| plan | targets | epochs | training min | " + " | ".join(keys) + " |",
           "|---" * (4 + len(keys)) + "|"]
    for title, run, scores, targets in (
            ("`medseg plan --race` (the planner)", planned["run"], rec["test"]["planned"],
             f"{len(cfg.get('regions') or [])} regions, sigmoid" if cfg.get("regions") else "labels, softmax"),
            ("label-wise softmax candidate, unraced", labels["run"], rec["test"]["labels"], "labels, softmax")):
        out.append(f"| {title} | {targets} | {run['epochs']} | {run['train_minutes']:.1f} | "
                   + " | ".join(_m(scores["mean"], k) for k in keys) + " |")
    out += ["", "What it planned (`--explain`):", "", "```", *planned["explain"], "```", ""]
    if race:
        out += ["The race (successive halving on fold 0, held out):", "", *race, ""]
    return out


def main() -> None:
    global RESULTS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=[*SECTIONS, "render"])
    parser.add_argument("--budget", type=float, default=30.0, help="minutes")
    parser.add_argument("--seeds", type=int, default=0)
    parser.add_argument("--cases", type=int, default=24, help="synthetic-ct: cases to generate")
    parser.add_argument("--only", nargs="*", help="medmnist: some of pneumonia breast adrenal3d")
    parser.add_argument("--work", type=Path, help="where runs go (default runs/planned)")
    parser.add_argument("--test-time", action="store_true",
                        help="hippocampus: also score mirror TTA and largest-component post-processing on the test split")
    parser.add_argument("--race", action="store_true",
                        help="hippocampus: plan with --race (the candidates the rules leave open, raced on fold 0)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results", help="where plan.json/plan.md go (smoke tests)")
    args = parser.parse_args()
    RESULTS = args.results
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.section == "render":
        report = json.loads((RESULTS / "plan.json").read_text())
        atomic_write_text(RESULTS / "plan.md", render(report))
        return
    record = SECTIONS[args.section](args)
    shown = "python benchmarks/bench_plan.py " + " ".join(sys.argv[1:])
    key = re.sub(r"[^a-z0-9]+", "_", shown.split("bench_plan.py ")[1].lower()).strip("_")
    merge(args.section, key, record, shown)
    print(f"written: {RESULTS / 'plan.json'}, {RESULTS / 'plan.md'}")


if __name__ == "__main__":
    main()
