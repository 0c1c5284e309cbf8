"""``--tiny``, shared by the benchmarks that ``make bench*`` runs: every code path of a benchmark on
minimal inputs (a few synthetic voxels or 2-4 of the shared cases, 1 repetition, 1-3 epochs), in
seconds, so that the test suite (``tests/test_benchmarks.py``) runs each one and checks the shape of
every file it writes.

Its figures mean nothing, so it never writes into ``benchmarks/results``: its files go to ``--out``,
or to a new temporary folder when ``--out`` is not given.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TINY_HELP = ("every code path on minimal inputs in seconds (for the test suite); writes to --out or a new "
             "temporary folder, never to benchmarks/results")


def add_tiny_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tiny`` and ``--out`` (default: benchmarks/results, with ``--tiny`` a new temporary folder)."""
    parser.add_argument("--tiny", action="store_true", help=TINY_HELP)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the .json and .md (default benchmarks/results; with --tiny a temporary one)")


def results_folder(args: argparse.Namespace) -> Path:
    """Where this run writes its results: ``--out``, else benchmarks/results, or a temporary folder in tiny mode.

    Raises:
        SystemExit: ``--tiny`` with ``--out`` naming benchmarks/results (the committed figures).
    """
    if not args.tiny:
        return args.out or RESULTS
    if args.out is None:
        out = Path(tempfile.mkdtemp(prefix="medseg-bench-tiny-"))
        print(f"--tiny: results go to {out}", flush=True)
        return out
    if args.out.resolve() == RESULTS.resolve():
        raise SystemExit(f"--tiny --out {args.out}: tiny mode's figures mean nothing and must not replace the "
                         "committed ones in benchmarks/results; give another folder, or leave --out out for a "
                         "temporary one")
    return args.out


def scratch_folder(prefix: str, args: argparse.Namespace, out: Path) -> Path:
    """A new scratch folder: in tiny mode inside the results folder ``out`` (so a test's temporary
    folder holds everything a run leaves), else in the system's temporary folder, as before."""
    if args.tiny:
        out.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=out if args.tiny else None))


def subset_manifest(source: Path, out: Path, per_split: dict[str, int]) -> Path:
    """Write the first ``n`` cases of each named split of the manifest CSV ``source`` (columns kept) to ``out``.

    Returns:
        ``out``.

    Raises:
        SystemExit: a split has fewer cases than asked for.
    """
    with open(source, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    kept = []
    for split, count in per_split.items():
        cases = [row for row in rows if row["split"] == split][:count]
        if len(cases) < count:
            raise SystemExit(f"{source}: a tiny run needs {count} '{split}' cases, the manifest has {len(cases)}")
        kept += cases
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    return out
