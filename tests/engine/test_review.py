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
from scipy import ndimage

from medseg.cli import main
from medseg.engine.results import CaseResult
from medseg.engine.review import (
    THUMBNAIL_PX,
    VALIDATION_PERCENTILE,
    QcReference,
    _largest_structure_centre,
    case_thumbnail,
    direction_letter,
    plain_reasons,
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
    # the error, with its fix, where the picture would be
    assert "not a NIfTI image" in page.column("thumbnail")[0] and page.column("status")[0] == "failed"
    entropies = [float(report[c]["mean_entropy"]) for c in order[1:]]
    assert entropies == sorted(entropies, reverse=True), "flagged cases, most uncertain first"
    assert all(report[c]["qc_flag"] == "True" for c in order[1:])
    assert page.column("#") == [str(i) for i in range(1, 6)]
    for header in ("status", "qc_flag", "qc_reason", "mean_entropy", "volume_ml_blob1", "volume_ml_blob2",
                   "seconds"):
        assert header in page.headers, header
    # headers in words with units (the report's names in data-key and the tooltip)
    assert {"uncertainty (mean entropy, 0-1)", "blob1 volume (mL; SD from training)", "why flagged", "time (s)",
            "review"} <= set(page.titles)
    # the reason in words (the limit came from --qc, not the model's validation cases, and it says
    # so); the report's wording stays in the cell's tooltip
    assert all("less certain than this batch's limit allows (uncertainty 0." in reason and "set with --qc" in reason
               for reason in page.column("qc_reason")[1:])

    # one thumbnail per finished case: three planes, each at most THUMBNAIL_PX a side, a few kB each
    assert len(page.images) == 4 * 3
    for src in page.images:
        picture = png_of(src)
        assert max(picture.size) == THUMBNAIL_PX
        assert len(src) < 15_000
    assert page.column("thumbnail")[0].startswith("failed: ")
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


_CONTRACT = {"qc": {"max_abs_volume_z": 3.0, "max_mean_entropy": 0.2278},
             "label_volumes_ml": {"anterior": {"mean": 1.5, "std": 0.3, "cases": 208},
                                  "posterior": {"mean": 1.25, "std": 0.25, "cases": 208}}}
_THRESHOLDS = {"max_abs_volume_z": 3.0, "max_mean_entropy": 0.2278, "min_agreement": 0.8}


def test_flags_are_explained_in_words_from_the_contract() -> None:
    """What each threshold means, from the model's contract: the validation cases' entropy percentile
    and the training volumes. The report's own reason (what flagged it) says which checks apply."""
    reference = QcReference.from_contract(_CONTRACT)
    case = _result("a", qc_flag=True, mean_entropy=0.263, agreement=0.712, volume_ml_anterior=4.65,
                   volume_z_anterior=10.5, volume_ml_posterior=1.3, volume_z_posterior=0.2,
                   qc_reason="anterior volume z = +10.5 (|z| > 3); mean entropy 0.263 > 0.2278; agreement 0.712 < 0.8")
    assert plain_reasons(case, _THRESHOLDS, reference) == [
        "anterior volume 3.1x the average training case (4.65 mL against 1.50 mL; 10.5 SD above the training average)",
        "less certain than 90 % of the validation cases (uncertainty 0.263; their 90th percentile 0.228)",
        "the flipped or ensembled predictions disagree: they overlap by 0.71 (Dice), less than the 0.8 expected"]
    # far beyond, too small, nothing found; a value read back from the report is text
    far = _result("b", qc_flag="True", mean_entropy="0.61", qc_reason="mean entropy 0.610 > 0.2278")
    assert plain_reasons(far, _THRESHOLDS, reference) == [
        "far less certain than 90 % of the validation cases (uncertainty 0.610; their 90th percentile 0.228)"]
    small = _result("c", qc_flag=True, volume_ml_posterior=0.3, volume_z_posterior=-3.8,
                    qc_reason="posterior volume z = -3.8 (|z| > 3)")
    assert plain_reasons(small, _THRESHOLDS, reference) == [
        "posterior volume only 24 % of the average training case (0.30 mL against 1.25 mL; 3.8 SD below the "
        "training average)"]
    none = _result("d", qc_flag=True, volume_ml_anterior=0.0, volume_z_anterior=-5.0,
                   qc_reason="anterior volume z = -5.0 (|z| > 3)")
    assert plain_reasons(none, _THRESHOLDS, reference) == ["no anterior found (training cases average 1.50 mL)"]


def test_flags_in_words_without_the_contract_or_with_a_threshold_set_for_the_batch() -> None:
    case = _result("a", qc_flag=True, mean_entropy=0.263, volume_ml_anterior=4.65, volume_z_anterior=10.5,
                   qc_reason="anterior volume z = +10.5 (|z| > 3); mean entropy 0.263 > 0.2")
    assert plain_reasons(case, {"max_abs_volume_z": 3.0, "max_mean_entropy": 0.2}) == [
        "anterior volume unusually large (4.65 mL): 10.5 SD above the training average",
        "less certain than the QC limit allows (uncertainty 0.263; limit 0.2)"]
    # --qc max_mean_entropy=0.2 against the contract's 0.2278: not the validation percentile any more
    overridden = plain_reasons(case, {"max_abs_volume_z": 3.0, "max_mean_entropy": 0.2},
                               QcReference.from_contract(_CONTRACT))
    assert overridden[1] == "less certain than this batch's limit allows (uncertainty 0.263; limit 0.2, set with --qc)"
    assert plain_reasons(_result("b", qc_flag=True, qc_reason="something new > 1"), _THRESHOLDS) == [
        "something new > 1"]  # a reason it does not know is kept as written
    assert plain_reasons(_result("c", qc_flag=False, qc_reason=""), _THRESHOLDS) == []


def test_the_validation_percentile_in_words_is_the_one_training_stores() -> None:
    from medseg.tasks.segmentation.training import ENTROPY_QUANTILE

    assert VALIDATION_PERCENTILE == round(100 * ENTROPY_QUANTILE)


def test_the_page_says_the_reasons_in_words_and_fits_volumes_and_their_z_in_one_column(tmp_path: Path) -> None:
    image, label, affine = make_case((17, 15, 9), seed=8)
    source = _save(tmp_path / "in" / "a.nii.gz", image, affine)
    mask = _save(tmp_path / "out" / "a.nii.gz", label, affine)
    values = {"volume_ml_anterior": 4.65, "volume_z_anterior": 10.5, "mean_entropy": 0.3, "qc_flag": True,
              "qc_reason": "anterior volume z = +10.5 (|z| > 3); mean entropy 0.300 > 0.2278"}
    path = write_review([CaseResult("a", str(source), "ok", outputs={"output": str(mask)}, values=values)],
                        tmp_path / "out" / "review.html", task="segmentation", model_uri="m",
                        labels={1: "anterior", 2: "posterior"}, output_columns=["output"],
                        value_columns=["volume_ml_anterior", "mean_entropy", "volume_z_anterior", "qc_flag",
                                       "qc_reason"], qc_thresholds=_THRESHOLDS, contract=_CONTRACT)
    text = path.read_text()
    page = ReviewPage(text)
    assert "volume_z_anterior" not in page.headers  # shown in the volume's cell
    assert page.column("volume_ml_anterior") == ["4.65+10.5 SD"]  # the z below the volume
    (reason,) = page.column("qc_reason")
    assert reason.startswith("anterior volume 3.1x the average training case") and \
        "less certain than 90 % of the validation cases" in reason
    assert 'title="anterior volume z = +10.5 (|z| &gt; 3); mean entropy 0.300 &gt; 0.2278"' in text
    assert "uncertainty at most 0.2278 (the validation cases&#x27; 90th percentile)" in text
    assert [e for e in re.findall(r'<span class="edge \w+" title="[^"]+">(\w)</span>', text)] == [
        "R", "L", "A", "P", "R", "L", "S", "I", "P", "A", "S", "I"]


def test_largest_structure_centre_is_inside_the_largest_blob() -> None:
    mask = np.zeros((30, 20, 10), np.uint8)
    mask[2:5, 2:5, 2:5] = 1  # small
    mask[15:26, 8:15, 3:10] = 2  # large, another label
    assert _largest_structure_centre(mask) == (20, 11, 6)  # the middle of 15..25, 8..14, 3..9
    assert _largest_structure_centre(np.zeros((4, 4, 4))) is None


def _red(picture: Image.Image) -> np.ndarray:
    pixels = np.asarray(picture.convert("RGB")).astype(int)
    return (pixels[..., 0] > pixels[..., 1] + 40) & (pixels[..., 0] > pixels[..., 2] + 40)


def _panel_pictures(thumbnail) -> list[Image.Image]:
    return [png_of("data:image/png;base64," + base64.b64encode(panel.png).decode()) for panel in thumbnail.panels]


def test_mask_thumbnail_keeps_the_physical_aspect_and_outlines_the_structure_in_every_plane(tmp_path: Path) -> None:
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
    for panel, picture in zip(thumbnail.panels, _panel_pictures(thumbnail)):
        assert picture.size == (THUMBNAIL_PX, THUMBNAIL_PX), panel.caption  # 40 mm square, whatever the voxels
        red = _red(picture)  # label 1 shows in each plane: the planes cross the largest structure
        assert red.sum() > 20, f"panel {panel.caption} shows no outline"
        # an outline, not a fill: the red line encloses grey image several times its own area
        inside = ndimage.binary_fill_holes(red) & ~red
        assert inside.sum() > 2 * red.sum(), f"panel {panel.caption}: the structure is filled, not outlined"


def _world_marker_case(shape: tuple[int, int, int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An image and a mask whose one structure lies to the patient's right, front and top of the volume's
    centre, in world (RAS) millimetres, whatever the voxel axes' order and direction."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = (nib.affines.apply_affine(affine, grid)).reshape(shape + (3,))
    centre = world.reshape(-1, 3).mean(axis=0)
    extent = np.ptp(world.reshape(-1, 3), axis=0)
    target = centre + 0.22 * extent  # towards +x (R), +y (A), +z (S)
    mask = (np.abs(world - target) < 0.12 * extent).all(axis=-1).astype(np.uint8)
    image = np.random.default_rng(0).normal(50.0, 5.0, shape).astype(np.float32) + 40.0 * mask
    return image, mask


def _lps_swapped(spacing: tuple[float, float, float]) -> np.ndarray:
    return _lps_affine(spacing)


def _flipped_oblique(spacing: tuple[float, float, float]) -> np.ndarray:
    """Oblique, with the first voxel axis running right-to-left and the third from head to feet."""
    affine = oblique_affine(spacing, (4.0, -8.0, 60.0), angle_deg=-25.0)
    affine[:3, 0] *= -1
    affine[:3, 2] *= -1
    return affine


def _slices_first(spacing: tuple[float, float, float]) -> np.ndarray:
    """The voxel axes in S, R, A order (slices first), with thick slices."""
    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = spacing[0], spacing[1], spacing[2], 1.0
    return affine


@pytest.mark.parametrize("make_affine", [lambda s: np.diag([*s, 1.0]), _lps_swapped, _flipped_oblique, _slices_first],
                         ids=["ras", "lps-swapped", "flipped-oblique", "slices-first"])
def test_orientation_letters_name_the_side_the_anatomy_is_on(make_affine, tmp_path: Path) -> None:
    """Whatever the affine, a structure to the patient's right, front and top shows on the sides the
    panels' letters call R, A and S; the letters read as a radiologist expects."""
    shape, spacing = (26, 19, 15), (0.9, 1.4, 3.1)
    affine = make_affine(spacing)
    image, mask = _world_marker_case(shape, affine)
    result = CaseResult("m", str(_save(tmp_path / "m.nii.gz", image, affine)), "ok",
                        outputs={"output": str(_save(tmp_path / "out" / "m.nii.gz", mask, affine))})
    thumbnail = case_thumbnail(result, ["output"])
    assert {p.caption: p.edges for p in thumbnail.panels} == {
        "axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("P", "A", "S", "I")}
    for panel, picture in zip(thumbnail.panels, _panel_pictures(thumbnail)):
        rows, cols = np.nonzero(_red(picture))
        assert rows.size, panel.caption
        left, right, top, bottom = panel.edges
        on_left, on_top = cols.mean() < picture.width / 2, rows.mean() < picture.height / 2
        assert (left if on_left else right) in "RAS", (panel.caption, panel.edges, cols.mean(), picture.width)
        assert (top if on_top else bottom) in "RAS", (panel.caption, panel.edges, rows.mean(), picture.height)


def test_direction_letter_takes_the_closest_patient_axis() -> None:
    assert [direction_letter(v) for v in ([1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1])] == \
        ["R", "L", "A", "P", "S", "I"]
    assert direction_letter([0.3, -0.9, 0.2]) == "P"  # oblique: its largest component
    assert direction_letter(np.array([-2.0, 1.9, 0.0])) == "L"


def test_float_outputs_show_side_by_side_and_no_output_shows_the_image(tmp_path: Path) -> None:
    image, _, affine = make_case((21, 17, 9), seed=5)
    source = _save(tmp_path / "r.nii.gz", image, affine)
    recon = CaseResult("r", str(source), "ok", outputs={
        "output": str(_save(tmp_path / "out" / "r_reconstruction.nii.gz", image * 0.9, affine)),
        "fbp_output": str(_save(tmp_path / "out" / "r_fbp.nii.gz", image * 1.1, affine))})
    thumbnail = case_thumbnail(recon, ["output", "fbp_output"])
    assert thumbnail.captions == ("input", "fbp", "output") and all(panel.png for panel in thumbnail.panels)

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
    assert len(page.images) == 3  # the classified image's three planes


def test_many_labels_share_one_volumes_column_sorted_by_the_most_unusual(tmp_path: Path) -> None:
    names = ("left_caudate_nucleus", "right_caudate_nucleus", "thalamus", "putamen")
    results = [_result(case, **{f"volume_ml_{n}": 1.0 + i for i, n in enumerate(names)},
                       **{f"volume_z_{n}": z * (i + 1) for i, n in enumerate(names)})
               for case, z in (("a", 0.5), ("b", -2.0))]
    columns = [f"volume_ml_{n}" for n in names] + [f"volume_z_{n}" for n in names]
    text = write_review(results, tmp_path / "review.html", task="segmentation", model_uri="m", labels={},
                        output_columns=[], value_columns=columns, qc_thresholds={}).read_text()
    page = ReviewPage(text)
    assert not [h for h in page.headers if h.startswith("volume_")] and "volumes (mL; SD from training)" in page.titles
    by_case = dict(zip([r["data-case"] for r in page.rows], page.column("volumes")))
    assert by_case["b"].startswith("left caudate nucleus 1 -2.0 SD") and "putamen 4 -8.0 SD" in by_case["b"]
    assert re.findall(r'<td data-sort="([\d.]*)" class="num volumes">', text) == ["2.0", "8.0"]  # the largest |z|
    # three labels or fewer keep a column each, their names in words
    few = write_review(results, tmp_path / "few.html", task="segmentation", model_uri="m", labels={},
                       output_columns=[], value_columns=columns[:3] + columns[4:7], qc_thresholds={}).read_text()
    assert {"left caudate nucleus volume (mL; SD from training)", "thalamus volume (mL; SD from training)"} <= set(
        ReviewPage(few).titles)


def test_the_docs_show_the_review_page_in_a_1400_px_window() -> None:
    """docs/explanation/qc-review.md shows the page as `python benchmarks/screenshot_review.py` takes it
    (1400 px wide, the width tests/engine/test_review_browser.py checks the page fits)."""
    from tests.conftest import REPO

    shot = REPO / "docs" / "screenshots" / "review_page.png"
    assert "../screenshots/review_page.png" in (REPO / "docs" / "explanation" / "qc-review.md").read_text()
    with Image.open(shot) as picture:
        assert picture.width == 1400, f"{shot} is {picture.width} px wide: rerun benchmarks/screenshot_review.py"
