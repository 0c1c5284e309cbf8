"""`make bench` before and after a change, in one run: each tree's own ``bench_perf.py`` on its own code.

Usage: python benchmarks/ab_bench.py --before 3fcffaf [--repeats 2] [--only w1,w4] [--out DIR]

Both commits are checked out in worktrees beside this checkout (``../medseg-ab-<sha>``) and run with
``PYTHONPATH`` pointing at each, so the same venv imports each side's code.
The order is before, after, after, before, so a machine that speeds up or slows down during the run
favours neither side. Each bench compares medseg with plain MONAI tutorial code *in the same bench*,
so the figure compared across the two sides is that ratio (medseg / plain), which the machine's drift
moves less than the raw times.

An old ``bench_perf.py`` that read the W4 folder-inference row in a shape ``bench_predict.py`` no
longer wrote (the KeyError of issue 29) is patched in the worktree to read the rows that script writes;
nothing else of the old tree changes. Writes ``ab.md`` / ``ab.json`` and each bench's own
``perf.{md,json}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: The old W4 folder-inference lines (before the fix) and what reads bench_predict's rows instead.
_OLD_PREDICT_ROW = '''        predict = json.loads((work / "predict" / "predict.json").read_text())["rows"][0]
        report["w4"]["folder_inference"] = predict
        rows.append(f"| W4 folder inference, {predict['cases']} hippocampus scans (scans/min) | "
                    f"{60 / predict['monai_s_per_case']:.0f} | {60 / predict['medseg_s_per_case']:.0f} | "
                    f"**{predict['speedup']:.2f}x** |")'''
_NEW_PREDICT_ROW = '''        predicted = json.loads((work / "predict" / "predict.json").read_text())  # ab_bench.py's patch
        report["w4"]["folder_inference"] = predicted
        hip = [r for r in predicted["rows"] if r["workload"] == "hippocampus"]
        plain = next(r for r in hip if r["path"] == "monai")
        names = {"medseg": "torch", "medseg-onnxruntime": "onnxruntime", "medseg-openvino": "openvino"}
        for r in hip:
            if r["path"] in names:
                rows.append(f"| W4 folder inference, {r['cases']} hippocampus scans, {names[r['path']]} (scans/min) | "
                            f"{60 / plain['s_per_case']:.0f} | {60 / r['s_per_case']:.0f} | "
                            f"**{plain['s_per_case'] / r['s_per_case']:.2f}x** |")'''

#: ``--no-bf16``: the bf16 paths of W2/W3 taken out of a bench_perf.py that has no ``--no-bf16`` of its own
#: (on a CPU without bf16 instructions one bf16 W3 volume takes hours), and the peak measured in fp32 only.
_NO_BF16 = {
    'runs = _interleaved(("plain", "medseg", "medseg_bf16"), args.repeats,':
        'runs = _interleaved(("plain", "medseg"), args.repeats,',
    'for path in ("medseg", "medseg_bf16"):': 'for path in ("medseg",):',
    'paths = ("plain", "medseg", "medseg_bf16") if volume == "ct192" else ("plain", "medseg")':
        'paths = ("plain", "medseg")',
    "for dtype in (torch.float32, torch.bfloat16):": "for dtype in (torch.float32,):",
    'best_peak = max(peak["conv3d_gflops_float32"], peak["conv3d_gflops_bfloat16"])':
        'best_peak = peak["conv3d_gflops_float32"]',
}

#: How a bench_perf.py that leaves bf16 out by itself (``--no-bf16``) says so.
_OWN_NO_BF16 = '"--no-bf16"'

_ROW = re.compile(r"^\| (W\d.*?) \| (.*?) \| (.*?) \| \*\*([\d.]+)x(?: / ([\d.]+)x)?\*\* \|$")
_MEASURED_IN_NAME = re.compile(r", % of \d+ peak")
_RATIO_ROW = re.compile(r"^\| (W\d.*?) \| (.*?) \| (.*?) \| ([\d.]+)x / \*\*([\d.]+)x\*\* \|$")


def worktree(commit: str, no_bf16: bool = False) -> Path:
    """A worktree of ``commit`` beside this checkout, with the old W4 row reader patched (and the bf16
    paths taken out with ``no_bf16``; the worktree's name says so)."""
    sha = subprocess.run(["git", "rev-parse", "--short=10", commit], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    tree = REPO.parent / f"medseg-ab-{sha}{'-fp32' if no_bf16 else ''}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=REPO, check=True,
                       capture_output=True)
    script = tree / "benchmarks" / "bench_perf.py"
    text = script.read_text(encoding="utf-8")
    text = text.replace(_OLD_PREDICT_ROW, _NEW_PREDICT_ROW)
    if no_bf16 and _OWN_NO_BF16 not in text:  # a bench_perf.py without the flag: its bf16 paths patched out
        missing = [old for old in _NO_BF16 if old not in text and _NO_BF16[old] not in text]
        if missing:
            raise SystemExit(f"{script}: --no-bf16 cannot find {missing[0]!r}; compare with bf16 paths")
        for old, new in _NO_BF16.items():
            text = text.replace(old, new)
    script.write_text(text, encoding="utf-8")
    # pipelines/ installs as medseg_pipelines (pyproject's package-dir): a link beside the tree lets
    # PYTHONPATH find the tree's own copy instead of the installed checkout's
    shim = tree.parent / f"{tree.name}-path"
    shim.mkdir(exist_ok=True)
    if not (shim / "medseg_pipelines").exists():
        (shim / "medseg_pipelines").symlink_to(tree / "pipelines")
    return tree


def tree_env(tree: Path) -> dict[str, str]:
    """The environment that imports ``tree``'s medseg and medseg_pipelines from this venv."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(tree.parent / f"{tree.name}-path")])}


def run_bench(tree: Path, repeats: int, only: str, out: Path, no_bf16: bool = False) -> dict[str, dict[str, float]]:
    """One ``bench_perf.py`` of ``tree`` on ``tree``'s code; its rows as ``{workload: medseg/plain}``."""
    if (out / "perf.md").is_file():  # a rerun keeps the benches that finished
        return figures((out / "perf.md").read_text(encoding="utf-8"))
    env = tree_env(tree)
    script = tree / "benchmarks" / "bench_perf.py"
    command = [sys.executable, str(script), "--repeats", str(repeats), "--only", only, "--out", str(out)]
    if no_bf16 and _OWN_NO_BF16 in script.read_text(encoding="utf-8"):
        command.append("--no-bf16")
    started = time.monotonic()
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
    (out / "log.txt").parent.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").write_text(done.stdout[-20000:] + "\n--- stderr ---\n" + done.stderr[-20000:], encoding="utf-8")
    if done.returncode != 0:
        raise SystemExit(f"{tree}: bench_perf.py exited {done.returncode}; see {out / 'log.txt'}")
    print(f"  {tree.name}: {(time.monotonic() - started) / 60:.1f} min", flush=True)
    return figures((out / "perf.md").read_text(encoding="utf-8"))


def ratios(table: str) -> dict[str, float]:
    """``{workload: medseg / plain}`` from a perf.md table; for W1's two-figure rows, the later epochs'.
    The workload names lose what each bench measures for itself (W2's "% of N peak")."""
    found: dict[str, float] = {}
    for line in table.splitlines():
        match = _ROW.match(line.strip()) or _RATIO_ROW.match(line.strip())
        if match:
            name = _MEASURED_IN_NAME.sub("", match.group(1))
            found[name] = float(match.group(5) or match.group(4))
    return found


def medseg_figures(table: str) -> dict[str, float]:
    """``{workload: medseg's own figure}`` from a perf.md table, as a speed (higher is faster): rates as
    they are, seconds inverted; for W1's two-figure cells, the later epochs'."""
    found: dict[str, float] = {}
    for line in table.splitlines():
        match = _ROW.match(line.strip()) or _RATIO_ROW.match(line.strip())
        if match:
            name = _MEASURED_IN_NAME.sub("", match.group(1))
            value = float(re.split(r"[;/]", match.group(3))[-1 if "/" in match.group(3) else 0])
            found[name] = 1 / value if "(s," in name or "(s/" in name else value
    return found


def compare(before: list[dict[str, dict[str, float]]], after: list[dict[str, dict[str, float]]]) -> list[dict]:
    """Per workload both sides' figures (``ratio``: medseg / plain in one bench; ``medseg``: medseg's own
    speed) and the change of their medians (positive: after is faster)."""
    rows = []
    for workload in [w for w in after[0]["ratio"] if all(w in r["ratio"] and w in r["medseg"] for r in before + after)]:
        row: dict[str, object] = {"workload": workload}
        for kind in ("ratio", "medseg"):
            b = [r[kind][workload] for r in before]
            a = [r[kind][workload] for r in after]
            row[kind] = {"before": b, "after": a, "change": statistics.median(a) / statistics.median(b) - 1}
        rows.append(row)
    return rows


def figures(table: str) -> dict[str, dict[str, float]]:
    return {"ratio": ratios(table), "medseg": medseg_figures(table)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the commit before the change")
    parser.add_argument("--after", default="HEAD", help="the commit after it (a worktree too, so edits in this "
                                                        "checkout during the run change nothing)")
    parser.add_argument("--repeats", type=int, default=2, help="bench_perf.py --repeats for each bench")
    parser.add_argument("--only", default="w1,w2,w3,w4", help="bench_perf.py --only: the workloads")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "refactor_ab" / "full")
    parser.add_argument("--no-bf16", action="store_true", help="leave out W2/W3's bf16 paths on both sides")
    parser.add_argument("--report-only", action="store_true", help="rewrite ab.md from the benches under --out")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # each bench runs in its own tree
    if args.report_only:
        report_from_folders(args)
        return
    old, new = worktree(args.before, args.no_bf16), worktree(args.after, args.no_bf16)
    head = new.name.removeprefix("medseg-ab-").removesuffix("-fp32")
    started = time.monotonic()
    sides: dict[str, list[dict[str, dict[str, float]]]] = {"before": [], "after": []}
    for index, (side, tree) in enumerate((("before", old), ("after", new), ("after", new), ("before", old))):
        print(f"bench {index + 1}/4: {side}", flush=True)
        sides[side].append(run_bench(tree, args.repeats, args.only, args.out / f"{index + 1}_{side}", args.no_bf16))
    rows = compare(sides["before"], sides["after"])
    minutes = (time.monotonic() - started) / 60
    write_report(args, old.name.removeprefix("medseg-ab-").removesuffix("-fp32"), head, rows, minutes)


def report_from_folders(args: argparse.Namespace) -> None:
    """ab.md / ab.json again from the four benches' perf.md under ``--out`` (their minutes summed)."""
    sides: dict[str, list[dict[str, dict[str, float]]]] = {"before": [], "after": []}
    minutes = 0.0
    for index, side in enumerate(("before", "after", "after", "before")):
        table = (args.out / f"{index + 1}_{side}" / "perf.md").read_text(encoding="utf-8")
        sides[side].append(figures(table))
        minutes += float(re.search(r"([\d.]+) min in all", table).group(1))
    before = json.loads((args.out / "ab.json").read_text(encoding="utf-8"))["before"]
    after = json.loads((args.out / "ab.json").read_text(encoding="utf-8"))["after"]
    write_report(args, before, after, compare(sides["before"], sides["after"]), minutes)


def write_report(args: argparse.Namespace, before: str, after: str, rows: list[dict[str, object]],
                 minutes: float) -> None:
    import platform

    lines = [f"# `make bench` before ({before}) and after ({after}), one run", "",
             f"`python benchmarks/ab_bench.py --before {args.before} --after {args.after} --repeats {args.repeats} "
             f"--only {args.only}"
             f"{' --no-bf16' if args.no_bf16 else ''}`: each tree's own `bench_perf.py --repeats {args.repeats} "
             f"--only {args.only}` on its own code{' without its bf16 paths' if args.no_bf16 else ''}, in the "
             "order before, after, after, before "
             f"({minutes:.0f} min in all; {platform.machine()}, {os.cpu_count()} CPUs). Each figure is medseg / plain "
             "MONAI within one bench (the plain MONAI code is the same on both sides), and medseg's own figure "
             "as a speed (rates as they are, seconds per epoch inverted to epochs per second); each change compares "
             "the medians of the two benches per side (positive: after is faster). The ratio absorbs a machine that "
             "drifts between benches; medseg's own figure is free of noise in the plain path.", "",
             "| workload | medseg / plain: before | after | change | medseg alone: before | after | change |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio, own = r["ratio"], r["medseg"]
        lines.append(f"| {r['workload']} | {' / '.join(f'{x:.2f}x' for x in ratio['before'])} | "
                     f"{' / '.join(f'{x:.2f}x' for x in ratio['after'])} | {ratio['change']:+.1%} | "
                     f"{' / '.join(f'{x:.4g}' for x in own['before'])} | {' / '.join(f'{x:.4g}' for x in own['after'])} "
                     f"| {own['change']:+.1%} |")
    lines += ["", "Each bench's own table: `1_before/perf.md`, `2_after/perf.md`, `3_after/perf.md`, `4_before/perf.md`."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ab.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (args.out / "ab.json").write_text(json.dumps({"before": before, "after": after, "repeats": args.repeats,
                                                  "minutes": minutes, "rows": rows}, indent=2), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
