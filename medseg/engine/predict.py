"""Batch prediction: load a model once, then run every scan of a folder through its task.

The one driver every task plugs into. It owns what is the same for all of them: discovery of
the scans, sharding (``num_parts``), skipping finished cases or redoing them (``overwrite``),
per-case error isolation (one bad scan is reported, the rest go on), the report (one row per
case, appended as each case ends so a crash keeps what is done, then written whole atomically:
:mod:`medseg.engine.report`), the summary and the MLflow inference run. A task supplies a :class:`CasePredictor`: the files a case produces, and
how to predict and write one case.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import resource
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from torch import nn
from tqdm import tqdm

from medseg._version import __version__ as medseg_version
from medseg.engine.model_format import NetworkBuilder, local_model_folder, read_model_folder
from medseg.engine.model_format import build_network as build_model_network
from medseg.engine.report import ReportAppender, finished_rows
from medseg.engine.review import write_qc_summary, write_review
from medseg.engine.runtime import to_channels_last, use_channels_last
from medseg.engine.sliding import fold_batch_norms
from medseg.errors import (
    CaseError,
    MedsegError,
    PredictOptionError,
    RunError,
    UsageError,
    cause_text,
    root_cause,
)
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.io.discovery import Discovery, InputCase, discover
from medseg.io.locks import open_lock_file, read_holder, write_holder

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
    """What :func:`predict_folder` wrote: the per-case CSV, the summary JSON and every case's result."""

    report: Path
    summary: Path
    results: tuple[CaseResult, ...]

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


# ----------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class LoadedModel:
    """One model, or an ensemble (folds, seeds) whose members share one preprocessing contract."""

    networks: tuple[nn.Module, ...]
    contract: dict[str, Any]  # the first member's; the preprocessing every member shares
    uris: tuple[str, ...]
    source_run_ids: tuple[str | None, ...]
    member_contracts: tuple[dict[str, Any], ...] = ()  # each member's own windowing (patch size, overlap)
    weights_sha256: tuple[str, ...] = ()  # each member's weights file: which model made an output
    backend: str = "torch"  # what runs the networks: torch, onnxruntime, openvino

    @property
    def weights_id(self) -> str:
        """One id for the weights of all members (the hash itself for a single model)."""
        if len(self.weights_sha256) == 1:
            return self.weights_sha256[0]
        return hashlib.sha256(",".join(self.weights_sha256).encode()).hexdigest()

    def members(self) -> list[tuple[nn.Module, dict[str, Any]]]:
        contracts = self.member_contracts or (self.contract,) * len(self.networks)
        return list(zip(self.networks, contracts))

    @property
    def task(self) -> str:
        return str(self.contract.get("task", ""))

    @property
    def uri(self) -> str:
        return ",".join(self.uris)

    @property
    def source_run_id(self) -> str | None:
        return self.source_run_ids[0] if len(self.source_run_ids) == 1 else ",".join(r or "" for r in self.source_run_ids)

    @property
    def label_names(self) -> dict[int, str]:
        return {int(k): v for k, v in self.contract.get("labels", {}).items()}


#: Contract entries every member of an ensemble must share: they define the grid and the
#: meaning of the averaged outputs. Patch size and window settings may differ.
ENSEMBLE_KEYS = ("task", "spatial_dims", "in_channels", "channel_names", "labels", "orientation", "spacing",
                 "intensity", "crop_foreground", "resize", "output_activation", "regions", "recon")


def load_model(ref: str, device: torch.device, build: NetworkBuilder) -> LoadedModel:
    """Load a medseg model (``runs:/`` or ``models:/`` URI, ``models:/<name>@<alias>``, or a local
    model folder): its JSON and safetensors only, the network rebuilt by ``build`` from medseg's
    registry (:mod:`medseg.engine.model_format`). Nothing in the folder is imported or unpickled.

    Raises:
        UsageError: the reference names no medseg model (a pickled one is refused, with the
            command that converts it), or a network this medseg cannot build.
        ModelLoadError: the model was found but is damaged (corrupt or truncated file, changed
            weights) or could not be loaded (out of memory).
    """
    with local_model_folder(ref) as (folder, run_id):
        files = read_model_folder(folder, ref)
    contract = files.contract
    if not contract.get("task"):
        raise UsageError(f"--model {ref}: its contract names no task; inference must not guess")
    network = build_model_network(files, build, ref).to(device)
    network = fold_batch_norms(network.eval())
    if use_channels_last(None, int(contract.get("spatial_dims", 3))):  # same values, faster 3D convolutions
        network = to_channels_last(network, 3)
    return LoadedModel((network,), contract, (ref,), (run_id,), weights_sha256=(files.weights_sha256,))


def expand_model_refs(refs: Sequence[str]) -> list[str]:
    """Model references with ensembles spelled out.

    A ``--seeds``/``--folds`` parent run directory (its ``ensemble.json``) or a parent run URI
    ``runs:/<parent id>`` stands for the models of its child runs.

    Raises:
        UsageError: an ensemble that lists no models.
    """
    out: list[str] = []
    for ref in refs:
        local = Path(ref)
        if (local / "ensemble.json").is_file():
            members = json.loads((local / "ensemble.json").read_text()).get("models", [])
            if not members:
                raise UsageError(f"--model {ref}: ensemble.json lists no models; did every child run finish?")
            out.extend(members)
        elif ref.startswith("runs:/") and "/" not in ref[len("runs:/"):].strip("/"):
            out.extend(_child_models(ref[len("runs:/"):].strip("/")) or [ref])
        else:
            out.append(ref)
    return out


def _child_models(parent_run_id: str) -> list[str]:
    """The models of a finished ``--seeds``/``--folds`` parent run's children ([] if not a parent).

    Raises:
        UsageError: the parent has not finished all its children.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        parent = client.get_run(parent_run_id)
    except Exception:  # not a run of this store: let the loader report the reference as given
        return []
    if "medseg.repeat" not in parent.data.tags:
        return []
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  order_by=["attributes.run_name ASC"])
    models = [c.data.tags["medseg.model_uri"] for c in children if c.data.tags.get("medseg.model_uri")]
    expected = int(parent.data.tags.get("medseg.repeat_count", len(models)))
    if parent.info.status != "FINISHED" or len(models) < expected:
        run_dir = parent.data.tags.get("run_dir", "<parent run dir>")
        raise UsageError(f"--model runs:/{parent_run_id}: {len(models)} of {expected} child models exist and the "
                         f"parent run is {parent.info.status}; finish it with `medseg run CONFIG --resume {run_dir} "
                         f"--{parent.data.tags['medseg.repeat']} {expected}` first")
    return models


def load_models(refs: str | Sequence[str], device: torch.device, build: NetworkBuilder) -> LoadedModel:
    """Load one model or an ensemble (several references, a parent run or its directory).

    Raises:
        UsageError: a member cannot be found, or members disagree on their preprocessing contract.
        ModelLoadError: a member was found but could not be loaded.
    """
    expanded = expand_model_refs([refs] if isinstance(refs, str) else list(refs))
    if not expanded:
        raise UsageError("--model: no model given")
    members = [load_model(ref, device, build) for ref in expanded]
    first = members[0]
    for member in members[1:]:
        for key in ENSEMBLE_KEYS:
            if member.contract.get(key) != first.contract.get(key):
                raise UsageError(f"--model {member.uri}: its {key} {member.contract.get(key)!r} differs from "
                                 f"{first.contract.get(key)!r} of {first.uri}; an ensemble averages models trained "
                                 "with the same preprocessing and labels (the folds or seeds of one config)")
    return LoadedModel(tuple(n for m in members for n in m.networks), first.contract,
                       tuple(u for m in members for u in m.uris), tuple(r for m in members for r in m.source_run_ids),
                       tuple(m.contract for m in members), tuple(h for m in members for h in m.weights_sha256))


# ----------------------------------------------------------------------------------- helpers for tasks


def read_error(path: Path | str, err: BaseException) -> CaseError:
    """The error for an input that could not be read or preprocessed, naming its root cause."""
    if isinstance(err, CaseError):
        return err
    cause = root_cause(err)
    if isinstance(cause, MedsegError):
        message = str(cause)
        return CaseError(message if f"{path}:" in message else f"{path}: {message}")
    return CaseError(f"{path}: could not be read or preprocessed ({cause_text(err)}). "
                     "Check that it is a complete NIfTI/DICOM/MHA/NRRD image")


def reader_source(image: Any) -> str | list[str]:
    """What the loader takes for an input (a path, or a sequence of channel files): one path, or a
    list of channel files (read as channels)."""
    if isinstance(image, (str, Path)):
        return str(image)
    paths = [str(p) for p in image]
    return paths if len(paths) > 1 else paths[0]


def shown_source(image: Any) -> str:
    """An input as messages name it (channel files joined by ``;``)."""
    return str(image) if isinstance(image, (str, Path)) else ";".join(str(p) for p in image)


def check_input_shape(contract: dict[str, Any], shape: Sequence[int], source: str) -> None:
    """Refuse an image whose channels or dimensions are not what the model takes.

    Raises:
        CaseError: names the input, what the model expects and what it got.
    """
    channels, spatial = int(shape[0]), tuple(int(s) for s in shape[1:])
    if channels != contract["in_channels"]:
        raise CaseError(f"{source}: the model expects {contract['in_channels']} channel(s) "
                        f"{contract['channel_names']}, got {channels} (shape {tuple(shape)}); give one file per case "
                        "with the channels the model was trained on")
    dims = contract["spatial_dims"]
    real_dims = sum(s > 1 for s in spatial)
    if len(spatial) != dims or real_dims < dims:
        raise CaseError(f"{source}: a {real_dims}D image (spatial shape {spatial}) given to a {dims}D model; "
                        f"use a {dims}D scan (a DICOM series folder rather than one slice, for instance)")


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write a NIfTI with qform and sform set to ``affine`` (RAS), atomically (2D affines are padded)."""
    affine = np.asarray(to_affine_nd(3, affine), dtype=np.float64)
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)
    return path


def voxel_volume_ml(affine: np.ndarray, spatial_dims: int) -> float:
    """Volume of one voxel in mL (for 2D images: area in mm² / 1000)."""
    a = np.asarray(affine, dtype=np.float64)
    d = min(spatial_dims, a.shape[0] - 1)
    return abs(float(np.linalg.det(a[:d, :d]))) / 1000.0


def mean_or_none(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    ``VmHWM`` first: ``ru_maxrss`` survives fork+exec, so a process started by a big parent
    would report the parent's peak instead of its own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------- the batch


def discover_inputs(input_dir: Path, channels: int | None = None) -> Discovery:
    """The scans under ``input_dir``; ``channels`` (the model contract's ``in_channels``) decides
    which files are the channel files of one case (:func:`medseg.io.discovery.group_channel_files`).

    Raises:
        UsageError: the input does not exist or holds no scans.
    """
    try:
        found = discover(input_dir, channels)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    for note in found.notes:
        log.info("%s", note)
    if not found.cases:
        raise UsageError(f"--input {input_dir}: no scans found (NIfTI, MHA, NRRD or DICOM), recursively")
    return found


def predict_folder(predictor: CasePredictor, model: LoadedModel, input_dir: Path, output_dir: Path,
                   options: PredictOptions, device: torch.device, tracker: Any | None = None,
                   found: Discovery | None = None) -> BatchReport:
    """Predict every scan under ``input_dir`` (this process's share with ``num_parts``).

    Args:
        predictor: the model's task's case predictor.
        model: the loaded model (for the summary: URIs, contract, source run).
        input_dir: folder searched recursively (or one file).
        output_dir: where outputs, ``predictions.csv`` and ``predict_summary.json`` go.
        options: see :class:`PredictOptions` (already checked against the task).
        device: where the network runs.
        tracker: an :class:`~medseg.tracking.MlflowTracker` with a started run, or None.
        found: the discovery of ``input_dir``, if already made (with the model's ``in_channels``,
            so that channel files are grouped as the model takes them).

    Raises:
        UsageError: missing input or an empty input folder, or ``output_dir`` inside an input folder.
    """
    found = found or discover_inputs(input_dir, model.contract.get("in_channels"))
    check_output_outside_inputs(output_dir, found.folders)
    cases = found.cases[options.part_id::options.num_parts]
    output_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_part{options.part_id}of{options.num_parts}" if options.num_parts > 1 else ""
    with _only_writer(output_dir, suffix):
        return _predict_cases(predictor, model, input_dir, output_dir, options, device, tracker, found, cases, suffix)


def check_output_outside_inputs(output_dir: Path, input_folders: Sequence[Path]) -> None:
    """Refuse an output folder that is, or is inside, a folder whose scans are searched recursively.

    Its outputs would be found as new scans by the next run, a case whose output has its input's
    name would be "skipped" as finished, and ``--overwrite`` would replace scans by masks. Both
    sides are resolved, links followed, so a link cannot hide the nesting.

    Raises:
        UsageError: names both folders, how they nest and a folder to use instead.
    """
    output = output_dir.resolve()
    for folder in input_folders:
        searched = folder.resolve()
        if output == searched or output.is_relative_to(searched):
            where = "is the --input folder" if output == searched else f"is inside the --input folder {folder}"
            shown = "" if (str(output), str(searched)) == (str(output_dir), str(folder)) else \
                f" (resolved: {output} in {searched})"
            raise UsageError(
                f"--output {output_dir}: {where}{shown}. Outputs there would be read as new scans by the next run, "
                "finished-looking files skip cases, and --overwrite would replace scans with masks. Choose an "
                f"--output outside {folder}, e.g. {searched.parent / (searched.name + '_predictions')}")


def _run_cases(predictor: CasePredictor, cases: Sequence[InputCase], output_dir: Path, options: PredictOptions,
               previous: dict[str, dict[str, str]], report_path: Path, started: float) -> list[CaseResult]:
    """Predict each case; one report row appended per case (a crash keeps what is done), the whole
    report written once at the end. Cases not started within ``options.time_limit_s`` fail saying so."""
    columns = [*COMMON_COLUMNS, *predictor.output_columns, *predictor.value_columns]
    results: list[CaseResult] = []
    try:
        with ReportAppender(report_path, columns) as appender:
            for case in tqdm(cases, desc="predict", unit="case", disable=not options.progress):
                if options.time_limit_s is not None and time.monotonic() - started > options.time_limit_s:
                    results.append(_not_started(case, options.time_limit_s))
                else:
                    results.append(_one_case(predictor, case, output_dir, options.overwrite,
                                             previous.get(case.case_id)))
                appender.append(results[-1].row())
            appender.finish([r.row() for r in results])
    except OSError as err:  # the disk filled up: stop here, every finished output is whole
        raise RunError(write_error(report_path, output_dir, err)) from err
    return results


def _review_page(predictor: CasePredictor, model: LoadedModel, report: BatchReport, results: list[CaseResult],
                 thresholds: dict[str, float], qc_path: Path, review_path: Path, progress: bool) -> Path | None:
    """``review.html``, or None when it could not be written (a convenience page: every case's output
    is written, so the failure is logged and the batch goes on)."""
    try:
        write_review(results, review_path, task=model.task, model_uri=model.uri, labels=model.label_names,
                     output_columns=predictor.output_columns, value_columns=predictor.value_columns,
                     qc_thresholds=thresholds, progress=progress,
                     links={report.report.name: report.report, report.summary.name: report.summary,
                            qc_path.name: qc_path})
    except Exception as err:  # noqa: BLE001 - see the docstring
        log.warning("review page %s not written: %s: %s", review_path, type(err).__name__, err)
        return None
    return review_path


def _predict_cases(predictor: CasePredictor, model: LoadedModel, input_dir: Path, output_dir: Path,
                   options: PredictOptions, device: torch.device, tracker: Any | None, found: Discovery,
                   cases: Sequence[InputCase], suffix: str) -> BatchReport:
    _claim_output_folder(output_dir, model, options.overwrite)
    _remove_stale_temporaries(predictor, cases, output_dir, suffix)
    report_path = output_dir / f"predictions{suffix}.csv"
    previous = {} if options.overwrite else finished_rows(report_path)
    started = time.monotonic()
    results = _run_cases(predictor, cases, output_dir, options, previous, report_path, started)
    seconds_total = time.monotonic() - started  # the predictions' time, without the review page's
    task_summary, task_metrics = predictor.summarise(results)
    report = BatchReport(report_path, output_dir / f"predict_summary{suffix}.json", tuple(results))
    # The thresholds the task applied (the contract's with --qc); a task without QC has none (and
    # check_options refuses --qc for it).
    thresholds = dict(getattr(predictor, "qc", None) or {})
    qc_path = output_dir / f"qc_summary{suffix}.json"
    qc = write_qc_summary(results, thresholds, qc_path)
    review_path = (_review_page(predictor, model, report, results, thresholds, qc_path,
                                output_dir / f"review{suffix}.html", options.progress) if options.review else None)
    summary = {
        "model_uri": model.uri,
        "weights_sha256": list(model.weights_sha256),
        "backend": model.backend,
        "ensemble_size": len(model.networks),
        "source_run_id": model.source_run_id,
        "task": model.task,
        "contract": model.contract,
        "medseg_version": medseg_version,
        "device": str(device),
        "input": str(input_dir),
        "output": str(output_dir),
        "part": {"part_id": options.part_id, "num_parts": options.num_parts},
        "options": {k: v for k, v in vars(options).items() if k not in ("device", "progress", "num_parts", "part_id")},
        "counts": report.counts,
        "cases": len(results),
        "seconds_total": seconds_total,
        "seconds_per_ok_case": mean_or_none([r.seconds for r in results if r.status == "ok"]),
        "peak_rss_mb": peak_rss_mb(),
        "discovery_notes": list(found.notes),
        "failed": {r.case_id: r.error for r in results if r.status == "failed"},
        "qc_flagged": qc["flagged"],
        "qc_summary": str(qc_path),
        "review": str(review_path) if review_path is not None else None,
        **task_summary,
    }
    atomic_write_text(report.summary, json.dumps(summary, indent=2))
    if tracker is not None:
        tracker.set_tags({"source_run_id": model.source_run_id or "", "model_uri": model.uri})
        tracker.log_params({"model_uri": model.uri, "backend": model.backend, "input": str(input_dir), "output": str(output_dir),
                            "device": str(device), "part_id": options.part_id, "num_parts": options.num_parts,
                            **{k: v for k, v in summary["options"].items()}})
        tracker.log_metrics({f"predict/{k}": v for k, v in report.counts.items()}, step=0)
        tracker.log_metrics({"predict/seconds_total": summary["seconds_total"],
                             "predict/peak_rss_mb": summary["peak_rss_mb"], **task_metrics}, step=0)
        tracker.log_metrics({"predict/qc_flagged": qc["flagged"]}, step=0)
        tracker.log_artifact(report.report)
        tracker.log_artifact(report.summary)
        tracker.log_artifact(qc_path)
        if review_path is not None:
            tracker.log_artifact(review_path)
    return report


#: Hidden file in an output folder naming the model whose outputs it holds.
MODEL_STAMP = ".medseg_predict_model.json"


@contextmanager
def _only_writer(output_dir: Path, suffix: str) -> Iterator[None]:
    """Hold an exclusive lock on the output folder (per ``--part-id`` shard) while predicting.

    Two predicts into one folder would each rewrite ``predictions.csv`` from their own rows and
    remove each other's temporary files; the second one is refused instead, saying who holds it.
    The lock is the kernel's (``flock``): it goes away with its process, even after ``kill -9``.
    Its file is opened without following links and never truncated (:mod:`medseg.io.locks`), so a
    link planted in a shared output folder cannot make predict overwrite the file it points to.

    Raises:
        RunError: another process is predicting into this folder (and shard), or the lock file is a
            link (or not a plain file).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks; the outputs stay atomic
        yield
        return
    lock_path = output_dir / f".medseg_predict{suffix}.lock"
    try:
        fd = open_lock_file(lock_path, f"the output folder {output_dir}")
    except OSError as err:
        raise RunError(f"--output {output_dir}: cannot write there ({err.strerror or err}). Choose a folder you can "
                       "write to, or fix its permissions.") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = read_holder(fd) or "another process"
            raise RunError(f"--output {output_dir}: {holder} is predicting into this folder now. Wait for it to "
                           "finish, choose another --output, or share the work between processes with "
                           "--num-parts N --part-id I (each part has its own report).") from None
        write_holder(fd, f"medseg predict (pid {os.getpid()} on {socket.gethostname()}, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')})")
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _claim_output_folder(output_dir: Path, model: LoadedModel, overwrite: bool) -> None:
    """Record which model writes into ``output_dir``; refuse to mix two models' outputs.

    A rerun with the same weights skips finished cases; one with other weights would skip them
    too and report the new model for masks the old one made, so it is refused unless
    ``overwrite`` re-predicts every case.

    Raises:
        UsageError: the folder holds outputs of a model with other weights.
    """
    stamp = output_dir / MODEL_STAMP
    if stamp.is_file() and not overwrite:
        try:
            earlier = json.loads(stamp.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            earlier = {}
        if isinstance(earlier, dict) and earlier.get("weights_id") not in (None, model.weights_id):
            raise UsageError(
                f"--output {output_dir}: holds outputs of another model ({earlier.get('model_uri')}, weights sha256 "
                f"{str(earlier.get('weights_id'))[:12]}…); this one ({model.uri}) has weights {model.weights_id[:12]}…. "
                "Use --overwrite to re-predict every case with this model, or another --output folder")
    atomic_write_text(stamp, json.dumps({"weights_id": model.weights_id, "weights_sha256": list(model.weights_sha256),
                                         "model_uri": model.uri, "medseg_version": medseg_version}, indent=2))


def _not_started(case: InputCase, limit_s: float) -> CaseResult:
    return CaseResult(case.case_id, case.shown, "failed",
                      f"{case.path}: not predicted: the request's time limit of {limit_s:g} s passed before this case "
                      "started. Send fewer paths per request, or ask the operator to raise the time limit", 0.0)


def _one_case(predictor: CasePredictor, case: InputCase, output_dir: Path, overwrite: bool,
              previous_row: dict[str, str] | None) -> CaseResult:
    started = time.monotonic()
    try:
        if case.problem:
            raise CaseError(case.problem)
        expected = predictor.expected_outputs(case, output_dir)
        _refuse_writing_over_inputs(case, expected)
        finished = all(p.exists() for p in expected.values()) if expected else previous_row is not None
        if finished and not overwrite:
            # Outputs are only ever renamed into place complete, so existing ones are finished work;
            # their values come from the earlier report (or the files), so the report stays whole.
            values = ({k: previous_row.get(k, "") for k in predictor.value_columns} if previous_row is not None
                      else predictor.values_of_finished(case, expected))
            return CaseResult(case.case_id, case.shown, "skipped", "output exists (use --overwrite to redo)",
                              time.monotonic() - started, {k: str(p) for k, p in expected.items()}, values)
        result = predictor.predict_case(case, output_dir)
    except OSError as err:
        # A failed write (disk full, read-only folder): say where and what to do, not the temp file's
        # name. Any other OSError (an input that cannot be opened) keeps its own cause below.
        message = (write_error(case.path, output_dir, err) if _is_write_failure(err, output_dir)
                   else f"{case.path}: {type(err).__name__}: {err}")
        log.warning("case %s failed: %s", case.case_id, message)
        return CaseResult(case.case_id, case.shown, "failed", message, time.monotonic() - started)
    except Exception as err:  # one bad case must not stop the batch
        message = str(err) if isinstance(err, MedsegError) else f"{case.path}: {type(err).__name__}: {err}"
        log.warning("case %s failed: %s", case.case_id, message)
        return CaseResult(case.case_id, case.shown, "failed", message, time.monotonic() - started)
    result.seconds = time.monotonic() - started
    return result


def _refuse_writing_over_inputs(case: InputCase, expected: dict[str, Path]) -> None:
    """A case whose output would replace one of its own input files (an input file given with
    ``--output`` its own folder) fails instead of being "skipped" or overwritten."""
    inputs = {p.resolve() for p in case.paths}
    for path in expected.values():
        if path.resolve() in inputs:
            raise CaseError(f"{case.path}: its output {path} would replace the input itself; choose an --output "
                            "folder other than the input's")


def _is_write_failure(err: OSError, output_dir: Path) -> bool:
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    target = err.filename or err.filename2
    if target is None:
        return False
    try:
        return Path(str(target)).resolve().is_relative_to(output_dir.resolve())
    except (OSError, ValueError):
        return False


def write_error(source: Path | str, output_dir: Path, err: OSError) -> str:
    """What a failed write means and what to do; nothing half-written is left (writes are atomic)."""
    fixes = {errno.ENOSPC: "free space on that disk (or choose another --output) and run again",
             errno.EDQUOT: "free space within your quota (or choose another --output) and run again",
             errno.EROFS: "the file system is read-only: choose another --output",
             errno.EACCES: "make the folder writable for you, or choose another --output",
             errno.EPERM: "make the folder writable for you, or choose another --output"}
    fix = fixes.get(err.errno or 0, "check the output folder and run again")
    return (f"{source}: writing its output into {output_dir} failed: {err.strerror or err} (errno {err.errno}). "
            f"Nothing half-written was kept; {fix}: finished cases are skipped on the rerun.")


def _remove_stale_temporaries(predictor: CasePredictor, cases: Sequence[InputCase], output_dir: Path,
                              suffix: str) -> None:
    """Temp files of a run killed mid-write; only this shard's own, since other shards may be writing."""
    mine: set[str] = set()
    for case in cases:
        try:
            mine |= {p.name for p in predictor.expected_outputs(case, output_dir).values()}
        except CaseError:  # no output name for this case: its row says why
            continue
    mine |= {f"predictions{suffix}.csv", f"predict_summary{suffix}.json", f"review{suffix}.html",
             f"qc_summary{suffix}.json"}
    if not suffix:  # every shard writes the stamp; only an unsharded run owns its temporaries
        mine.add(MODEL_STAMP)
    for stale in output_dir.glob(".*.tmp*"):
        if stale.name[1:].split(".tmp")[0].rsplit(".", 1)[0] in mine:
            stale.unlink()
