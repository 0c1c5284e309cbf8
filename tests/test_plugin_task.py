"""A fourth task from a package outside ``medseg/``, registered through the ``medseg.tasks``
entry-point group, trains one epoch and predicts a folder, with no file in ``medseg/`` touched.

The package (``tests/plugin_task/medseg_toy_task``) is put on ``sys.path`` beside a
``.dist-info`` folder holding its ``entry_points.txt``: exactly what ``pip install`` leaves in
site-packages, so the registry finds it the way it finds an installed plugin.
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

import medseg
from medseg.data.manifest import Case, sha256_of, write_manifest
from medseg.errors import ConfigError
from medseg.tasks import registry

PLUGIN = Path(__file__).parent / "plugin_task" / "medseg_toy_task"


@pytest.fixture
def toy_task_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    site = tmp_path / "site"
    shutil.copytree(PLUGIN, site / PLUGIN.name)
    dist = site / "medseg_toy_task-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: medseg-toy-task\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[medseg.tasks]\ntoy_regression = medseg_toy_task:TASK\n")
    monkeypatch.syspath_prepend(str(site))
    registry._plugin_specs.cache_clear()
    registry.get_task.cache_clear()
    yield
    registry._plugin_specs.cache_clear()
    registry.get_task.cache_clear()


def _write_images(root: Path, n: int, seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        split = "train" if i < n - 4 else ("val" if i < n - 2 else "test")
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        image = rng.normal(rng.uniform(0, 4), 0.3, size=(20, 18)).astype(np.float32)
        path = folder / f"img{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(image, np.diag([0.8, 1.1, 1.0, 1.0])), path)
        cases.append(Case(f"img{i:02d}", (str(path.relative_to(root)),), None, split,
                          image_sha256=(sha256_of(path),)))
    return cases


def test_a_task_nobody_registered_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"task": "segmentaton", "data": {"manifest": "m.csv"}}))
    known = ", ".join(repr(name) for name in sorted(medseg.list_tasks()))
    assert {"classification", "detection", "pretraining", "reconstruction", "regression",
            "segmentation"} <= set(medseg.list_tasks())
    with pytest.raises(ConfigError, match=r"task 'segmentaton' is not registered; did you mean 'segmentation'\?.*"
                                          rf"Known tasks: \[{re.escape(known)}"):
        medseg.load_config(path)


def test_fourth_task_from_an_entry_point_trains_and_predicts_a_folder(tmp_path: Path, toy_task_installed: None) -> None:
    assert "toy_regression" in medseg.list_tasks()
    assert medseg.list_models("toy_regression") == ["tiny_regressor"]
    root = tmp_path / "images"
    manifest = write_manifest(_write_images(root, 12), tmp_path / "toy.csv")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({
        "task": "toy_regression", "output_dir": str(tmp_path / "runs"),
        "data": {"manifest": str(manifest), "root": str(root)},
        "train": {"max_epochs": 1, "batch_size": 2, "device": "cpu"},
        "tracking": {"uri": uri, "experiment": "toy"},
    }))
    cfg = medseg.load_config(config)
    assert type(cfg).__name__ == "ToyConfig" and cfg.size == (16, 16)

    result = medseg.train(cfg, progress=False)

    assert result is not None and result.model_uri
    assert result.metrics["train/epochs"] == 1 and result.metrics["test/mse"] >= 0
    assert (result.run_dir / "verify_report.json").is_file() and (result.run_dir / "contract.json").is_file()

    predictor = medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=uri)
    assert predictor.task.name == "toy_regression"
    batch = predictor.predict_folder(root / "test", tmp_path / "out", progress=False)
    assert batch.counts == {"ok": 2, "failed": 0, "skipped": 0}
    with open(batch.report, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case_id"] for r in rows] == ["img10", "img11"]
    assert all(np.isfinite(float(r["predicted_mean"])) for r in rows)
    with pytest.raises(medseg.errors.UsageError, match="--tta: not used by a toy_regression model"):
        medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=uri, tta=True)


def test_the_plugin_reaches_medseg_only_through_the_kit_and_is_short() -> None:
    """The plug-in surface is ``medseg.tasks.kit``: a whole task imports nothing else of medseg and
    needs under 120 lines (the engine owns training, evaluation, packaging and batch prediction)."""
    import ast

    source = (Path(__file__).parent / "plugin_task" / "medseg_toy_task" / "__init__.py").read_text(encoding="utf-8")
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)} | {
        alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import) for alias in node.names}
    assert {m for m in imported if m and m.startswith("medseg")} == {"medseg.tasks"}
    assert "from medseg.tasks import kit" in source
    assert len(source.splitlines()) < 120
