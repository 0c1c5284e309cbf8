"""Pretraining benchmark for classification: label efficiency on PneumoniaMNIST, masked-autoencoder
pretraining of the classifier's ResNet-18 vs training it from scratch, at the same total budget.

One pretraining run (``medseg.pretrain``: the ResNet-18 of ``configs/medmnist_pneumonia.yaml`` as a
masked autoencoder, its encoder the classifier's own feature extractor, on every image of the official
train and val splits, labels unread; the test images are left out) for ``--pretrain-minutes``; then,
for each count of labelled training images (``--cases``: the first N of the official train split),
two classification runs of that config:

- **scratch**: from random weights for ``--minutes``;
- **pretrained**: ``model.init_from`` the pretraining run's encoder (the head starts fresh),
  fine-tuned for ``--minutes`` less ``--pretrain-minutes``, so both arms spend the same total
  wall-clock time (the pretraining charged in full to every pretrained arm).

Every run selects its checkpoint by AUC on the first ``--val-cases`` images of the official val split
(a labelled set as small as the training set's order of magnitude, not MedMNIST's 524) and is scored
once on the whole official test split (624 images): AUC and accuracy, as its evaluate stage writes them.
Each invocation (one pretraining and its arms) rewrites ``pretrain_classification.json`` and
``pretrain_classification.md``.

Usage: python benchmarks/bench_pretrain_classification.py [--minutes 7] [--pretrain-minutes 5]
       [--cases 20,100] [--val-cases 50] [--widen 0.25] [--note TEXT] [--out benchmarks/results] [--tiny]
       python benchmarks/bench_pretrain_classification.py --render --note TEXT   (rewrites the .md, runs nothing)

The data: ``data_manifests/medmnist_pneumonia.csv`` and ``data/pneumoniamnist`` (``make medmnist``
imports them from ``../shared/data/medmnist/pneumoniamnist.npz``). ``--tiny`` (benchmarks/tiny.py):
12/4/4 images of that manifest, one epoch per run, cases 6 and all; for the test suite, never into
benchmarks/results.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tiny import add_tiny_arguments, results_folder, scratch_folder, subset_manifest

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data_manifests" / "medmnist_pneumonia.csv"
DATA = REPO / "data" / "pneumoniamnist"
CONFIG = REPO / "configs" / "medmnist_pneumonia.yaml"
ARMS = ("scratch", "pretrained")
NAME = "pretrain_classification"
#: What configs/medmnist_pneumonia.yaml's classifier reads, given to the pretraining run so that every
#: encoder tensor matches (the network's width comes from --widen, the same for every run).
PRETRAIN_INPUT = ["data.channels=[xray]", "preprocess.orientation=null", "preprocess.intensity.mode=ct_window",
                  "preprocess.intensity.window=[0,255]", "data.cross_split_duplicates=warning",
                  "model.name=resnet18", "model.spatial_dims=2", "model.stem=small", "model.activation=relu",
                  "model.norm=batch", "patch.size=[28,28]", "patch.samples_per_volume=1"]
#: The classification runs: no t-SNE (minutes of CPU on the test split that say nothing here).
SCHEDULE = ["validation.tsne=false", "train.val_interval=1"]


def _tracking(scratch: Path) -> list[str]:
    # one thread and no loader workers: one core of the shared host per run, the same for every arm
    return [f"output_dir={scratch / 'runs'}", f"tracking.uri=sqlite:///{scratch / 'mlflow.db'}", "train.device=cpu",
            "tracking.system_metrics=false", "train.num_threads=1", "train.num_workers=0", "data.cache=memory"]


def _budget(minutes: float, tiny: bool) -> list[str]:
    return ["train.max_epochs=1", "train.max_minutes=null"] if tiny else [f"train.max_minutes={minutes}",
                                                                         "train.max_epochs=null"]


def _rows(split: str | None = None) -> list[dict[str, str]]:
    with open(MANIFEST, newline="") as f:
        return [r for r in csv.DictReader(f) if split is None or r["split"] == split]


def unlabelled_manifest(scratch: Path, tiny: bool) -> tuple[Path, int]:
    """Every image of the official train and val splits (the test split left out), and how many."""
    counts = {"train": 12, "val": 4} if tiny else {s: len(_rows(s)) for s in ("train", "val")}
    return subset_manifest(MANIFEST, scratch / "unlabelled.csv", counts), sum(counts.values())


def pretrain_once(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    """The pretraining run: the classifier's ResNet-18 as a masked autoencoder on the unlabelled images."""
    import medseg

    started, load = time.monotonic(), os.getloadavg()
    manifest, images = unlabelled_manifest(home, args.tiny)
    settings = [*PRETRAIN_INPUT, *_tracking(home), *_budget(args.pretrain_minutes, args.tiny),
                f"model.widen_factor={args.widen}", "masking.block=[4,4]", "masking.ratio=0.6",
                f"train.batch_size={8 if args.tiny else 64}", f"data.root={DATA}"]
    result = medseg.pretrain(manifest, overrides=settings, progress=False)
    assert result is not None
    return {"run_id": result.run_id, "weights": str(result.weights), "tensors": len(result.tensors),
            "images": images, "minutes": args.pretrain_minutes, "epochs": result.run.metrics.get("train/epochs"),
            "train_loss": result.run.metrics.get("train/loss"), "wall_s": round(time.monotonic() - started, 1),
            "load_start": [round(v, 2) for v in load], "load_end": [round(v, 2) for v in os.getloadavg()]}


def labelled_manifest(scratch: Path, cases: str, args: argparse.Namespace) -> tuple[Path, int]:
    """The first ``cases`` training images (``all``: every one), the first ``--val-cases`` val images and
    the whole test split; and the count of training images."""
    train = len(_rows("train"))
    count = train if cases == "all" else int(cases)
    per_split = {"train": min(count, 12), "val": 4, "test": 4} if args.tiny else {
        "train": count, "val": args.val_cases, "test": len(_rows("test"))}
    return subset_manifest(MANIFEST, scratch / f"labelled_{cases}.csv", per_split), per_split["train"]


def classification_arm(arm: str, cases: str, scratch: Path, args: argparse.Namespace,
                       pretraining: dict[str, Any]) -> dict[str, Any]:
    """One classification run of ``arm`` on ``cases`` labelled images: its test scores and what it loaded."""
    import medseg

    manifest, count = labelled_manifest(scratch, cases, args)
    minutes = args.minutes - (args.pretrain_minutes if arm == "pretrained" else 0.0)
    load = os.getloadavg()
    overrides = [*_tracking(scratch), *_budget(minutes, args.tiny), *SCHEDULE, f"data.manifest={manifest}",
                 f"data.root={DATA}", f"model.widen_factor={args.widen}", "train.batch_size=16"]
    if arm == "pretrained":
        overrides.append(f"model.init_from={pretraining['weights']}")
    result = medseg.train(CONFIG, overrides=overrides, progress=False)
    assert result is not None
    metrics = result.metrics
    loaded = fresh = None
    if arm == "pretrained":
        record = json.loads((result.run_dir / "init_from.json").read_text())
        loaded, fresh = len(record["loaded"]), record["fresh"]
    return {"arm": arm, "cases": count, "fine_tune_minutes": minutes, "total_minutes": args.minutes,
            "epochs": metrics.get("train/epochs"), "test_auc": metrics.get("test/auc"),
            "test_acc": metrics.get("test/acc"), "val_auc": metrics.get("val/auc"), "loaded_tensors": loaded,
            "fresh_tensors": fresh, "run_id": result.run_id, "load_start": [round(v, 2) for v in load],
            "load_end": [round(v, 2) for v in os.getloadavg()]}


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def _by_cases(results: dict[str, Any]) -> list[tuple[int, dict[str, dict[str, Any]]]]:
    rows: dict[int, dict[str, dict[str, Any]]] = {}
    for entry in results.get("arms", {}).values():
        rows.setdefault(int(entry["cases"]), {})[entry["arm"]] = entry
    return sorted(rows.items())


def _gain(arms: dict[str, dict[str, Any]], key: str) -> str:
    values = [arms.get(a, {}).get(key) for a in ("pretrained", "scratch")]
    return "-" if None in values else f"{float(values[0]) - float(values[1]):+.3f}"


def _loads(entry: dict[str, Any]) -> str:
    start, end = entry.get("load_start") or ["?"], entry.get("load_end") or ["?"]
    return f"{start[0]} -> {end[0]}"


def markdown(results: dict[str, Any]) -> str:
    """``pretrain_classification.md`` from everything the JSON holds."""
    pre = results.get("pretraining") or {}
    lines = ["# Pretraining a classifier: label efficiency on PneumoniaMNIST", "",
             f"Written by `{results.get('command', 'python benchmarks/bench_pretrain_classification.py')}`. "
             "**The host was shared** with other sessions' work (2 cores; each run one thread, no loader "
             "workers; the 1-minute load average at the start and end of each run is in the table), and the "
             "budgets are minutes: every figure is one seed of a short run, a floor rather than what either arm "
             "reaches, and differences of a few hundredths are within what another seed or another load gives.", "",
             f"Pretraining: the ResNet-18 of `configs/medmnist_pneumonia.yaml` (here at widen_factor "
             f"{results.get('widen', '?')}) as a masked autoencoder: its encoder is the classifier's own feature "
             f"extractor, with SimMIM's 1x1-conv + pixel-shuffle decoder; 60% of the 4x4 blocks blanked, L1 on "
             f"them. On all {pre.get('images', '?')} images of the official train and val splits (labels unread; "
             f"the test images left out) for {pre.get('minutes', '?')} min: {pre.get('epochs', '?')} epoch(s), "
             f"final masked L1 {_fmt(pre.get('train_loss'))}; {pre.get('tensors', '?')} encoder tensors handed "
             f"on (`model.init_from`; the head `fc` starts fresh). Load {_loads(pre)}.", "",
             "Each row trains the classification config on the first N images of the official train split, "
             f"selects its checkpoint by AUC on the first {results.get('val_cases', '?')} images of the official "
             "val split, and is scored once on the whole official test split (624 images). **scratch** trains from "
             "random weights for the total budget; **pretrained** starts from the encoder and fine-tunes for the "
             "total less the pretraining (the same total wall-clock time, the pretraining charged in full to each "
             "row).", "",
             "| labelled images | total (min) | scratch: epochs | scratch: test AUC | scratch: test acc | "
             "pretrained: fine-tune (min) | pretrained: epochs | pretrained: test AUC | pretrained: test acc | "
             "AUC pretrained - scratch | acc pretrained - scratch | load scratch | load pretrained |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, arms in _by_cases(results):
        scratch, pretrained = arms.get("scratch", {}), arms.get("pretrained", {})
        cells = [str(n), str(next(iter(arms.values())).get("total_minutes", "-")), str(scratch.get("epochs", "-")),
                 _fmt(scratch.get("test_auc")), _fmt(scratch.get("test_acc")),
                 str(pretrained.get("fine_tune_minutes", "-")), str(pretrained.get("epochs", "-")),
                 _fmt(pretrained.get("test_auc")), _fmt(pretrained.get("test_acc")), _gain(arms, "test_auc"),
                 _gain(arms, "test_acc"), _loads(scratch) if scratch else "-", _loads(pretrained) if pretrained else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Test AUC and accuracy: `test/auc` and `test/acc` of each run's evaluate stage (the checkpoint "
              "with the best validation AUC); run ids, validation AUC and the tensors loaded are in "
              f"`{NAME}.json`.", "", *[line for note in results.get("notes", []) for line in (note, "")],
              "Host: " + results.get("host", "?"), ""]
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=7.0, help="total wall-clock budget of every arm")
    parser.add_argument("--pretrain-minutes", type=float, default=5.0, help="the pretraining run's budget")
    parser.add_argument("--cases", default=None, help="labelled training images per row (default 20,100; with "
                        "--tiny 6,all)")
    parser.add_argument("--val-cases", type=int, default=50, help="validation images of every classification run")
    parser.add_argument("--widen", type=float, default=0.25, help="ResNet-18 widen_factor of every run")
    parser.add_argument("--note", action="append", default=[], help="a line for the results file (what shared "
                        "the host, what was not met); repeatable")
    parser.add_argument("--render", action="store_true", help="run nothing: rewrite the .md from the .json in "
                        "--out, with the --note lines added to its notes (what the load log showed afterwards)")
    add_tiny_arguments(parser)
    args = parser.parse_args(argv)
    args.cases = args.cases or ("6,all" if args.tiny else "20,100")
    if args.pretrain_minutes >= args.minutes and not args.tiny:
        raise SystemExit("--pretrain-minutes must be less than --minutes (the pretrained arm fine-tunes for the rest)")
    if not MANIFEST.is_file() or not DATA.is_dir():
        raise SystemExit(f"{MANIFEST.relative_to(REPO)} or {DATA.relative_to(REPO)} is missing. Fix: `make medmnist` "
                         "(imports ../shared/data/medmnist/pneumoniamnist.npz)")
    return args


def _commit() -> str:
    """The checkout's commit, ``+`` when files differ from it (what the figures were measured with)."""
    def git(*words: str) -> str:
        return subprocess.run(["git", *words], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")


def render(out: Path, notes: list[str]) -> None:
    """Rewrite ``out``'s .md from its .json, the ``notes`` added (``--render``)."""
    from medseg.io.atomic import atomic_write_text

    json_path = out / f"{NAME}.json"
    results = json.loads(json_path.read_text(encoding="utf-8"))
    results["notes"] = [*results.get("notes", []), *notes]
    atomic_write_text(json_path, json.dumps(results, indent=2))
    atomic_write_text(out / f"{NAME}.md", markdown(results))


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    from medseg.io.atomic import atomic_write_text

    out = results_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        render(out, args.note)
        return
    json_path = out / f"{NAME}.json"
    results: dict[str, Any] = {"arms": {}}  # one pretraining and its arms per invocation: the file is rewritten
    home = scratch_folder("bench-pretrain-cls-", args, out) if args.tiny else \
        Path(tempfile.mkdtemp(prefix="bench-pretrain-cls-"))
    results.update({
        "command": "OMP_NUM_THREADS=1 python " + shlex.join(["benchmarks/bench_pretrain_classification.py",
                                                             *(sys.argv[1:] if argv is None else argv)]),
        "host": (f"{platform.node() or 'host'}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                 f"load average {os.getloadavg()[0]:.1f} when the last invocation started, shared with other sessions, "
                 f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"),
        "widen": args.widen, "val_cases": args.val_cases, "notes": args.note, "commit": _commit()})
    results["pretraining"] = pretrain_once(args, home)
    atomic_write_text(json_path, json.dumps(results, indent=2))
    print(f"pretraining: {json.dumps(results['pretraining'])}", flush=True)
    for cases in [c.strip() for c in args.cases.split(",") if c.strip()]:
        for arm in ARMS:
            started = time.monotonic()
            entry = classification_arm(arm, cases, home, args, results["pretraining"])
            results["arms"][f"{arm}/{cases}"] = {**entry, "wall_s": round(time.monotonic() - started, 1),
                                                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            atomic_write_text(json_path, json.dumps(results, indent=2))
            atomic_write_text(out / f"{NAME}.md", markdown(results))
            print(f"{arm}/{cases}: {json.dumps(results['arms'][f'{arm}/{cases}'])}", flush=True)
    atomic_write_text(out / f"{NAME}.md", markdown(results))


if __name__ == "__main__":
    main()
