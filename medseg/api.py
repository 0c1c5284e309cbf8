"""medseg's public Python API: what the CLI calls, and what notebooks and scripts import.

>>> import medseg
>>> cfg = medseg.load_config("configs/demo_segmentation.yaml", overrides=["train.max_epochs=2"])
>>> result = medseg.train(cfg)                      # one MLflow run: verify, train, evaluate, package
>>> predictor = medseg.Predictor.from_uri(result.model_uri)
>>> prediction = predictor.predict("scan.nii.gz")   # a file, a DICOM folder, a MetaTensor or an array
>>> prediction.label_map.shape, prediction.volumes_ml
>>> report = predictor.predict_folder("scans/", "masks/")

Every function returns a typed result; nothing here prints. Errors a user can cause are
:mod:`medseg.errors` exceptions whose message names the file or key, the problem and the fix.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from medseg.config import RunConfig, read_config_file
from medseg.config.paths import path_keys, resolve_raw_paths
from medseg.data.build import build_manifest, build_manifest_from_layout
from medseg.data.layouts import DatasetLayout, detect_layout
from medseg.data.manifest import Manifest, manifest_summary
from medseg.data.medmnist import import_medmnist
from medseg.data.verify import VerifyOptions, VerifyReport
from medseg.engine import distributed
from medseg.engine.backend_choice import (
    BACKEND_ENV,
    DEFAULT_BACKEND,
    on_backend,
    record_graphs,
    resolve_backend,
)
from medseg.engine.model_loading import LoadedModel, load_models
from medseg.engine.models import list_models as registered_models
from medseg.engine.predict import discover_inputs, predict_folder
from medseg.engine.ray_predict import (
    CasePredictorFactory,
    Engine,
    RayCaseRunner,
    RayOptions,
    case_runner,
    record_ray,
)
from medseg.engine.remote_output import publish_batch, publishing, publishing_factory, staging_folder
from medseg.engine.results import BatchReport, CasePredictor, Prediction, PredictOptions, check_options
from medseg.engine.runner import RepeatKind, headline, run_pipeline, run_repeated
from medseg.engine.runtime import resolve_device, tune_allocator
from medseg.errors import ConfigError, UsageError
from medseg.io.discovery import discover_paths
from medseg.io.readers import strip_volume_suffix
from medseg.io.remote_folder import remote_folder
from medseg.io.uris import local_folder
from medseg.planning.dataset import consecutive_labels, dataset_name, describe_dataset, labels_from_manifest
from medseg.tasks.base import Task
from medseg.tasks.registry import get_task, list_tasks, load_config, network_from_spec, validate_config

log = logging.getLogger(__name__)

__all__ = [
    "BatchReport", "Prediction", "Predictor", "RunResult", "VerifyReport", "build_manifest", "calibrate_run", "check_model",
    "convert_model", "demo", "export_model", "headline", "manifest_summary",
    "DatasetLayout", "build_manifest_from_layout", "detect_layout", "import_medmnist",
    "list_models", "list_tasks", "load_config", "plan", "PretrainResult", "pretrain", "train", "validate_config", "verify",
]


# ----------------------------------------------------------------------------------- registries


def list_models(task: str | None = None) -> list[str]:
    """The ``model.name`` values ``task`` accepts (every task's as ``task/name`` when None).

    Raises:
        UnknownTaskError: ``task`` is not registered.
    """
    for name in [task] if task else list_tasks():
        get_task(name)  # importing a task registers its networks
    return registered_models(task)


# ----------------------------------------------------------------------------------- train


@dataclass(frozen=True)
class RunResult:
    """A finished run (or a ``seeds``/``folds`` parent run), as its ``summary.json`` records it.

    Attributes:
        run_id: the MLflow run.
        model_uri: the logged model (an MLflow model URI, ``models:/m-<id>``); for a ``seeds``/``folds``
            parent run, its run directory, which :meth:`Predictor.from_uri` loads as the ensemble.
        model_uris: for a parent run, each child's model URI.
        run_dir: the run directory (config, checkpoints, evaluation, contract, summary).
        tracking_uri: the MLflow store the run is in.
        metrics: final metrics (``test/dice_mean``, ``best_val/...``, ``train/epochs``...).
        summary_path: the ``summary.json`` these come from.
        children: for a parent run, each child's name, run id and metrics.
    """

    run_id: str
    model_uri: str | None
    run_dir: Path
    tracking_uri: str
    metrics: dict[str, float | None]
    summary_path: Path
    children: tuple[dict[str, Any], ...] = ()
    model_uris: tuple[str, ...] = ()

    @classmethod
    def from_summary(cls, path: Path) -> RunResult:
        summary = json.loads(Path(path).read_text())
        return cls(summary["run_id"], summary.get("model_uri"), Path(summary["run_dir"]), summary["tracking_uri"],
                   dict(summary.get("metrics", {})), Path(path), tuple(summary.get("children", ())),
                   tuple(summary.get("model_uris", ())))


def _as_config(config: RunConfig | str | Path, overrides: Sequence[str] | None) -> RunConfig:
    if isinstance(config, RunConfig):
        if overrides:
            raise UsageError("train: overrides go with a config path; for a config object use "
                             "medseg.load_config(path, overrides=[...]) or cfg.model_copy(update=...)")
        return config
    return load_config(config, list(overrides or []))


def train(config: RunConfig | str | Path, *, overrides: Sequence[str] | None = None, resume: bool | str | Path = False,
          progress: bool = True, seeds: int | None = None, folds: int | None = None) -> RunResult | None:
    """Run the config's task pipeline (verify, train, evaluate, package) as one MLflow run.

    Under ``torchrun`` every process calls this; they train together (DDP) and only the main
    process returns a result.

    Args:
        config: a validated config (:func:`load_config`) or the path of its YAML file.
        overrides: ``key.sub=value`` strings, with a config path.
        resume: True continues the newest unfinished run under ``output_dir``; a path, that run.
        progress: progress bars.
        seeds: run K seeds (seed, seed+1, ...) as child runs of one parent run.
        folds: run folds 0..K-1 of the manifest as child runs of one parent run (default: the
            config's ``train.folds``, what a plan sets for a fold ensemble).

    Returns:
        The run's :class:`RunResult`; None on the non-main processes of a distributed run.

    Raises:
        ConfigError: an invalid config. DataVerificationError: the data failed verification.
        RunError: nothing to resume, or a resumed run's config changed.
    """
    cfg = _pretrained_first(_as_config(config, overrides), resume, progress)
    if seeds is not None and folds is not None:
        raise UsageError("train: give seeds or folds, not both")
    if seeds is not None and cfg.train.folds is not None:
        raise UsageError(f"train: --seeds {seeds} with a config that trains a {cfg.train.folds}-fold ensemble "
                         "(train.folds); set train.folds=null to repeat one run with seeds")
    if folds is None and seeds is None:
        folds = cfg.train.folds  # a planned fold ensemble
    task = get_task(str(cfg.task))
    from medseg_pipelines import run as stages

    def pipeline(ctx: Any) -> None:
        stages(ctx, task)

    ctx = distributed.init_distributed(cfg.train.device)
    if ctx.enabled and threading.current_thread() is threading.main_thread():
        # torchrun stops the surviving workers with SIGTERM when one dies: unwind, so the MLflow
        # run is marked FAILED instead of being left RUNNING.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    resume_arg: bool | Path = Path(resume) if isinstance(resume, (str, Path)) else bool(resume)
    if seeds is not None or folds is not None:
        kind = RepeatKind.SEEDS if seeds is not None else RepeatKind.FOLDS
        summary_path = run_repeated(cfg, pipeline, kind, int(seeds or folds or 0), resume=resume_arg,
                                    progress=progress, prepare_data=task.prepare_data)
    else:
        summary_path = run_pipeline(cfg, pipeline, resume=resume_arg, progress=progress,
                                    prepare_data=task.prepare_data)
    distributed.shutdown()  # on success only: see its docstring
    return None if summary_path is None else RunResult.from_summary(summary_path)


def demo(out: str | Path = "medseg-demo", *, overrides: Sequence[str] | None = None,
         progress: bool = True) -> RunResult | None:
    """``medseg demo``: train the demo U-Net on the 40 MSD hippocampus crops shipped inside medseg.

    Works from any folder and a plain ``pip install``: the config and manifest are the package's
    (``medseg/demo``, the same as ``configs/demo_segmentation.yaml`` and
    ``data_manifests/demo_hippocampus.csv``); everything the run writes goes under ``out``
    (``runs/`` and the SQLite MLflow store ``mlflow.db``), nothing into the package.

    Args:
        out: the folder for the run and its MLflow store (created).
        overrides: ``key=value`` settings on top, e.g. ``["train.max_epochs=2"]``.
        progress: progress bars.
    """
    demo_dir = Path(__file__).resolve().parent / "demo"
    home = Path(out).resolve()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"medseg demo: cannot create the output folder {home} ({err.strerror}); "
                         "give a folder you can write with -o/--out") from err
    settings = [f"data.manifest={demo_dir / 'demo_hippocampus.csv'}", f"data.root={demo_dir / 'hippocampus'}",
                f"output_dir={home / 'runs'}", f"tracking.uri=sqlite:///{home / 'mlflow.db'}", *(overrides or [])]
    return train(load_config(demo_dir / "demo_segmentation.yaml", settings), progress=progress)


def _pretrained_first(cfg: RunConfig, resume: bool | str | Path, progress: bool) -> RunConfig:
    """Run the config's ``pretrain`` stage (a planned pretraining) and start ``cfg`` from its weights.

    Nothing happens without one or when ``model.init_from`` is given. On ``resume`` nothing is
    pretrained: the run continues from its own checkpoint, and its config gets back the weights it
    started from, as the resume check expects.
    """
    stage = getattr(cfg, "pretrain", None)
    if stage is None or getattr(cfg.model, "init_from", None):
        return cfg
    if resume:
        return cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": _started_from(cfg, resume)})})
    result = pretrain(config=stage, progress=progress)
    if result is None:
        raise UsageError(f"pretrain: {stage}: a planned pretraining runs in one process; run `medseg pretrain --config "
                         f"{stage}` first, then this config with --set model.init_from=<its weights>")
    log.info("pretraining run %s finished; fine-tuning from %s", result.run_id, result.weights)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": str(result.weights)})})


def _started_from(cfg: RunConfig, resume: bool | str | Path) -> str | None:
    """The ``model.init_from`` the run being resumed started with (None: it started fresh)."""
    import yaml

    from medseg.engine.runner import find_resumable

    run_dir = find_resumable(cfg.output_dir) if isinstance(resume, bool) else Path(resume)
    saved = run_dir / "resolved_config.yaml"
    raw = yaml.safe_load(saved.read_text(encoding="utf-8")) if saved.is_file() else None
    return ((raw or {}).get("model") or {}).get("init_from")


@dataclass(frozen=True)
class PretrainResult:
    """A finished pretraining run (``medseg pretrain``).

    Attributes:
        run_id: its MLflow run (tagged ``medseg.kind=pretraining``).
        weights: the safetensors file a segmentation or classification run starts from:
            ``model.init_from: <weights>``.
        metadata: its JSON sidecar (the run, the network, the tensors).
        tensors: the names of the tensors ``weights`` holds.
        run: the run as :func:`train` returns it (run folder, tracking URI, metrics).
    """

    run_id: str
    weights: Path
    metadata: Path
    tensors: tuple[str, ...]
    run: RunResult


def pretrain(data: str | Path | None = None, *, config: RunConfig | str | Path | None = None,
             overrides: Sequence[str] | None = None, budget: str | float | None = None, resume: bool | str | Path = False,
             progress: bool = True) -> PretrainResult | None:
    """Pretrain a segmentation U-Net, or a classification network's feature extractor, as a masked
    autoencoder on every image, labelled or not, as one MLflow run; its weights start a segmentation
    or classification run (``model.init_from``), which records it.

    Args:
        data: a folder of scans (every scan is used; a manifest of them is written into the run's
            ``output_dir``) or a manifest CSV (every case, whatever its split; labels ignored). None:
            the config's ``data.manifest``.
        config: a pretraining config or its YAML (``task: pretraining``); None: the defaults
            (a 16-32-64-128 U-Net on 64³ patches), with ``overrides``.
        overrides: ``key.sub=value`` strings (e.g. ``model.channels=[16,32,64]``): give the model
            section of the segmentation run it will initialise.
        budget: wall-clock training time (``10m``, ``1h``, minutes); it alone ends training.
        resume: True continues the newest unfinished pretraining run under ``output_dir``; a path, that run.
        progress: progress bars.

    Returns:
        The :class:`PretrainResult`; None on the non-main processes of a distributed run.

    Raises:
        ConfigError: an invalid config. ManifestError: no scans, or scans that cannot be grouped.
        DataVerificationError: an unreadable scan (the report names it).
    """
    from medseg.config import apply_override, config_to_dict
    from medseg.tasks.pretraining.data import folder_manifest

    settings = list(overrides or [])
    if budget is not None:
        settings += [f"train.max_minutes={parse_budget(budget)}", "train.max_epochs=null"]
    if isinstance(config, RunConfig):
        raw = config_to_dict(config)
    elif config is not None:
        raw = config_to_dict(load_config(config))
    else:
        raw = {"task": "pretraining", "data": {}}
    for item in settings:
        apply_override(raw, item)
    if str(raw.get("task")) != "pretraining":
        raise ConfigError(f"pretrain: the config is for task {raw.get('task')!r}; give a task: pretraining config")
    if data is not None and Path(data).suffix.lower() != ".csv":
        out = Path(raw.get("output_dir") or "runs/pretraining")
        raw["data"] = {**raw.get("data", {}), "root": str(Path(data).resolve()),
                       "manifest": str(folder_manifest(Path(data), out / f"{Path(data).resolve().name}_scans.csv",
                                                       len(raw.get("data", {}).get("channels") or [1])).resolve())}
    elif data is not None:
        raw["data"] = {**raw.get("data", {}), "manifest": str(Path(data).resolve())}
    result = train(validate_config(raw, source="pretrain"), resume=resume, progress=progress)
    if result is None:
        return None
    from medseg.engine.transfer import provenance_path
    from medseg.tasks.pretraining.training import WEIGHTS

    weights = result.run_dir / WEIGHTS
    about = json.loads(provenance_path(weights).read_text(encoding="utf-8"))
    return PretrainResult(result.run_id, weights, provenance_path(weights), tuple(about["tensors"]), result)


def calibrate_run(run_dir: str | Path, *, progress: bool = True) -> RunResult:
    """Calibrate a finished run's model: re-run its last stages with temperature scaling.

    For runs trained before medseg calibrated models (or with ``validation.calibrate: false``): the
    best checkpoint is scored again on the validation split, which fits the temperature, and on
    the test split (ECE before and after), then packaged as a new model whose contract carries the
    temperature. Nothing is retrained; accuracy and the evaluated Dice stay the same. The metrics, figures
    and new model are logged to the run's own MLflow run, and its ``summary.json`` names the new model.

    Args:
        run_dir: the run folder (``resolved_config.yaml``, ``checkpoints/best.safetensors``,
            ``summary.json``).

    Raises:
        RunError: not a finished run folder. UsageError: the task has no class probabilities.
    """
    from medseg.engine.recalibrate import finished_run_files, recalibrate_run

    files = finished_run_files(Path(run_dir))
    # a resolved config holds absolute paths; an older run's relative ones started where it was run
    cfg = validate_config(read_config_file(files.config), source=str(files.config))
    if not hasattr(cfg.validation, "calibrate"):
        raise UsageError(f"calibrate {run_dir}: a {cfg.task} model outputs no class probabilities to calibrate")
    cfg = cfg.model_copy(update={"validation": cfg.validation.model_copy(update={"calibrate": True})})
    return RunResult.from_summary(recalibrate_run(files, cfg, get_task(str(cfg.task)), progress=progress))


def describe(config: RunConfig) -> tuple[Task, torch.nn.Module, str]:
    """The task of ``config``, the network it builds and a few words on its input (``medseg validate``)."""
    task = get_task(str(config.task))
    return task, task.build_network(config), task.describe_input(config)


# ----------------------------------------------------------------------------------- verify


def verify(manifest: str | Path | Manifest, *, config: RunConfig | str | Path | None = None, root: str | Path | None = None,
           labels: Sequence[int] | None = None, report: str | Path | None = None,
           progress: bool = True) -> VerifyReport:
    """Check every case of a manifest: files, hashes, geometry, labels, leakage between splits.

    Args:
        manifest: the manifest CSV (or a read :class:`~medseg.data.manifest.Manifest`).
        config: check the data as this config's task will use them (labels, channels,
            dimensions); its data root is the default ``root``.
        root: the folder the manifest's paths start from (else the config's, else ``$MEDSEG_DATA_ROOT``).
        labels: allowed label values, overriding the config's; neither: label values are not checked.
        report: also write the report as JSON here.
        progress: progress bar.

    Returns:
        The report; ``report.ok`` is False when it found errors.
    """
    options = VerifyOptions()
    if config is not None:
        cfg = config if isinstance(config, RunConfig) else load_config(config)
        options = get_task(str(cfg.task)).verify_options(cfg)
        root = root if root is not None else cfg.data.resolved_root()
    if labels is not None:
        options = replace(options, labels=list(labels))
    options, root = _from_sidecar(manifest, options, root, config is None)
    if root is None:
        from medseg.config import DATA_ROOT_ENV

        env = os.environ.get(DATA_ROOT_ENV)
        if not env:
            raise ConfigError(f"verify: no data root; pass root=DIR (--root), a config, or set ${DATA_ROOT_ENV} "
                              "(a manifest built by `medseg manifest build` remembers its root in <name>.meta.json)")
        root = env
    if options.labels is None:
        log.warning("no label map given (labels or a config): label values are not checked")
    result = options.check(manifest, Path(root), progress)
    if report is not None:
        result.write(Path(report))
    return result


def _from_sidecar(manifest: str | Path | Manifest, options: VerifyOptions, root: str | Path | None,
                  labels_from_sidecar: bool) -> tuple[VerifyOptions, str | Path | None]:
    """The root and label values a built manifest remembers (``<name>.meta.json``), where neither the
    caller nor a config gave them."""
    from medseg.data.sidecar import read_sidecar

    path = manifest.path if isinstance(manifest, Manifest) else Path(manifest)
    info = read_sidecar(path) if path is not None else None
    if info is None or path is None:
        return options, root
    if root is None:
        log.info("data root %s (from %s.meta.json)", info.root, path.stem)
        root = info.root
    if labels_from_sidecar:  # no config: the manifest's own label column and label map
        if info.class_labels:
            options = replace(options, class_labels=True)
        if options.labels is None and info.labels:
            values = sorted(info.labels) if info.class_labels else sorted({0, *info.labels})
            options = replace(options, labels=values)
    return options, root


# ----------------------------------------------------------------------------------- predict


def _tracking(tracking_uri: str | None) -> str:
    """The MLflow store model URIs resolve against: given, ``$MLFLOW_TRACKING_URI``, or medseg's default."""
    import mlflow

    from medseg.tracking import default_tracking_uri

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


class Predictor:
    """A trained model (or an ensemble), loaded once, that predicts images and folders of scans.

    Preprocessing, patch size, overlap and labels come from the model's contract; outputs are on
    each input's own grid. Build one with :meth:`from_uri`.
    """

    def __init__(self, model: LoadedModel, task: Task, device: torch.device, options: PredictOptions,
                 tracking_uri: str = ""):
        check_options(options, task.name, task.predict_options)
        self.model = model
        self.task = task
        self.device = device
        self.options = options
        self.tracking_uri = tracking_uri
        self._case_predictor: CasePredictor = task.case_predictor(model, options, device)
        if model.contract.get("evaluated_with_tta") and not options.tta:  # once per loaded model, any task
            log.info("model %s: its run scored val and test with mirroring TTA (nnU-Net's default); add --tta to "
                     "predict as it was scored (slower: one prediction per mirroring)", model.uri)

    @classmethod
    def from_uri(cls, uri: str | Path | Sequence[str | Path], device: str = "auto", *, tracking_uri: str | None = None,
                 tta: bool = False, overlap: float | None = None, keep_largest: bool | None = None,
                 measured: bool = False, backend: str | None = None, allow_constant: bool = False,
                 qc: dict[str, float] | None = None) -> Predictor:
        """Load a model: an MLflow URI (``runs:/<id>/model``, ``models:/<name>/<version>``), a model
        folder, a ``seeds``/``folds`` parent (run URI ``runs:/<parent id>`` or its run directory), or
        several of these as an ensemble.

        Args:
            uri: the model reference(s).
            device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``...
            tracking_uri: the MLflow store for ``runs:/`` and ``models:/`` URIs (default:
                ``$MLFLOW_TRACKING_URI``, else medseg's ``sqlite:///runs/mlflow.db``).
            tta: average over the axis flips the model was trained with (segmentation, classification;
                super-resolution over its in-plane flips); detection fuses the flips' boxes (the
                contract's ``detect.fusion``).
            overlap: sliding-window overlap instead of the contract's (segmentation).
            keep_largest: keep each label's largest connected component; None: the contract's (segmentation).
            measured: the inputs already are the degraded images (reconstruction).
            allow_constant: accept images with one value everywhere (refused by default: a blank
                export would otherwise get a confident-looking prediction).
            qc: QC thresholds overriding the contract's (segmentation): ``max_abs_volume_z``,
                ``max_mean_entropy``, ``min_agreement``; a case passing one gets ``qc_flag`` and the reason.
                Detection's: ``min_boxes``, ``max_confident_boxes``, ``min_top_score``, ``max_edge_boxes``.
            backend: what runs the network: ``torch``, ``onnxruntime`` or ``openvino`` (the network
                exported to ONNX once, cached by its weights, inside the same preprocessing,
                sliding-window and inversion path; a ``medseg export`` folder's own graph is used),
                or ``auto``: the fastest measured backend installed here for a CPU, torch on a GPU
                (:data:`medseg.engine.backend_choice.BACKEND_PREFERENCE`). Default: ``$MEDSEG_BACKEND``, else :data:`DEFAULT_BACKEND`.

        Raises:
            UsageError: the model cannot be found, has no contract, or an option does not apply to its task.
            ModelLoadError: the model was found but could not be loaded (corrupt, out of memory).
        """
        store = _tracking(tracking_uri)
        torch_device = resolve_device(device)
        tune_allocator()
        refs = [str(uri)] if isinstance(uri, (str, Path)) else [str(u) for u in uri]
        model = load_models(refs, torch_device, network_from_spec)
        task = get_task(model.task)
        automatic = (backend or os.environ.get(BACKEND_ENV) or DEFAULT_BACKEND) == "auto"
        model = on_backend(model, task, resolve_backend(backend, torch_device), automatic)
        options = PredictOptions(device=device, tta=tta, overlap=overlap, keep_largest=keep_largest, measured=measured,
                                 allow_constant=allow_constant, qc=tuple(sorted((qc or {}).items())))
        return cls(model, task, torch_device, options, store)

    @property
    def contract(self) -> dict[str, Any]:
        """The model's I/O contract (channels, labels, orientation, spacing, intensity, ...)."""
        return self.model.contract

    @property
    def labels(self) -> dict[int, str]:
        return self.model.label_names

    @property
    def output_columns(self) -> tuple[str, ...]:
        """The report columns holding each case's output files, the main one first."""
        return tuple(self._case_predictor.output_columns)

    def predict(self, image: str | Path | MetaTensor | np.ndarray | torch.Tensor, *,
                affine: np.ndarray | None = None, case_id: str | None = None) -> Prediction:
        """Predict one image.

        Args:
            image: a NIfTI/MHA/NRRD/DICOM file or a DICOM series folder; or a MONAI ``MetaTensor``
                (channel first, or without a channel axis for one channel) with its affine; or a
                numpy array / tensor of the same layout with ``affine``.
            affine: the 4x4 (RAS, as nibabel reads it) voxel-to-world matrix of an array input.
            case_id: the name used in messages (default: the file's name, or ``image``).

        Returns:
            The :class:`~medseg.engine.results.Prediction`, on the input's own grid, with the quality
            check ``predict_folder`` would report for it in ``.qc`` (segmentation and detection).

        Raises:
            UsageError: an array without ``affine``. CaseError: the image cannot be read or does not
                fit the model (channels, dimensions); the message names it and the fix.
        """
        if isinstance(image, (str, Path)):
            path = Path(image)
            name = case_id or strip_volume_suffix(path.resolve().name)
            return self._case_predictor.predict(path, name)
        return self._case_predictor.predict(self._as_meta_tensor(image, affine), case_id or "image")

    def _as_meta_tensor(self, image: MetaTensor | np.ndarray | torch.Tensor, affine: np.ndarray | None) -> MetaTensor:
        dims = int(self.contract["spatial_dims"])
        tensor: torch.Tensor
        if isinstance(image, MetaTensor):
            tensor = image
            matrix = np.asarray(affine if affine is not None else image.affine, dtype=np.float64)
        else:
            if affine is None:
                raise UsageError("Predictor.predict: an array needs its affine (4x4 voxel-to-world, RAS), e.g. "
                                 "predict(array, affine=nibabel.load(path).affine); or pass the file's path")
            matrix = np.asarray(affine, dtype=np.float64)
            tensor = MetaTensor(torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image))
        if tensor.ndim == dims:  # no channel axis: one channel
            tensor = tensor[None]
        if tensor.ndim != dims + 1:
            raise UsageError(f"Predictor.predict: expected a {dims}D image as (channels, *spatial) or (*spatial), "
                             f"got shape {tuple(tensor.shape)}")
        if matrix.shape != (4, 4) and matrix.shape != (dims + 1, dims + 1):
            raise UsageError(f"Predictor.predict: affine must be 4x4 (or {dims + 1}x{dims + 1}), got {matrix.shape}")
        meta = {k: v for k, v in (getattr(tensor, "meta", {}) or {}).items() if k != "affine"}
        meta.update({"original_affine": matrix, "spatial_shape": np.asarray(tensor.shape[1:])})
        meta.setdefault("original_channel_dim", 0)
        return MetaTensor(tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor, affine=torch.as_tensor(matrix),
                          meta=meta)

    def predict_folder(self, input: str | Path, output: str | Path, *, overwrite: bool = False,
                       save_probabilities: bool = False, save_uncertainty: bool = False, num_parts: int = 1,
                       part_id: int = 0, progress: bool = True, tracker: Any | None = None,
                       review: bool = True, engine: Engine | str = Engine.LOCAL,
                       ray: RayOptions | None = None) -> BatchReport:
        """Predict every scan under ``input`` (recursively) into ``output``.

        Each case is written atomically on its own grid; a case that fails is reported and the rest
        go on; a rerun skips finished cases unless ``overwrite``. ``output`` gets
        ``predictions.csv`` (one row per case) and ``predict_summary.json``.

        Args:
            input: a folder (or one file).
            output: the output folder: a path, a ``file://`` URI, or an fsspec URI (``s3://bucket/prefix``,
                ``gs://...``, ``az://...``, with s3fs, gcsfs or adlfs installed), where each case's files
                are put whole once written and the batch's files when it ends
                (:mod:`medseg.engine.remote_output`).
            overwrite: redo cases that already have their outputs.
            save_probabilities: also write the class probabilities (segmentation).
            save_uncertainty: also write ``<case>_entropy.nii.gz`` and, with TTA or an ensemble,
                ``<case>_variance.nii.gz`` (segmentation).
            num_parts / part_id: predict only every ``num_parts``-th case from ``part_id`` (sharding).
            progress: progress bar.
            tracker: an :class:`~medseg.tracking.MlflowTracker` with a started run, to log to.
            review: also write ``review.html`` (``review_partKofN.html`` for a shard): every case's
                row and thumbnail, worst QC first, in one self-contained page.
            engine: ``local`` (this process, the default) or ``ray``: the cases run on Ray Data
                actors that each load the model once (:mod:`medseg.engine.ray_predict`); outputs,
                report, summary, review page and MLflow run are the same.
            ray: the Ray engine's cluster address, actors and resources per actor.

        Raises:
            UsageError: no such input, no scans in it, an option its task does not use; Ray asked
                for and not installed; an output URI no installed file system writes.
            RunError: an output URI that cannot be written (credentials, no such bucket).
        """
        options = replace(self.options, overwrite=overwrite, save_probabilities=save_probabilities,
                          save_uncertainty=save_uncertainty, num_parts=num_parts, part_id=part_id, progress=progress,
                          review=review)
        check_options(options, self.task.name, self.task.predict_options)
        remote = remote_folder(output, "--output")  # None: a local folder (a path or a file:// URI)
        factory = self.case_predictor_factory(options)
        if remote is not None:  # each Ray worker puts the outputs it writes at the URI, opened there
            factory = functools.partial(publishing_factory, factory, remote.uri)
        runner = case_runner(engine, factory, ray)
        input = local_folder(input, "--input")
        found = discover_inputs(input, self.model.contract.get("in_channels"))
        case_predictor = self.task.case_predictor(self.model, options, self.device)
        if remote is None:
            out = local_folder(output, "--output")
        else:  # after discovery: an empty input writes nothing there
            case_predictor, out = publishing(case_predictor, remote), staging_folder(remote)
        report = record_graphs(predict_folder(case_predictor, self.model, input, out, options, self.device, tracker,
                                              found, runner), self.model)
        report = record_ray(report, runner, tracker) if isinstance(runner, RayCaseRunner) else report
        return publish_batch(report, remote) if remote is not None else report

    def case_predictor_factory(self, options: PredictOptions) -> CasePredictorFactory:
        """What rebuilds this predictor's case predictor in another process (a Ray actor): the same
        model references, MLflow store, backend and options, loaded there once."""
        return functools.partial(load_case_predictor, self.model.uris, self.tracking_uri, self.model.backend, options)

    def predict_paths(self, paths: Sequence[str | Path], output: str | Path, *, overwrite: bool = False,
                      save_probabilities: bool = False, progress: bool = False, review: bool = False,
                      time_limit_s: float | None = None) -> BatchReport:
        """Predict the scans at ``paths`` (files, DICOM series folders or folders of scans) into ``output``,
        as one batch: what a served model does with a column of paths. A path that does not exist
        is a failed row, the others go on. No review page unless ``review``: a served request's
        answer is its table. With ``time_limit_s``, cases not started within it are failed rows
        saying so (the case running then finishes)."""
        options = replace(self.options, overwrite=overwrite, save_probabilities=save_probabilities, progress=progress,
                          review=review, time_limit_s=time_limit_s)
        check_options(options, self.task.name, self.task.predict_options)
        found = discover_paths([Path(p) for p in paths], self.model.contract.get("in_channels"))
        case_predictor = self.task.case_predictor(self.model, options, self.device)
        return record_graphs(predict_folder(case_predictor, self.model, Path(str(paths[0]) if len(paths) == 1 else "."),
                                             Path(output), options, self.device, None, found), self.model)


def load_case_predictor(uris: Sequence[str], tracking_uri: str, backend: str, options: PredictOptions) -> CasePredictor:
    """Load the model at ``uris`` (one, or an ensemble) on ``options.device`` and return its task's case
    predictor: what each Ray actor runs (see :meth:`Predictor.case_predictor_factory`)."""
    _tracking(tracking_uri or None)
    device = resolve_device(options.device)
    tune_allocator()  # as Predictor.from_uri does for the local path: the same speed in each actor
    model = load_models(list(uris), device, network_from_spec)
    task = get_task(model.task)
    return task.case_predictor(on_backend(model, task, resolve_backend(backend, device)), options, device)


def predict_dataset(model: str | Path | Sequence[str | Path], input: str | Path, output: str | Path, *,
                    engine: Engine | str = Engine.LOCAL, ray: RayOptions | None = None, device: str = "auto",
                    tracking_uri: str | None = None, backend: str | None = None, tracker: Any | None = None,
                    **options: Any) -> BatchReport:
    """Predict every scan under ``input`` into ``output`` with ``model``, on this machine or on Ray.

    ``Predictor.from_uri(model, ...).predict_folder(input, output, engine=engine, ray=ray, ...)`` in one
    call: the model options (``tta``, ``overlap``, ``keep_largest``, ``qc``...) go to
    :meth:`Predictor.from_uri`, the batch options (``overwrite``, ``save_probabilities``,
    ``num_parts``, ``progress``, ``review``...) to :meth:`Predictor.predict_folder`.

    Args:
        model: the model reference(s), as for :meth:`Predictor.from_uri`.
        input: a folder of scans (searched recursively) or one file.
        output: the output folder, on a file system every Ray worker sees at the same path, or an
            fsspec URI every worker may write (``s3://bucket/prefix``: see :meth:`Predictor.predict_folder`).
        engine: ``local`` (default) or ``ray`` (:mod:`medseg.engine.ray_predict`).
        ray: cluster address, actors, CPUs and GPUs per actor (default: a local runtime, one actor).
        device / tracking_uri / backend: as for :meth:`Predictor.from_uri`; with Ray, ``device``
            is each actor's (``auto``: the GPU Ray gives an actor with ``gpus_per_actor``).
        tracker: an MLflow tracker with a started run, to log the batch to.

    Raises:
        UsageError: an unknown option, or one of the errors of the two calls.
    """
    model_keys = {"tta", "overlap", "keep_largest", "measured", "allow_constant", "qc"}
    batch_keys = {"overwrite", "save_probabilities", "save_uncertainty", "num_parts", "part_id", "progress", "review"}
    unknown = sorted(set(options) - model_keys - batch_keys)
    if unknown:
        raise UsageError(f"predict_dataset: unknown option(s) {unknown}; it takes {sorted(model_keys | batch_keys)}")
    predictor = Predictor.from_uri(model, device, tracking_uri=tracking_uri, backend=backend,
                                   **{k: v for k, v in options.items() if k in model_keys})
    return predictor.predict_folder(input, output, tracker=tracker, engine=engine, ray=ray,
                                    **{k: v for k, v in options.items() if k in batch_keys})


# ----------------------------------------------------------------------------------- model files


def export_model(uri: str | Path, out: str | Path, export_format: str = "onnx", *,
                 tracking_uri: str | None = None) -> Path:
    """Write ``out``: the model folder (weights, network spec, contract) plus its network as
    ``network.onnx`` (run by ``--backend onnxruntime|openvino``, or by any ONNX tool) or
    ``network.pt`` (TorchScript, for other tools: medseg never loads TorchScript, which is code).

    Returns:
        The exported network file.
    """
    from medseg.engine.backends import EXPORT_FORMATS, EXPORTED_NAME, export_network
    from medseg.engine.model_format import local_model_folder, pin_file, read_model_folder, write_model_folder
    from medseg.engine.sliding import fold_batch_norms

    if export_format not in EXPORT_FORMATS:
        raise UsageError(f"--format {export_format!r}: use one of {list(EXPORT_FORMATS)}")
    _tracking(tracking_uri)
    with local_model_folder(str(uri)) as (folder, run_id):
        files = read_model_folder(folder, str(uri))
    task = get_task(str(files.contract.get("task")))
    network = network_from_spec(files.network_spec)
    network.load_state_dict(files.state_dict)
    out = Path(out)
    write_model_folder(out, network, files.network_spec, files.contract,
                       extra={"run_id": run_id, "exported_from": str(uri), "export_format": export_format})
    example, dynamic = task.export_example(files.contract)
    name = EXPORTED_NAME if export_format == "onnx" else "network.pt"
    path = export_network(fold_batch_norms(network.eval()), example, out / name, export_format, dynamic_spatial=dynamic)
    pin_file(out, name)  # its sha256 in medseg_model.json: checked before it runs, by `medseg model check` too
    return path


def check_model(uri: str | Path, *, tracking_uri: str | None = None) -> Any:
    """``medseg model check``: the :class:`~medseg.engine.model_check.ModelCheck` of a model folder or
    ``runs:/``/``models:/`` URI (downloaded, files only), before anyone loads it. Nothing is
    imported, unpickled or run.

    Raises:
        UsageError: the path does not exist, or the URI names nothing in the tracking store.
    """
    from medseg.engine.model_check import check_model_folder
    from medseg.engine.model_format import local_model_folder

    _tracking(tracking_uri)
    with local_model_folder(str(uri)) as (folder, _):
        return check_model_folder(folder)


def evaluate(predictions: str | Path, references: str | Path, *, labels: Mapping[int, str] | str | None = None,
             out: str | Path | None = None) -> Any:
    """``medseg evaluate``: score a folder of predicted label maps against a folder of references.

    The :class:`~medseg.tasks.segmentation.folder_scores.FolderScores` (per-case Dice, HD95 in mm,
    volumes in mL; the run-style summed Dice per label) of every reference that has a prediction
    of the same name, scored by the same code as a run's test split.

    Args:
        predictions: folder of predicted masks (``medseg predict``'s output folder as it is).
        references: folder of reference masks (``labelsTs``).
        labels: value -> name, or ``"1=anterior,2=posterior"``; None: every non-zero value in the references.
        out: write ``scores.csv`` and ``scores.json`` here.

    Raises:
        UsageError: a folder is missing or holds no label maps, or ``labels`` is not ``value=name,...``.
    """
    from medseg.tasks.segmentation.folder_scores import score_folders

    named = parse_label_names(labels) if isinstance(labels, str) else labels
    return score_folders(Path(predictions), Path(references), named, None if out is None else Path(out))


def evaluate_downstream(model: str | Path | Sequence[str | Path], pairs: str | Path, out: str | Path, *,
                        labels: Mapping[int, str] | str | None = None, tracking_uri: str | None = None,
                        device: str = "auto", experiment: str | None = "downstream", progress: bool = True) -> Any:
    """``medseg evaluate-downstream``: judge enhanced images by a frozen segmentation model.

    Every kind of input in the pairs table (the enhanced image, its naive baselines, the original)
    is segmented by ``model`` into ``out/masks/<kind>/``; the
    :class:`~medseg.tasks.segmentation.downstream.DownstreamScores` give the Dice per label and its
    mean per kind per case (scored as ``medseg evaluate`` scores), with each image's PSNR and SSIM
    against its reference, written to ``out/downstream.{csv,json}`` and logged to MLflow.

    Args:
        model: the frozen segmentation model (a ``runs:/``, ``models:/`` URI, model folder, or an ensemble).
        pairs: the pairs table (CSV: ``case_id, kind, image, reference, label``; see
            :mod:`medseg.tasks.segmentation.downstream`).
        out: the output folder.
        labels: value -> name, or ``"1=anterior,2=posterior"``; None: the model's labels.
        tracking_uri: the MLflow store of ``model`` and of the run logged here.
        device: ``auto``, ``cpu``, ``cuda``...
        experiment: the MLflow experiment to log the scores to; None: not logged.
        progress: progress bars while segmenting.

    Raises:
        UsageError: the table is malformed or names missing files, or the model writes no label maps.
    """
    from medseg.tasks.segmentation.downstream import kinds, read_pairs, score_downstream, stage_by_case

    table = read_pairs(Path(pairs))
    predictor = Predictor.from_uri(model, device, tracking_uri=tracking_uri)
    if not predictor.labels:
        raise UsageError(f"--model {model}: expected a segmentation model (one that writes label maps); got a "
                         f"{predictor.model.task} model")
    folder = Path(out)
    masks: dict[str, Path] = {}
    for kind in kinds(table):
        inputs = stage_by_case({p.case_id: p.image for p in table if p.kind == kind}, folder / "inputs" / kind)
        masks[kind] = folder / "masks" / kind
        predictor.predict_folder(inputs, masks[kind], progress=progress, review=False)
    named = parse_label_names(labels) if isinstance(labels, str) else (labels or predictor.labels)
    scores = score_downstream(table, masks, named, folder / "by_case", out=folder)
    if experiment:
        scores.run_id = _log_downstream(scores, model, pairs, experiment, predictor.tracking_uri)
    return scores


def _log_downstream(scores: Any, model: Any, pairs: str | Path, experiment: str, tracking_uri: str) -> str:
    """One MLflow run holding the downstream scores: the means as metrics, the tables as artifacts."""
    from medseg.tracking import MlflowTracker

    tracker = MlflowTracker(tracking_uri, experiment)
    run_id = tracker.start("evaluate-downstream", {"medseg.stage": "evaluate-downstream"})
    tracker.log_params({"model": str(model), "pairs": str(pairs), "kinds": ",".join(scores.means)})
    tracker.log_metrics(scores.metrics(), step=0)
    for path in scores.files.values():
        tracker.log_artifact(Path(path), "downstream")
    tracker.end()
    return run_id


PICKLE_WARNING = ("converting unpickles {source}, which runs whatever code the file holds: only convert a model "
                  "whose origin you trust")


def convert_model(source: str | Path, out: str | Path, *, config: RunConfig | str | Path | None = None,
                  tracking_uri: str | None = None) -> Path:
    """Convert a pickled model into medseg's safe format, knowingly unpickling it once.

    Args:
        source: a pickled state dict (``.pt``/``.pth``/``.bin``, read with ``weights_only=True``), or
            a pickled MLflow PyTorch model (an older medseg's model: folder or URI).
        out: for a state dict, the ``.safetensors`` file to write (for ``model.init_from``); for a
            model, the model folder to write (``medseg_model.json`` + ``weights.safetensors``).
        config: the run's config (its ``resolved_config.yaml``): what rebuilds the network; needed
            for a model, which carried no network spec before.

    Returns:
        The file or folder written.

    Raises:
        UsageError: a model without ``config``, or weights that do not fit the config's network.
    """
    from medseg.engine.loop import network_spec
    from medseg.engine.model_format import write_model_folder
    from medseg.io import safe_tree

    log.warning(PICKLE_WARNING.format(source=source))
    path = Path(source)
    out = Path(out)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)  # the one knowing unpickle
        state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UsageError(f"{source}: holds no state dict of tensors; nothing to convert")
        return safe_tree.save(out, {k: v.contiguous() for k, v in state.items()})
    if config is None:
        raise UsageError(f"{source}: converting a model needs --config, the config it was trained with (its run "
                         "folder's resolved_config.yaml): it says how to rebuild the network")
    import mlflow

    from medseg.tracking.sqlite_store import require_existing_store

    store = _tracking(tracking_uri)
    if str(source).startswith(("runs:/", "models:/")):
        require_existing_store(store, f"convert {source}")
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    task = get_task(str(cfg.task))
    pickled = mlflow.pytorch.load_model(str(source), map_location="cpu")  # the one knowing unpickle
    network = task.build_network(cfg)
    try:
        network.load_state_dict(pickled.state_dict(), strict=True)
    except RuntimeError as err:
        raise UsageError(f"{source}: its weights do not fit the network of {config} ({str(err).splitlines()[0]}); "
                         "give the config of the run that trained it") from err
    # What the old model learned beyond its config (label volumes, QC thresholds, its temperature)
    # is in its MLmodel metadata: plain YAML, read without unpickling anything.
    from mlflow.models import Model

    stored = (Model.load(str(source)).metadata or {}).get("medseg_contract") or {}
    contract = {**task.contract(cfg), **(stored if isinstance(stored, dict) else {})}
    write_model_folder(out, network, network_spec(cfg), contract, extra={"converted_from": str(source)})
    return out


# ----------------------------------------------------------------------------------- manifests


def parse_label_names(spec: str) -> dict[int, str]:
    """``"0=normal,1=pneumonia"`` -> ``{0: "normal", 1: "pneumonia"}`` (``--labels`` of ``manifest build``
    and ``evaluate``).

    Raises:
        ConfigError: an item is not ``value=name`` with an integer value, a value repeats, or nothing is given.
    """
    named: dict[int, str] = {}
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        value, sep, name = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit() or not name.strip():
            raise ConfigError(f"--labels {spec!r}: {item!r} is not value=name. Expected e.g. 0=normal,1=pneumonia.")
        if int(value) in named:
            raise ConfigError(f"--labels {spec!r}: value {int(value)} is named twice. Give each value once.")
        named[int(value)] = name.strip()
    if not named:
        raise ConfigError(f"--labels {spec!r}: no labels given. Expected e.g. 0=normal,1=pneumonia.")
    return named


# ------------------------------------------------------------------------------------ planning


def parse_budget(text: str | float | int) -> float:
    """``30m``, ``1.5h``, ``90s`` or a number of minutes -> minutes.

    Raises:
        UsageError: anything else.
    """
    if isinstance(text, (int, float)):
        minutes = float(text)
    else:
        units = {"s": 1 / 60, "m": 1.0, "min": 1.0, "h": 60.0}
        raw = text.strip().lower()
        unit = next((u for u in ("min", "s", "m", "h") if raw.endswith(u)), "")
        try:
            minutes = float(raw[: len(raw) - len(unit)] if unit else raw) * units.get(unit, 1.0)
        except ValueError:
            raise UsageError(f"--budget {text!r}: expected a duration such as 30m, 1.5h or 600s") from None
    if not minutes > 0:
        raise UsageError(f"--budget {text!r}: must be more than zero")
    return minutes


def plan(dataset: str | Path, *, task: str | None = None, budget: str | float = "30m", root: str | Path | None = None,
         manifest: str | Path | None = None, out: str | Path | None = None, device: str = "auto",
         name: str | None = None, probe: bool = True, progress: bool = True, seed: int = 0,
         home: str | Path | None = None, unlabelled: str | Path | None = None) -> Any:
    """``medseg plan``: fingerprint a dataset and plan a config for it, the budget and this machine.

    Args:
        dataset: a dataset folder (MSD, nnU-Net, images/labels, ImageFolder, a CSV of path,label,
            case folders; see ``medseg manifest build``) or a manifest CSV (then ``root`` is needed).
        task: segmentation, classification, reconstruction or regression; default what the data say.
        budget: training time, ``30m`` / ``1.5h`` / minutes.
        root: the folder a manifest's paths start from (default: ``dataset``).
        manifest: the manifest to use if it exists, else where to write the one built from the
            folder (default ``<home>/data_manifests/<dataset name>.csv``: every case in 5
            cross-validation folds, fewer with fewer cases; a test split only where the layout has one).
        out: write the commented config here; what lies in ``home`` or in a folder given by a
            relative path it names relative to itself, the rest absolute, so it loads from any folder.
        device: what to plan for and probe on (``auto``: the GPU if there is one).
        name: the run's experiment and output folder name (default: the dataset's).
        probe: time candidate plans on the device (at most 60 s); False plans from the rules alone.
        progress: progress bars.
        seed: the split seed, when a manifest is built.
        home: the folder the plan's outputs go in: the manifest it builds (``data_manifests/``),
            the runs and their MLflow store (``runs/``, ``runs/mlflow.db``); default ``out``'s
            folder, else the current directory.
        unlabelled: a folder of scans without labels: the plan pretrains on them and the labelled
            training images first when the budget leaves the fine-tuning its step goal
            (:mod:`medseg.planning.pretraining_budget`); ``.pretraining`` is then that config.

    Returns:
        A :class:`medseg.planning.plan.Plan`: ``.config`` (a config mapping, paths absolute), ``.why``,
        ``.probe``, ``.fingerprint``, ``.explain()``, ``.to_yaml()``.

    Raises:
        UsageError: a bad budget, an unknown task, or a task without a planner.
        ManifestError, VolumeReadError: the data cannot be read (the message names the file).
    """
    from medseg.planning.fingerprint import compute_fingerprint
    from medseg.planning.plan import PlanRequest

    minutes = parse_budget(budget)
    home_dir = _absolute(home if home is not None else (Path(out).parent if out is not None else "."))
    described = describe_dataset(_absolute(dataset), _absolute(root) if root else None,
                                  _absolute(manifest) if manifest else None, seed, progress, home_dir / "data_manifests")
    task_name = task or described.task
    if task_name is None:
        raise UsageError(f"{dataset}: the data do not say which task they are for; pass --task "
                         f"({', '.join(list_tasks())})")
    chosen = get_task(task_name)
    class_labels = bool(getattr(chosen, "class_labels", False))
    labels = described.labels or labels_from_manifest(described.manifest, class_labels)
    fingerprint = compute_fingerprint(described.manifest, described.root, channel_names=described.channel_names,
                                      labels=labels, class_labels=class_labels, progress=progress)
    if not class_labels:
        labels = consecutive_labels(labels or {}, {int(v) for c in fingerprint.cases for v in c.class_voxels})
    labels = labels or {0: "class_0", 1: "class_1"}
    request = PlanRequest(task=task_name, budget_minutes=minutes, device=resolve_device(device),
                          name=name or dataset_name(Path(dataset) if not described.manifest.path
                                                     else Path(described.manifest.path)),
                          manifest=Path(described.manifest.path or ""), root=described.root, labels=labels,
                          channel_names=fingerprint.channel_names, probe=probe, progress=progress, home=home_dir,
                          relative_inputs=_named_relatively(dataset, root, manifest))
    result = chosen.plan(request, fingerprint)
    # planners name the runs and their store relatively (runs/<name>, sqlite:///runs/mlflow.db): in the home
    result.config = resolve_raw_paths(result.config, path_keys(chosen.config_type), home_dir)
    result.selection_metric = chosen.selection_metric
    folds = sorted({c.fold for c in described.manifest.cases if c.fold is not None and c.fold >= 0})
    if len(folds) >= 2:
        validation_type = chosen.config_type.model_fields["validation"].annotation
        result.train_on_every_case(len(folds), sum(1 for c in described.manifest.cases if c.fold == folds[0]),
                                   calibrates="calibrate" in getattr(validation_type, "model_fields", {}))
    if unlabelled is not None:
        _plan_pretraining(result, _absolute(unlabelled), described, home_dir)
    result.notes.insert(0, described.described.replace("\n", "; "))
    validate_config(result.config)  # the plan is an ordinary config: it must load as one
    if out is not None:
        result.write(out)
        load_config(Path(out))
    return result


def _plan_pretraining(planned: Any, unlabelled: Path, described: Any, home: Path) -> None:
    """Give the plan a pretraining stage on the ``unlabelled`` scans if it pays (``medseg plan --unlabelled``)."""
    from medseg.planning.pretraining_plan import budget_pretraining
    from medseg.tasks.pretraining.config import PRETRAINED_NETWORKS
    from medseg.tasks.pretraining.data import every_image_manifest

    network = planned.config["model"]["name"]
    if network not in PRETRAINED_NETWORKS:
        raise UsageError(f"--unlabelled {unlabelled}: the planner budgets pretraining for segmentation U-Nets "
                         f"({', '.join(PRETRAINED_NETWORKS)}) and the {planned.task} plan's network is {network!r}; "
                         "plan without --unlabelled (a classification network is pretrained by `medseg pretrain` "
                         "and fine-tuned with model.init_from: docs/how-to/pretrain.md)")
    images = every_image_manifest(unlabelled, described.manifest, described.root,
                                  home / "data_manifests" / f"{planned.request.name}_pretraining.csv",
                                  len(planned.config["data"]["channels"]))
    if budget_pretraining(planned, images.manifest, images.unlabelled, images.labelled).pretrains:
        validate_config(planned.pretraining, source="the planned pretraining")  # an ordinary config too


def _absolute(path: str | Path) -> Path:
    """``path`` from the current directory, without following links (what the user named)."""
    return Path(os.path.abspath(path))


def _named_relatively(*paths: str | Path | None) -> tuple[Path, ...]:
    """The folders of the paths given relatively (a file's folder): a plan names what is in them relatively too."""
    given = [_absolute(p) for p in paths if p is not None and not Path(p).is_absolute()]
    return tuple(p if p.is_dir() else p.parent for p in given)


def race_plan(planned: Any, *, progress: bool = True, **options: Any) -> Any:
    """Race the candidates a plan leaves open (successive halving on its fold 0) and make the
    winner the plan, its budget less the race's time; see :mod:`medseg.planning.race`.

    Args:
        planned: a :class:`medseg.planning.plan.Plan` from :func:`plan`.
        progress: progress bars.
        options: ``share`` (of the budget, default a third), ``min_run_minutes``.

    Returns:
        The :class:`medseg.planning.race.RaceResult`, or None when there was nothing to race (the
        plan's notes say why); ``planned.config`` is then unchanged.
    """
    from medseg.planning.race import race

    task = get_task(planned.task)
    from medseg_pipelines import run as stages

    def pipeline(ctx: Any) -> None:
        stages(ctx, task)

    result = race(planned, pipeline, validate_config, progress=progress, prepare_data=task.prepare_data, **options)
    validate_config(planned.config)  # the winner is an ordinary config
    return result
