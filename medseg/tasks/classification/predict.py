"""Batch classification of a folder of images: one CSV row per image with the class probabilities.

The same columns as the evaluation stage's per-case CSV (``case_id, label, predicted,
prob_<class>...``; ``label`` stays empty here), plus the input path, status and error. The CSV
is rewritten atomically after each image, so a crash keeps what is done, and a rerun skips the
images it already has (``--overwrite`` redoes them).
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose, Resized

from medseg.config import Precision
from medseg.data.transforms import IMAGE
from medseg.engine.runtime import autocast, autocast_dtype
from medseg.errors import MedsegError
from medseg.io.atomic import atomic_write_text
from medseg.io.discovery import InputCase
from medseg.tasks.classification.metrics import class_probabilities

log = logging.getLogger(__name__)

FIXED_FIELDS = ("case_id", "label", "predicted", "predicted_name")
TRAILING_FIELDS = ("input", "status", "error", "seconds")


@dataclass
class ClassifiedCase:
    case_id: str
    input: str
    status: str  # ok | failed | skipped
    error: str = ""
    seconds: float = 0.0
    probabilities: dict[str, float] = field(default_factory=dict)
    predicted: int | None = None
    predicted_name: str = ""


def classification_preprocessing(contract: dict[str, Any], base: Compose) -> Compose:
    """The contract's deterministic chain followed by the resize to the network input."""
    chain = list(base.transforms)
    if contract.get("resize"):
        chain.append(Resized(keys=IMAGE, spatial_size=list(contract["resize"]), mode="area"))
    return Compose(chain)


@torch.no_grad()
def classify_image(model: Any, image: torch.Tensor, device: torch.device, tta: bool) -> torch.Tensor:
    """Class probabilities (K,) averaged over the ensemble's members and, with ``tta``, all axis flips."""
    dims = model.contract["spatial_dims"]
    head = model.contract.get("output_activation", "softmax")
    amp = autocast_dtype(Precision.AUTO, device)
    x = image[None].to(device)
    flips = [c for r in range(1, dims + 1) for c in itertools.combinations(range(2, dims + 2), r)] if tta else []
    total = None
    count = 0
    for network, _ in model.members():
        for axes in [(), *flips]:
            with autocast(amp, device):
                logits = network(x.flip(axes) if axes else x)
            probs = class_probabilities(logits, head)[0].cpu()
            total = probs if total is None else total + probs
            count += 1
    return total / count  # type: ignore[operator]


def previous_rows(path: Path) -> dict[str, dict[str, str]]:
    """Rows of an earlier run's CSV that finished (status ok or skipped), by case id."""
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {row["case_id"]: row for row in csv.DictReader(fh) if row.get("status") in ("ok", "skipped")}


def classify_cases(model: Any, cases: Sequence[InputCase], pre: Compose, device: torch.device, report_path: Path,
                   tta: bool, overwrite: bool, check_input: Any, progress_bar: Any) -> list[ClassifiedCase]:
    """Classify every case, one CSV row each; a failing case is recorded and the rest go on."""
    names = {int(k): v for k, v in model.contract["labels"].items()}
    done = {} if overwrite else previous_rows(report_path)
    results: list[ClassifiedCase] = []
    for case in progress_bar(cases):
        started = time.monotonic()
        if case.case_id in done:
            row = done[case.case_id]
            results.append(ClassifiedCase(case.case_id, str(case.path), "skipped", "already classified (use "
                                          "--overwrite to redo)", 0.0,
                                          {n: float(row[f"prob_{n}"]) for n in names.values()},
                                          int(row["predicted"]), row["predicted_name"]))
        else:
            try:
                if case.problem:
                    raise MedsegError(case.problem)
                try:
                    image = pre({IMAGE: str(case.path)})[IMAGE]
                except Exception as err:
                    root = _root_cause(err)
                    text = str(root).strip().splitlines()[-1][:300] if str(root).strip() else ""
                    raise MedsegError(f"{case.path}: could not be read or preprocessed ({type(root).__name__}: "
                                      f"{text}). Check that it is a complete NIfTI/DICOM/MHA/NRRD image") from err
                check_input(model, image, case)
                probs = classify_image(model, torch.as_tensor(image), device, tta)
                k = int(probs.argmax())
                results.append(ClassifiedCase(case.case_id, str(case.path), "ok", "", time.monotonic() - started,
                                              {n: float(probs[i]) for i, n in names.items()}, k, names[k]))
            except Exception as err:  # one bad image must not stop the batch
                message = str(err) if isinstance(err, MedsegError) else f"{case.path}: {type(err).__name__}: {err}"
                log.warning("case %s failed: %s", case.case_id, message)
                results.append(ClassifiedCase(case.case_id, str(case.path), "failed", message,
                                              time.monotonic() - started))
        write_report(results, names, report_path)
    return results


def _root_cause(err: BaseException) -> BaseException:
    """The innermost cause: MONAI wraps a reader's error in "applying transform ..." layers."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def write_report(results: Sequence[ClassifiedCase], names: dict[int, str], path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*FIXED_FIELDS, *[f"prob_{n}" for n in names.values()], *TRAILING_FIELDS])
    for r in results:
        writer.writerow([r.case_id, "", "" if r.predicted is None else r.predicted, r.predicted_name,
                         *[f"{r.probabilities[n]:.6f}" if n in r.probabilities else "" for n in names.values()],
                         r.input, r.status, r.error, f"{r.seconds:.4f}"])
    return atomic_write_text(path, buffer.getvalue())
