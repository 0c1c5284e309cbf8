"""Batch inference over folders of scans with a model that carries its I/O contract.

The model is loaded once; preprocessing, patch size, overlap and label map come from its
contract. Each prediction is inverted back onto the scan's own grid (MONAI ``Invertd`` over
the same transforms that prepared it), written atomically, and reported per case. A case
that fails is recorded and the batch goes on.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import Compose, Invertd, KeepLargestConnectedComponent
from torch import nn
from tqdm import tqdm

import medseg
from medseg.config import IntensityConfig, Precision, PreprocessConfig
from medseg.data.transforms import IMAGE, preprocessing
from medseg.engine.runtime import (
    autocast_dtype,
    resolve_device,
    to_channels_last,
    tune_allocator,
    use_channels_last,
)
from medseg.engine.sliding import fold_batch_norms, label_map, predict_logits
from medseg.errors import CaseError, MedsegError, UsageError
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.io.dicom_seg import dicom_seg_available, write_dicom_seg
from medseg.io.discovery import InputCase, discover

log = logging.getLogger(__name__)

PRED = "pred"
SUPPORTED_TASKS = {"segmentation", "classification", "reconstruction"}


@dataclass(frozen=True)
class LoadedModel:
    """One model, or an ensemble (folds, seeds) whose members share one preprocessing contract."""

    networks: tuple[nn.Module, ...]
    contract: dict[str, Any]  # the first member's; the preprocessing every member shares
    uris: tuple[str, ...]
    source_run_ids: tuple[str | None, ...]
    member_contracts: tuple[dict[str, Any], ...] = ()  # each member's own windowing (patch size, overlap)

    def members(self) -> list[tuple[nn.Module, dict[str, Any]]]:
        contracts = self.member_contracts or (self.contract,) * len(self.networks)
        return list(zip(self.networks, contracts))

    @property
    def uri(self) -> str:
        return ",".join(self.uris)

    @property
    def source_run_id(self) -> str | None:
        return self.source_run_ids[0] if len(self.source_run_ids) == 1 else ",".join(r or "" for r in self.source_run_ids)

    @property
    def label_names(self) -> dict[int, str]:
        return {int(k): v for k, v in self.contract["labels"].items()}


#: Contract entries every member of an ensemble must share: they define the grid and the
#: meaning of the averaged probabilities. Patch size and window settings may differ.
ENSEMBLE_KEYS = ("task", "spatial_dims", "in_channels", "channel_names", "labels", "orientation", "spacing",
                 "intensity", "crop_foreground", "resize", "output_activation")


@dataclass(frozen=True)
class PredictOptions:
    device: str = "auto"
    overlap: float | None = None  # None: the contract's
    tta: bool = False
    overwrite: bool = False
    save_probabilities: bool = False
    keep_largest: bool | None = None  # None: the contract's
    num_parts: int = 1
    part_id: int = 0
    progress: bool = True
    measured: bool = False  # reconstruction: the inputs already are the degraded images


@dataclass
class CaseResult:
    case_id: str
    input: str
    status: str  # ok | failed | skipped
    error: str = ""
    seconds: float = 0.0
    output: str = ""
    dicom_seg: str = ""
    voxels: dict[str, int] = field(default_factory=dict)
    volume_ml: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PredictOutputs:
    report: Path
    summary: Path
    results: tuple[CaseResult, ...]

    @property
    def n_failed(self) -> int:
        return sum(r.status == "failed" for r in self.results)


# ----------------------------------------------------------------------------------- model


def load_model(ref: str, device: torch.device) -> LoadedModel:
    """Load an MLflow model (``runs:/``, ``models:/`` URI or a local model folder) and its contract.

    Raises:
        UsageError: the reference is not an MLflow model, or the model has no medseg contract.
    """
    import mlflow
    from mlflow.models import Model

    local = Path(ref)
    try:
        if local.exists():
            if not (local / "MLmodel").is_file():
                raise UsageError(f"--model {ref}: folder has no MLmodel file; give an MLflow model folder "
                                 "(e.g. an artifact download of runs:/<id>/model) or a model URI")
            meta = Model.load(str(local))
        else:
            meta = mlflow.models.get_model_info(ref)
        network = mlflow.pytorch.load_model(ref, map_location=device)
    except UsageError:
        raise
    except Exception as err:  # MLflow raises many types for a missing run/model/registry entry
        raise UsageError(f"--model {ref}: could not be loaded ({type(err).__name__}: {err}). Check the URI and "
                         "that the tracking URI (--tracking-uri or $MLFLOW_TRACKING_URI) points at its store") from err
    contract = (meta.metadata or {}).get("medseg_contract")
    if not contract:
        raise UsageError(f"--model {ref}: the model carries no medseg contract (metadata.medseg_contract); "
                         "only models logged by `medseg run` can be used, since inference must not guess")
    if contract.get("task") not in SUPPORTED_TASKS:
        raise UsageError(f"--model {ref}: task {contract.get('task')!r} has no batch predictor yet; "
                         f"supported: {sorted(SUPPORTED_TASKS)}")
    network = fold_batch_norms(network.eval())
    if use_channels_last(None, int(contract.get("spatial_dims", 3))):  # same values, faster 3D convolutions
        network = to_channels_last(network, 3)
    return LoadedModel((network,), contract, (ref,), (getattr(meta, "run_id", None),))


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


def load_models(refs: str | Sequence[str], device: torch.device) -> LoadedModel:
    """Load one model or an ensemble (several references, a parent run or its directory).

    Raises:
        UsageError: a member cannot be loaded, or members disagree on their preprocessing contract.
    """
    expanded = expand_model_refs([refs] if isinstance(refs, str) else list(refs))
    if not expanded:
        raise UsageError("--model: no model given")
    members = [load_model(ref, device) for ref in expanded]
    first = members[0]
    for member in members[1:]:
        for key in ENSEMBLE_KEYS:
            if member.contract.get(key) != first.contract.get(key):
                raise UsageError(f"--model {member.uri}: its {key} {member.contract.get(key)!r} differs from "
                                 f"{first.contract.get(key)!r} of {first.uri}; an ensemble averages models trained "
                                 "with the same preprocessing and labels (the folds or seeds of one config)")
    return LoadedModel(tuple(n for m in members for n in m.networks), first.contract,
                       tuple(u for m in members for u in m.uris), tuple(r for m in members for r in m.source_run_ids),
                       tuple(m.contract for m in members))


def contract_preprocessing(contract: dict[str, Any]) -> Compose:
    """The deterministic chain the model was trained behind, rebuilt from its contract."""
    cfg = PreprocessConfig(
        orientation=contract["orientation"],
        spacing=tuple(contract["spacing"]) if contract.get("spacing") else None,
        intensity=IntensityConfig(**contract["intensity"]),
        crop_foreground=contract.get("crop_foreground", False),
    )
    return Compose(preprocessing(cfg, keys=(IMAGE,)))


# ----------------------------------------------------------------------------------- one case


def predict_probabilities(model: LoadedModel, image: torch.Tensor, device: torch.device, overlap: float | None,
                          tta: bool) -> torch.Tensor:
    """Softmax probabilities (K, *spatial) on the CPU, averaged over the ensemble's members and,
    with ``tta``, over all axis flips (nnU-Net's mirroring)."""
    dims = model.contract["spatial_dims"]
    amp = autocast_dtype(Precision.AUTO, device)

    def run(network: nn.Module, contract: dict[str, Any], axes: tuple[int, ...]) -> torch.Tensor:
        window = contract["sliding_window"]
        x = image.flip(axes) if axes else image
        logits = predict_logits(network, x, contract["patch_size"],
                                overlap=overlap if overlap is not None else window["overlap"],
                                sw_batch_size=window["sw_batch_size"], blend=window["blend"], device=device,
                                amp_dtype=amp)
        probs = torch.softmax(logits, dim=0)
        return probs.flip(axes) if axes else probs

    flips = [combo for r in range(1, dims + 1) for combo in itertools.combinations(range(1, dims + 1), r)] if tta else []
    runs = [(network, contract, axes) for network, contract in model.members() for axes in [(), *flips]]
    total = run(*runs[0])
    for network, contract, axes in runs[1:]:
        total.add_(run(network, contract, axes))
    return total.div_(len(runs))


def _check_input(model: LoadedModel, image: MetaTensor, case: InputCase) -> None:
    c = model.contract
    channels, spatial = image.shape[0], tuple(image.shape[1:])
    if channels != c["in_channels"]:
        raise CaseError(f"{case.path}: the model expects {c['in_channels']} channel(s) {c['channel_names']}, "
                        f"got {channels} (shape {tuple(image.shape)}); give one file per case with the channels "
                        "the model was trained on")
    dims = c["spatial_dims"]
    real_dims = sum(s > 1 for s in spatial)
    if len(spatial) != dims or real_dims < dims:
        raise CaseError(f"{case.path}: a {real_dims}D image (spatial shape {spatial}) given to a {dims}D model; "
                        f"use a {dims}D scan (a DICOM series folder rather than one slice, for instance)")


def predict_case(model: LoadedModel, case: InputCase, pre: Compose, output_dir: Path, device: torch.device,
                 options: PredictOptions) -> CaseResult:
    """Predict one scan and write ``<case_id>.nii.gz`` on its native grid."""
    started = time.monotonic()
    paths = case_outputs(case, output_dir, options)
    out_path = paths["mask"]
    result = CaseResult(case.case_id, str(case.path), "ok", output=str(out_path))
    if case.problem:
        raise CaseError(case.problem)
    if all(p.exists() for p in paths.values()) and not options.overwrite:
        # Outputs are only ever renamed into place complete, so an existing one is finished work;
        # its volumes are read back so the report stays whole.
        existing = nib.load(out_path)
        _measure(np.asarray(existing.dataobj), existing.affine, model, result)
        result.status = "skipped"
        result.error = "output exists (use --overwrite to redo)"
        result.seconds = time.monotonic() - started
        return result
    try:
        data = pre({IMAGE: str(case.path)})
    except MedsegError:
        raise
    except Exception as err:
        raise CaseError(f"{case.path}: could not be read or preprocessed ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}). "
                        "Check that it is a complete NIfTI/DICOM/MHA/NRRD image") from err
    image: MetaTensor = data[IMAGE]
    _check_input(model, image, case)
    probs = predict_probabilities(model, image.as_tensor(), device, options.overlap, options.tta)
    data[PRED] = MetaTensor(probs, meta=dict(image.meta), applied_operations=list(image.applied_operations))
    native = Invertd(keys=PRED, transform=pre, orig_keys=IMAGE, nearest_interp=False)(data)[PRED]
    original_affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
    labels = label_map(native.as_tensor())
    expected_shape = tuple(int(s) for s in image.meta["spatial_shape"])
    if tuple(labels.shape) != expected_shape:  # pragma: no cover - Invertd guarantees this; keep it loud
        raise CaseError(f"{case.path}: prediction shape {tuple(labels.shape)} does not match the input {expected_shape}")
    keep = options.keep_largest if options.keep_largest is not None else model.contract.get(
        "postprocess", {}).get("keep_largest_component", False)
    if keep:
        foreground = [k for k in model.label_names if k != 0]
        labels = KeepLargestConnectedComponent(applied_labels=foreground, independent=True)(labels[None])[0]
    label_array = labels.cpu().numpy().astype(np.uint8 if max(model.label_names) < 256 else np.uint16)
    # The mask goes last: its presence is what tells a rerun that the case is finished.
    if "dicom_seg" in paths:
        result.dicom_seg = str(write_dicom_seg(label_array, case.path, case.series_uid or "", model.label_names,
                                               paths["dicom_seg"]))
    if "probabilities" in paths:
        prob_array = np.moveaxis(native.as_tensor().cpu().numpy().astype(np.float32), 0, -1)
        write_nifti(prob_array, original_affine, paths["probabilities"])
    write_nifti(label_array, original_affine, out_path)
    _measure(label_array, original_affine, model, result)
    result.seconds = time.monotonic() - started
    return result


def case_outputs(case: InputCase, output_dir: Path, options: PredictOptions) -> dict[str, Path]:
    """Every file this case should produce under the given options."""
    paths = {"mask": output_dir / f"{case.case_id}.nii.gz"}
    if case.kind == "dicom_series" and case.series_uid and dicom_seg_available():
        paths["dicom_seg"] = output_dir / f"{case.case_id}_seg.dcm"
    if options.save_probabilities:
        paths["probabilities"] = output_dir / f"{case.case_id}_probabilities.nii.gz"
    return paths


def _measure(label_array: np.ndarray, affine: np.ndarray, model: LoadedModel, result: CaseResult) -> None:
    """Voxel counts and volumes (mL, or mm² / 1000 for 2D) per foreground label into ``result``."""
    a = np.asarray(affine, dtype=np.float64)
    d = min(label_array.ndim, a.shape[0] - 1)
    voxel_ml = abs(float(np.linalg.det(a[:d, :d]))) / 1000.0
    for value, name in model.label_names.items():
        if value != 0:
            count = int((label_array == value).sum())
            result.voxels[name] = count
            result.volume_ml[name] = count * voxel_ml


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write a NIfTI with qform and sform set to ``affine`` (RAS), atomically (2D affines are padded)."""
    affine = np.asarray(to_affine_nd(3, affine), dtype=np.float64)
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)
    return path


# ----------------------------------------------------------------------------------- batch


def predict_folder(model_ref: str | Sequence[str], input_dir: Path, output_dir: Path, options: PredictOptions,
                   tracker: Any | None = None) -> PredictOutputs:
    """Predict every scan under ``input_dir`` (this process's share with ``num_parts``).

    Args:
        model_ref: MLflow model URI or local MLflow model folder; several, or a ``--seeds``/``--folds``
            parent (run URI or directory), for an ensemble averaging their probabilities.
        input_dir: folder searched recursively (or one file).
        output_dir: where masks, ``predictions.csv`` and ``predict_summary.json`` go.
        options: see :class:`PredictOptions`.
        tracker: an :class:`~medseg.tracking.MlflowTracker` with a started run, or None.

    Raises:
        UsageError: bad model, missing input, empty input folder, bad shard options.
    """
    if options.num_parts < 1 or not 0 <= options.part_id < options.num_parts:
        raise UsageError(f"--part-id {options.part_id} must be in [0, --num-parts={options.num_parts})")
    if options.overlap is not None and not 0 <= options.overlap < 1:
        raise UsageError(f"--overlap {options.overlap}: must be in [0, 1), e.g. 0.5")
    device = resolve_device(options.device)
    tune_allocator()
    try:
        found = discover(input_dir)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    for note in found.notes:
        log.info("%s", note)
    if not found.cases:
        raise UsageError(f"--input {input_dir}: no scans found (NIfTI, MHA, NRRD or DICOM), recursively")
    cases = found.cases[options.part_id::options.num_parts]
    model = load_models(model_ref, device)
    output_dir.mkdir(parents=True, exist_ok=True)
    if model.contract["task"] == "reconstruction":  # its own chain: scaling to [0, 1] and back
        return _reconstruct_folder(model, found, cases, input_dir, output_dir, device, options, tracker)
    pre = contract_preprocessing(model.contract)
    if model.contract["task"] == "classification":
        return _classify_folder(model, found, cases, pre, input_dir, output_dir, device, options, tracker)
    if options.measured:
        raise UsageError("--measured is for reconstruction models; this model is a "
                         f"{model.contract['task']} model")
    # Temp files of a run killed mid-write; only this shard's own, since other shards may be writing.
    mine = {p.name for case in cases for p in case_outputs(case, output_dir, options).values()}
    for stale in output_dir.glob(".*.tmp*"):
        if stale.name[1:].split(".tmp")[0].rsplit(".", 1)[0] in mine:
            stale.unlink()
    suffix = f"_part{options.part_id}of{options.num_parts}" if options.num_parts > 1 else ""
    report_path = output_dir / f"predictions{suffix}.csv"
    results: list[CaseResult] = []
    started = time.monotonic()
    for case in tqdm(cases, desc="predict", unit="case", disable=not options.progress):
        t0 = time.monotonic()
        try:
            result = predict_case(model, case, pre, output_dir, device, options)
        except Exception as err:  # one bad case must not stop the batch
            message = str(err) if isinstance(err, MedsegError) else f"{case.path}: {type(err).__name__}: {err}"
            log.warning("case %s failed: %s", case.case_id, message)
            result = CaseResult(case.case_id, str(case.path), "failed", error=message, seconds=time.monotonic() - t0)
        results.append(result)
        _write_report(results, model, report_path)  # rewritten after each case: a crash keeps what is done
    summary = {
        "model_uri": model.uri,
        "ensemble_size": len(model.networks),
        "source_run_id": model.source_run_id,
        "contract": model.contract,
        "medseg_version": medseg.__version__,
        "device": str(device),
        "input": str(input_dir),
        "output": str(output_dir),
        "part": {"part_id": options.part_id, "num_parts": options.num_parts},
        "options": {"tta": options.tta, "overlap": options.overlap, "overwrite": options.overwrite,
                    "save_probabilities": options.save_probabilities, "keep_largest": options.keep_largest},
        "counts": {status: sum(r.status == status for r in results) for status in ("ok", "failed", "skipped")},
        "cases": len(results),
        "seconds_total": time.monotonic() - started,
        "seconds_per_ok_case": _mean([r.seconds for r in results if r.status == "ok"]),
        "volume_ml_total": {name: sum(r.volume_ml.get(name, 0.0) for r in results)
                            for name in model.label_names.values() if name != model.label_names.get(0)},
        "peak_rss_mb": peak_rss_mb(),
        "discovery_notes": found.notes + ([] if dicom_seg_available() or not any(
            c.kind == "dicom_series" for c in cases) else ["DICOM SEG not written: install medseg[dicom-seg] (highdicom)"]),
        "failed": {r.case_id: r.error for r in results if r.status == "failed"},
    }
    summary_path = atomic_write_text(output_dir / f"predict_summary{suffix}.json", json.dumps(summary, indent=2))
    if tracker is not None:
        tracker.set_tags({"source_run_id": model.source_run_id or "", "model_uri": model.uri})
        tracker.log_params({"model_uri": model.uri, "input": str(input_dir), "output": str(output_dir),
                            "tta": options.tta, "overlap": options.overlap, "device": str(device),
                            "part_id": options.part_id, "num_parts": options.num_parts})
        tracker.log_metrics({f"predict/{k}": v for k, v in summary["counts"].items()}, step=0)
        tracker.log_metrics({"predict/seconds_total": summary["seconds_total"],
                             "predict/peak_rss_mb": summary["peak_rss_mb"]}, step=0)
        tracker.log_artifact(report_path)
        tracker.log_artifact(summary_path)
    return PredictOutputs(report_path, summary_path, tuple(results))


def _classify_folder(model: LoadedModel, found: Any, cases: Sequence[InputCase], pre: Compose, input_dir: Path,
                     output_dir: Path, device: torch.device, options: PredictOptions,
                     tracker: Any | None) -> PredictOutputs:
    """``predict_folder`` for a classification model: ``predictions.csv`` with class probabilities."""
    from medseg.tasks.classification.predict import classification_preprocessing, classify_cases

    report_path = output_dir / f"predictions{_part_suffix(options)}.csv"
    started = time.monotonic()
    results = classify_cases(model, cases, classification_preprocessing(model.contract, pre), device, report_path,
                             options.tta, options.overwrite, _check_input,
                             lambda items: tqdm(items, desc="classify", unit="image", disable=not options.progress))
    predicted = [r.predicted_name for r in results if r.status in ("ok", "skipped")]
    return _finish_folder(model, found, results, started, input_dir, output_dir, device, options, tracker, report_path,
                          {"options": {"tta": options.tta, "overwrite": options.overwrite},
                           "predicted_counts": {name: predicted.count(name) for name in model.label_names.values()}},
                          {"tta": options.tta})


def _reconstruct_folder(model: LoadedModel, found: Any, cases: Sequence[InputCase], input_dir: Path,
                        output_dir: Path, device: torch.device, options: PredictOptions,
                        tracker: Any | None) -> PredictOutputs:
    """``predict_folder`` for a reconstruction model: NIfTI reconstructions (and baselines) and a
    report with NMSE / PSNR / SSIM per case."""
    from medseg.tasks.reconstruction.predict import reconstruct_cases

    report_path = output_dir / f"predictions{_part_suffix(options)}.csv"
    started = time.monotonic()
    results = reconstruct_cases(model, cases, output_dir, device, report_path, options.measured, options.overwrite,
                                lambda items: tqdm(items, desc="reconstruct", unit="case", disable=not options.progress),
                                write_nifti)
    scored = [r.metrics for r in results if r.status == "ok" and r.metrics]
    means = {k: _mean([m[k] for m in scored]) for k in (scored[0] if scored else {})}
    return _finish_folder(model, found, results, started, input_dir, output_dir, device, options, tracker, report_path,
                          {"mode": "measured" if options.measured else "retrospective",
                           "options": {"overwrite": options.overwrite, "measured": options.measured},
                           "mean_metrics": means},
                          {"measured": options.measured}, {f"predict/{k}": v for k, v in means.items() if v is not None})


def _part_suffix(options: PredictOptions) -> str:
    return f"_part{options.part_id}of{options.num_parts}" if options.num_parts > 1 else ""


def _finish_folder(model: LoadedModel, found: Any, results: Sequence[Any], started: float, input_dir: Path,
                   output_dir: Path, device: torch.device, options: PredictOptions, tracker: Any | None,
                   report_path: Path, extra_summary: dict[str, Any], extra_params: dict[str, Any],
                   extra_metrics: dict[str, float] | None = None) -> PredictOutputs:
    """Summary JSON and the MLflow inference run shared by the classification and reconstruction folders."""
    counts = {status: sum(r.status == status for r in results) for status in ("ok", "failed", "skipped")}
    summary = {
        "model_uri": model.uri, "ensemble_size": len(model.networks), "source_run_id": model.source_run_id,
        "contract": model.contract, "medseg_version": medseg.__version__, "device": str(device),
        "input": str(input_dir), "output": str(output_dir),
        "part": {"part_id": options.part_id, "num_parts": options.num_parts},
        "counts": counts, "cases": len(results), "seconds_total": time.monotonic() - started,
        "seconds_per_ok_case": _mean([r.seconds for r in results if r.status == "ok"]),
        "peak_rss_mb": peak_rss_mb(), "discovery_notes": found.notes,
        "failed": {r.case_id: r.error for r in results if r.status == "failed"},
        **extra_summary,
    }
    summary_path = atomic_write_text(output_dir / f"predict_summary{_part_suffix(options)}.json",
                                     json.dumps(summary, indent=2))
    if tracker is not None:
        tracker.set_tags({"source_run_id": model.source_run_id or "", "model_uri": model.uri})
        tracker.log_params({"model_uri": model.uri, "input": str(input_dir), "output": str(output_dir),
                            "device": str(device), **extra_params})
        tracker.log_metrics({f"predict/{k}": v for k, v in counts.items()}, step=0)
        if extra_metrics:
            tracker.log_metrics(extra_metrics, step=0)
        tracker.log_artifact(report_path)
        tracker.log_artifact(summary_path)
    return PredictOutputs(report_path, summary_path, tuple(results))


def _mean(values: Sequence[float]) -> float | None:
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


def _write_report(results: Sequence[CaseResult], model: LoadedModel, path: Path) -> None:
    names = [n for v, n in sorted(model.label_names.items()) if v != 0]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case_id", "input", "status", "error", "seconds", "output", "dicom_seg",
                     *[f"voxels_{n}" for n in names], *[f"volume_ml_{n}" for n in names]])
    for r in results:
        writer.writerow([r.case_id, r.input, r.status, r.error, f"{r.seconds:.3f}", r.output if r.status == "ok" else "",
                         r.dicom_seg,
                         *[r.voxels.get(n, "") for n in names],
                         *[f"{r.volume_ml[n]:.4f}" if n in r.volume_ml else "" for n in names]])
    atomic_write_text(path, buffer.getvalue())
