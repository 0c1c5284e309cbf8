"""Behaviour before and after a change: the same configs trained deterministically on both commits.

Usage: python benchmarks/ab_behaviour.py --before 3fcffaf [--after HEAD] [--out benchmarks/results/refactor_ab/behaviour]

Each config runs as ``medseg run CONFIG --set train.deterministic=true train.max_epochs=N
train.max_minutes=null ...`` in a worktree of each commit (``../medseg-ab-<sha>``, ``PYTHONPATH`` at it,
the same venv), so both sides train the same steps in the same order with deterministic algorithms
and a step-based schedule: the same code gives the same figures to the last digit, and a difference
is a change of behaviour, not noise. Data folders that are not in git (the imported MedMNIST sets
under ``data/``) are read from this checkout. Writes ``behaviour.md`` / ``behaviour.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_bench import tree_env, worktree  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    """One config, the epochs it trains here, the data root it reads, and the metrics compared."""

    config: str
    epochs: int
    metrics: tuple[str, ...]
    data_root: str | None = None  # relative to this checkout, for data that is not in git


CASES = (
    Case("configs/msd_hippocampus.yaml", 2, ("test/dice_mean", "test/dice/anterior", "test/dice/posterior", "test/hd95/anterior", "test/ece")),
    Case("configs/medmnist_breast.yaml", 4, ("test/auc", "test/acc", "test/ece"), "data/breastmnist"),
    Case("configs/medmnist_pneumonia.yaml", 1, ("test/auc", "test/acc", "test/ece"), "data/pneumoniamnist"),
    Case("configs/medmnist_adrenal3d.yaml", 2, ("test/auc", "test/acc", "test/ece"), "data/adrenalmnist3d"),
)


def run_case(tree: Path, case: Case, work: Path) -> dict[str, float | None]:
    """``medseg run`` of one config in ``tree``; the compared metrics from its summary.json (a run that
    finished in ``work`` before is read, not repeated)."""
    finished = sorted(work.rglob("summary.json")) if work.is_dir() else []
    if finished:
        return _metrics(finished[-1], case)
    overrides = [f"train.max_epochs={case.epochs}", "train.max_minutes=null", "train.deterministic=true",
                 f"output_dir={work}", f"tracking.uri=sqlite:///{work}/mlflow.db"]
    if case.data_root:
        overrides.append(f"data.root={REPO / case.data_root}")
    command = [sys.executable, "-m", "medseg", "run", case.config, "--no-progress",
               *[arg for item in overrides for arg in ("--set", item)]]
    done = subprocess.run(command, cwd=tree, env=tree_env(tree), capture_output=True, text=True, check=False)
    (work / "log.txt").parent.mkdir(parents=True, exist_ok=True)
    (work / "log.txt").write_text(done.stdout[-20000:] + "\n--- stderr ---\n" + done.stderr[-20000:], encoding="utf-8")
    if done.returncode != 0:
        raise SystemExit(f"{tree.name}: {' '.join(command)} exited {done.returncode}; see {work / 'log.txt'}")
    return _metrics(next(work.rglob("summary.json")), case)


def _metrics(summary_path: Path, case: Case) -> dict[str, float | None]:
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    return {m: summary.get("metrics", {}).get(m) for m in case.metrics}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "refactor_ab" / "behaviour")
    parser.add_argument("--work", type=Path, default=Path("/tmp/medseg-ab-behaviour"))
    parser.add_argument("--configs", nargs="*", help="only these config stems (default: every case)")
    args = parser.parse_args(argv)
    trees = {"before": worktree(args.before), "after": worktree(args.after)}
    started = time.monotonic()
    rows = []
    for case in [c for c in CASES if not args.configs or Path(c.config).stem in args.configs]:
        name = Path(case.config).stem
        scores = {side: run_case(tree, case, args.work / side / name) for side, tree in trees.items()}
        print(f"{name}: {scores}", flush=True)
        rows.append({"config": case.config, "epochs": case.epochs, **scores})
    minutes = (time.monotonic() - started) / 60
    earlier = args.out / "behaviour.json"
    if minutes < 1 and earlier.is_file():  # every run read back from an earlier invocation: its time stands
        minutes = json.loads(earlier.read_text(encoding="utf-8"))["minutes"]
    write_report(args, {side: tree.name.removeprefix("medseg-ab-") for side, tree in trees.items()}, rows, minutes)


def write_report(args: argparse.Namespace, commits: dict[str, str], rows: list[dict], minutes: float) -> None:
    lines = [f"# Behaviour before ({commits['before']}) and after ({commits['after']}): deterministic runs", "",
             f"`python benchmarks/ab_behaviour.py --before {args.before} --after {args.after}"
             f"{' --configs ' + ' '.join(args.configs) if args.configs else ''}` ({minutes:.0f} min): each "
             "config trained with `train.deterministic=true` for the epochs shown (no time budget), on each commit's "
             "code, and scored as its `medseg run` scores it. Same code, same figures to the last digit; a "
             "difference is a change of behaviour.", "",
             "| config | epochs | metric | before | after | difference |", "|---|---|---|---|---|---|"]
    for row in rows:
        for metric, before in row["before"].items():
            after = row["after"][metric]
            diff = "n/a" if before is None or after is None else "0 (identical)" if after == before else \
                f"{after - before:+.1e}"
            lines.append(f"| `{row['config']}` | {row['epochs']} | {metric} | {_fmt(before)} | {_fmt(after)} | {diff} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "behaviour.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (args.out / "behaviour.json").write_text(json.dumps({"commits": commits, "minutes": minutes, "rows": rows},
                                                        indent=2), encoding="utf-8")
    print("\n".join(lines))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6f}"


if __name__ == "__main__":
    main()
