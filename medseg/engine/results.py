"""What a batch prediction is made of and ends with: the options, one case's result, the batch's report,
one image's prediction, and the :class:`CasePredictor` protocol a task implements."""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from monai.data import MetaTensor

from medseg.errors import (
    PredictOptionError,
    UsageError,
)
from medseg.io.discovery import InputCase

if TYPE_CHECKING:
    from medseg.engine.model_loading import LoadedModel

log = logging.getLogger(__name__)


#: The statuses a case ends with.
STATUSES = ("ok", "failed", "skipped")
#: Report columns every task has, first.
COMMON_COLUMNS = ("case_id", "input", "status", "error", "seconds")


@dataclass(frozen=True)
class PredictOptions:
    """How to predict. The first group applies to every task; a task lists the others it uses in
    ``Task.predict_options`` and the driver refuses the rest (see :func:`check_options`)."""

    device: str = "auto"
    overwrite: bool = False
    num_parts: int = 1
    part_id: int = 0
    progress: bool = True
    allow_constant: bool = False  # accept images with one value everywhere (refused by default)
    # task-specific: None / False means "not asked for"
    tta: bool = False  # average over every axis flip (segmentation, classification)
    overlap: float | None = None  # sliding-window overlap; None: the contract's (segmentation)
    save_probabilities: bool = False  # write the class probabilities beside the mask (segmentation)
    save_uncertainty: bool = False  # write entropy and between-sample variance maps beside the mask (segmentation)
    keep_largest: bool | None = None  # keep each label's largest component; None: the contract's (segmentation)
    measured: bool = False  # the inputs already are the degraded images (reconstruction)
    qc: tuple[tuple[str, float], ...] = ()  # QC thresholds overriding the contract's (segmentation)
    review: bool = True  # write review.html: every case's row and thumbnail, worst first (every task)
    # a served request's time limit (s): cases not started by then fail with the reason, so the
    # work stops at the next case instead of running on after the client was answered
    time_limit_s: float | None = None


#: Options every task honours.
COMMON_OPTIONS = frozenset({"device", "overwrite", "num_parts", "part_id", "progress", "allow_constant", "review",
                            "time_limit_s"})
#: How each task-specific option reads on the command line, for messages.
OPTION_FLAGS = {"tta": "--tta", "overlap": "--overlap", "save_probabilities": "--save-probabilities",
                "save_uncertainty": "--save-uncertainty",
                "keep_largest": "--keep-largest", "measured": "--measured", "qc": "--qc"}


def check_options(options: PredictOptions, task_name: str, supported: frozenset[str]) -> None:
    """Refuse every option that was asked for but does not apply to ``task_name``.

    Raises:
        PredictOptionError: names the refused options, the model's task and the options it does take.
    """
    defaults = PredictOptions()
    asked = [f.name for f in fields(PredictOptions)
             if f.name not in COMMON_OPTIONS and getattr(options, f.name) != getattr(defaults, f.name)]
    refused = [name for name in asked if name not in supported]
    if refused:
        flags = ", ".join(OPTION_FLAGS.get(name, name) for name in refused)
        usable = ", ".join(OPTION_FLAGS.get(name, name) for name in sorted(supported)) or "none"
        raise PredictOptionError(f"{flags}: not used by a {task_name} model, so it would be ignored; leave it out "
                                 f"(options a {task_name} model takes: {usable})")
    if options.num_parts < 1 or not 0 <= options.part_id < options.num_parts:
        raise UsageError(f"--part-id {options.part_id} must be in [0, --num-parts={options.num_parts})")
    if options.overlap is not None and not 0 <= options.overlap < 1:
        raise UsageError(f"--overlap {options.overlap}: must be in [0, 1), e.g. 0.5")


@dataclass
class CaseResult:
    """One case of a batch: its status, its output files and the task's values (report columns)."""

    case_id: str
    input: str
    status: str = "ok"  # ok | failed | skipped
    error: str = ""
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)  # report column -> file written
    values: dict[str, Any] = field(default_factory=dict)  # report column -> value (volumes, probabilities, ...)

    def row(self) -> dict[str, Any]:
        outputs = self.outputs if self.status in ("ok", "skipped") else {}
        return {"case_id": self.case_id, "input": self.input, "status": self.status, "error": self.error,
                "seconds": f"{self.seconds:.3f}", **outputs, **{k: _cell(v) for k, v in self.values.items()}}


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


@dataclass(frozen=True)
class BatchReport:
    """What :func:`predict_folder` wrote: the per-case CSV, the summary JSON and every case's result.

    Attributes:
        report / summary: ``predictions.csv`` and ``predict_summary.json`` on this machine; with an
            ``output`` URI, this machine's copies of what was put at ``destination``.
        results: every case's result, in case order.
        destination: the output URI (``s3://bucket/prefix``) the batch was written to, or None for
            a local folder.
    """

    report: Path
    summary: Path
    results: tuple[CaseResult, ...]
    destination: str | None = None

    @property
    def report_location(self) -> str:
        """Where ``predictions.csv`` is: its URI at the destination, else its local path."""
        return f"{self.destination}/{self.report.name}" if self.destination else str(self.report)

    @property
    def summary_location(self) -> str:
        """Where ``predict_summary.json`` is: its URI at the destination, else its local path."""
        return f"{self.destination}/{self.summary.name}" if self.destination else str(self.summary)

    @property
    def n_failed(self) -> int:
        return sum(r.status == "failed" for r in self.results)

    @property
    def counts(self) -> dict[str, int]:
        return {status: sum(r.status == status for r in self.results) for status in STATUSES}

    def summary_dict(self) -> dict[str, Any]:
        return dict(json.loads(self.summary.read_text()))


@dataclass
class Prediction:
    """One image's prediction, on the input's own grid (what ``Predictor.predict`` returns).

    Attributes:
        case_id: the case (the file's name for a path).
        task: the model's task.
        affine: the input's own affine (RAS, as nibabel writes it): the grid of every array here.
        label_map: segmentation: the label of each voxel (*spatial).
        probabilities: segmentation: class probabilities (K, *spatial); classification: (K,).
        class_probabilities: classification: class name -> probability.
        predicted_class: classification: the most probable class's name.
        reconstruction: reconstruction: the network's image, in the input's intensity units.
        baseline: reconstruction: the classical baseline (zero-filled, FBP or the noisy input).
        voxels / volumes_ml: segmentation: per foreground label, its voxel count and volume in mL.
        metrics: values the task computes for the case (reconstruction: PSNR/SSIM/NMSE against the input).
        uncertainty: per-case scores (see :mod:`medseg.engine.uncertainty`): segmentation
            ``mean_entropy`` and ``agreement`` (None without TTA or an ensemble); classification
            ``entropy`` and ``max_probability``.
        entropy / variance: segmentation, when asked for: the normalised entropy of the averaged
            probabilities and the variance between flips/members, per voxel on the input's grid.
        qc: the quality check a batch reports for the case, under the model's thresholds or the
            predictor's ``qc`` overrides: ``qc_flag`` and ``qc_reason`` (segmentation also each
            label's ``volume_z_<label>`` against the training split); empty where the task has none.
    """

    case_id: str
    task: str
    affine: np.ndarray
    label_map: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    class_probabilities: dict[str, float] = field(default_factory=dict)
    predicted_class: str | None = None
    reconstruction: np.ndarray | None = None
    baseline: np.ndarray | None = None
    voxels: dict[str, int] = field(default_factory=dict)
    volumes_ml: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    uncertainty: dict[str, float | None] = field(default_factory=dict)
    entropy: np.ndarray | None = None
    variance: np.ndarray | None = None
    qc: dict[str, Any] = field(default_factory=dict)


class CasePredictor(Protocol):
    """What a task gives the driver for one loaded model (see ``Task.case_predictor``).

    Attributes:
        output_columns: report columns that hold output paths, in order.
        value_columns: report columns of the task's values, in order.
    """

    output_columns: Sequence[str]
    value_columns: Sequence[str]

    def expected_outputs(self, case: InputCase, output_dir: Path) -> dict[str, Path]:
        """Every file this case produces (report column -> path); empty if it writes none. A
        finished case has all of them: each is renamed into place complete, the main one last."""
        ...

    def predict(self, image: str | Path | MetaTensor, case_id: str) -> Prediction:
        """Predict one image: a file or DICOM folder to read, or a channel-first ``MetaTensor``
        (affine in its meta, RAS) that is already in memory."""
        ...

    def predict_case(self, case: InputCase, output_dir: Path) -> CaseResult:
        """Read, predict and write one case (atomically); raise :class:`CaseError` if it cannot be."""
        ...

    def values_of_finished(self, case: InputCase, outputs: dict[str, Path]) -> dict[str, Any]:
        """The values of a case finished by an earlier run whose report row is lost (read back from its files)."""
        ...

    def summarise(self, results: Sequence[CaseResult]) -> tuple[dict[str, Any], dict[str, float]]:
        """Task entries for the summary JSON, and metrics for the MLflow inference run."""
        ...


@runtime_checkable
class StagedCasePredictor(CasePredictor, Protocol):
    """A :class:`CasePredictor` whose ``predict_case`` is three steps an engine may run in different
    processes (the Ray engine: CPU workers read and write, the model's actors run only the network).
    ``predict_case(case, out)`` must be ``write_case(case, infer_case(case, read_case(case), out), out)``,
    so both engines compute the same outputs. What a step returns travels between processes in
    memory: keep it to arrays and plain values, and what ``infer_case`` returns small (a mask, not
    the class scores)."""

    def read_case(self, case: InputCase) -> Any:
        """Read and preprocess one case; raise :class:`CaseError` if it cannot be."""
        ...

    def infer_case(self, case: InputCase, read: Any, output_dir: Path) -> Any:
        """The network (and whatever must stay beside it) on ``read_case``'s result."""
        ...

    def write_case(self, case: InputCase, inferred: Any, output_dir: Path) -> CaseResult:
        """Write ``infer_case``'s result (atomically) and return the case's result."""
        ...


class PublishingCasePredictor(ABC):
    """A :class:`CasePredictor` whose outputs are put elsewhere once written (an fsspec URI:
    :class:`medseg.engine.remote_output.RemoteOutput`): each case is written to a local staging folder
    and then put at ``destination``, so whether a case is finished, and what its row names, is the
    destination's. A base class, not a protocol: the driver asks ``isinstance`` once per case, and a
    runtime protocol's check (every member looked up) would cost the local path time."""

    destination: str

    @abstractmethod
    def stage(self, output_dir: Path, suffix: str, model: LoadedModel, overwrite: bool) -> None:
        """Make ``output_dir`` (the driver's staging folder, locked) the destination's working copy before
        a batch (shard ``suffix``): its report and model stamp fetched, this model's claim put there.

        Raises:
            UsageError: the destination holds another model's outputs. RunError: it cannot be written.
        """

    @abstractmethod
    def published(self, expected: dict[str, Path]) -> dict[str, str] | None:
        """The destination URI of each of a case's expected outputs (report column -> URI), or None when
        one of them is not there yet (the case is not finished)."""

    @abstractmethod
    def local_copies(self, results: Sequence[CaseResult], folder: Path) -> AbstractContextManager[list[CaseResult]]:
        """``results`` with their outputs fetched into ``folder`` (for the review page's thumbnails and
        relative links), removed on exit."""
