"""Train the runs behind the results tables (docs/results) and write them to ``benchmarks/results/``.

Each suite is a list of ordinary ``medseg run`` commands, run one after another as child
processes (``--no-progress``). The script reads each run's ``summary.json`` (the path is the
last ``summary: <path>`` line ``medseg run`` prints) and writes, atomically:

- ``<file>.json``: every run's command, config, overrides, all final metrics (held-out test
  split, and ``real/...`` for reconstruction), epochs, training and whole-run minutes, the cases
  of each split, the seeds, the MLflow run id and model URI, plus the date, git commit and the
  machine (platform, CPU count, torch version, CUDA or not);
- ``<file>.md``: the tables the docs' results pages include, generated from that JSON.

Suites (minutes on this project's 2-core CPU, from the results files):

- ``hippocampus`` -> ``hippocampus.{json,md}``: ``msd_hippocampus.yaml`` for 30 minutes, 6 minutes,
  and 30 minutes with 2 processes; test Dice on the 52 held-out cases. About 70 minutes.
- ``medmnist`` -> ``medmnist.{json,md}``: the three MedMNIST configs with ``--seeds 3`` (and the
  AdrenalMNIST3D lr 0.002 round); test AUC / ACC on the official test splits. About 50 minutes.
  Needs ``make medmnist`` first.
- ``recon`` -> ``reconstruction.{json,md}``: ``recon_mri_4x`` (U-Net, data consistency, cascade;
  4x and 8x), ``recon_ct_sparse`` and ``denoise_mri``; test and real-image PSNR / SSIM / NMSE
  beside the classical baseline. About 80 minutes.
- ``demo`` -> ``demo.{json,md}``: ``demo_segmentation.yaml`` (its manifest has no test split, so
  it is scored on its 10 validation cases). About 2 minutes.

Usage:
    python benchmarks/run_results.py SUITE [--minutes M] [--set KEY=VALUE ...] [--seeds K]
                                     [--only REGEX ...] [--work DIR] [--out benchmarks/results]

A smoke test that leaves ``runs/`` and ``benchmarks/results/`` alone:
    python benchmarks/run_results.py demo --minutes 0.2 --set train.max_epochs=1 \\
        --work /tmp/rr --out /tmp/rr/results
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SUMMARY_LINE = re.compile(r"summary: (.+summary\.json)\s*$")
log = logging.getLogger("run_results")

HIPPOCAMPUS_HINT = ("The MSD Task04 Hippocampus folder (imagesTr/, labelsTr/) is expected at "
                    "../shared/data/msd_task04_hippocampus; elsewhere, pass --set data.root=/path/to/Task04_Hippocampus.")
MEDMNIST_HINT = ("Import the MedMNIST files first: `make medmnist` (reads ../shared/data/medmnist/*.npz; "
                 "`make medmnist MEDMNIST=/path/to/npz-folder` for another folder).")


@dataclass(frozen=True)
class Run:
    """One ``medseg run`` command of a suite."""

    config: str
    overrides: tuple[str, ...] = ()
    seeds: int = 0  # 0: a single run; K: --seeds K
    nproc: int = 1
    title: str = ""  # what the table calls it; the config and overrides when empty

    def name(self) -> str:
        """The table's name for the run: its title, else the config and its non-budget overrides."""
        if self.title:
            return self.title
        extra = [o for o in self.overrides if not o.startswith("train.max_minutes=")]
        return f"`{Path(self.config).stem}`" + (f" (`{' '.join(extra)}`)" if extra else "")

    def argv(self, extra: list[str]) -> list[str]:
        """``medseg`` arguments, with ``extra`` overrides after the run's own (the later one wins)."""
        cmd = ["run", self.config, "--no-progress"]
        if self.seeds:
            cmd += ["--seeds", str(self.seeds)]
        if self.nproc > 1:
            cmd += ["--nproc", str(self.nproc)]
        for override in (*self.overrides, *extra):
            cmd += ["--set", override]
        return cmd


@dataclass(frozen=True)
class Suite:
    file: str  # benchmarks/results/<file>.json and .md
    title: str
    runs: tuple[Run, ...]
    data_hint: str
    minutes: int  # rough length on 2 cores, for the log


MRI_8X = ("recon.acceleration=8", "recon.center_fraction=0.04")
SUITES: dict[str, Suite] = {
    "hippocampus": Suite("hippocampus", "MSD Task04 Hippocampus: held-out test Dice", (
        Run("configs/msd_hippocampus.yaml", ("train.max_minutes=30",)),
        Run("configs/msd_hippocampus.yaml", ("train.max_minutes=6",)),
        Run("configs/msd_hippocampus.yaml", ("train.max_minutes=30", "train.batch_size=1"), nproc=2),
    ), HIPPOCAMPUS_HINT, 70),
    "medmnist": Suite("medmnist", "MedMNIST v2: official test split, mean ± std over seeds", (
        Run("configs/medmnist_pneumonia.yaml", seeds=3, title="PneumoniaMNIST (`medmnist_pneumonia`)"),
        Run("configs/medmnist_breast.yaml", seeds=3, title="BreastMNIST (`medmnist_breast`)"),
        Run("configs/medmnist_adrenal3d.yaml", seeds=3, title="AdrenalMNIST3D (`medmnist_adrenal3d`)"),
        Run("configs/medmnist_adrenal3d.yaml", ("optim.lr=0.002",), seeds=3,
            title="AdrenalMNIST3D (`medmnist_adrenal3d`, `optim.lr=0.002`)"),
    ), MEDMNIST_HINT, 50),
    "recon": Suite("reconstruction", "Reconstruction: held-out volumes beside the classical baseline", (
        Run("configs/recon_mri_4x.yaml", ("model.name=unet",)),
        Run("configs/recon_mri_4x.yaml"),
        Run("configs/recon_mri_4x.yaml", ("model.name=cascade",)),
        Run("configs/recon_mri_4x.yaml", (*MRI_8X, "model.name=unet")),
        Run("configs/recon_mri_4x.yaml", MRI_8X),
        Run("configs/recon_ct_sparse.yaml"),
        Run("configs/denoise_mri.yaml"),
    ), HIPPOCAMPUS_HINT, 80),
    "demo": Suite("demo", "`make demo`: the demo U-Net", (
        Run("configs/demo_segmentation.yaml"),
    ), "The demo crops ship in medseg/demo/hippocampus; run from the repository root.", 2),
}


# ------------------------------------------------------------------------------------ before the runs


def check_data(run: Run, extra: list[str], hint: str) -> None:
    """Fail before any training if a run's data root, manifest or first image is missing.

    Raises:
        SystemExit: with the config, what was expected, what was found and how to fix it.
    """
    import medseg
    from medseg.data.manifest import read_manifest
    from medseg.errors import MedsegError

    try:
        cfg = medseg.load_config(REPO / run.config, [*run.overrides, *extra])
        recon = getattr(cfg, "recon", None)  # only reconstruction configs have the section
        if recon is not None and recon.phantoms is not None:
            return  # the run writes its own phantoms into data.root
        root = cfg.data.resolved_root()
        manifest = read_manifest(REPO / cfg.data.manifest)
    except MedsegError as exc:
        raise SystemExit(f"{run.config}: {exc}\n{hint}") from None
    root = root if root.is_absolute() else REPO / root
    problem = ""
    if not root.is_dir():
        problem = f"data root {root} is not a folder"
    else:
        first = manifest.cases[0].image_paths(root)[0]
        if not first.exists():
            problem = (f"the manifest's first image is missing\n    Expected: {first}\n"
                       f"    Files:    {REPO / cfg.data.manifest} (paths relative to data.root {root})")
        for entry in recon.real_images if recon is not None else []:
            if not entry.startswith("pydicom:") and not (root / entry).exists():
                problem = f"recon.real_images entry {entry} does not exist\n    Expected: {(root / entry).resolve()}"
    if problem:
        raise SystemExit(f"{run.config}: {problem}\n{hint}")


def machine() -> dict[str, Any]:
    """Where the runs ran: enough to tell a 2-core CPU from a GPU node."""
    import monai
    import torch

    import medseg

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), flags=re.M)
        cpu = names[0].strip() if names else cpu
    cuda = torch.cuda.is_available()
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "medseg": medseg.__version__,
        "cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }


def git_state() -> dict[str, Any]:
    from medseg.tracking.mlflow_tracker import git_commit

    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                            capture_output=True, text=True, check=False)
    return {"commit": git_commit(REPO), "uncommitted_changes": bool(status.stdout.strip())}


# ------------------------------------------------------------------------------------ the runs


def execute(run: Run, extra: list[str], location: list[str]) -> dict[str, Any]:
    """Run one ``medseg run`` (``location``: where its outputs go, left out of the shown command)
    and return its record for the JSON.

    Raises:
        SystemExit: the command failed or printed no ``summary:`` line.
    """
    argv = [sys.executable, "-m", "medseg", *run.argv([*extra, *location])]
    shown = "medseg " + shlex.join(run.argv(extra))
    log.info("%s", shown)
    load_before = os.getloadavg()[0]
    started = time.time()
    summary_line = ""
    with subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            found = SUMMARY_LINE.search(line)  # under --nproc, torchrun may prefix the rank's lines
            summary_line = found.group(1) if found else summary_line
    if proc.returncode != 0 or not summary_line:
        raise SystemExit(f"`{shown}` exited with {proc.returncode}"
                         + ("" if summary_line else " and printed no 'summary: <path>' line")
                         + "; see its log above. Nothing was written to the results folder.")
    return run_record(run, extra, Path(summary_line), (time.time() - started) / 60, load_before)


def run_record(run: Run, extra: list[str], summary_path: Path, wall_minutes: float,
               load_before: float) -> dict[str, Any]:
    """The JSON record of one finished run, from its ``summary.json`` and run directory."""
    summary = json.loads(summary_path.read_text())
    run_dir = Path(summary["run_dir"])
    children = [{**child, **_child_extras(Path(child["run_dir"]))} for child in summary.get("children", [])]
    resolved = _resolved_config(run_dir)
    return {
        "name": run.name(),
        "command": "medseg " + shlex.join(run.argv(extra)),
        "config": run.config,
        "overrides": [*run.overrides, *extra],
        "seeds": [_resolved_config(Path(c["run_dir"]))["seed"] for c in children] or [resolved["seed"]],
        "nproc": run.nproc,
        "task": resolved["task"],
        "model": resolved["model"],
        "run_id": summary["run_id"],
        "model_uri": summary["model_uri"],
        "tracking_uri": summary["tracking_uri"],
        "run_dir": str(run_dir),
        "epochs": summary["metrics"].get("train/epochs"),
        "train_minutes": summary["metrics"].get("train/minutes"),
        "wall_minutes": wall_minutes,
        "load_average_before": round(load_before, 2),
        "splits": _split_counts(resolved),
        "metrics": summary["metrics"],
        **_child_extras(run_dir),
        "children": children,
    }


def _resolved_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((run_dir / "resolved_config.yaml").read_text())


def _split_counts(resolved: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Cases per split and, for classification, per class (read after the run: CT phantoms are
    written by it)."""
    from medseg.data.manifest import read_manifest

    names = {str(k): str(v) for k, v in (resolved["data"].get("labels") or {}).items()}
    counts: dict[str, dict[str, int]] = {}
    for case in read_manifest(REPO / resolved["data"]["manifest"]).cases:
        per_split = counts.setdefault(case.split, {"cases": 0})
        per_split["cases"] += 1
        if resolved["task"] == "classification" and case.label is not None:
            name = f"class {names.get(case.label, case.label)}"
            per_split[name] = per_split.get(name, 0) + 1
    return counts


def _child_extras(run_dir: Path) -> dict[str, Any]:
    """The scored cases of each evaluated split, and the per-volume rows of real images."""
    scored = {}
    for path in sorted((run_dir / "evaluation").glob("*_cases.csv")):
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        scored[path.name[: -len("_cases.csv")]] = rows
    out: dict[str, Any] = {"scored_cases": {split: len(rows) for split, rows in scored.items()}}
    if "real" in scored:
        out["real_cases"] = scored["real"]
    summary = run_dir / "summary.json"
    if summary.is_file():
        out["wall_minutes_in_run"] = json.loads(summary.read_text()).get("wall_minutes")
    return out


# ------------------------------------------------------------------------------------ the tables


def _f(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pm(metrics: dict[str, Any], key: str, digits: int = 3) -> str:
    std = metrics.get(f"{key}_std")
    return _f(metrics.get(key), digits) + ("" if std is None else f" ± {_f(std, digits)}")


def _split_text(splits: dict[str, dict[str, int]]) -> str:
    return " / ".join(f"{splits[s]['cases']} {s}" for s in ("train", "val", "test") if s in splits)


def segmentation_table(records: list[dict[str, Any]]) -> list[str]:
    lines = []
    for rec in records:
        m = rec["metrics"]
        split = "test" if "test/dice_mean" in m else "best_val"
        labels = sorted(k.split("/")[-1] for k in m if k.startswith(f"{split}/dice/"))
        if not lines:
            lines = ["| run | data | scored on | epochs | training min (s / epoch) | whole run min | "
                     + " | ".join(f"Dice {label}" for label in labels) + " | mean Dice | per-case mean |",
                     "|---|---|---|---|---|---|" + "---|" * (len(labels) + 2)]
        scored = rec["scored_cases"].get("test" if split == "test" else "val")
        per_epoch = (rec["train_minutes"] * 60 / rec["epochs"]) if rec["epochs"] and rec["train_minutes"] else None
        lines.append(f"| `{rec['command']}` | {_split_text(rec['splits'])} | "
                     f"**{'test' if split == 'test' else 'val'}** ({scored} cases) | {rec['epochs']} | "
                     f"{_f(rec['train_minutes'], 1)} ({_f(per_epoch, 1)}) | {_f(rec['wall_minutes'], 1)} | "
                     + " | ".join(_f(m.get(f"{split}/dice/{label}")) for label in labels)
                     + f" | **{_f(m.get(f'{split}/dice_mean'))}** | {_f(m.get(f'{split}/dice_mean_per_case'))} |")
    return lines


def classification_table(records: list[dict[str, Any]]) -> list[str]:
    lines = ["| dataset (config) | network | seeds | epochs per seed | training min per seed | whole run min "
             "| test AUC | test ACC | sensitivity | specificity | test cases |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    seeds = ["", "Per seed (the checkpoint with the best validation AUC, scored once on test):", "",
             "| dataset (config) | seed | epochs | training min | best-val epoch | val ACC | val AUC | test AUC "
             "| test ACC |", "|---|---|---|---|---|---|---|---|---|"]
    classes = ["", "Cases per split and class:", ""]
    for rec in records:
        m, model = rec["metrics"], rec["model"]
        network = (f"{model.get('spatial_dims', 2)}D {model['name']} x{model.get('widen_factor', 1)}"
                   f", {model.get('stem', '')} stem")
        lines.append(f"| {rec['name']} | {network} | {len(rec['seeds'])} | {_pm(m, 'train/epochs', 1)} | "
                     f"{_pm(m, 'train/minutes', 1)} | {_f(rec['wall_minutes'], 1)} | **{_pm(m, 'test/auc')}** | **{_pm(m, 'test/acc')}** | "
                     f"{_pm(m, 'test/sensitivity')} | {_pm(m, 'test/specificity')} | "
                     f"{rec['scored_cases'].get('test') or rec['children'][0]['scored_cases'].get('test')} |")
        for seed, child in zip(rec["seeds"], rec["children"] or [rec]):
            c = child["metrics"]
            seeds.append(f"| {rec['name']} | {seed} | {c.get('train/epochs')} | {_f(c.get('train/minutes'), 1)} | "
                         f"{c.get('best_val/epoch')} | {_f(c.get('best_val/acc'))} | {_f(c.get('best_val/auc'))} | "
                         f"{_f(c.get('test/auc'))} | {_f(c.get('test/acc'))} |")
        classes.append(f"- {rec['name']}: " + "; ".join(
            f"{split} " + ", ".join(f"{k[len('class '):]} {v} ({v / counts['cases']:.1%})"
                                    for k, v in sorted(counts.items()) if k != "cases")
            for split, counts in rec["splits"].items()))
    return lines + seeds + classes


def _triple(m: dict[str, Any], prefix: str) -> str:
    return f"{_f(m.get(prefix + 'psnr'), 2)} / {_f(m.get(prefix + 'ssim'))} / {_f(m.get(prefix + 'nmse'), 4)}"


def reconstruction_table(records: list[dict[str, Any]]) -> list[str]:
    lines = ["| config (overrides) | model, epochs | training min | whole run min | test volumes "
             "| test baseline PSNR / SSIM / NMSE | test network PSNR / SSIM / NMSE | gain |",
             "|---|---|---|---|---|---|---|---|"]
    real = ["", "On real images the network never saw (`recon.real_images`), per volume:", "",
            "| config (overrides) | image | slices | baseline PSNR / SSIM | network PSNR / SSIM |",
            "|---|---|---|---|---|"]
    for rec in records:
        m = rec["metrics"]
        baseline = next((k[len("test/"):-len("_psnr")] for k in m if re.fullmatch(r"test/.+_psnr", k)), "baseline")
        model = rec["model"]["name"] + (f" x{rec['model'].get('cascades')}" if rec["model"]["name"] == "cascade" else "")

        lines.append(f"| {rec['name']} | {model}, {rec['epochs']} | {_f(rec['train_minutes'], 1)} | "
                     f"{_f(rec['wall_minutes'], 1)} | {rec['scored_cases'].get('test')} | "
                     f"{baseline} {_triple(m, f'test/{baseline}_')} | {_triple(m, 'test/')} | "
                     f"**{m.get('test/psnr_gain', 0):+.2f} dB, {m.get('test/ssim_gain', 0):+.3f}** |")
        for row in rec.get("real_cases", []):
            real.append(f"| {rec['name']} | {row['case_id']} | {row.get('slices', '')} | "
                        f"{_f(float(row[f'{baseline}_psnr']), 2)} / {_f(float(row[f'{baseline}_ssim']))} | "
                        f"{_f(float(row['psnr']), 2)} / {_f(float(row['ssim']))} |")
        if "real/psnr" in m:
            real.append(f"| {rec['name']} | **mean over volumes** | | {_f(m.get(f'real/{baseline}_psnr'), 2)} / "
                        f"{_f(m.get(f'real/{baseline}_ssim'))} | {_f(m.get('real/psnr'), 2)} / {_f(m.get('real/ssim'))} |")
    return lines + (real if len(real) > 5 else [])


TABLES = {"segmentation": segmentation_table, "classification": classification_table,
          "reconstruction": reconstruction_table}


def markdown(report: dict[str, Any]) -> str:
    mach = report["machine"]
    where = (f"{mach['cpu']}, {mach['cpus_usable']} of {mach['cpu_count']} CPUs usable, "
             f"{mach['gpu'] or 'no GPU'}, torch {mach['torch']}, MONAI {mach['monai']}")
    commit = report["git"]["commit"][:12] + (" with uncommitted changes" if report["git"]["uncommitted_changes"] else "")
    lines = [f"# {report['title']}", "",
             f"Written by `{report['command']}` on {report['date'][:10]} (commit {commit}), {where}; "
             f"{report['minutes_in_all']:.0f} min in all. Every run is one `medseg run`, listed with its MLflow "
             f"run id and model URI in `{report['file']}.json`.", ""]
    for task, table in TABLES.items():
        records = [r for r in report["runs"] if r["task"] == task]
        if records:
            lines += table(records) + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--minutes", type=float, help="train.max_minutes for every run (default: each run's own)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra override for every run (repeatable), e.g. train.max_epochs=1")
    parser.add_argument("--seeds", type=int, help="seeds per repeated run (default: the suite's, 3)")
    parser.add_argument("--only", action="append", metavar="REGEX",
                        help="only the runs whose command matches this regular expression (repeat: any of them)")
    parser.add_argument("--work", type=Path, help="output_dir and MLflow store under this folder instead of the "
                        "configs' runs/ (for smoke tests)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    suite = SUITES[args.suite]
    extra = [*(f"train.max_minutes={args.minutes}",) * (args.minutes is not None), *args.overrides]
    runs = [replace(r, seeds=args.seeds) if r.seeds and args.seeds else r for r in suite.runs]
    if args.minutes is not None:  # --minutes replaces a run's own budget rather than overriding it twice
        runs = [replace(r, overrides=tuple(o for o in r.overrides if not o.startswith("train.max_minutes=")))
                for r in runs]
    if args.only:
        runs = [r for r in runs if any(re.search(pattern, " ".join(r.argv(extra))) for pattern in args.only)]
        if not runs:
            raise SystemExit(f"--only {args.only!r} matches none of the {args.suite} runs: "
                             + "; ".join(" ".join(r.argv(extra)) for r in suite.runs))
    for run in runs:
        check_data(run, extra, suite.data_hint)
    log.info("%s: %d run(s), about %d min on 2 cores at the default budgets", args.suite, len(runs), suite.minutes)
    invocation = shlex.join(["python", "benchmarks/run_results.py", *sys.argv[1:]])
    git, where = git_state(), machine()  # the code and machine the runs start from
    started = time.time()
    records = []
    for i, run in enumerate(runs):
        location = []
        if args.work is not None:
            stem = Path(run.config).stem
            location = [f"output_dir={(args.work / f'{stem}-{i}').resolve()}",
                        f"tracking.uri=sqlite:///{(args.work / 'mlflow.db').resolve()}"]
        records.append(execute(run, extra, location))
    from medseg.io.atomic import atomic_write_text

    report = {"suite": args.suite, "file": suite.file, "title": suite.title, "command": invocation,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git": git,
              "machine": where, "minutes_in_all": (time.time() - started) / 60, "runs": records}
    json_path = atomic_write_text(args.out / f"{suite.file}.json", json.dumps(report, indent=2) + "\n")
    md_path = atomic_write_text(args.out / f"{suite.file}.md", markdown(report))
    print(md_path.read_text())
    log.info("wrote %s and %s", json_path, md_path)


if __name__ == "__main__":
    main()
