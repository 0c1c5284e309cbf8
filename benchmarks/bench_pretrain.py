"""Pretraining benchmark: label efficiency on MSD hippocampus, masked-autoencoder pretraining vs from scratch.

One pretraining run (``medseg.pretrain``: the hippocampus U-Net of ``configs/msd_hippocampus.yaml`` as a
masked autoencoder on all 260 images of ``data_manifests/msd_hippocampus.csv``, labels unread) for
``--pretrain-minutes``; then, for each count of labelled training cases (``--cases``: the first N of the
committed train split, ``all`` = 182), two segmentation runs of that config:

- **scratch**: trained from random weights for ``--minutes``;
- **pretrained**: ``model.init_from`` the pretraining run's encoder, fine-tuned for ``--minutes`` less
  ``--pretrain-minutes``, so both arms spend the same total wall-clock time (the pretraining is
  charged in full to every pretrained arm, although one run serves all of them);
- **amortised** (only with ``--arms``): the same start, fine-tuned for the whole ``--minutes``, as
  when one pretraining serves many fine-tunings and its cost is shared.

Both validate on the first ``--val-cases`` of the committed val split and are scored once on the whole
committed test split (52 cases): test Dice, as the evaluate stage writes it. Each invocation adds its
arms to ``pretrain.json`` (the pretraining run recorded there is reused while its weights exist), and
``pretrain.md`` (a table and the curve as text bars) is rewritten from all of them.

Note the pretraining sees the test split's images (not their labels), as "every image the user has"
does in practice; the results file says so.

Usage: python benchmarks/bench_pretrain.py [--minutes 3] [--pretrain-minutes 1.5] [--cases 5,20]
       [--arms scratch,pretrained] [--out benchmarks/results] [--tiny]
       python benchmarks/bench_pretrain.py --arms ""     (rewrites pretrain.md from pretrain.json)

``--tiny`` (benchmarks/tiny.py): 4/2/2 hippocampus cases, one epoch per run, cases 2 and all; for the
test suite, never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from tiny import add_tiny_arguments, results_folder, scratch_folder, subset_manifest

REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = REPO.parent / "shared" / "data" / "msd_task04_hippocampus"
HIPPO_MANIFEST = REPO / "data_manifests" / "msd_hippocampus.csv"
SEGMENTATION_CONFIG = REPO / "configs" / "msd_hippocampus.yaml"
ARMS = ("scratch", "pretrained", "amortised")
#: The arms a run makes unless --arms says otherwise.
DEFAULT_ARMS = ("scratch", "pretrained")
#: The network and input of configs/msd_hippocampus.yaml, given to the pretraining run so that every
#: encoder tensor matches the segmentation U-Net it initialises.
NETWORK = ["model.name=unet", "model.channels=[16,32,64,128]", "model.strides=[2,2,2]", "model.num_res_units=1",
           "model.norm=instance", "patch.size=[32,48,32]", "data.channels=[mri]", "preprocess.orientation=RAS",
           "preprocess.spacing=null", "preprocess.intensity.mode=zscore"]
#: Steps per epoch and validation every 5 epochs for every segmentation run, whatever its case count,
#: so that validation costs the same share of each budget.
SCHEDULE = ["train.iterations_per_epoch=20", "train.val_interval=5", "validation.overlays=0", "validation.hd95=false"]


def _tracking(scratch: Path) -> list[str]:
    # one thread and no loader workers: one core of the shared host per run, the same for every arm
    return [f"output_dir={scratch / 'runs'}", f"tracking.uri=sqlite:///{scratch / 'mlflow.db'}", "train.device=cpu",
            "tracking.system_metrics=false", "train.num_threads=1", "train.num_workers=0"]


def _budget(minutes: float, tiny: bool) -> list[str]:
    return ["train.max_epochs=1", "train.max_minutes=null"] if tiny else [f"train.max_minutes={minutes}",
                                                                         "train.max_epochs=null"]


def _all_images(scratch: Path, tiny: bool) -> Path:
    return subset_manifest(HIPPO_MANIFEST, scratch / "all_images.csv", {"train": 4, "val": 2, "test": 2}) \
        if tiny else HIPPO_MANIFEST


def pretrain_once(results: dict[str, Any], home: Path, minutes: float, tiny: bool) -> dict[str, Any]:
    """The pretraining run of ``results`` if its weights are still on disk, else a new one."""
    done = results.get("pretraining")
    if done and Path(done["weights"]).is_file() and done["minutes"] == minutes:
        return dict(done)
    import medseg

    started = time.monotonic()
    settings = [*NETWORK, *_tracking(home), *_budget(minutes, tiny), "masking.block=[8,8,8]", "masking.ratio=0.6",
                "patch.samples_per_volume=2", "train.batch_size=2", "data.cache=memory"]
    if tiny:
        settings.append("patch.size=[16,16,16]")  # the tiny U-Net is the same; smaller patches, faster steps
    result = medseg.pretrain(_all_images(home, tiny), overrides=[*settings, f"data.root={HIPPOCAMPUS}"], progress=False)
    assert result is not None
    return {"run_id": result.run_id, "weights": str(result.weights), "tensors": len(result.tensors),
            "images": _count_cases(_all_images(home, tiny)),
            "minutes": minutes, "epochs": result.run.metrics.get("train/epochs"),
            "train_loss": result.run.metrics.get("train/loss"), "wall_s": round(time.monotonic() - started, 1),
            "tracking_uri": result.run.tracking_uri}


def _count_cases(manifest: Path) -> int:
    with open(manifest, newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def labelled_manifest(scratch: Path, cases: str, val_cases: int, tiny: bool) -> tuple[Path, int]:
    """The first ``cases`` training cases (``all``: every one), the first ``val_cases`` validation cases
    and the whole test split of the committed manifest; and the count of training cases."""
    with open(HIPPO_MANIFEST, newline="") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r["split"] == "train"]
    count = len(train) if cases == "all" else int(cases)
    per_split = {"train": min(count, 4), "val": 2, "test": 2} if tiny else {
        "train": count, "val": val_cases, "test": sum(1 for r in rows if r["split"] == "test")}
    out = subset_manifest(HIPPO_MANIFEST, scratch / f"labelled_{cases}.csv", per_split)
    return out, per_split["train"]


def segmentation_arm(arm: str, cases: str, scratch: Path, args: argparse.Namespace,
                     pretraining: dict[str, Any]) -> dict[str, Any]:
    """One segmentation run of ``arm`` on ``cases`` labelled cases; its test Dice and what it loaded."""
    import medseg

    manifest, count = labelled_manifest(scratch, cases, args.val_cases, args.tiny)
    minutes = args.minutes - (args.pretrain_minutes if arm == "pretrained" else 0.0)
    starts_pretrained = arm in ("pretrained", "amortised")
    overrides = [*_tracking(scratch), *_budget(minutes, args.tiny), *SCHEDULE, f"data.manifest={manifest}",
                 f"data.root={HIPPOCAMPUS}", *(["train.iterations_per_epoch=2"] if args.tiny else [])]
    if starts_pretrained:
        overrides.append(f"model.init_from={pretraining['weights']}")
    result = medseg.train(SEGMENTATION_CONFIG, overrides=overrides, progress=False)
    assert result is not None
    metrics = result.metrics
    loaded = None
    if starts_pretrained:
        loaded = len(json.loads((result.run_dir / "init_from.json").read_text())["loaded"])
    return {"arm": arm, "cases": count, "fine_tune_minutes": minutes, "total_minutes": args.minutes,
            "epochs": metrics.get("train/epochs"), "test_dice_mean": metrics.get("test/dice_mean"),
            "test_dice_anterior": metrics.get("test/dice/anterior"),
            "test_dice_posterior": metrics.get("test/dice/posterior"), "loaded_tensors": loaded,
            "run_id": result.run_id}


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def _rows(results: dict[str, Any]) -> list[tuple[int, dict[str, dict[str, Any]]]]:
    """(labelled cases, arm -> entry) per row, fewest cases first."""
    by_cases: dict[int, dict[str, dict[str, Any]]] = {}
    for entry in results.get("arms", {}).values():
        by_cases.setdefault(int(entry["cases"]), {})[entry["arm"]] = entry
    return sorted(by_cases.items())


def _gain(arms: dict[str, dict[str, Any]], arm: str) -> str:
    dice = [arms.get(a, {}).get("test_dice_mean") for a in (arm, "scratch")]
    return "-" if None in dice else f"{float(dice[0]) - float(dice[1]):+.3f}"


def _cells(arms: dict[str, dict[str, Any]], arm: str) -> list[str]:
    entry = arms.get(arm, {})
    return [str(entry.get("epochs", "-")), _fmt(entry.get("test_dice_mean"))]


def markdown(results: dict[str, Any]) -> str:
    """``pretrain.md`` from everything ``pretrain.json`` holds."""
    pre = results.get("pretraining") or {}
    lines = ["# Pretraining: label efficiency on MSD hippocampus", "",
             "Written by `python benchmarks/bench_pretrain.py` (" + results.get("command", "") + "). **The host was "
             "shared** with other sessions' work (2 cores; each run one thread, no loader workers), and the budgets "
             "are minutes, not the hours such a comparison deserves: every figure is one seed of a short run, a "
             "floor rather than what either arm reaches.", "",
             f"Pretraining: the U-Net of `configs/msd_hippocampus.yaml` as a masked autoencoder (60% of 8³ blocks "
             f"blanked, L1 on them) on all {pre.get('images', '?')} images of `data_manifests/msd_hippocampus.csv` "
             f"(train, val and test images alike, labels unread) for {pre.get('minutes', '?')} min: "
             f"{pre.get('epochs', '?')} epoch(s), final masked L1 {_fmt(pre.get('train_loss'))}; "
             f"{pre.get('tensors', '?')} encoder tensors handed on (`model.init_from`).", "",
             "Each row trains the segmentation config on the first N cases of the committed train split, validates "
             "on the first val cases, and is scored once on the whole committed test split (52 cases). **scratch** "
             "trains from random weights for the total budget; **pretrained** starts from the encoder and "
             "fine-tunes for the total less the pretraining (the same total wall-clock time, the pretraining "
             "charged in full to each row); **amortised**, where run, starts from the encoder and fine-tunes for "
             "the whole total (the pretraining a one-off cost shared by every fine-tuning).", "",
             "| labelled cases | total budget (min) | scratch: epochs | scratch: test Dice | pretrained: fine-tune (min) "
             "| pretrained: epochs | pretrained: test Dice | pretrained - scratch | amortised: epochs | "
             "amortised: test Dice | amortised - scratch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, arms in _rows(results):
        total = next(iter(arms.values())).get("total_minutes", "-")
        cells = [str(n), str(total), *_cells(arms, "scratch"),
                 str(arms.get("pretrained", {}).get("fine_tune_minutes", "-")), *_cells(arms, "pretrained"),
                 _gain(arms, "pretrained"), *_cells(arms, "amortised"), _gain(arms, "amortised")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Test Dice: mean over anterior and posterior of the per-class Dice from summed counts "
              "(`test/dice_mean` of each run); per-structure values and run ids are in `pretrain.json`. An epoch is "
              f"{results.get('steps_per_epoch', 20)} steps of 2 volumes x 2 patches in every run.", "",
              *_load_note(results),
              "The curve: test Dice against the number of labelled training cases.", "", *curve(results), "",
              "Host: " + results.get("host", "?"), ""]
    return "\n".join(lines)


def _load_note(results: dict[str, Any]) -> list[str]:
    """How far the steps a budget bought varied between runs (the shared host's load changed)."""
    per_minute = [float(e["epochs"]) / float(e["fine_tune_minutes"]) for e in results.get("arms", {}).values()
                  if e.get("epochs") and e.get("fine_tune_minutes")]
    if len(per_minute) < 2:
        return []
    return [f"The host's load changed from run to run: a minute of training bought {min(per_minute):.1f} to "
            f"{max(per_minute):.1f} epochs (see the epochs columns), so arms that ran at different times got "
            "different numbers of steps for the same budget; a difference of a few hundredths in Dice may be those "
            "steps rather than the start.", ""]


def curve(results: dict[str, Any]) -> list[str]:
    """Test Dice against labelled cases as text bars (one per arm and row), readable in the file and on
    the docs page alike; 40 characters are a Dice of 1."""
    lines = ["```text", f"{'test Dice':<17}0{' ' * 38}1"]
    for n, arms in _rows(results):
        for arm in ARMS:
            if arm in arms:
                dice = arms[arm].get("test_dice_mean")
                bar = "" if dice is None else "#" * round(40 * max(0.0, float(dice)))
                lines.append(f"{n:>4} {arm:<10} |{bar:<40}| {_fmt(dice)}")
    return [*lines, "```"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="total wall-clock budget of every arm")
    parser.add_argument("--pretrain-minutes", type=float, default=1.5, help="the pretraining run's budget")
    parser.add_argument("--cases", default=None, help="labelled training cases per row, all = 182 (default "
                        "5,10,20,all; with --tiny 2,all)")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--val-cases", type=int, default=6, help="validation cases of every segmentation run")
    add_tiny_arguments(parser)
    args = parser.parse_args(argv)
    args.cases = args.cases or ("2,all" if args.tiny else "5,10,20,all")
    if args.pretrain_minutes >= args.minutes and not args.tiny:
        raise SystemExit("--pretrain-minutes must be less than --minutes (the pretrained arm fine-tunes for the rest)")
    from medseg.io.atomic import atomic_write_text

    out = results_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "pretrain.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {"arms": {}}
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if arms:  # with --arms "" this only rewrites pretrain.md from pretrain.json
        results["host"] = (f"{platform.node() or 'host'}, {os.cpu_count()} cores, "
                           f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f} when "
                           "the last invocation started, shared with other sessions, "
                           f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        results["steps_per_epoch"] = 2 if args.tiny else 20
        results["command"] = (f"--minutes {args.minutes} --pretrain-minutes {args.pretrain_minutes} "
                              f"--val-cases {args.val_cases}")
    home = out if not arms else scratch_folder("bench-pretrain-", args, out) if args.tiny else \
        Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    if {"pretrained", "amortised"} & set(arms):
        results["pretraining"] = pretrain_once(results, Path(results.get("pretraining_home") or home),
                                               args.pretrain_minutes, args.tiny)
        results["pretraining_home"] = str(Path(results["pretraining"]["weights"]).parents[3])
        atomic_write_text(json_path, json.dumps(results, indent=2))
        print(f"pretraining: {json.dumps(results['pretraining'])}", flush=True)
    for cases in [c.strip() for c in args.cases.split(",") if c.strip()] if arms else []:
        for arm in arms:
            started = time.monotonic()
            entry = segmentation_arm(arm, cases, home, args, results.get("pretraining", {}))
            results["arms"][f"{arm}/{cases}"] = {**entry, "wall_s": round(time.monotonic() - started, 1),
                                                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            atomic_write_text(json_path, json.dumps(results, indent=2))
            atomic_write_text(out / "pretrain.md", markdown(results))
            print(f"{arm}/{cases}: {json.dumps(results['arms'][f'{arm}/{cases}'])}", flush=True)
    atomic_write_text(out / "pretrain.md", markdown(results))


if __name__ == "__main__":
    main()
