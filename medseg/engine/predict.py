"""Batch prediction: load a model once, then run every scan of a folder through its task.

The one driver every task plugs into. It owns what is the same for all of them: discovery of
the scans, sharding (``num_parts``), skipping finished cases or redoing them (``overwrite``),
per-case error isolation (one bad scan is reported, the rest go on), the report (one row per
case, appended as each case ends so a crash keeps what is done, then written whole atomically:
:mod:`medseg.engine.report`), the summary and the MLflow inference run. A task supplies a :class:`CasePredictor`: the files a case produces, and
how to predict and write one case. An output at an fsspec URI (``s3://bucket/prefix``) is this
driver's too: the folder here stages the batch's files, and a
:class:`~medseg.engine.results.PublishingCasePredictor` puts each case's files at the URI
(:mod:`medseg.engine.remote_output`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from medseg._version import __version__ as medseg_version
from medseg.engine.case_io import mean_or_none, peak_rss_mb
from medseg.engine.model_loading import LoadedModel
from medseg.engine.report import ReportAppender, finished_rows
from medseg.engine.results import (
    COMMON_COLUMNS,
    BatchReport,
    CasePredictor,
    CaseResult,
    PredictOptions,
    PublishingCasePredictor,
)
from medseg.engine.review import write_qc_summary, write_review
from medseg.errors import (
    CaseError,
    MedsegError,
    RunError,
    UsageError,
)
from medseg.io.atomic import atomic_write_text
from medseg.io.discovery import Discovery, InputCase, discover, discover_entries
from medseg.io.locks import open_lock_file, read_holder, write_holder
from medseg.io.uris import check_uri, fetched, file_uri_path, uri_scheme

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------- the batch


def discover_inputs(input_dir: Path, channels: int | None = None) -> Discovery:
    """The scans under ``input_dir``; ``channels`` (the model contract's ``in_channels``) decides
    which files are the channel files of one case (:func:`medseg.io.discovery.group_channel_files`).

    A ``.csv`` or ``.parquet`` file is a table of scans: its ``path`` column names them (files,
    DICOM series folders; relative paths are read from the table's folder; ``file://`` URIs; other
    fsspec URIs such as ``s3://bucket/scan.nii.gz``, fetched when the case is read), and a path that
    does not exist is a failed case of its own (:func:`medseg.io.discovery.discover_entries`).

    Raises:
        UsageError: the input does not exist or holds no scans; a table without a ``path`` column.
    """
    if input_dir.is_file() and input_dir.suffix.lower() in PATH_TABLES:
        found = discover_entries(read_path_table(input_dir), channels)
        if not found.cases:
            raise UsageError(f"--input {input_dir}: the table lists no paths; give one scan per row in its 'path' column")
        return found
    try:
        found = discover(input_dir, channels)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    for note in found.notes:
        log.info("%s", note)
    if not found.cases:
        raise UsageError(f"--input {input_dir}: no scans found (NIfTI, MHA, NRRD or DICOM), recursively")
    return found


#: How the cases of a batch are run: ``(predictor, cases, output_dir, options, previous rows by case id,
#: report path, start time) -> one result per case, in case order``. :func:`run_cases` runs them here,
#: one after the other; :mod:`medseg.engine.ray_predict` runs them on Ray Data actors.
CaseRunner = Callable[[CasePredictor, Sequence[InputCase], Path, PredictOptions, dict[str, dict[str, str]], Path, float],
                      list[CaseResult]]


#: Table files whose ``path`` column lists the scans of a batch (``--input cases.csv``).
PATH_TABLES = (".csv", ".parquet")


def read_path_table(table: Path) -> list[Path | str]:
    """The scans a ``.csv``/``.parquet`` table lists in its ``path`` column: local paths (relative ones
    from its folder, ``file://`` URIs as the paths they name), and other URIs as text (their schemes
    checked here, before any case runs).

    Raises:
        UsageError: the table cannot be read, has no ``path`` column (the columns it has are named), or
            names a URI no installed file system reads (naming it and the package to install).
    """
    import pandas as pd

    try:
        frame = pd.read_parquet(table) if table.suffix.lower() == ".parquet" else pd.read_csv(table, dtype=str)
    except ImportError as err:
        raise UsageError(f"--input {table}: reading Parquet needs pyarrow ({err}); pip install pyarrow, or give "
                         "a CSV") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"--input {table}: not a readable table ({type(err).__name__}: {err}); give a CSV or "
                         "Parquet file with a 'path' column, one scan per row") from None
    if "path" not in frame.columns:
        raise UsageError(f"--input {table}: expected a 'path' column (one scan per row), found columns "
                         f"{list(frame.columns)[:20]}; rename the column of scan paths to 'path'")
    entries: list[Path | str] = []
    for text in (str(p).strip() for p in frame["path"] if isinstance(p, str) and p.strip()):
        scheme = uri_scheme(text)
        if scheme == "file":
            entries.append(file_uri_path(text, f"--input {table}"))
        elif scheme is not None:
            check_uri(text, f"--input {table}")
            entries.append(text)
        else:
            entries.append(Path(text) if Path(text).is_absolute() else table.parent / text)
    return entries


def predict_folder(predictor: CasePredictor, model: LoadedModel, input_dir: Path, output_dir: Path,
                   options: PredictOptions, device: torch.device, tracker: Any | None = None,
                   found: Discovery | None = None, runner: CaseRunner | None = None) -> BatchReport:
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
        runner: what runs the cases (default :func:`run_cases`, in this process); the folder's lock,
            resume, report, summary, review page and MLflow run are the same whichever runs them.

    Raises:
        UsageError: missing input or an empty input folder, or ``output_dir`` inside an input folder.
    """
    found = found or discover_inputs(input_dir, model.contract.get("in_channels"))
    check_output_outside_inputs(output_dir, found.folders)
    cases = found.cases[options.part_id::options.num_parts]
    output_dir.mkdir(parents=True, exist_ok=True)
    suffix = shard_suffix(options)
    with _only_writer(output_dir, suffix):
        return _predict_cases(predictor, model, input_dir, output_dir, options, device, tracker, found, cases, suffix,
                              runner or run_cases)


def shard_suffix(options: PredictOptions) -> str:
    """What a shard's batch files add to their names (``predictions_part0of4.csv``); "" unsharded."""
    return f"_part{options.part_id}of{options.num_parts}" if options.num_parts > 1 else ""


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


def run_cases(predictor: CasePredictor, cases: Sequence[InputCase], output_dir: Path, options: PredictOptions,
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
                    results.append(predict_one_case(predictor, case, output_dir, options.overwrite,
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
    if isinstance(predictor, PublishingCasePredictor):
        # the outputs are at the destination: their thumbnails are made from copies fetched beside the
        # page, whose links then name them relative to it, as they will be once the page is put there
        with predictor.local_copies(results, review_path.parent) as copies:
            return _write_review_page(predictor, model, report, copies, thresholds, qc_path, review_path, progress)
    return _write_review_page(predictor, model, report, results, thresholds, qc_path, review_path, progress)


def _write_review_page(predictor: CasePredictor, model: LoadedModel, report: BatchReport, results: list[CaseResult],
                       thresholds: dict[str, float], qc_path: Path, review_path: Path, progress: bool) -> Path | None:
    try:
        write_review(results, review_path, task=model.task, model_uri=model.uri, labels=model.label_names,
                     output_columns=predictor.output_columns, value_columns=predictor.value_columns,
                     qc_thresholds=thresholds, progress=progress, contract=model.contract,
                     links={report.report.name: report.report, report.summary.name: report.summary,
                            qc_path.name: qc_path})
    except Exception as err:  # noqa: BLE001 - see the docstring
        log.warning("review page %s not written: %s: %s", review_path, type(err).__name__, err)
        return None
    return review_path


def _predict_cases(predictor: CasePredictor, model: LoadedModel, input_dir: Path, output_dir: Path,
                   options: PredictOptions, device: torch.device, tracker: Any | None, found: Discovery,
                   cases: Sequence[InputCase], suffix: str, runner: CaseRunner) -> BatchReport:
    if isinstance(predictor, PublishingCasePredictor):  # the output folder stages a URI's batch files
        predictor.stage(output_dir, suffix, model, options.overwrite)
    else:
        claim_output_folder(output_dir, model, options.overwrite)
    remove_case_temporaries(predictor, cases, output_dir, suffix)
    report_path = output_dir / f"predictions{suffix}.csv"
    previous = {} if options.overwrite else finished_rows(report_path)
    started = time.monotonic()
    results = runner(predictor, cases, output_dir, options, previous, report_path, started)
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
    # with an output URI the batch files are put there after this (remote_output.publish_batch): name them there
    destination = predictor.destination if isinstance(predictor, PublishingCasePredictor) else None
    output = destination or str(output_dir)

    def shown(path: Path) -> str:
        return f"{destination}/{path.name}" if destination else str(path)

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
        "output": output,
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
        "qc_summary": shown(qc_path),
        "review": shown(review_path) if review_path is not None else None,
        **task_summary,
    }
    atomic_write_text(report.summary, json.dumps(summary, indent=2))
    if tracker is not None:
        tracker.set_tags({"source_run_id": model.source_run_id or "", "model_uri": model.uri})
        tracker.log_params({"model_uri": model.uri, "backend": model.backend, "input": str(input_dir), "output": output,
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


def claim_output_folder(output_dir: Path, model: LoadedModel, overwrite: bool) -> None:
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


def predict_one_case(predictor: CasePredictor, case: InputCase, output_dir: Path, overwrite: bool,
                     previous_row: dict[str, str] | None) -> CaseResult:
    """One case, isolated: skipped when its outputs exist (unless ``overwrite``), else predicted and
    written; any failure is the case's ``failed`` result with the reason, never an exception."""
    started = time.monotonic()
    try:
        done = finished_case(predictor, case, output_dir, overwrite, previous_row)
        if done is not None:
            done.seconds = time.monotonic() - started
            return done
        with readable(case) as local:
            result = predictor.predict_case(local, output_dir)
    except Exception as err:  # one bad case must not stop the batch
        return failed_case(case, output_dir, err, time.monotonic() - started)
    result.input, result.seconds = case.shown, time.monotonic() - started
    return result


@contextmanager
def readable(case: InputCase) -> Iterator[InputCase]:
    """``case`` as the readers take it: a case named by URI has its object fetched to a local file
    first (removed on exit), and a message about that copy names the URI instead.

    Raises:
        CaseError: the object cannot be fetched, or the case fails with the copy's name in its message.
    """
    if case.uri is None:
        yield case
        return
    with fetched(case.uri) as local:
        try:
            yield replace(case, path=local)
        except MedsegError as err:
            if str(local) not in str(err):
                raise
            raise CaseError(str(err).replace(str(local), case.uri)) from err


def finished_case(predictor: CasePredictor, case: InputCase, output_dir: Path, overwrite: bool,
                  previous_row: dict[str, str] | None) -> CaseResult | None:
    """The ``skipped`` result of a case an earlier run finished (unless ``overwrite``), else None.

    Raises:
        CaseError: the case cannot be predicted (discovery's problem with it, or an output that would
            replace its own input).
    """
    if case.problem:
        raise CaseError(case.problem)
    expected = predictor.expected_outputs(case, output_dir)
    _refuse_writing_over_inputs(case, expected)
    if isinstance(predictor, PublishingCasePredictor):  # the outputs are (or are not) at the destination
        where = predictor.published(expected) if expected and not overwrite else None
        finished = where is not None if expected else previous_row is not None
    else:
        where = {k: str(p) for k, p in expected.items()}
        finished = all(p.exists() for p in expected.values()) if expected else previous_row is not None
    if not finished or overwrite:
        return None
    # Outputs are only ever renamed into place complete, so existing ones are finished work;
    # their values come from the earlier report (or the files), so the report stays whole.
    values = ({k: previous_row.get(k, "") for k in predictor.value_columns} if previous_row is not None
              else predictor.values_of_finished(case, expected))
    return CaseResult(case.case_id, case.shown, "skipped", "output exists (use --overwrite to redo)", 0.0,
                      where or {}, values)


def failed_case(case: InputCase, output_dir: Path, err: Exception, seconds: float) -> CaseResult:
    """The ``failed`` result of a case whose prediction raised ``err``, its message naming the input."""
    source = case.uri or case.path
    if isinstance(err, OSError):
        # A failed write (disk full, read-only folder): say where and what to do, not the temp file's
        # name. Any other OSError (an input that cannot be opened) keeps its own cause below.
        message = (write_error(source, output_dir, err) if _is_write_failure(err, output_dir)
                   else f"{source}: {type(err).__name__}: {err}")
    else:
        message = str(err) if isinstance(err, MedsegError) else f"{source}: {type(err).__name__}: {err}"
    log.warning("case %s failed: %s", case.case_id, message)
    return CaseResult(case.case_id, case.shown, "failed", message, seconds)


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


def remove_case_temporaries(predictor: CasePredictor, cases: Sequence[InputCase], output_dir: Path,
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
