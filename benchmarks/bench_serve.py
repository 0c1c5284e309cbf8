"""``medseg serve`` on real scans: latency, throughput at 1/2/4 clients, and whether the served masks
are the bytes ``Predictor.predict_paths`` writes; optionally path-mode requests of many rows.

A real server process (``medseg serve MODEL --backend torch``) on 127.0.0.1; 20 MSD Task04
hippocampus scans sent as the request body; the reference masks predicted in this process by
``Predictor.predict_paths`` with the same model. ``--rows 1000 4000 20000`` also times path-mode
requests naming that many hard links to a few small scans under the input root.

Usage: python benchmarks/bench_serve.py --model DIR [--cases 20] [--rows ...] [--out benchmarks/results]
(the model: a trained hippocampus model folder, e.g. the one ``make results-plan`` leaves under
runs/planned/hippocampus_15m/<time>/model). Writes serve.md and serve.json (keeps the hostile
suite's ``attacks`` section, which ``make serve-attacks`` writes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HIPPO = REPO.parent / "shared" / "data" / "msd_task04_hippocampus"
OCTET = {"Content-Type": "application/octet-stream"}


def _clients(served: object, scans: list[Path], clients: int) -> dict[str, float]:
    """Every scan sent once, by ``clients`` threads at a time: wall time, throughput, latencies."""
    latencies: list[float] = []
    statuses: list[int] = []
    queue = list(scans)
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                scan = queue.pop()
            start = time.perf_counter()
            status, _, _ = served.request("POST", "/predict", scan.read_bytes(), OCTET, timeout=600)  # type: ignore[attr-defined]
            latencies.append(time.perf_counter() - start)
            statuses.append(status)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(scans), "ok": statuses.count(200), "wall_s": round(wall, 2),
            "requests_per_s": round(len(scans) / wall, 3), "median_latency_s": round(statistics.median(latencies), 3),
            "max_latency_s": round(max(latencies), 3)}


def _equal_masks(served: object, scans: list[Path], model: str, work: Path) -> dict[str, int]:
    import medseg

    predictor = medseg.Predictor.from_uri(model, device="cpu", backend="torch")
    report = predictor.predict_paths(scans, work / "reference")
    reference = {r.case_id: Path(r.outputs["output"]).read_bytes() for r in report.results}
    equal = 0
    for scan in scans:
        status, _, body = served.request("POST", "/predict", scan.read_bytes(), OCTET, timeout=600)  # type: ignore[attr-defined]
        equal += status == 200 and body == reference[scan.name.removesuffix(".nii.gz")]
    return {"cases": len(scans), "equal_mask_bytes": equal}


def _path_rows(model: str, scans: list[Path], rows: list[int], work: Path) -> list[dict[str, float]]:
    from tests.serving.serve_support import serve

    root, out = work / "rows_in", work / "rows_out"
    for folder in (root, out, work / "rows_server"):
        folder.mkdir()
    for index in range(max(rows)):  # hard links: distinct names (case ids), a few small files
        (root / f"r{index:05d}.nii.gz").hardlink_to(scans[index % len(scans)])
    results = []
    with serve(model, work / "rows_server", "--max-concurrent", "1", "--timeout-s", "36000", "--input-root",
               str(root), "--output-root", str(out)) as served:
        for count in rows:
            body = json.dumps({"paths": [f"r{i:05d}.nii.gz" for i in range(count)]}).encode()
            start = time.perf_counter()
            status, answer = served.json("POST", "/predict/paths", body, {"Content-Type": "application/json"},
                                         timeout=36000)
            seconds = time.perf_counter() - start
            results.append({"rows": count, "status": status, "seconds": round(seconds, 2),
                            "ms_per_row": round(1000 * seconds / count, 2),
                            "ok": answer.get("counts", {}).get("ok") if isinstance(answer, dict) else None})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="trained hippocampus model folder or URI")
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="*", default=[], help="path-mode request sizes, e.g. 1000 4000 20000")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    from benchmarks.run_results import git_state, machine
    from tests.serving.serve_support import serve

    scans = sorted((HIPPO / "imagesTr").glob("*.nii.gz"))[: args.cases]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    record: dict[str, object] = {
        "command": " ".join(["python", "benchmarks/bench_serve.py", *sys.argv[1:]]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "git": git_state(), "machine": machine(),
        "model": args.model, "backend": "torch", "max_concurrent": args.max_concurrent, "scans": len(scans)}
    with serve(args.model, work, "--max-concurrent", str(args.max_concurrent), "--queue", "16") as served:
        _clients(served, scans[:2], 1)  # warm-up
        record["equality"] = _equal_masks(served, scans, args.model, work)
        record["throughput"] = [_clients(served, scans, n) for n in args.clients]
        record["server_health"] = served.json("GET", "/health")[1]
    _write(args.out, record)
    if args.rows:
        record["path_mode"] = _path_rows(args.model, scans[:4], sorted(args.rows), work)
    _write(args.out, record)


def _write(out: Path, record: dict[str, object]) -> None:
    path = out / "serve.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    if "attacks" in previous:
        record["attacks"] = previous["attacks"]
    path.write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# medseg serve", "", f"`{record['command']}`  ", f"{record['date']}, commit {record['git']['commit']}, "  # type: ignore[index]
             f"{record['machine']['cpu']} ({record['machine']['cpus_usable']} cores), backend torch, "  # type: ignore[index]
             f"{record['max_concurrent']} worker(s)", "",
             f"Served masks equal to `Predictor.predict_paths`' bytes: {record['equality']['equal_mask_bytes']} of "  # type: ignore[index]
             f"{record['equality']['cases']} hippocampus scans", "",
             "| clients | requests | ok | wall s | requests/s | median latency s | max latency s |", "|---|---|---|---|---|---|---|"]
    for row in record["throughput"]:  # type: ignore[attr-defined]
        lines.append(f"| {row['clients']} | {row['requests']} | {row['ok']} | {row['wall_s']} | {row['requests_per_s']} "
                     f"| {row['median_latency_s']} | {row['max_latency_s']} |")
    if record.get("path_mode"):
        lines += ["", "Path mode, one request of N rows:", "", "| rows | status | seconds | ms/row |", "|---|---|---|---|"]
        lines += [f"| {r['rows']} | {r['status']} | {r['seconds']} | {r['ms_per_row']} |" for r in record["path_mode"]]  # type: ignore[attr-defined]
    attacks = record.get("attacks")
    if isinstance(attacks, dict):
        lines += ["", f"Hostile suite (`make serve-attacks`): {attacks['attacks']} attacks, answers by status "
                  f"{attacks['by_status']}, {attacks['unexplained_5xx_or_bodies']} unexplained, reads/writes outside "
                  f"the roots {attacks['outside_reads']}/{attacks['outside_writes']}, peak RSS server "
                  f"{attacks['server_peak_rss_mb']:.0f} MiB, workers {attacks['worker_peak_rss_mb']:.0f} MiB"]
    (out / "serve.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
