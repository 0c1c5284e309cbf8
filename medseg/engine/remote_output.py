"""Batch prediction into an fsspec URI (``--output s3://bucket/prefix``), on either engine.

The writers write local files, so each case is written by the task into a private temporary
folder on the machine that writes it (the driver, or a Ray worker) and its files are then put at
the destination one by one, the main output last (:class:`~medseg.io.remote_folder.RemoteFolder`:
each put is whole or nothing). The contract is the local folder's: a case's outputs at the
destination mean it is finished, so a rerun predicts only the cases whose outputs are missing
there; a case that cannot be written is a failed row.

The batch's own files (``predictions.csv``, ``predict_summary.json``, ``qc_summary.json``,
``review.html``) are written on the driver into a staging folder of this user's
(``$MEDSEG_CACHE_DIR/outputs/<hash of the URI>``), locked there as a local output folder is, and put
at the destination when the batch ends (the summary last); the rerun of a batch killed before
then finds its finished cases by their outputs. Two machines writing one URI are not stopped from
doing so (an object store has no lock): share the work with ``--num-parts``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, cast

from monai.data import MetaTensor

from medseg.engine.model_loading import LoadedModel
from medseg.engine.predict import MODEL_STAMP, claim_output_folder
from medseg.engine.results import (
    BatchReport,
    CasePredictor,
    CaseResult,
    Prediction,
    PublishingCasePredictor,
    StagedCasePredictor,
)
from medseg.errors import CaseError, MedsegError, RunError
from medseg.io.discovery import InputCase
from medseg.io.remote_folder import RemoteFolder
from medseg.tracking.wheel import cache_root, private_folder

log = logging.getLogger(__name__)


class RemoteOutput(PublishingCasePredictor):
    """A task's case predictor whose outputs are put at ``folder`` (a
    :class:`~medseg.engine.results.PublishingCasePredictor`); the task's own is ``inner``."""

    def __init__(self, inner: CasePredictor, folder: RemoteFolder):
        self.inner, self.folder = inner, folder
        self.destination = folder.uri
        self.output_columns = inner.output_columns
        self.value_columns = inner.value_columns
        self.qc = getattr(inner, "qc", None)  # the task's QC thresholds, which the batch's summary reports

    def expected_outputs(self, case: InputCase, output_dir: Path) -> dict[str, Path]:
        return self.inner.expected_outputs(case, output_dir)

    def stage(self, output_dir: Path, suffix: str, model: LoadedModel, overwrite: bool) -> None:
        """The destination's report (the rows of its finished cases) and model stamp fetched into the
        staging folder, then this model's stamp put at the destination first, so a destination that
        cannot be written, or holds another model's outputs, is refused before any case runs."""
        for name in _batch_files(suffix):  # an earlier batch's page or summary must not be put with this one's
            (output_dir / name).unlink(missing_ok=True)
        try:
            for name in (f"predictions{suffix}.csv", MODEL_STAMP):
                self.folder.fetch(name, output_dir / name)
            claim_output_folder(output_dir, model, overwrite)
            self.folder.put(output_dir / MODEL_STAMP, MODEL_STAMP)
            # the puts a killed batch left: every one unsharded; a shard's own batch files only (another
            # shard may be putting its cases now)
            self.folder.remove_temporaries(_batch_files(suffix) if suffix else None)
        except MedsegError:  # another model's outputs there: claim_output_folder's own message
            raise
        except Exception as err:  # the file systems raise their own types (botocore's, gcsfs's), not only OSError
            raise RunError(f"--output {self.folder.uri}: cannot read and write there ({type(err).__name__}: {err}). "
                           "Check the URI, that your credentials may write there (AWS_PROFILE, "
                           "GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*...) and that the storage is reachable; "
                           "or give a local folder") from None

    def published(self, expected: dict[str, Path]) -> dict[str, str] | None:
        # output_paths puts every output directly in the folder: its name is its key at the destination
        if not all(self.folder.exists(path.name) for path in expected.values()):
            return None
        return {column: self.folder.uri_of(path.name) for column, path in expected.items()}

    def predict(self, image: str | Path | MetaTensor, case_id: str) -> Prediction:
        return self.inner.predict(image, case_id)

    def predict_case(self, case: InputCase, output_dir: Path) -> CaseResult:
        with TemporaryDirectory(prefix="medseg-publish-") as staging:
            return self._publish(case, self.inner.predict_case(case, Path(staging)), Path(staging))

    def values_of_finished(self, case: InputCase, outputs: dict[str, Path]) -> dict[str, Any]:
        """Read back from the destination's files (fetched here) when the earlier report is lost."""
        with TemporaryDirectory(prefix="medseg-fetch-") as folder:
            local = {column: Path(folder) / path.name for column, path in outputs.items()}
            for column, path in outputs.items():
                self.folder.fetch(path.name, local[column])
            return self.inner.values_of_finished(case, local)

    def summarise(self, results: Sequence[CaseResult]) -> tuple[dict[str, Any], dict[str, float]]:
        return self.inner.summarise(results)

    @contextmanager
    def local_copies(self, results: Sequence[CaseResult], folder: Path) -> Iterator[list[CaseResult]]:
        fetched: list[Path] = []
        try:
            copies = []
            for result in results:
                local = {}
                for column, uri in result.outputs.items():
                    name = uri.removeprefix(f"{self.folder.uri}/")
                    try:
                        if name == uri or not self.folder.fetch(name, folder / name):
                            continue
                    except Exception as err:  # noqa: BLE001 - a convenience page: that case shows no thumbnail
                        log.warning("review page: %s not fetched (%s: %s)", uri, type(err).__name__, err)
                        continue
                    fetched.append(folder / name)
                    local[column] = str(folder / name)
                copies.append(replace(result, outputs=local))
            yield copies
        finally:
            for path in fetched:
                path.unlink(missing_ok=True)

    def _publish(self, case: InputCase, result: CaseResult, staging: Path) -> CaseResult:
        """Put a case's written outputs at the destination, the main one last (its presence is what
        tells a rerun that the case is finished), and name them there in its row."""
        if result.status != "ok" or not result.outputs:
            return result
        main = next(column for column in (*self.output_columns, *result.outputs) if column in result.outputs)
        order = [column for column in result.outputs if column != main] + [main]
        published = {}
        for column in order:
            local = Path(result.outputs[column])
            name = local.relative_to(staging).as_posix()
            try:
                published[column] = self.folder.put(local, name)
            except Exception as err:  # the file systems raise their own types (botocore's, gcsfs's)
                raise CaseError(f"{case.uri or case.path}: putting its output {name} at {self.folder.uri} failed "
                                f"({type(err).__name__}: {err}). Check that this worker's credentials may write "
                                "there and that the storage is reachable; nothing half-written is there, and a "
                                "rerun predicts this case again") from err
        return replace(result, outputs={column: published[column] for column in result.outputs})


class StagedRemoteOutput(RemoteOutput):
    """:class:`RemoteOutput` of a staged case predictor: the Ray engine reads, runs the network and
    writes in different workers; the writing worker puts the outputs at the destination."""

    @property
    def staged(self) -> StagedCasePredictor:
        return cast(StagedCasePredictor, self.inner)

    def read_case(self, case: InputCase) -> Any:
        return self.staged.read_case(case)

    def infer_case(self, case: InputCase, read: Any, output_dir: Path) -> Any:
        return self.staged.infer_case(case, read, output_dir)

    def write_case(self, case: InputCase, inferred: Any, output_dir: Path) -> CaseResult:
        with TemporaryDirectory(prefix="medseg-publish-") as staging:
            return self._publish(case, self.staged.write_case(case, inferred, Path(staging)), Path(staging))


def publishing(inner: CasePredictor, folder: RemoteFolder) -> RemoteOutput:
    """``inner`` with its outputs put at ``folder``, staged (three Ray stages) when ``inner`` is."""
    return StagedRemoteOutput(inner, folder) if isinstance(inner, StagedCasePredictor) else RemoteOutput(inner, folder)


def publishing_factory(make_predictor: Any, uri: str) -> CasePredictor:
    """What each Ray worker builds: the task's case predictor putting its outputs at ``uri`` (opened in
    the worker, with the worker's credentials). Use it as ``functools.partial(publishing_factory, f, uri)``."""
    return publishing(make_predictor(), RemoteFolder.open(uri))


# ----------------------------------------------------------------------------------- the batch's files


def staging_folder(folder: RemoteFolder) -> Path:
    """This user's local folder for the batch files of ``folder`` (one per destination URI): the output
    folder the driver locks and writes the report, summary and review page into."""
    return private_folder(cache_root() / "outputs" / hashlib.sha256(folder.uri.encode()).hexdigest()[:16])


def _batch_files(suffix: str) -> set[str]:
    return {f"predictions{suffix}.csv", f"predict_summary{suffix}.json", f"review{suffix}.html",
            f"qc_summary{suffix}.json", MODEL_STAMP}


def publish_batch(report: BatchReport, folder: RemoteFolder) -> BatchReport:
    """Put the batch's files at the destination, the summary last (its presence says the batch ended);
    the report returned names the destination.

    Raises:
        RunError: a file could not be put; every case's outputs are there, and a rerun redoes none.
    """
    staged = report.summary.parent
    suffix = report.summary.stem.removeprefix("predict_summary")
    names = [f"qc_summary{suffix}.json", f"review{suffix}.html", report.report.name, report.summary.name]
    for name in names:
        if (staged / name).is_file():
            try:
                folder.put(staged / name, name)
            except Exception as err:  # the file systems raise their own types
                raise RunError(f"--output {folder.uri}: putting {name} there failed ({type(err).__name__}: {err}); "
                               f"every finished case's outputs are there, and this machine's copy is {staged / name}. "
                               "Run again to write it (finished cases are skipped)") from err
    return replace(report, destination=folder.uri)
