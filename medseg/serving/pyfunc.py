"""The pyfunc model behind a logged medseg model: a DataFrame of paths in, one row per case out.

``predict`` takes a DataFrame with a ``path`` column (image files or DICOM series folders) and
``params={"output_dir": ...}``; it runs the whole pipeline (read, preprocess, network, invert,
write on each input's own grid) through :class:`medseg.Predictor`, and returns one row per case:
``case_id, status, error, output`` plus the task's values (per-label voxels and mL for
segmentation, class probabilities for classification, PSNR/SSIM for reconstruction). A case that
fails is a row with ``status == "failed"`` and the reason; the others go on.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mlflow.pyfunc import PythonModel


class MedsegPyfuncModel(PythonModel):  # type: ignore[misc]
    """Loads the model's safetensors and JSON artifacts with medseg's own loader (once per device)."""

    def load_context(self, context: Any) -> None:
        self.folder = Path(context.artifacts["medseg_model"]).parent
        self._predictors: dict[str, Any] = {}

    def _predictor(self, device: str) -> Any:
        from medseg.api import Predictor

        if device not in self._predictors:
            self._predictors[device] = Predictor.from_uri(str(self.folder), device=device)
        return self._predictors[device]

    # No type hints on predict: MLflow would read them as a schema; the logged signature is the schema.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        """One row per case of the scans at ``model_input["path"]``, written under ``params["output_dir"]``."""
        import pandas as pd

        params = dict(params or {})
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "path" not in frame.columns:
            raise ValueError(f"expected a DataFrame with a 'path' column (image files or DICOM folders), got "
                             f"columns {list(frame.columns)}")
        output_dir = str(params.get("output_dir") or "") or tempfile.mkdtemp(prefix="medseg-predict-")
        predictor = self._predictor(str(params.get("device") or "auto"))
        # A server predicts what it is sent: by default a case is redone even if output_dir holds a file
        # of that name from an earlier request (the CLI's "skip finished cases" is for reruns of a batch).
        report = predictor.predict_paths([str(p) for p in frame["path"]], output_dir,
                                         overwrite=bool(params.get("overwrite", True)))
        main_column = next(iter(predictor.output_columns), None)  # a classifier writes no file per case
        rows = []
        for result in report.results:
            row: dict[str, Any] = {"case_id": result.case_id, "path": result.input, "status": result.status,
                                   "error": result.error,
                                   "output": result.outputs.get(main_column, "") if main_column else ""}
            row.update(result.values)
            rows.append(row)
        table = pd.DataFrame(rows)
        # a failed row has no values: None (JSON null), not NaN, which strict JSON parsers refuse
        return table.astype(object).where(pd.notna(table), None)
