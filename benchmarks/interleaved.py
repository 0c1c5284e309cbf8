"""Shared by the training benchmarks: run each path in its own child process, interleaved, and
report the medians of the first epoch and of the later ones with their ratio medseg / plain."""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

PATHS = ("medseg", "plain")


def in_process(main: Callable[[list[str]], None], argv: list[str]) -> dict:
    """``main(argv)`` in this process; the JSON of its last output line, as a worker child prints it.

    ``--tiny`` runs its workers this way: the same arguments and the same JSON line, without a child's
    start (importing torch, MONAI and medseg again costs seconds, more than a tiny run's work).
    """
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(argv)
    return json.loads(printed.getvalue().strip().splitlines()[-1])


def run_child(script: str, path: str, extra: Sequence[str], cwd: Path,
              main: Callable[[list[str]], None] | None = None) -> dict:
    """Run ``script --worker PATH *extra`` and return the JSON of its last output line; with ``main``
    (the script's own, for ``--tiny``) in this process instead (:func:`in_process`)."""
    if main is not None:
        return in_process(main, ["--worker", path, *extra])
    done = subprocess.run([sys.executable, script, "--worker", path, *extra], capture_output=True, text=True,
                          check=False, cwd=cwd)
    if done.returncode != 0:
        raise SystemExit(f"{path} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleave(repeats: int, run: Callable[[str], dict], rate: str, unit: str) -> dict[str, list[dict]]:
    """``repeats`` rounds of both paths, alternating which goes first, each printed as it ends."""
    runs: dict[str, list[dict]] = {p: [] for p in PATHS}
    for repeat in range(repeats):
        for path in tuple(reversed(PATHS)) if repeat % 2 else PATHS:
            result = run(path)
            runs[path].append(result)
            print(f"repeat {repeat + 1} {path}: " + ", ".join(f"{e[rate]:.1f}" for e in result["epochs"])
                  + f" {unit} per epoch", flush=True)
    return runs


def summarise_and_write(runs: dict[str, list[dict]], rate: str, unit: str, epochs: int, out: Path, name: str,
                        report: dict) -> str:
    """Medians per path, the ratios, ``<out>/<name>.json`` and ``.md``; returns the markdown table."""
    summary = {}
    for path, results in runs.items():
        first = statistics.median(r["epochs"][0][rate] for r in results)
        later = statistics.median(e[rate] for r in results for e in r["epochs"][1:]) if epochs > 1 else None
        summary[path] = {"first_epoch": first, "steady": later}
    ratio_first = summary["medseg"]["first_epoch"] / summary["plain"]["first_epoch"]
    ratio_steady = summary["medseg"]["steady"] / summary["plain"]["steady"] if epochs > 1 else None
    out.mkdir(parents=True, exist_ok=True)
    full = {**report, "epochs": epochs, "unit": unit, "runs": runs, "summary": summary,
            "ratio_first_epoch": ratio_first, "ratio_steady": ratio_steady}
    (out / f"{name}.json").write_text(json.dumps(full, indent=2))
    table = [f"| path | first epoch ({unit}) | later epochs ({unit}) |", "|---|---|---|"]
    for path in ("plain", "medseg"):
        s = summary[path]
        steady = f"{s['steady']:.1f}" if s["steady"] else "-"
        label = "plain MONAI (Dataset, 2 workers)" if path == "plain" else "medseg"
        table.append(f"| {label} | {s['first_epoch']:.1f} | {steady} |")
    table.append(f"| **ratio medseg / plain** | **{ratio_first:.2f}x** | **{ratio_steady:.2f}x** |" if ratio_steady
                 else f"| ratio | {ratio_first:.2f}x | - |")
    text = "\n".join(table) + "\n"
    (out / f"{name}.md").write_text(text)
    return text


def train_with_data_path(path: str, items: list, chain, data_cfg, net, optimiser, loss_fn, batch: int, steps: int,
                         epochs: int, rate: str, cache_dir: Path, workers: int = 0) -> dict:
    """The worker's body: ``epochs`` epochs of ``steps`` steps through one data path; per-epoch rates.

    ``medseg``: the chain's deterministic prefix cached (``make_dataset``), the seeded sample stream
    (``EpochSamples``) in-process (a synchronous ``DataLoader``) or in ``workers`` processes, as
    ``medseg.engine.loop.loader_workers`` picks for the config; torch threads = cores: what
    ``medseg run`` does. ``plain``: MONAI ``Dataset`` with the whole chain per sample, ``DataLoader(num_workers=2,
    shuffle=True)``, torch's default threads. The first epoch's time includes building the cache.
    """
    import time

    import torch
    from monai.data import DataLoader, Dataset

    from medseg.data.datasets import make_dataset
    from medseg.data.sampling import EpochSamples, epoch_order, process_positions, split_transforms
    from medseg.engine.runtime import configure_threads

    if path == "medseg":
        configure_threads(None, 1)
        prefix, rest = split_transforms(chain)
        started = time.perf_counter()
        cached = make_dataset(items, prefix, data_cfg, cache_dir, progress=False)
        cache_seconds = time.perf_counter() - started

        def loader(epoch: int):
            length, positions = process_positions(steps, batch, 1, 0)
            samples = EpochSamples(cached, rest, epoch_order(len(cached), length, 0, epoch), positions, 0, epoch)
            if workers:
                return DataLoader(samples, batch_size=batch, shuffle=False, num_workers=workers)
            return DataLoader(samples, batch_size=batch, shuffle=False, num_workers=0)
    else:
        cache_seconds = 0.0
        dataset = Dataset(items, chain)

        def loader(epoch: int):
            return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=2, drop_last=True)

    done = []
    net.train()
    for epoch in range(epochs):
        started = time.perf_counter()
        seen = 0
        for step, batch_data in enumerate(loader(epoch)):
            if step >= steps:
                break
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(net(batch_data["image"]), batch_data["label"])
            loss.backward()
            optimiser.step()
            seen += len(batch_data["label"])
        seconds = time.perf_counter() - started + (cache_seconds if epoch == 0 else 0.0)
        done.append({"seconds": seconds, "samples": seen, rate: seen / seconds})
    return {"path": path, "epochs": done, "threads": torch.get_num_threads(), "cache_seconds": cache_seconds}
