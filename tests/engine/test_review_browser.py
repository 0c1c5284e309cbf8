"""review.html in a real browser: headless Chromium (the OS's, driven by Playwright) opens the page
from disk, as a reviewer would; nothing may fail, load from elsewhere, or stay unsorted.

Chromium comes from the OS packages: ``make browser`` installs it (``make test`` does too). Without
it these tests fail, saying so; ``MEDSEG_SKIP_BROWSER_TESTS=1`` skips them on purpose.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import pytest

from medseg.cli import main
from medseg.engine.results import CaseResult
from medseg.engine.review import write_review
from tests.conftest import classification_config, make_case, oblique_affine, train_run, write_medmnist_npz

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """A headless Chromium (Playwright's ``Browser``), or the text of what is missing: each test
    then fails with it (a failure, not a skip, so a machine without a browser cannot pass unseen)."""
    if os.environ.get("MEDSEG_SKIP_BROWSER_TESTS") == "1":
        pytest.skip("MEDSEG_SKIP_BROWSER_TESTS=1: the review page's browser tests are skipped")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        yield ("Chromium is not installed, so review.html cannot be tested in a browser: `make browser` installs "
               "it (apt-get install chromium); set MEDSEG_SKIP_BROWSER_TESTS=1 to skip these tests")
        return
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        yield "playwright is not installed: pip install -e '.[dev]' (set MEDSEG_SKIP_BROWSER_TESTS=1 to skip)"
        return
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _browser(chromium: Any) -> Any:
    if isinstance(chromium, str):
        pytest.fail(chromium)
    return chromium


def _cells(page: Any, column: str) -> list[str]:
    """The ``data-sort`` keys of one column, in the rows' current order."""
    return page.evaluate("""(name) => {
        const index = Array.from(document.querySelectorAll('#cases thead th')).findIndex(th => th.dataset.key === name);
        return Array.from(document.querySelectorAll('#cases tbody tr')).map(row => row.cells[index].dataset.sort);
    }""", column)


def _horizontal_overflow(page: Any) -> int:
    """How many pixels the page is wider than its window (0: no horizontal scroll bar)."""
    return int(page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth"))


def _header(page: Any, column: str) -> Any:
    return page.locator(f'#cases thead th[data-key="{column}"]')


def check_review_page(browser: Any, path: Path, cases: set[str]) -> dict[str, Any]:
    """Open ``path`` from disk and check what any review page must do; returns what a test may look at more."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})  # its own storage, and room for a 2nd page
    page = context.new_page()
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url))
    try:
        page.goto(path.resolve().as_uri())
        page.wait_for_load_state("load")
        rows = page.eval_on_selector_all("#cases tbody tr", "rows => rows.map(r => r.dataset.case)")
        assert sorted(rows) == sorted(cases), "one row per case"
        images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        assert images and all(done and width > 0 and height > 0 for done, width, height in images), images
        assert all(url == path.resolve().as_uri() or url.startswith("data:") for url in requests), requests
        assert _horizontal_overflow(page) == 0, "the page must fit a 1400 px window without scrolling sideways"

        # the worst-first order is the rank's; "#" shows it ascending
        assert _cells(page, "#") == [str(i) for i in range(1, len(cases) + 1)]
        assert _header(page, "#").get_attribute("aria-sort") == "ascending"
        seconds = sorted(float(s) for s in _cells(page, "seconds"))
        _header(page, "seconds").click()
        assert [float(s) for s in _cells(page, "seconds")] == seconds
        assert _header(page, "seconds").get_attribute("aria-sort") == "ascending"
        assert _header(page, "#").get_attribute("aria-sort") is None
        _header(page, "seconds").click()
        assert [float(s) for s in _cells(page, "seconds")] == seconds[::-1]
        assert _header(page, "seconds").get_attribute("aria-sort") == "descending"
        _header(page, "case").click()
        assert _cells(page, "case") == sorted(cases)
        _header(page, "#").click()  # back to worst first
        assert _cells(page, "#") == [str(i) for i in range(1, len(cases) + 1)]
        _header(page, "#").press("Enter")  # the keyboard sorts too
        assert _cells(page, "#") == [str(i) for i in range(len(cases), 0, -1)]
        _check_decisions(page, rows)
        assert errors == [], errors
        return {"rows": rows, "page": page.content()}
    finally:
        context.close()


def _wait_until_stored(page: Any, case: str, timeout_s: float = 20.0) -> None:
    """Wait until a new page of ``page``'s browser reads ``case``'s decision from localStorage."""
    key = page.evaluate('() => "medseg-review:" + location.pathname')
    probe = page.context.new_page()
    try:
        probe.goto(page.url)
        deadline = time.monotonic() + timeout_s
        while case not in (probe.evaluate("key => localStorage.getItem(key) || ''", key)):
            assert time.monotonic() < deadline, f"the decisions never reached the browser's storage ({key})"
            time.sleep(0.1)
    finally:
        probe.close()


def _check_decisions(page: Any, rows: list[str]) -> None:
    """Accept / reject and comments: kept across a reload, downloaded as review.csv, formulas quoted."""
    def row(case: str) -> Any:
        return page.locator(f'#cases tbody tr[data-case="{case}"]')

    rejected, accepted = rows[0], rows[1]
    row(rejected).locator("td.decision select").select_option("reject")
    row(rejected).locator("td.decision input").fill('=HYPERLINK("x"), "quoted"')
    row(accepted).locator("td.decision select").select_option("accept")
    assert "rejected" in (row(rejected).get_attribute("class") or "")
    assert "accepted" in (row(accepted).get_attribute("class") or "")
    # Chromium hands a page's localStorage writes to its other documents asynchronously: a reload
    # at once raced that on a loaded host (the reloaded page read no decisions). Reload once another
    # page of the browser sees them, as a reviewer coming back would.
    _wait_until_stored(page, rejected)
    for _ in range(5):  # a reload on a loaded host has still read none once: a reviewer would reload again
        page.reload()
        page.wait_for_load_state("load")
        if row(rejected).locator("td.decision select").input_value() == "reject":
            break
        page.wait_for_timeout(1000)
    assert row(rejected).locator("td.decision select").input_value() == "reject"
    with page.expect_download() as download:
        page.locator("#download-review").click()
    lines = Path(download.value.path()).read_text().splitlines()
    assert lines[0] == "case_id,decision,comment" and len(lines) == len(rows) + 1
    assert f'{rejected},reject,"\'=HYPERLINK(""x""), ""quoted"""' in lines
    assert f"{accepted},accept," in lines
    page.evaluate("() => localStorage.clear()")


def test_segmentation_review_page_in_chromium(chromium, trained_segmentation: dict[str, str], tmp_path: Path) -> None:
    browser = _browser(chromium)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, (shape, spacing) in enumerate((((23, 31, 17), (0.8, 1.3, 2.9)), ((19, 25, 13), (1.2, 0.9, 3.3)),
                                          ((27, 19, 9), (0.7, 0.7, 4.1)))):
        image, _, affine = make_case(shape, seed=70 + i, spacing=spacing)
        nib.save(nib.Nifti1Image(image, affine), inputs / f"case_{i}.nii.gz")
    (inputs / "broken.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["predict", "--model", trained_segmentation["model_uri"], "--input", str(inputs), "--output", str(out),
                 "--tracking-uri", trained_segmentation["tracking_uri"], "--no-progress", "--no-tracking"]) == 1
    seen = check_review_page(browser, out / "review.html", {"case_0", "case_1", "case_2", "broken"})
    assert seen["rows"][0] == "broken"


def test_classification_review_page_in_chromium(chromium, tmp_path: Path) -> None:
    from medseg import Predictor
    from medseg.data.medmnist import import_medmnist

    browser = _browser(chromium)

    npz = write_medmnist_npz(tmp_path / "toy.npz", counts=(16, 6, 6))
    import_medmnist(npz, tmp_path / "manifest.csv", tmp_path / "images", labels={0: "normal", 1: "lesion"},
                    progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = classification_config(tmp_path, tmp_path / "manifest.csv", tmp_path / "images", uri,
                                   train={"max_epochs": 1, "batch_size": 8, "val_interval": 1, "num_threads": 1})
    result = train_run(config)
    test_images = tmp_path / "images" / "test"
    (test_images / "zz_broken.nii").write_bytes(b"not a nifti at all")
    batch = Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=uri).predict_folder(
        test_images, tmp_path / "out", progress=False)
    cases = {r.case_id for r in batch.results}
    assert len(cases) == 7 and batch.n_failed == 1
    seen = check_review_page(browser, tmp_path / "out" / "review.html", cases)
    assert seen["rows"][0] == "zz_broken"
    assert seen["page"].count('class="probs"') == 6  # each classified image has its class probabilities


# Per panel: label-coloured pixels, and how many of them have four coloured neighbours (a fill's inside).
_OUTLINE_PIXELS = """() => Array.from(document.querySelectorAll('.frame img')).map(img => {
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const context = canvas.getContext('2d');
    context.drawImage(img, 0, 0);
    const {data, width, height} = context.getImageData(0, 0, canvas.width, canvas.height);
    const coloured = (x, y) => {
        const i = 4 * (y * width + x), r = data[i], g = data[i + 1], b = data[i + 2];
        return Math.max(r, g, b) - Math.min(r, g, b) > 60;  // the palette's colours, not the grey image
    };
    let edge = 0, inside = 0;
    for (let y = 1; y < height - 1; y++) for (let x = 1; x < width - 1; x++) {
        if (!coloured(x, y)) continue;
        edge++;
        if (coloured(x - 1, y) && coloured(x + 1, y) && coloured(x, y - 1) && coloured(x, y + 1)) inside++;
    }
    return [img.closest('figure').querySelector('figcaption').textContent, edge, inside];
})"""

# Per panel: its edge letters and whether each sits inside the picture, visible.
_EDGE_LETTERS = """() => Array.from(document.querySelectorAll('.frame')).map(frame => {
    const box = frame.querySelector('img').getBoundingClientRect();
    return Array.from(frame.querySelectorAll('.edge')).map(span => {
        const r = span.getBoundingClientRect();
        const inside = r.width > 0 && r.left >= box.left - 1 && r.right <= box.right + 1 && r.top >= box.top - 1
            && r.bottom <= box.bottom + 1 && getComputedStyle(span).visibility === 'visible';
        return span.className.replace('edge ', '') + ':' + span.textContent + (inside ? '' : ' (outside)');
    }).join(' ');
})"""


def _awkward_batch(folder: Path) -> list[CaseResult]:
    """Predictions as predict reports them, on volumes with non-identity affines and anisotropic voxels,
    two labels, long names and a long error: what has to fit 1400 px."""
    results = []
    for i, (shape, spacing) in enumerate((((23, 31, 17), (0.8, 1.3, 2.9)), ((19, 25, 13), (1.2, 0.9, 3.3)),
                                          ((27, 19, 9), (0.7, 0.7, 4.1)))):
        image, label, affine = make_case(shape, seed=90 + i, spacing=spacing)
        if i == 1:  # voxel axes swapped and flipped against RAS
            affine = oblique_affine(spacing, (10.0, 20.0, -30.0), angle_deg=-35.0)[:, [1, 0, 2, 3]]
            affine[:3, 0] *= -1
        case = f"patient_{i:03d}_with_a_rather_long_identifier_t1w"
        nib.save(nib.Nifti1Image(image, affine), folder / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / f"{case}_mask.nii.gz")
        z = (10.5, -0.4, 0.3)[i]
        entropy = (0.31, 0.61, 0.08)[i]
        reasons = [f"blob1 volume z = {z:+.1f} (|z| > 3)"] * (abs(z) > 3) + \
            [f"mean entropy {entropy:.3f} > 0.2278"] * (entropy > 0.2278) + ["agreement 0.712 < 0.8"] * (i == 1)
        results.append(CaseResult(case, str(folder / f"{case}.nii.gz"), "ok",
                                  outputs={"output": str(folder / f"{case}_mask.nii.gz")}, seconds=1.5 + i,
                                  values={"volume_ml_blob1": 4.65 if i == 0 else 1.4, "volume_ml_blob2": 1.3,
                                          "mean_entropy": entropy, "agreement": 0.712 if i == 1 else 0.93,
                                          "volume_z_blob1": z, "volume_z_blob2": 0.1, "qc_flag": bool(reasons),
                                          "qc_reason": "; ".join(reasons)}))
    results.append(CaseResult("broken_scan_with_an_even_longer_identifier_than_the_others", str(folder / "b.nii.gz"),
                              "failed", "b.nii.gz: could not be read or preprocessed (its compressed data are damaged "
                              "or cut short (EOFError: Compressed file ended before the end-of-stream marker was "
                              "reached)). Check that it is a complete NIfTI/DICOM/MHA/NRRD image", 0.01))
    return results


def test_review_page_fits_1400_px_with_outlines_orientation_letters_zoom_and_reasons_in_words(
        chromium, tmp_path: Path) -> None:
    browser = _browser(chromium)
    results = _awkward_batch(tmp_path)
    columns = ["voxels_blob1", "voxels_blob2", "volume_ml_blob1", "volume_ml_blob2", "mean_entropy", "agreement",
               "volume_z_blob1", "volume_z_blob2", "qc_flag", "qc_reason"]
    contract = {"qc": {"max_abs_volume_z": 3.0, "max_mean_entropy": 0.2278},
                "label_volumes_ml": {"blob1": {"mean": 1.5, "std": 0.3, "cases": 40}}}
    path = write_review(results, tmp_path / "review.html", task="segmentation", model_uri="/models/hippocampus",
                        labels={0: "background", 1: "blob1", 2: "blob2"}, output_columns=["output"],
                        value_columns=columns, qc_thresholds={**contract["qc"], "min_agreement": 0.8},
                        contract=contract)
    check_review_page(browser, path, {r.case_id for r in results})  # fits, sorts, downloads review.csv

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        page.goto(path.resolve().as_uri())
        page.wait_for_load_state("load")
        # the mask drawn as an outline in every plane: coloured edges, hardly any coloured inside
        panels = page.evaluate(_OUTLINE_PIXELS)
        assert len(panels) == 9 and [caption for caption, _, _ in panels[:3]] == ["axial", "coronal", "sagittal"]
        for caption, edge, inside in panels:
            assert edge > 15 and inside < 0.15 * edge, (caption, edge, inside)
        # the patient directions at the four edges of every plane, inside the picture
        assert page.evaluate(_EDGE_LETTERS) == ["left:R right:L top:A bottom:P", "left:R right:L top:S bottom:I",
                                                "left:P right:A top:S bottom:I"] * 3
        # a click zooms the planes within the window; another click puts them back
        thumb = page.locator(".thumb").first
        before = thumb.bounding_box()
        thumb.click()
        zoomed = thumb.bounding_box()
        assert zoomed["width"] >= 1.5 * before["width"] and thumb.get_attribute("aria-expanded") == "true"
        assert zoomed["x"] + zoomed["width"] <= 1400 and _horizontal_overflow(page) == 0
        thumb.click()
        assert thumb.bounding_box()["width"] == pytest.approx(before["width"], abs=1)
        # reasons in words, headers in words with a tooltip each
        reasons = page.locator('tr[data-case="patient_000_with_a_rather_long_identifier_t1w"] td.reason li')
        assert reasons.all_inner_texts() == [
            "blob1 volume 3.1x the average training case (4.65 mL against 1.50 mL; 10.5 SD above the training average)",
            "less certain than 90 % of the validation cases (uncertainty 0.310; their 90th percentile 0.228)"]
        headers = page.eval_on_selector_all("#cases thead th", "ths => ths.map(th => [th.innerText, th.title])")
        assert all(text and "_" not in text and title for text, title in headers), headers
    finally:
        page.close()
