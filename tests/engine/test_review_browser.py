"""review.html in a real browser: headless Chromium (the OS's, driven by Playwright) opens the page
from disk, as a reviewer would; nothing may fail, load from elsewhere, or stay unsorted.

Chromium comes from the OS packages: ``make browser`` installs it (``make test`` does too). Without
it these tests fail, saying so; ``MEDSEG_SKIP_BROWSER_TESTS=1`` skips them on purpose.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import pytest

from medseg.cli import main
from tests.conftest import classification_config, make_case, train_run, write_medmnist_npz

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


def _header(page: Any, column: str) -> Any:
    return page.locator(f'#cases thead th[data-key="{column}"]')


def check_review_page(browser: Any, path: Path, cases: set[str]) -> dict[str, Any]:
    """Open ``path`` from disk and check what any review page must do; returns what a test may look at more."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
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
        page.close()


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
    page.reload()
    page.wait_for_load_state("load")
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
