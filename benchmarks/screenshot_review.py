"""A screenshot of ``medseg predict``'s review page (``review.html``) for the docs, taken in headless Chromium.

Two ways to get the page:

* ``--review PATH``: an existing ``review.html`` (nothing is predicted);
* ``--model DIR --input DIR``: a real predict on ``--cases`` scans of ``--input`` (after skipping
  ``--offset``), copied into a temporary folder with ``--harmed`` of them again under heavy noise (so
  the QC has something to flag; ``--qc`` sets other thresholds than the model's) and ``--broken``
  truncated copies (failed rows), then its page.

The docs' picture (``docs/explanation/qc-review.md``), 1400 px wide, from the demo model trained for
12 minutes and hippocampus scans it never saw (the demo trains on the first 40)::

    medseg demo -o /tmp/medseg-demo --set train.max_minutes=12
    python benchmarks/screenshot_review.py --model /tmp/medseg-demo/runs/<its run folder> \\
        --input ../shared/data/msd_task04_hippocampus/imagesTr --offset 40

Or photograph an existing page: ``python benchmarks/screenshot_review.py --review out/review.html``.
Writes ``docs/screenshots/review_page.png`` (``--out``). Needs Playwright (``pip install -e .[dev]``)
and Chromium (``make browser``). ``tests/engine/test_review_browser.py`` checks in Chromium that the
page fits this width.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def harmed_copy(source: Path, target: Path, seed: int, strength: float = 1.5) -> Path:
    """``source`` with Gaussian noise of ``strength`` times its foreground's standard deviation."""
    import nibabel as nib
    import numpy as np

    image = nib.load(source)
    data = np.asarray(image.dataobj, dtype=np.float32)
    scale = float(data[data > 0].std()) if np.any(data > 0) else float(data.std()) or 1.0
    noisy = data + np.random.default_rng(seed).normal(0.0, strength * scale, data.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(noisy, image.affine), target)
    return target


def predict_review(model: str, inputs: Path, workdir: Path, cases: int, harmed: int, broken: int,
                   qc: dict[str, float], offset: int = 0) -> Path:
    """Predict ``cases`` scans of ``inputs`` (from the ``offset``-th), ``harmed`` noisy and ``broken`` truncated
    copies; the page's path."""
    import medseg

    scans = sorted(p for p in inputs.iterdir() if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith("."))
    if not scans:
        raise SystemExit(f"--input {inputs}: no NIfTI scans")
    scans = scans[offset:]
    if not scans:
        raise SystemExit(f"--offset {offset}: --input {inputs} has no more scans than that")
    folder = workdir / "input"
    folder.mkdir(parents=True)
    for scan in scans[:cases]:
        shutil.copy(scan, folder / scan.name)
    for i, scan in enumerate(scans[:harmed]):
        name = scan.name.replace(".nii", "_noisy.nii", 1)
        harmed_copy(scan, folder / name, seed=i)
    for scan in scans[:broken]:
        data = scan.read_bytes()
        (folder / scan.name.replace(".nii", "_truncated.nii", 1)).write_bytes(data[: len(data) // 2])
    predictor = medseg.Predictor.from_uri(model, device="cpu", qc=qc)
    batch = predictor.predict_folder(folder, workdir / "output", progress=False)
    review = batch.summary_dict().get("review")
    if not review:
        raise SystemExit(f"predict wrote no review page; see {batch.summary}")
    return Path(review)


def screenshot(page_path: Path, out: Path, width: int, height: int) -> Path:
    """The top of the page in a ``width`` x ``height`` viewport, as PNG."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("Chromium not found: `make browser` installs it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(page_path.resolve().as_uri())
            page.wait_for_load_state("load")
            page.screenshot(path=str(out))
        finally:
            browser.close()
    return out


def main(argv: list[str] | None = None) -> int:
    from medseg.cli import (
        _qc_threshold as qc_threshold,  # the same KEY=VALUE parsing as `medseg predict --qc`
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--review", type=Path, help="an existing review.html to photograph (predicts nothing)")
    parser.add_argument("--model", help="a medseg model (folder or URI) to predict with")
    parser.add_argument("--input", type=Path, help="folder of NIfTI scans (the first --cases are used)")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--offset", type=int, default=0, help="skip this many scans first (the model's training cases)")
    parser.add_argument("--harmed", type=int, default=2, help="noisy copies of the first scans, for QC flags")
    parser.add_argument("--broken", type=int, default=1, help="truncated copies of the first scans, for failed rows")
    parser.add_argument("--qc", action="append", type=qc_threshold, metavar="KEY=VALUE", default=[],
                        help="QC threshold (as medseg predict --qc)")
    parser.add_argument("--keep", type=Path, help="predict into this folder and keep it (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots" / "review_page.png")
    parser.add_argument("--width", type=int, default=1400, help="window width in px (the page must fit 1400)")
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)
    if args.review is None and (args.model is None or args.input is None):
        parser.error("give --review PATH, or --model and --input to predict a batch first")
    if args.review is not None:
        print(screenshot(args.review, args.out, args.width, args.height))
        return 0
    with tempfile.TemporaryDirectory(prefix="medseg-review-") as tmp:
        workdir = args.keep or Path(tmp)
        review = predict_review(args.model, args.input, workdir, args.cases, args.harmed, args.broken,
                                dict(args.qc), args.offset)
        print(f"review: {review}")
        print(screenshot(review, args.out, args.width, args.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
