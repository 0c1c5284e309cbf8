"""Segmentation of one scan with a loaded model: sliding window, TTA/ensemble, back to the native grid.

Preprocessing, patch size, overlap and label map come from the model's contract. The
probabilities are inverted onto the scan's own grid (MONAI ``Invertd`` over the same transforms
that prepared it) before the argmax, so the mask has the input's shape and affine. A region model
(contract ``output_activation: sigmoid`` with its ``regions``) averages sigmoids instead of
softmaxes, and its mask is their decoding in the contract's paint order. The contract's
``postprocess.min_component_size`` removes small components on the network's grid, before that
inversion; ``keep_largest_component`` applies to the mask on the input's grid.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd, KeepLargestConnectedComponent
from torch import nn

from medseg.config import Precision
from medseg.data.transforms import IMAGE, apply_deferred_window, preprocessing_from_contract, window_function
from medseg.engine.calibration import contract_temperature
from medseg.engine.case_io import (
    check_input_shape,
    portable_history,
    read_error,
    reader_source,
    shown_source,
    voxel_volume_ml,
    write_nifti,
)
from medseg.engine.model_loading import LoadedModel
from medseg.engine.results import CaseResult, Prediction, PredictOptions
from medseg.engine.runtime import autocast_dtype
from medseg.engine.sliding import class_sigmoid, class_softmax, label_map, predict_logits
from medseg.engine.tta import Samples, flip_combinations, predict_samples, tta_axes
from medseg.engine.uncertainty import mean_foreground_entropy, sample_agreement, voxel_entropy
from medseg.errors import CaseError, ModelError, PredictOptionError
from medseg.io.dicom_seg import dicom_seg_available, write_dicom_seg
from medseg.io.discovery import InputCase
from medseg.io.naming import output_paths
from medseg.io.preflight import available_memory, human_bytes
from medseg.tasks.segmentation.bounded import ScoresPlan, SweepResult, member_slabs, plan_scores, sweep
from medseg.tasks.segmentation.postprocess import remove_small_components, sizes_by_value
from medseg.tasks.segmentation.regions import Regions, decode_regions
from medseg.tasks.segmentation.slab_resample import SlabResampler, resamples

PRED = "pred"
#: The thresholds ``--qc KEY=VALUE`` may set (the contract stores the ones the model starts with).
QC_KEYS = ("max_abs_volume_z", "max_mean_entropy", "min_agreement")


def qc_thresholds(contract: dict[str, Any], overrides: Sequence[tuple[str, float]]) -> dict[str, float]:
    """The contract's QC thresholds with the user's overrides.

    Raises:
        PredictOptionError: an override names no known threshold.
    """
    thresholds = {k: float(v) for k, v in (contract.get("qc") or {}).items() if k in QC_KEYS}
    for key, value in overrides:
        if key not in QC_KEYS:
            raise PredictOptionError(f"--qc {key}={value}: unknown threshold; use one of {', '.join(QC_KEYS)}")
        thresholds[key] = float(value)
    return thresholds
#: Per-case uncertainty in the report (see medseg.engine.uncertainty): mean entropy inside the
#: predicted foreground, and the agreement (mean Dice) of the flips' and members' masks.
UNCERTAINTY_COLUMNS = ("mean_entropy", "agreement")
#: ``MEDSEG_PREDICT_SCORES``: how a scan's class scores are held (auto: see ScoresPlan).
SCORES_MODES = ("auto", "full", "bounded")


def check_scores_memory(plan: ScoresPlan, source: str, available: int, tta: bool) -> None:
    """Refuse a scan whose class scores would not fit in memory the way they are to be held.

    Raises:
        CaseError: names the scan, the memory it needs and has, and what would make it fit.
    """
    needed = plan.bounded_bytes if plan.bounded else plan.full_bytes
    if needed <= available:
        return
    how = "slab by slab" if plan.bounded else "for the whole volume at once"
    fix = ("predict it on a machine with more memory, or with a model that resamples to a coarser spacing"
           if plan.bounded else "leave --tta out (every axis is mirrored, so no slab can be swept one way) or "
           "predict it on a machine with more memory" if tta else "predict it on a machine with more memory")
    raise CaseError(f"{source}: its class scores need about {human_bytes(needed)} {how} ({plan.reason}); this "
                    f"machine has {human_bytes(available)} available. Expected a scan whose scores fit; {fix}")


def case_label(volume: MetaTensor) -> str:
    """The file a preprocessed volume came from, for messages."""
    return str(volume.meta.get("filename_or_obj") or "image given in memory")


def _member_regions(model: LoadedModel) -> Regions | None:
    """The regions every member of the model shares (None: softmax models).

    Raises:
        ModelError: a member's contract is inconsistent, or the members' regions differ.
    """
    members = model.member_contracts or (model.contract,)
    found = [Regions.from_contract(contract, f"model {uri}") for contract, uri in zip(members, model.uris)]
    if any(r != found[0] for r in found[1:]):
        shown = [r.to_contract() if r else None for r in found]
        raise ModelError(f"--model {model.uri}: the members' regions differ ({shown}); an ensemble averages models "
                         "trained with the same regions (the folds or seeds of one config)")
    return found[0]


def _contract_min_sizes(model: LoadedModel, names: dict[int, str]) -> dict[int, int]:
    """Label value -> voxels of the contract's ``postprocess.min_component_size`` (absent in older models).

    Raises:
        ModelError: it names labels the model does not have.
    """
    sizes = (model.contract.get("postprocess") or {}).get("min_component_size") or {}
    try:
        return sizes_by_value(sizes, names)
    except ValueError as err:
        raise ModelError(f"--model {model.uri}: its contract's postprocess.{err}; the contract was edited or "
                         "belongs to another model, so re-package the model from its run") from err


class SegmentationPredictor:
    """Masks (and optionally probabilities, DICOM SEG) for the scans of a folder or in memory."""

    output_columns = ("output", "dicom_seg", "probabilities", "entropy", "variance")

    def __init__(self, model: LoadedModel, options: PredictOptions, device: torch.device):
        self.model = model
        self.options = options
        self.device = device
        self.names = model.label_names
        self.regions = _member_regions(model)
        self.foreground = [n for v, n in sorted(self.names.items()) if v != 0]
        self.volume_stats: dict[str, dict[str, float]] = model.contract.get("label_volumes_ml") or {}
        self.qc = qc_thresholds(model.contract, options.qc)
        self.value_columns = [*(f"voxels_{n}" for n in self.foreground), *(f"volume_ml_{n}" for n in self.foreground),
                              *UNCERTAINTY_COLUMNS, *(f"volume_z_{n}" for n in self.foreground if n in self.volume_stats),
                              "qc_flag", "qc_reason"]
        # a CT window is deferred: the bounded sweep applies it window by window to the int16 scan
        self._chains = {load: preprocessing_from_contract(model.contract, load, options.allow_constant, defer_window=True)
                        for load in (True, False)}
        self.flip_axes = tta_axes(model.contract, options.tta, f"model {model.uri}")
        self.keep_largest = options.keep_largest if options.keep_largest is not None else bool(
            model.contract.get("postprocess", {}).get("keep_largest_component", False))
        self.min_sizes = _contract_min_sizes(model, self.names)

    # ------------------------------------------------------------------------------- one image

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (K, *spatial), or a region model's sigmoids (R, *spatial), on the CPU
        for a preprocessed image, averaged over the ensemble's members and, with TTA, over all axis
        flips (nnU-Net's mirroring)."""
        return self.samples(image, keep_spread=False).mean

    def samples(self, image: torch.Tensor, keep_spread: bool = True) -> Samples:
        """:meth:`probabilities` with the spread between flips and members (see :mod:`~medseg.engine.uncertainty`)."""
        dims = int(self.model.contract["spatial_dims"])
        amp = autocast_dtype(Precision.AUTO, self.device)
        overlap = self.options.overlap

        def run(member: tuple[nn.Module, dict[str, Any]], x: torch.Tensor) -> torch.Tensor:
            network, contract = member
            window = contract["sliding_window"]
            logits = predict_logits(network, x, contract["patch_size"],
                                    overlap=overlap if overlap is not None else window["overlap"],
                                    sw_batch_size=window["sw_batch_size"], blend=window["blend"], device=self.device,
                                    amp_dtype=amp)
            if self.regions is not None:  # independent regions: no temperature is fitted for them
                return class_sigmoid(logits)
            # each member's own temperature (fitted on its validation split; 1 for older models); a
            # softmax that rounds alike wherever a voxel sits, so the bounded path's slabs agree bitwise
            return class_softmax(logits, contract_temperature(contract))

        return predict_samples(self.model.members(), image, dims, self.options.tta, run, keep_spread=keep_spread,
                               axes=self.flip_axes, decode=self.label_map if self.regions is not None else None)

    def label_map(self, probabilities: torch.Tensor) -> torch.Tensor:
        """The mask (*spatial) of averaged probabilities (K or R, *spatial): their arg-max, or a region
        model's decoding (each region painted where its sigmoid exceeds 0.5, in paint order)."""
        if self.regions is None:
            return label_map(probabilities)
        return decode_regions(probabilities, self.regions)

    def predict(self, image: str | Path | Sequence[str | Path] | MetaTensor, case_id: str, keep_probabilities: bool = True) -> Prediction:
        """The mask of one image on its own grid (see :class:`~medseg.engine.results.Prediction`).

        Args:
            image: a file or DICOM folder, or a channel-first ``MetaTensor`` already in memory.
            case_id: its name in messages and results.
            keep_probabilities: also return the class probabilities on the native grid (K times
                the image's memory as float32).
        """
        loaded = isinstance(image, MetaTensor)
        prediction = self.predict_prepared(self.prepare(image, case_id), case_id, keep_probabilities, read=not loaded)
        prediction.qc = self.quality(prediction.volumes_ml, prediction.uncertainty)  # as a batch's row has it
        return prediction

    def prepare(self, image: str | Path | Sequence[str | Path] | MetaTensor, case_id: str) -> dict[Any, Any]:
        """Read (unless ``image`` is already in memory) and preprocess one image, checked against the
        contract: the data :meth:`predict_prepared` takes (the volume with its transform history). A
        model's CT window is left in it, not yet applied, with the scan in its stored integer type
        (:class:`~medseg.data.transforms.DeferredWindowd`; ``apply_deferred_window`` applies it).

        Raises:
            CaseError: the image cannot be read or preprocessed, or does not fit the model.
        """
        loaded = isinstance(image, MetaTensor)
        try:
            data: dict[Any, Any] = self._chains[not loaded]({IMAGE: image if loaded else reader_source(image)})
        except Exception as err:
            raise read_error(case_id if loaded else shown_source(image), err) from err
        check_input_shape(self.model.contract, data[IMAGE].shape, case_id if loaded else shown_source(image))
        return data

    def predict_prepared(self, data: dict[Any, Any], case_id: str, keep_probabilities: bool = True,
                         read: bool = True) -> Prediction:
        """:meth:`predict` from :meth:`prepare`'s data: the network, then the scores back on the input's grid
        (``read``: the data was read from a file, so its history starts with the reader)."""
        chain = self._chains[read]
        volume: MetaTensor = data[IMAGE]
        source = case_label(volume) if read else case_id
        plan = self.scores_plan(volume)
        if plan.bounded:
            return self._predict_bounded(data, chain, case_id, plan, keep_probabilities, owned=read)
        data = apply_deferred_window(data)
        volume = data[IMAGE]
        many = self.options.tta or len(self.model.networks) > 1  # a spread to measure
        spread = self.samples(volume.as_tensor(), keep_spread=many)
        probs = spread.mean
        classes = probs.shape[0]
        consensus = self.label_map(probs)
        sigmoid = self.regions is not None
        uncertainty = {"mean_entropy": mean_foreground_entropy(probs, consensus, sigmoid=sigmoid),
                       "agreement": sample_agreement(spread.labels, consensus, [v for v in self.names if v != 0])}
        maps = []
        if self.options.save_uncertainty:  # inverted with the probabilities, onto the input's grid
            maps.append(voxel_entropy(probs, sigmoid=sigmoid))
            if spread.variance is not None:
                maps.append(spread.variance)
        if self.min_sizes:  # on the network's grid, where the sizes were chosen; the model's uncertainty stays
            probs = self.remove_small_components(probs, consensus)
        stacked = torch.cat([probs, *(m[None] for m in maps)]) if maps else probs
        data[PRED] = MetaTensor(stacked, meta=dict(volume.meta), applied_operations=list(volume.applied_operations))
        native_all = Invertd(keys=PRED, transform=chain, orig_keys=IMAGE, nearest_interp=False)(data)[PRED].as_tensor()
        native = native_all[:classes]
        affine = np.asarray(volume.meta["original_affine"], dtype=np.float64)
        labels = self.label_map(native)
        expected_shape = tuple(int(s) for s in volume.meta["spatial_shape"])
        if tuple(labels.shape) != expected_shape:  # pragma: no cover - Invertd guarantees this; keep it loud
            raise CaseError(f"{source}: prediction shape {tuple(labels.shape)} does not match the input {expected_shape}")
        if self.keep_largest:
            foreground = [k for k in self.names if k != 0]
            labels = KeepLargestConnectedComponent(applied_labels=foreground, independent=True)(labels[None])[0]
        label_array = labels.cpu().numpy().astype(np.uint8 if max(self.names) < 256 else np.uint16)
        voxels, volumes = self.measure(label_array, affine)
        extra = [native_all[classes + i].cpu().numpy().astype(np.float32) for i in range(len(maps))]
        return Prediction(case_id, "segmentation", affine, label_map=label_array,
                          probabilities=native.cpu().numpy().astype(np.float32) if keep_probabilities else None,
                          voxels=voxels, volumes_ml=volumes, uncertainty=uncertainty,
                          entropy=extra[0] if extra else None, variance=extra[1] if len(extra) > 1 else None)

    def scores_plan(self, volume: MetaTensor) -> ScoresPlan:
        """Whether this preprocessed volume's scores are held whole or slab by slab
        (:func:`~medseg.tasks.segmentation.bounded.plan_scores`; ``MEDSEG_PREDICT_SCORES`` =
        auto, full or bounded overrides the choice)."""
        mode = os.environ.get("MEDSEG_PREDICT_SCORES", "auto")
        if mode not in SCORES_MODES:
            raise PredictOptionError(f"MEDSEG_PREDICT_SCORES={mode!r}: use one of {', '.join(SCORES_MODES)}")
        contract = self.model.contract
        dims = int(contract["spatial_dims"])
        overlap = self.options.overlap if self.options.overlap is not None else contract["sliding_window"]["overlap"]
        flips = flip_combinations(dims, self.options.tta, self.flip_axes)
        native = tuple(int(s) for s in volume.meta["spatial_shape"])
        unsupported = self.options.save_uncertainty or (self.min_sizes and resamples(contract))
        plan = plan_scores(contract, tuple(volume.shape[1:]), native, classes=len(self.names) if self.regions is None
                           else len(self.regions.labels), samples=len(flips) * len(self.model.networks),
                           flip_axes=flips, overlap=float(overlap), available=available_memory(),
                           mode="full" if unsupported else mode, resampled=resamples(contract))
        logging.getLogger(__name__).debug("scores: %s (%s)", "slab by slab" if plan.bounded else "full", plan.reason)
        check_scores_memory(plan, case_label(volume), available_memory(), self.options.tta)
        return plan

    def _predict_bounded(self, data: dict[Any, Any], chain: Any, case_id: str, plan: ScoresPlan,
                         keep_probabilities: bool, owned: bool = False) -> Prediction:
        """:meth:`predict` with the scores held one slab at a time (:mod:`~medseg.tasks.segmentation.bounded`).
        ``owned``: the scan was read here (not a caller's tensor), so a single sweep may hand its
        passed rows back (its values are not read after the sweep: the inversion needs its history)."""
        volume: MetaTensor = data[IMAGE]
        axis = plan.axis
        sigmoid = self.regions is not None
        slabs = functools.partial(member_slabs, axis=axis, device=self.device, overlap=self.options.overlap,
                                  amp=autocast_dtype(Precision.AUTO, self.device), sigmoid=sigmoid,
                                  intensity=window_function(data),
                                  capped_classes=None if plan.exact else len(self.names) if self.regions is None
                                  else len(self.regions.labels),
                                  consumed=owned and not self.options.tta and len(self.model.networks) == 1,
                                  bands=plan.bands)
        resample = SlabResampler.for_volume(volume, axis, plan.bands) if resamples(self.model.contract) else None
        if resample is not None:
            resample.start(self.label_map, keep_probabilities, len(self.names))
        result = sweep(self.model.members(), volume.as_tensor(), axis=axis, tta=self.options.tta,
                       flip_axes=self.flip_axes, slabs=slabs, decode=self.label_map, sigmoid=sigmoid,
                       foreground=[v for v in self.names if v != 0],
                       keep_probabilities=keep_probabilities and resample is None,
                       on_slab=resample.add if resample is not None else None, bands=plan.bands,
                       keep_labels=resample is None)
        affine = np.asarray(volume.meta["original_affine"], dtype=np.float64)
        if resample is not None:
            labels, native_probs = resample.finish()
        else:
            labels, native_probs = self._invert_bounded(data, chain, result)
        uncertainty = result.totals.uncertainty()
        del result  # the network grid's labels: the input grid's are all that is needed now
        if self.keep_largest:
            foreground = [k for k in self.names if k != 0]
            labels = KeepLargestConnectedComponent(applied_labels=foreground, independent=True)(labels[None])[0]
        label_array = labels.cpu().numpy().astype(np.uint8 if max(self.names) < 256 else np.uint16, copy=False)
        voxels, volumes = self.measure(label_array, affine)
        return Prediction(case_id, "segmentation", affine, label_map=label_array,
                          probabilities=native_probs.numpy().astype(np.float32, copy=False)
                          if native_probs is not None else None,
                          voxels=voxels, volumes_ml=volumes, uncertainty=uncertainty)

    def _invert_bounded(self, data: dict[Any, Any], chain: Any, result: SweepResult) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network-grid labels (and kept probabilities) of a sweep on the input's grid, for a model
        that does not resample: its inverse moves voxels (orientation, crop), so inverting the labels
        (nearest) gives the labels of the inverted probabilities."""
        volume: MetaTensor = data[IMAGE]
        labels = result.labels
        if labels is None:  # pragma: no cover - the sweep keeps them for a model that does not resample
            raise CaseError(f"{case_label(volume)}: the sweep kept no network-grid labels to invert")
        if self.min_sizes:
            if result.probabilities is not None:
                result.probabilities = self.remove_small_components(result.probabilities, labels)
            labels = torch.from_numpy(remove_small_components(labels.numpy(), self.min_sizes))

        def invert(x: torch.Tensor, nearest: bool) -> torch.Tensor:
            data[PRED] = MetaTensor(x, meta=dict(volume.meta), applied_operations=list(volume.applied_operations))
            return Invertd(keys=PRED, transform=chain, orig_keys=IMAGE, nearest_interp=nearest)(data)[PRED].as_tensor()

        native = invert(labels[None], True)[0].to(torch.uint8 if max(self.names) < 256 else torch.int32)
        probs = invert(result.probabilities, False) if result.probabilities is not None else None
        data.pop(PRED)  # the network grid's labels (or probabilities), not kept beside the input grid's
        expected = tuple(int(s) for s in volume.meta["spatial_shape"])
        if tuple(native.shape) != expected:  # pragma: no cover - Invertd guarantees this; keep it loud
            raise CaseError(f"{case_label(volume)}: prediction shape {tuple(native.shape)} does not match the input {expected}")
        return native, probs

    def remove_small_components(self, probs: torch.Tensor, consensus: torch.Tensor) -> torch.Tensor:
        """``probs`` with the small components of their mask (the contract's ``min_component_size``)
        replaced by the label they take (:func:`~medseg.tasks.segmentation.postprocess.remove_small_components`).

        The probabilities, not the mask, are what is resampled onto the input's grid, so a relabelled
        voxel gets its new label's certain scores: a one-hot softmax, or the sigmoids of the regions
        that hold the new label. The native mask, and the probabilities saved with it, then agree.
        """
        cleaned = torch.from_numpy(remove_small_components(consensus.cpu().numpy(), self.min_sizes))
        changed = cleaned != consensus.cpu()
        if not bool(changed.any()):
            return probs
        new = cleaned[changed].long()
        if self.regions is None:
            scores = torch.nn.functional.one_hot(new, probs.shape[0]).T.to(probs.dtype)
        else:
            scores = torch.stack([torch.isin(new, torch.tensor(labels)) for labels in self.regions.labels]).to(probs.dtype)
        out = probs.clone()
        out[:, changed] = scores
        return out

    def measure(self, label_array: np.ndarray, affine: np.ndarray) -> tuple[dict[str, int], dict[str, float]]:
        """Voxel counts and volumes (mL, or mm² / 1000 for 2D) per foreground label."""
        voxel_ml = voxel_volume_ml(affine, label_array.ndim)
        # counted a few slices at a time: a whole-volume comparison makes a boolean volume per label
        step = max(1, (4 << 20) // max(1, label_array[:1].size))
        voxels = {name: sum(int(np.count_nonzero(label_array[i:i + step] == value))
                            for i in range(0, len(label_array), step))
                  for value, name in self.names.items() if value != 0}
        return voxels, {name: count * voxel_ml for name, count in voxels.items()}

    # ------------------------------------------------------------------------------- one case of a batch

    def expected_outputs(self, case: InputCase, output_dir: Path) -> dict[str, Path]:
        suffixes = {"output": ".nii.gz"}
        if case.kind == "dicom_series" and case.series_uid and dicom_seg_available():
            suffixes["dicom_seg"] = "_seg.dcm"
        if self.options.save_probabilities:
            suffixes["probabilities"] = "_probabilities.nii.gz"
        if self.options.save_uncertainty:
            suffixes["entropy"] = "_entropy.nii.gz"
            if self.options.tta or len(self.model.networks) > 1:  # a variance needs several samples
                suffixes["variance"] = "_variance.nii.gz"
        return output_paths(output_dir, case.case_id, suffixes)  # a long case name shortened, with its hash

    def predict_case(self, case: InputCase, output_dir: Path) -> CaseResult:
        return self.write_case(case, self.infer_case(case, self.read_case(case), output_dir), output_dir)

    # the three steps of predict_case, which an engine may run in different processes (medseg.engine.ray_predict)

    def read_case(self, case: InputCase) -> dict[Any, Any]:
        """Read and preprocess a case: its volume and the transform history its inversion needs, which
        names no transform object of this process (so another process's identical chain inverts it)."""
        data = self.prepare(case.source, case.case_id)
        data[IMAGE] = portable_history(data[IMAGE])
        return data

    def infer_case(self, case: InputCase, data: dict[Any, Any], output_dir: Path) -> Prediction:
        """The network on :meth:`read_case`'s data, its scores reduced to the mask (and the outputs asked
        for) on the input's grid: only these leave the process, never the class scores."""
        keep = "probabilities" in self.expected_outputs(case, output_dir)
        return self.predict_prepared(data, case.case_id, keep_probabilities=keep)

    def write_case(self, case: InputCase, prediction: Prediction, output_dir: Path) -> CaseResult:
        """Write :meth:`infer_case`'s prediction (atomically, the mask last) and the case's report values."""
        paths = self.expected_outputs(case, output_dir)
        label_array = cast(np.ndarray, prediction.label_map)
        outputs: dict[str, str] = {}
        if "dicom_seg" in paths:
            outputs["dicom_seg"] = str(write_dicom_seg(label_array, case.path, case.series_uid or "",
                                                       self.names, paths["dicom_seg"]))
        if "probabilities" in paths:
            write_nifti(np.moveaxis(cast(np.ndarray, prediction.probabilities), 0, -1), prediction.affine, paths["probabilities"])
            outputs["probabilities"] = str(paths["probabilities"])
        for key in ("entropy", "variance"):
            if key in paths:
                write_nifti(cast(np.ndarray, getattr(prediction, key)), prediction.affine, paths[key])
                outputs[key] = str(paths[key])
        # The mask goes last: its presence is what tells a rerun that the case is finished.
        write_nifti(label_array, prediction.affine, paths["output"])
        outputs["output"] = str(paths["output"])
        values = {**self._values(prediction.voxels, prediction.volumes_ml), **prediction.uncertainty}
        values.update(self.quality(prediction.volumes_ml, prediction.uncertainty))
        return CaseResult(case.case_id, case.shown, "ok", outputs=outputs, values=values)

    def quality(self, volumes_ml: dict[str, float], uncertainty: dict[str, float | None]) -> dict[str, Any]:
        """Each label's volume as a z-score against the training split's, and the QC flag with the
        reasons: every threshold (contract's, or the user's ``--qc``) that a score passes."""
        out: dict[str, Any] = {}
        reasons = []
        for name in self.foreground:
            stats = self.volume_stats.get(name)
            if not stats:
                continue
            z = (volumes_ml[name] - stats["mean"]) / max(stats["std"], 1e-9)
            out[f"volume_z_{name}"] = round(z, 3)
            limit = self.qc.get("max_abs_volume_z")
            if limit is not None and abs(z) > limit:
                reasons.append(f"{name} volume z = {z:+.1f} (|z| > {limit:g})")
        entropy, agreement = uncertainty.get("mean_entropy"), uncertainty.get("agreement")
        if entropy is not None and self.qc.get("max_mean_entropy") is not None and entropy > self.qc["max_mean_entropy"]:
            reasons.append(f"mean entropy {entropy:.3f} > {self.qc['max_mean_entropy']:g}")
        if agreement is not None and self.qc.get("min_agreement") is not None and agreement < self.qc["min_agreement"]:
            reasons.append(f"agreement {agreement:.3f} < {self.qc['min_agreement']:g}")
        return {**out, "qc_flag": bool(reasons), "qc_reason": "; ".join(reasons)}

    def values_of_finished(self, case: InputCase, outputs: dict[str, Path]) -> dict[str, Any]:
        existing = cast(nib.Nifti1Image, nib.load(outputs["output"]))
        return self._values(*self.measure(np.asarray(existing.dataobj), np.asarray(existing.affine)))

    def _values(self, voxels: dict[str, int], volumes: dict[str, float]) -> dict[str, Any]:
        return {**{f"voxels_{n}": voxels[n] for n in self.foreground},
                **{f"volume_ml_{n}": round(volumes[n], 4) for n in self.foreground}}

    def summarise(self, results: Sequence[CaseResult]) -> tuple[dict[str, Any], dict[str, float]]:
        done = [r for r in results if r.status in ("ok", "skipped")]
        notes = [] if dicom_seg_available() or not any(r.input and Path(r.input).is_dir() for r in results) else [
            "DICOM SEG not written: install medseg[dicom-seg] (highdicom)"]
        totals = {n: sum(float(r.values.get(f"volume_ml_{n}") or 0.0) for r in done) for n in self.foreground}
        return {"volume_ml_total": totals, "task_notes": notes}, {}
