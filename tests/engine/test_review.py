"""The batch review page (review.html) and the QC summary that ``medseg predict`` writes beside its report."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import nibabel as nib
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from medseg.cli import main
from medseg.engine.results import CaseResult
from medseg.engine.review import (
    THUMBNAIL_PX,
    _largest_structure_centre,
    case_thumbnail,
    qc_summary,
    reason_kinds,
    worst_first,
    write_review,
)
from tests.conftest import TCIA, make_case, oblique_affine, require


class ReviewPage(HTMLParser):
    """What a test needs from review.html: the rows (in page order), every image and every link."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.cells: list[list[str]] = []
        self.headers: list[str] = []  # each header's report column (data-key)
        self.titles: list[str] = []  # what a reviewer reads
        self._key: str | None = None
        self.images: list[str] = []
        self.links: list[str] = []
        self.sources: list[tuple[str, str, str]] = []  # (tag, attribute, value) of everything that loads or links
        self._in_body = self._in_head_row = False
        self._text: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        for key in ("src", "href", "action", "data", "poster", "srcset"):
            if key in values:
                self.sources.append((tag, key, values[key]))
        if tag == "tbody":
            self._in_body = True
        elif tag == "thead":
            self._in_head_row = True
        elif tag == "tr" and self._in_body:
            self.rows.append(values)
            self.cells.append([])
        elif tag in ("td", "th"):
            self._text = []
            self._key = values.get("data-key")  # a header's report column (its text is in words)
        elif tag == "img":
            self.images.append(values.get("src", ""))
        elif tag == "a":
            self.links.append(values.get("href", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_body = False
        elif tag == "thead":
            self._in_head_row = False
        elif tag in ("td", "th") and self._text is not None:
            text = " ".join("".join(self._text).split())
            if tag == "th" and self._in_head_row:
                self.headers.append(self._key or text)
                self.titles.append(text)
            elif self._in_body:
                self.cells[-1].append(text)
            self._text = None

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)

    def column(self, name: str) -> list[str]:
        index = self.headers.index(name)
        return [cells[index] for cells in self.cells]


def assert_self_contained(text: str, page: ReviewPage) -> None:
    """Nothing on the page loads from elsewhere: images are data: URIs, links are relative paths."""
    assert not re.search(r"<(link|iframe|object|embed|base)\b", text, re.I)
    assert not re.search(r"<script[^>]*\bsrc=", text, re.I)
    assert not re.search(r"url\(\s*['\"]?(?!data:)", text, re.I), "CSS must not load anything"
    for tag, key, value in page.sources:
        if tag == "img":
            assert value.startswith("data:image/png;base64,"), (tag, key, value[:80])
        else:
            assert not re.match(r"[a-z][a-z0-9+.-]*:", value, re.I), f"<{tag} {key}={value!r}>: not a relative path"
    assert not re.search(r"(src|href)\s*=\s*['\"]?\s*(https?:)?//", text, re.I)


def png_of(src: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    image.load()
    assert image.format == "PNG"
    return image


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _report(output_dir: Path, name: str = "predictions.csv") -> dict[str, dict[str, str]]:
    with open(output_dir / name, newline="") as fh:
        return {row["case_id"]: row for row in csv.DictReader(fh)}


def _lps_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """Axes swapped and flipped against RAS (first voxel axis runs along -y, the second along -x)."""
    affine = np.zeros((4, 4))
    affine[0, 1], affine[1, 0], affine[2, 2], affine[3, 3] = -spacing[1], -spacing[0], spacing[2], 1.0
    affine[:3, 3] = (30.0, -20.0, 5.0)
    return affine


@pytest.fixture(scope="module")
def trained(trained_segmentation: dict[str, str]) -> dict[str, str]:
    return trained_segmentation


# ----------------------------------------------------------------------------------- through a real predict


def test_predict_writes_a_self_contained_review_page_worst_first(trained, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    image, _, affine = make_case((23, 31, 17), seed=11, spacing=(0.8, 1.3, 2.9))
    _save(inputs / "oblique.nii.gz", image, affine)
    image, _, _ = make_case((19, 27, 13), seed=12, spacing=(1.1, 0.7, 3.1))
    _save(inputs / "nested" / "swapped_axes.nii.gz", image, _lps_affine((1.1, 0.7, 3.1)))
    image, _, affine = make_case((31, 21, 11), seed=13, spacing=(0.6, 0.6, 4.0))
    _save(inputs / "thick_slices.nii.gz", image, affine)
    (inputs / "broken.nii.gz").write_bytes(b"a patient list, not an image")
    shutil.copytree(require(TCIA / "T1post"), inputs / "PGBM-001" / "T1post")  # a DICOM series: a folder

    out = tmp_path / "out"
    # every case with any uncertainty is flagged: the order among them is then the entropy's
    code = main(["predict", "--model", trained["model_uri"], "--input", str(inputs), "--output", str(out),
                 "--tracking-uri", trained["tracking_uri"], "--no-progress", "--qc", "max_mean_entropy=0"])
    assert code == 1  # the broken file failed; the page is written all the same
    report = _report(out)
    assert len(report) == 5 and report["broken"]["status"] == "failed"

    text = (out / "review.html").read_text(encoding="utf-8")
    page = ReviewPage(text)
    assert_self_contained(text, page)
    assert sorted(r["data-case"] for r in page.rows) == sorted(report)  # one row per case
    order = [r["data-case"] for r in page.rows]
    assert order[0] == "broken", "a failed case comes first"
    assert "not a NIfTI image" in page.column("error")[0] and page.column("status")[0] == "failed"
    entropies = [float(report[c]["mean_entropy"]) for c in order[1:]]
    assert entropies == sorted(entropies, reverse=True), "flagged cases, most uncertain first"
    assert all(report[c]["qc_flag"] == "True" for c in order[1:])
    assert page.column("#") == [str(i) for i in range(1, 6)]
    for header in ("status", "qc_flag", "qc_reason", "mean_entropy", "volume_ml_blob1", "volume_ml_blob2",
                   "seconds", "error"):
        assert header in page.headers, header
    # headers in words with units (the report's names in data-key and the tooltip)
    assert {"uncertainty (mean entropy, 0-1)", "blob1 volume (mL)", "why flagged", "time (s)", "review"} <= set(
        page.titles)

    # one thumbnail per finished case: three planes of at most THUMBNAIL_PX, a few kB each
    assert len(page.images) == 4
    for src in page.images:
        picture = png_of(src)
        assert picture.height <= THUMBNAIL_PX and THUMBNAIL_PX < picture.width <= 3 * THUMBNAIL_PX + 4
        assert len(src) < 40_000
    assert "failed: no output to show" in text
    # links are relative to the page and reach each case's mask and input (a DICOM case's folder)
    targets = {(out / unquote(href)).resolve() for href in page.links}
    for case_id, row in report.items():
        assert Path(row["input"]).resolve() in targets, case_id
        if row["status"] == "ok":
            assert (out / f"{case_id}.nii.gz").resolve() in targets
    assert (out / "predictions.csv").resolve() in targets

    # the header: model, counts and the thresholds that applied
    assert trained["model_uri"] in text and "max_mean_entropy = 0" in text
    assert "ok 4" in text and "failed 1" in text and "flagged 4" in text
    qc = json.loads((out / "qc_summary.json").read_text())
    assert qc["flagged"] == 4 and qc["by_reason"]["mean entropy"] == 4 and qc["thresholds"]["max_mean_entropy"] == 0
    assert set(qc["flagged_cases"]) == set(order[1:])
    summary = json.loads((out / "predict_summary.json").read_text())
    assert summary["review"] == str(out / "review.html") and summary["qc_flagged"] == 4

    # the inference run holds the page, the QC summary and the number of flagged cases
    client = MlflowClient(trained["tracking_uri"])
    experiment = client.get_experiment_by_name("medseg-predict")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"params.output = '{out}'")
    assert {"review.html", "qc_summary.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.metrics["predict/qc_flagged"] == 4


def test_no_review_flag_and_shards_name_their_own_page(trained, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    for i in range(3):
        image, _, affine = make_case((15, 17, 9), seed=40 + i)
        _save(inputs / f"s{i}.nii.gz", image, affine)
    plain = tmp_path / "plain"
    assert main(["predict", "--model", trained["model_uri"], "--input", str(inputs), "--output", str(plain),
                 "--tracking-uri", trained["tracking_uri"], "--no-progress", "--no-tracking", "--no-review"]) == 0
    assert not (plain / "review.html").exists() and (plain / "qc_summary.json").is_file()
    assert json.loads((plain / "predict_summary.json").read_text())["review"] is None

    sharded = tmp_path / "sharded"
    for part in (0, 1):
        assert main(["predict", "--model", trained["model_uri"], "--input", str(inputs), "--output", str(sharded),
                     "--tracking-uri", trained["tracking_uri"], "--no-progress", "--no-tracking",
                     "--num-parts", "2", "--part-id", str(part)]) == 0
    assert not (sharded / "review.html").exists()
    cases = [{r["data-case"] for r in ReviewPage((sharded / f"review_part{k}of2.html").read_text()).rows} for k in (0, 1)]
    assert cases[0] | cases[1] == {"s0", "s1", "s2"} and not cases[0] & cases[1]
    assert (sharded / "qc_summary_part1of2.json").is_file()


# ----------------------------------------------------------------------------------- the page's parts


def _result(case_id: str, status: str = "ok", **values: object) -> CaseResult:
    return CaseResult(case_id, f"/data/{case_id}.nii.gz", status, "boom" if status == "failed" else "", 0.5,
                      values=dict(values))


def test_worst_first_puts_failed_then_flagged_then_the_most_uncertain() -> None:
    results = [
        _result("calm", mean_entropy=0.05, qc_flag=False),
        _result("unsure_but_unflagged", mean_entropy=0.9, qc_flag=False),
        _result("flagged_low", mean_entropy=0.1, qc_flag=True),
        _result("flagged_high", mean_entropy=0.4, qc_flag=True),
        _result("failed", "failed"),
        _result("skipped_flagged", "skipped", mean_entropy="0.2", qc_flag="True"),  # read back from the report
        _result("no_score", qc_flag=False),
    ]
    assert [r.case_id for r in worst_first(results)] == [
        "failed", "flagged_high", "skipped_flagged", "flagged_low", "unsure_but_unflagged", "calm", "no_score"]
    # agreement: lower is worse; classification's entropy: higher is worse
    assert [r.case_id for r in worst_first([_result("a", agreement=0.9), _result("b", agreement=0.4)])] == ["b", "a"]
    assert [r.case_id for r in worst_first([_result("a", entropy=0.1), _result("b", entropy=0.7)])] == ["b", "a"]


def test_qc_summary_counts_flagged_cases_per_reason() -> None:
    assert reason_kinds("blob1 volume z = +3.2 (|z| > 3); mean entropy 0.410 > 0.3") == ["blob1 volume z", "mean entropy"]
    assert reason_kinds("agreement 0.712 < 0.8") == ["agreement"]
    results = [_result("a", qc_flag=True, qc_reason="blob1 volume z = -4.0 (|z| > 3); agreement 0.5 < 0.8"),
               _result("b", qc_flag="True", qc_reason="agreement 0.6 < 0.8"), _result("c", qc_flag=False, qc_reason=""),
               _result("d", "failed")]
    summary = qc_summary(results, {"min_agreement": 0.8, "max_abs_volume_z": 3.0})
    assert summary["flagged"] == 2 and summary["cases"] == 4
    assert summary["by_reason"] == {"agreement": 2, "blob1 volume z": 1}
    assert set(summary["flagged_cases"]) == {"a", "b"}


def test_largest_structure_centre_is_inside_the_largest_blob() -> None:
    mask = np.zeros((30, 20, 10), np.uint8)
    mask[2:5, 2:5, 2:5] = 1  # small
    mask[15:26, 8:15, 3:10] = 2  # large, another label
    assert _largest_structure_centre(mask) == (20, 11, 6)  # the middle of 15..25, 8..14, 3..9
    assert _largest_structure_centre(np.zeros((4, 4, 4))) is None


def test_mask_thumbnail_keeps_the_physical_aspect_and_shows_the_structure_in_every_plane(tmp_path: Path) -> None:
    # 40 x 20 x 10 voxels of 1 x 2 x 4 mm on an oblique grid: every plane is 40 mm square
    shape, spacing = (40, 20, 10), (1.0, 2.0, 4.0)
    affine = oblique_affine(spacing, (-12.0, 30.5, 7.0))
    rng = np.random.default_rng(3)
    image = rng.normal(100.0, 10.0, shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[5:9, 3:6, 1:3] = 2  # a small structure away from the middle
    mask[22:34, 11:17, 5:9] = 1  # the largest one, away from the middle too
    result = CaseResult("c", str(_save(tmp_path / "c.nii.gz", image, affine)), "ok",
                        outputs={"output": str(_save(tmp_path / "out" / "c.nii.gz", mask, affine))})
    thumbnail = case_thumbnail(result, ["output"])
    assert thumbnail.note == "" and thumbnail.captions == ("axial", "coronal", "sagittal")
    picture = png_of("data:image/png;base64," + base64.b64encode(thumbnail.png or b"").decode()).convert("RGB")
    assert picture.size == (3 * THUMBNAIL_PX + 2 * 2, THUMBNAIL_PX)
    pixels = np.asarray(picture).astype(int)
    for k in range(3):  # label 1 (red) shows in each plane: the planes cross the largest structure
        panel = pixels[:, k * (THUMBNAIL_PX + 2):(k + 1) * (THUMBNAIL_PX + 2) - 2]
        red = (panel[..., 0] > panel[..., 1] + 40) & (panel[..., 0] > panel[..., 2] + 40)
        assert red.sum() > 50, f"panel {thumbnail.captions[k]} shows no mask"


def test_float_outputs_show_side_by_side_and_no_output_shows_the_image(tmp_path: Path) -> None:
    image, _, affine = make_case((21, 17, 9), seed=5)
    source = _save(tmp_path / "r.nii.gz", image, affine)
    recon = CaseResult("r", str(source), "ok", outputs={
        "output": str(_save(tmp_path / "out" / "r_reconstruction.nii.gz", image * 0.9, affine)),
        "fbp_output": str(_save(tmp_path / "out" / "r_fbp.nii.gz", image * 1.1, affine))})
    thumbnail = case_thumbnail(recon, ["output", "fbp_output"])
    assert thumbnail.captions == ("input", "fbp", "output") and thumbnail.png

    classified = CaseResult("k", str(source), "ok", values={"prob_normal": 0.2, "prob_lesion": 0.8})
    assert case_thumbnail(classified, []).captions == ("axial", "coronal", "sagittal")


def test_a_case_without_a_thumbnail_keeps_its_row_and_the_page_is_written(tmp_path: Path) -> None:
    image, _, affine = make_case((15, 13, 7), seed=6)
    source = _save(tmp_path / "in" / "good.nii.gz", image, affine)
    truncated = tmp_path / "out" / "cut.nii.gz"
    truncated.parent.mkdir()
    truncated.write_bytes(source.read_bytes()[:60])  # the mask was damaged after predict wrote it
    wrong_shape = _save(tmp_path / "out" / "shape.nii.gz", np.zeros((5, 5, 5), np.uint8), affine)
    results = [
        CaseResult("cut", str(source), "ok", outputs={"output": str(truncated)}, values={"volume_ml_x": 1.5}),
        CaseResult("shape", str(source), "ok", outputs={"output": str(wrong_shape)}),
        CaseResult("gone", str(tmp_path / "in" / "moved_away.nii.gz"), "ok"),
        CaseResult("k", str(source), "ok", values={"prob_normal": 0.25, "prob_lesion": 0.75, "predicted_name": "lesion"}),
        CaseResult("bad <name> & 'quotes'", str(source), "failed", "cannot read <this>"),
    ]
    path = write_review(results, tmp_path / "out" / "review.html", task="segmentation", model_uri="models:/m/1",
                        labels={0: "background", 1: "x"}, output_columns=["output"],
                        value_columns=["volume_ml_x", "predicted_name", "prob_normal", "prob_lesion"],
                        qc_thresholds={})
    text = path.read_text()
    page = ReviewPage(text)
    assert_self_contained(text, page)
    assert [r["data-case"] for r in page.rows][0] == "bad <name> & 'quotes'" and len(page.rows) == 5
    assert "cannot read &lt;this&gt;" in text  # escaped, not markup
    notes = dict(zip([r["data-case"] for r in page.rows], page.column("thumbnail")))
    assert notes["cut"].startswith("no thumbnail:")
    assert "shape.nii.gz has shape (5, 5, 5), the input (15, 13, 7)" in notes["shape"]
    assert "moved_away.nii.gz" in notes["gone"] and "file not found" in notes["gone"]
    assert "lesion 0.750" in notes["k"]  # class probabilities as bars beside the image
    assert len(page.images) == 1
