"""``medseg serve``: a real server process answering what ``Predictor.predict_paths`` writes, in the
scan's own format, with the operator's limits and roots (issue 26). The hostile clients are in
test_hostile.py."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import medseg
from medseg.errors import UsageError
from medseg.serving.guard import PathRefused, ServeLimits, resolve_inside
from tests.conftest import REPO, classification_config, write_medmnist_npz
from tests.serving.serve_support import Served, seeded_model_folder, segmentation_model, serve

OCTET = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return segmentation_model(tmp_path_factory.mktemp("serve_model"))


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory, model: tuple[Path, Path]) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("roots")
    (base / "in").mkdir()
    (base / "out").mkdir()
    for scan in sorted((model[1] / "imagesTr").glob("*.nii.gz"))[:2]:
        (base / "in" / scan.name).write_bytes(scan.read_bytes())
    (base / "secret.nii.gz").write_bytes((model[1] / "imagesTr" / "case_000.nii.gz").read_bytes())
    return base / "in", base / "out"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model: tuple[Path, Path],
           roots: tuple[Path, Path]) -> Iterator[Served]:
    with serve(model[0], tmp_path_factory.mktemp("served"), "--max-concurrent", "1", "--input-root", str(roots[0]),
               "--output-root", str(roots[1])) as served:
        yield served


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, model: tuple[Path, Path]) -> dict[str, tuple[Path, dict]]:
    """What ``Predictor.predict_paths`` writes for each synthetic scan: its mask and its values."""
    predictor = medseg.Predictor.from_uri(str(model[0]), device="cpu", backend="torch")
    scans = sorted((model[1] / "imagesTr").glob("*.nii.gz"))
    report = predictor.predict_paths(scans, tmp_path_factory.mktemp("reference"))
    return {r.case_id: (Path(r.outputs["output"]), r.values) for r in report.results}


def test_ping_health_version_and_docs(server: Served, model: tuple[Path, Path]) -> None:
    assert server.json("GET", "/ping") == (200, {"status": "ok"})
    status, health = server.json("GET", "/health")
    assert status == 200 and health["workers_ready"] == 1 and health["path_mode"] is True
    assert health["limits"]["max_body_mb"] == 256.0
    status, version = server.json("GET", "/version")
    weights = hashlib.sha256((model[0] / "weights.safetensors").read_bytes()).hexdigest()
    assert status == 200 and version["weights_sha256"] == [weights]
    assert version["backend"] == "torch" and version["medseg_version"] == medseg.__version__
    status, spec = server.json("GET", "/openapi.json")
    assert status == 200 and {"/predict", "/predict/paths", "/ping", "/health", "/version"} <= set(spec["paths"])
    assert server.request("GET", "/docs")[0] == 200


def test_served_masks_are_the_bytes_predict_writes(server: Served, model: tuple[Path, Path],
                                                   reference: dict[str, tuple[Path, dict]]) -> None:
    for scan in sorted((model[1] / "imagesTr").glob("*.nii.gz")):
        expected, values = reference[scan.name.removesuffix(".nii.gz")]
        status, headers, body = server.request("POST", "/predict", scan.read_bytes(), OCTET)
        assert status == 200, body
        assert body == expected.read_bytes()
        assert headers["content-disposition"] == 'attachment; filename="mask.nii.gz"'
        row = json.loads(headers["x-medseg-row"])
        assert row["status"] == "ok" and row["voxels_blob1"] == values["voxels_blob1"]
        assert row["qc_flag"] == values["qc_flag"] and "mean_entropy" in row


def test_multipart_upload_ignores_the_client_file_name(server: Served, model: tuple[Path, Path],
                                                       reference: dict[str, tuple[Path, dict]]) -> None:
    scan = model[1] / "imagesTr" / "case_001.nii.gz"
    body = (b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="../../../../tmp/evil.nii.gz"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + scan.read_bytes() + b"\r\n--b0undary--\r\n")
    status, _, mask = server.request("POST", "/predict", body, {"Content-Type": "multipart/form-data; boundary=b0undary"})
    assert status == 200 and mask == reference["case_001"][0].read_bytes()
    assert not Path("/tmp/evil.nii.gz").exists()


@pytest.mark.parametrize("suffix", [".nii", ".nrrd", ".mha"])
def test_mask_comes_back_in_the_scan_format(server: Served, model: tuple[Path, Path], tmp_path: Path,
                                            reference: dict[str, tuple[Path, dict]], suffix: str) -> None:
    source = model[1] / "imagesTr" / "case_002.nii.gz"
    converted = tmp_path / f"scan{suffix}"
    if suffix == ".nii":  # the same NIfTI, uncompressed: the same mask, uncompressed
        converted.write_bytes(gzip.decompress(source.read_bytes()))
    else:
        sitk.WriteImage(sitk.ReadImage(str(source)), str(converted))
    status, headers, body = server.request("POST", "/predict", converted.read_bytes(), OCTET)
    assert status == 200, body
    assert headers["content-disposition"] == f'attachment; filename="mask{suffix}"'
    (tmp_path / f"mask{suffix}").write_bytes(body)
    if suffix == ".nii":
        assert body == gzip.decompress(reference["case_002"][0].read_bytes())
    got, want = sitk.ReadImage(str(tmp_path / f"mask{suffix}")), sitk.ReadImage(str(reference["case_002"][0]))
    assert np.array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want))
    assert np.allclose(got.GetOrigin(), want.GetOrigin()) and np.allclose(got.GetSpacing(), want.GetSpacing())
    assert np.allclose(got.GetDirection(), want.GetDirection())


def test_json_output_and_dicom_seg_for_a_nifti(server: Served, model: tuple[Path, Path]) -> None:
    scan = (model[1] / "imagesTr" / "case_000.nii.gz").read_bytes()
    status, answer = server.json("POST", "/predict?output=json", scan, OCTET)
    assert status == 200 and answer["task"] == "segmentation" and answer["row"]["status"] == "ok"
    assert "input" not in answer["row"] and "/" not in json.dumps(answer["row"]).replace("/predict", "")
    status, refused = server.json("POST", "/predict?output=dicom_seg", scan, OCTET)
    assert status == 422 and "DICOM series" in refused["problem"] and refused["fix"]
    status, refused = server.json("POST", "/predict?output=png", scan, OCTET)
    assert status == 422 and refused["expected"]


def test_path_mode_fresh_folder_per_request(server: Served, roots: tuple[Path, Path]) -> None:
    names = sorted(p.name for p in roots[0].iterdir())
    first = server.json("POST", "/predict/paths", json.dumps({"paths": names}).encode(),
                        {"Content-Type": "application/json"})
    second = server.json("POST", "/predict/paths", json.dumps({"paths": names[:1]}).encode(),
                         {"Content-Type": "application/json"})
    assert first[0] == 200 and second[0] == 200, (first, second)
    assert first[1]["counts"]["ok"] == 2 and first[1]["output_folder"] != second[1]["output_folder"]
    for row in first[1]["rows"]:
        assert (roots[1] / row["outputs"]["output"]).is_file()
        assert row["outputs"]["output"].startswith(first[1]["output_folder"] + "/")
    assert sorted(p.name for p in roots[0].iterdir()) == names  # nothing written beside the inputs


def test_path_mode_refusals_say_nothing_about_existence(server: Served, roots: tuple[Path, Path]) -> None:
    def refused(path: str) -> tuple[int, dict]:
        status, body = server.json("POST", "/predict/paths", json.dumps({"paths": [path]}).encode(),
                                   {"Content-Type": "application/json"})
        body["problem"] = body["problem"].replace(repr(path), "PATH")
        body["found"] = ""
        return status, body

    existing, missing = refused("../secret.nii.gz"), refused("../no-such.nii.gz")
    assert existing[0] == 403 and existing == missing
    assert refused(str(roots[0].parent / "secret.nii.gz")) == existing
    assert refused(".") == existing


def test_classifier_answers_its_row(tmp_path_factory: pytest.TempPathFactory) -> None:
    from PIL import Image

    from medseg.data.medmnist import import_medmnist

    tmp = tmp_path_factory.mktemp("classifier")
    npz = write_medmnist_npz(tmp / "toy.npz", counts=(4, 2, 2))
    import_medmnist(npz, tmp / "manifest.csv", tmp / "images", labels={0: "normal", 1: "lesion"}, progress=False)
    config = classification_config(tmp, tmp / "manifest.csv", tmp / "images", f"sqlite:///{tmp / 'unused.db'}")
    folder = seeded_model_folder(config, tmp / "model")
    png = tmp / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (17, 21), dtype=np.uint8)).save(png)
    with serve(folder, tmp, "--max-concurrent", "1") as served:
        status, answer = served.json("POST", "/predict", png.read_bytes(), {"Content-Type": "image/png"})
        assert status == 200 and answer["task"] == "classification", answer
        assert {"prob_normal", "prob_lesion"} <= set(answer["row"])


def test_cli_refuses_a_shared_work_dir_and_half_path_mode(model: tuple[Path, Path], tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    base = [sys.executable, "-m", "medseg", "serve", str(model[0])]
    done = subprocess.run([*base, "--work-dir", str(shared)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "chmod 700" in done.stderr
    done = subprocess.run([*base, "--input-root", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "--output-root" in done.stderr


def test_resolve_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "outside.nii.gz").write_bytes(b"x")
    (root / "link_in.nii.gz").symlink_to(root / "sub" / "a.nii.gz")
    (root / "link_out.nii.gz").symlink_to(tmp_path / "outside.nii.gz")
    assert resolve_inside(root, "sub/a.nii.gz") == (root / "sub" / "a.nii.gz").resolve()
    assert resolve_inside(root, "link_in.nii.gz") == (root / "sub" / "a.nii.gz").resolve()
    messages = set()
    for bad in ["link_out.nii.gz", "../outside.nii.gz", str(tmp_path / "outside.nii.gz"), "sub", "missing.nii.gz",
                "", "a\x00b", "x" * 5000, "sub/../../outside.nii.gz", "."]:
        with pytest.raises(PathRefused, match="refused: expected a file inside") as err:
            resolve_inside(root, bad)
        messages.add(str(err.value).split(" refused")[1])
    assert len(messages) == 1  # one message whatever the reason


def test_limits_from_env() -> None:
    limits = ServeLimits.from_env({"MEDSEG_SERVE_TIMEOUT_S": "7.5", "MEDSEG_SERVE_QUEUE": "3"}, queue=None,
                                  max_rows=10)
    assert (limits.timeout_s, limits.queue, limits.max_rows) == (7.5, 3, 10)
    with pytest.raises(UsageError, match=r"MEDSEG_SERVE_QUEUE='many': expected an integer"):
        ServeLimits.from_env({"MEDSEG_SERVE_QUEUE": "many"})
    with pytest.raises(UsageError, match="must be positive"):
        ServeLimits(timeout_s=0)
    with pytest.raises(UsageError, match="needs both"):
        ServeLimits(input_root=Path("/"))
