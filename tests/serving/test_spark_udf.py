"""The Spark recipe of docs/how-to/cluster.md: a logged medseg model as ``mlflow.pyfunc.spark_udf`` over
a DataFrame of paths, on a local Spark (Java 17+), gives the local path's per-case rows and masks.

Slow (a JVM and Python workers start); skipped, saying what to install, without pyspark or Java.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medseg.cli import main
from tests.conftest import HIPPO, require

pytestmark = pytest.mark.slow

#: The rows the UDF returns, as a Spark schema: what the served model answers per path (see
#: medseg.serving.pyfunc); counts as doubles, so that a failed row's missing values are NaN, not an error.
RESULT_TYPE = ("case_id string, path string, status string, error string, output string, "
               "voxels_blob1 double, voxels_blob2 double, volume_ml_blob1 double, volume_ml_blob2 double")
SCANS = ("hippocampus_003.nii.gz", "hippocampus_019.nii.gz", "hippocampus_024.nii.gz", "hippocampus_036.nii.gz")


def _spark_or_skip() -> None:
    pytest.importorskip("pyspark", reason="pyspark is not installed: pip install 'medseg[spark]'")
    java = shutil.which("java")
    if java is None:
        pytest.skip("Java is not installed (Spark needs Java 17+): apt-get install openjdk-17-jre-headless")
    version = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    if not any(f'version "{v}' in version for v in ("17", "18", "19", "2")):
        pytest.skip(f"Spark 4 needs Java 17+, found: {version.splitlines()[0] if version else java}")


def test_spark_udf_over_a_dataframe_of_paths_gives_the_local_rows_and_masks(
        trained_segmentation: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _spark_or_skip()
    import mlflow
    from pyspark.sql import SparkSession
    from pyspark.sql.functions import col, struct

    inputs, served = tmp_path / "in", tmp_path / "served"
    inputs.mkdir(), served.mkdir()
    for name in SCANS:
        shutil.copy(require(HIPPO / "imagesTr" / name), inputs / name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Spark Python worker (OMP_NUM_THREADS=1 below): the same arithmetic
    try:
        assert main(["predict", "--model", trained_segmentation["model_uri"], "--tracking-uri",
                     trained_segmentation["tracking_uri"], "--input", str(inputs), "--output", str(tmp_path / "local"),
                     "--no-progress", "--no-tracking", "--no-review"]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "local" / "predictions.csv", newline="") as fh:
        local = {row["case_id"]: row for row in csv.DictReader(fh)}

    env = {"MEDSEG_SERVE_INPUT_ROOT": str(inputs), "MEDSEG_SERVE_OUTPUT_ROOT": str(served),
           "MEDSEG_SERVE_DEVICE": "cpu", "MEDSEG_BACKEND": "torch", "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": trained_segmentation["tracking_uri"]}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # Spark starts its Python workers with `python3` from PATH unless told otherwise: the one that has medseg
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    mlflow.set_tracking_uri(trained_segmentation["tracking_uri"])
    spark = (SparkSession.builder.master("local[2]").appName("medseg-spark-recipe")
             .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    try:
        paths = spark.createDataFrame([(name,) for name in [*SCANS, "missing.nii.gz"]], ["path"]).repartition(2)
        predict = mlflow.pyfunc.spark_udf(spark, trained_segmentation["model_uri"], result_type=RESULT_TYPE,
                                          env_manager="local", extra_env=env)
        rows = [r.asDict() for r in paths.select(predict(struct(col("path"))).alias("r")).select("r.*").collect()]
    finally:
        spark.stop()

    by_path = {row["path"]: row for row in rows}
    assert sorted(by_path) == sorted([*SCANS, "missing.nii.gz"])
    assert by_path["missing.nii.gz"]["status"] == "failed" and "missing.nii.gz" in by_path["missing.nii.gz"]["error"]
    for name in SCANS:
        row, reference = by_path[name], local[name.removesuffix(".nii.gz")]
        assert (row["case_id"], row["status"], row["error"]) == (reference["case_id"], "ok", "")
        for column in ("voxels_blob1", "voxels_blob2"):
            assert row[column] == float(reference[column]), (name, column)
        for column in ("volume_ml_blob1", "volume_ml_blob2"):
            assert row[column] == pytest.approx(float(reference[column]), rel=1e-5), (name, column)
        mask = served / row["output"]
        assert mask.read_bytes() == (tmp_path / "local" / name).read_bytes(), f"{name}: mask differs from local"
