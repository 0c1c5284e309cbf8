"""Detection boxes in review.html: each case's best boxes outlined on the axial plane through their
centres, with their scores, on awkward grids (axes swapped and flipped against RAS, anisotropic voxels);
checked in headless Chromium against bright cuboids placed exactly where the boxes are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from medseg.engine.results import CaseResult
from medseg.engine.review import REVIEW_BOXES, _boxes_thumbnail, read_boxes, write_review
from tests.conftest import oblique_affine
from tests.engine import test_review_browser
from tests.engine.test_review_browser import _browser, check_review_page

chromium = test_review_browser.chromium  # the browser tests' fixture: one Chromium for the module

# Per panel: its caption, the bounding box (x0, y0, x1, y1, in pixels) of the box outlines' colour
# and of the bright cuboid's pixels, and its score labels with where they sit against the picture.
_PANELS = """() => Array.from(document.querySelectorAll('.frame')).map(frame => {
    const img = frame.querySelector('img');
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const context = canvas.getContext('2d');
    context.drawImage(img, 0, 0);
    const {data, width, height} = context.getImageData(0, 0, canvas.width, canvas.height);
    const outline = [width, height, -1, -1], bright = [width, height, -1, -1];
    const grow = (b, x, y) => { b[0] = Math.min(b[0], x); b[1] = Math.min(b[1], y);
                                b[2] = Math.max(b[2], x); b[3] = Math.max(b[3], y); };
    for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) {
        const i = 4 * (y * width + x), r = data[i], g = data[i + 1], b = data[i + 2];
        if (r > 200 && g < 60 && b < 110) grow(outline, x, y);  // the first class's colour (230, 25, 75)
        else if (Math.max(r, g, b) - Math.min(r, g, b) < 8 && r > 200) grow(bright, x, y);
    }
    const box = img.getBoundingClientRect();
    const scores = Array.from(frame.querySelectorAll('.score')).map(span => {
        const r = span.getBoundingClientRect();
        return [span.textContent, r.left >= box.left - 1 && r.right <= box.right + 1 && r.top >= box.top - 1
                && r.bottom <= box.bottom + 1];
    });
    const letters = Array.from(frame.querySelectorAll('.edge')).map(s => s.textContent).join('');
    return {caption: frame.parentElement.querySelector('figcaption').textContent, outline, bright, scores, letters,
            width, height};
})"""


def _swapped_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxel axes swapped and the first flipped against RAS, anisotropic: what the boxes must survive."""
    affine = oblique_affine(spacing, (10.0, 20.0, -30.0), angle_deg=0.0)[:, [1, 0, 2, 3]]
    affine[:3, 0] *= -1
    return affine


def _case_with_boxes(folder: Path, case: str, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                     boxes: list[tuple[tuple[int, ...], tuple[int, ...], float]], seed: int) -> CaseResult:
    """A scan whose first box holds a bright cuboid, and its ``_boxes.json`` as predict writes it (the
    n-th box of class n, so each has its own colour)."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 100, shape).astype(np.float32)
    if boxes:
        start, end, _ = boxes[0]
        image[tuple(slice(s, e) for s, e in zip(start, end))] = 1000.0
    nib.save(nib.Nifti1Image(image, _swapped_affine(spacing)), folder / f"{case}.nii.gz")
    records = [{"class": value, "score": score, "world_mm": {"min": [0, 0, 0], "max": [1, 1, 1]},
                "voxels": {"start": list(start), "end": list(end)}} for value, (start, end, score) in enumerate(boxes, 1)]
    (folder / f"{case}_boxes.json").write_text(json.dumps({"case_id": case, "boxes": records}))
    return CaseResult(case, str(folder / f"{case}.nii.gz"), "ok", outputs={"boxes": str(folder / f"{case}_boxes.json")},
                      seconds=0.5 + seed, values={"n_boxes": float(len(boxes))})


def test_review_page_draws_each_case_boxes_with_scores_over_the_lesion_in_chromium(chromium: Any,
                                                                                    tmp_path: Path) -> None:
    browser = _browser(chromium)
    results = [
        # two boxes; the second crosses the axial plane through the first's centre (z 4..7 against 3..6)
        _case_with_boxes(tmp_path, "two_lesions", (41, 35, 11), (0.8, 1.3, 3.1),
                         [((6, 9, 3), (14, 15, 7), 0.91), ((20, 12, 4), (27, 20, 8), 0.4)], 1),
        _case_with_boxes(tmp_path, "none_found", (23, 29, 9), (1.1, 0.9, 4.0), [], 2),
        CaseResult("unreadable", str(tmp_path / "gone.nii.gz"), "failed", "gone.nii.gz: file not found", 0.01)]
    path = write_review(results, tmp_path / "review.html", task="detection", model_uri="runs:/x/model",
                        labels={0: "background", 1: "lesion", 2: "node"}, output_columns=["boxes"], value_columns=["n_boxes"],
                        qc_thresholds={})
    check_review_page(browser, path, {"two_lesions", "none_found", "unreadable"})

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        page.goto(path.resolve().as_uri())
        page.wait_for_load_state("load")
        panels = page.evaluate(_PANELS)
        boxed = [p for p in panels if p["caption"].startswith("box")]
        assert [p["caption"] for p in boxed] == ["box 1", "box 2"]
        first = boxed[0]
        # the outline lies on the cuboid's edge: the bright inside fits within it, a pixel or two in
        for edge, (outline, bright) in enumerate(zip(first["outline"], first["bright"])):
            assert abs(outline - bright) <= 3, (edge, first["outline"], first["bright"])
        assert first["bright"][2] - first["bright"][0] > 5 and first["bright"][3] - first["bright"][1] > 5
        assert first["scores"] == [["0.91", True], ["0.40", True]]  # both boxes cross its plane, labels inside
        assert boxed[1]["scores"] == [["0.91", True], ["0.40", True]]  # box 1 (z 3..6) crosses box 2's centre z 6
        assert first["letters"] == "RLAP"  # axial, radiological: patient's right on the left, anterior up
        # the case without boxes shows its middle planes and says why
        row = page.locator('tr[data-case="none_found"] td.picture')
        assert "no boxes predicted" in row.inner_text() and row.locator("img").count() == 3
    finally:
        page.close()


def test_box_thumbnails_2d_and_many_boxes(tmp_path: Path) -> None:
    image = np.random.default_rng(0).uniform(0, 1, (37, 29)).astype(np.float32)
    affine = np.diag([0.7, 1.9, 1.0])
    boxes_path = tmp_path / "scan_boxes.json"
    boxes_path.write_text(json.dumps({"boxes": [
        {"class": 1, "score": 0.2 + 0.1 * i, "voxels": {"start": [2 * i, 3], "end": [2 * i + 4, 9]}} for i in range(5)]}))
    boxes = read_boxes(boxes_path)
    assert [b.score for b in boxes] == pytest.approx([0.6, 0.5, 0.4, 0.3, 0.2])  # best first
    thumbnail = _boxes_thumbnail(image, affine, boxes)
    assert len(thumbnail.panels) == REVIEW_BOXES and "2 more box(es)" in thumbnail.note
    assert [len(p.marks) for p in thumbnail.panels] == [5] * REVIEW_BOXES  # a 2D image: every box on its one plane
    mark = thumbnail.panels[0].marks[0]  # rows: y upward; columns: x, the patient's right on the left; box x 8..12 of 37, y 3..9 of 29
    assert mark.left == pytest.approx((37 - 12) / 37) and mark.top == pytest.approx(1 - 9 / 29)
    with pytest.raises(ValueError, match="Expected a JSON object with a 'boxes' list"):
        bad = tmp_path / "bad_boxes.json"
        bad.write_text(json.dumps({"boxes": 3}))
        read_boxes(bad)
