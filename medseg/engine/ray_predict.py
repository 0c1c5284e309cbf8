"""Batch prediction on Ray Data: the cases of a batch run through Ray Data stages, the network on a
pool of actors that each load the model once, instead of one after the other in this process.

Everything else is :func:`medseg.engine.predict.predict_folder`'s: discovery, the output folder's
lock and model stamp, resume (a case whose outputs exist is skipped), ``predictions.csv`` (one row
appended as each case ends, then written whole in case order), ``predict_summary.json``,
``review.html`` and the MLflow run. Only the :data:`~medseg.engine.predict.CaseRunner` differs:
:class:`RayCaseRunner` turns the cases into a Ray Dataset (one row per case) and maps it with
``map_batches`` through three stages (:mod:`medseg.engine.ray_stages`) when the task's case
predictor is staged (:class:`~medseg.engine.results.StagedCasePredictor`; segmentation is):

1. **read**: resume (a finished case becomes its ``skipped`` row), then reading and preprocessing
   (``read_case``), on CPU workers (``io_actors`` of ``io_cpus`` each);
2. **network**: ``infer_case`` on the model's actors (``actors`` of ``cpus_per_actor`` and
   ``gpus_per_actor`` each), which reduce the class scores to the mask on the input's grid before
   anything leaves them: a preprocessed volume goes in, a mask (and the outputs asked for) comes out,
   never the scores (K float32 volumes);
3. **write**: ``write_case`` (atomic writes, the mask last) on CPU workers; with an output URI
   (``s3://bucket/prefix``) each worker puts the files it wrote there (:mod:`medseg.engine.remote_output`).

The steps are the very methods the local path's ``predict_case`` chains, so the outputs are the local
path's bit for bit on the same arithmetic (thread count). Another task's case predictor runs as one
stage (:func:`~medseg.engine.predict.predict_one_case` on the model's actors). A failing case is a
failed row in whichever stage it fails, never a failed job; later stages pass its row on.

Each actor takes one case at a time (``batch_size=1``, one task in flight), so it holds one case's
data; between stages, cases wait in Ray's object store under Ray Data's backpressure (spilled to
disk past its budget), a preprocessed volume as its float32 array with its transform history.

A worker that dies (``kill -9``, the kernel's OOM killer, a crash in native code) is restarted by
Ray and its case retried (``max_restarts=-1``, ``max_task_retries``); a case whose every try killed
its worker is a failed row saying so (Ray Data's ``max_errored_blocks``), the others go on. Writes
are atomic, so a killed write leaves a temp file and never a half-written output; the driver
removes this batch's temp files once the actors are done.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medseg.config import StrEnum
from medseg.engine.predict import CaseRunner, remove_case_temporaries, write_error
from medseg.engine.ray_stages import (
    CaseActor,
    CasePredictorFactory,
    NetworkStage,
    ReadStage,
    WriteStage,
    case_rows,
    result_from_json,
)
from medseg.engine.report import ReportAppender
from medseg.engine.results import (
    COMMON_COLUMNS,
    BatchReport,
    CasePredictor,
    CaseResult,
    PredictOptions,
    StagedCasePredictor,
)
from medseg.errors import RunError, UsageError
from medseg.io.atomic import atomic_write_text
from medseg.io.discovery import InputCase

log = logging.getLogger(__name__)

#: Where a Ray cluster is named when no address is given (Ray's own variable).
RAY_ADDRESS_ENV = "RAY_ADDRESS"


class Engine(StrEnum):
    """What runs the cases of a batch: this process (the default), or Ray Data actors."""

    LOCAL = "local"
    RAY = "ray"


def parse_engine(name: str) -> Engine:
    """Raises:
        UsageError: an engine medseg does not have, naming the ones it has.
    """
    try:
        return Engine(name)
    except ValueError:
        raise UsageError(f"--engine {name!r}: unknown; use one of {', '.join(e.value for e in Engine)}") from None


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray engine runs.

    Attributes:
        address: a running cluster (``ray://head:10001``, ``auto``, ``host:6379``); None:
            ``$RAY_ADDRESS``, else a local Ray runtime started for this batch and stopped after it.
        actors: actors in the pool (each loads the model once and predicts one case at a time).
        cpus_per_actor: CPUs Ray reserves for each actor (also torch's thread count in it).
        gpus_per_actor: GPUs per actor (0: CPU actors; 1: one GPU each; 0.5: two actors share one).
        local_cpus: CPUs of a local runtime (default: this machine's); ignored with ``address``.
        task_retries: how many times a case whose worker died is tried again on a restarted actor.
        dashboard: start Ray's dashboard with a local runtime (http://127.0.0.1:8265).
        io_actors: workers of the read and of the write stage each (None: as many as ``actors``).
        io_cpus: CPUs Ray reserves for each of them (0: they share the CPUs the model's actors leave;
            give 1 or more on a cluster whose CPU nodes should do the reading and writing).
    """

    address: str | None = None
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    local_cpus: int | None = None
    task_retries: int = 2
    dashboard: bool = False
    io_actors: int | None = None
    io_cpus: float = 0.0

    def check(self) -> None:
        """Raises:
            UsageError: a count or resource that cannot be, naming the flag and the fix.
        """
        if self.actors < 1:
            raise UsageError(f"--ray-actors {self.actors}: must be at least 1 (the actors in Ray's pool)")
        if self.cpus_per_actor <= 0:
            raise UsageError(f"--ray-cpus-per-actor {self.cpus_per_actor:g}: must be > 0, e.g. 1 or 4")
        if self.gpus_per_actor < 0:
            raise UsageError(f"--ray-gpus-per-actor {self.gpus_per_actor:g}: must be >= 0 (0: CPU actors)")
        if self.io_actors is not None and self.io_actors < 1:
            raise UsageError(f"--ray-io-actors {self.io_actors}: must be at least 1 (workers reading and writing)")
        if self.io_cpus < 0:
            raise UsageError(f"--ray-io-cpus {self.io_cpus:g}: must be >= 0 (0: share the actors' CPUs)")
        if self.task_retries < 0:
            raise UsageError(f"task_retries {self.task_retries}: must be >= 0")
        if self.local_cpus is not None and self.local_cpus < self.actors * self.cpus_per_actor:
            raise UsageError(f"--ray-local-cpus {self.local_cpus}: {self.actors} actor(s) x {self.cpus_per_actor:g} "
                             f"CPU(s) need {self.actors * self.cpus_per_actor:g}; give more CPUs or fewer actors")


def import_ray() -> Any:
    """The ``ray`` module, with ``ray.data``.

    Raises:
        UsageError: Ray is not installed, with the install command.
    """
    try:
        import ray
        import ray.data  # noqa: F401 - the engine's part of Ray; its absence is what the message names
    except ImportError as err:
        raise UsageError(f"--engine ray: Ray Data is not installed ({err}). Install it with "
                         "pip install 'medseg[ray]' (or pip install 'ray[data]'), or use --engine local") from None
    return ray


@contextmanager
def ray_runtime(options: RayOptions) -> Iterator[Any]:
    """Ray, connected: the runtime already initialised in this process, the cluster at ``options.address``
    (or ``$RAY_ADDRESS``), or a local runtime started here (quiet, no dashboard unless asked) and
    stopped on the way out. Yields the ``ray`` module."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    address = options.address or os.environ.get(RAY_ADDRESS_ENV) or None
    quiet = {"logging_level": logging.WARNING, "configure_logging": True}
    if address:
        log.info("Ray: connecting to %s", address)
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=options.local_cpus or os.cpu_count() or 1, include_dashboard=options.dashboard, **quiet)
    try:
        if not address:  # a cluster may grow (an autoscaler); this machine will not
            check_fits(options, ray.cluster_resources())
        yield ray
    finally:
        ray.shutdown()


def check_fits(options: RayOptions, resources: dict[str, float]) -> None:
    """Refuse a pool the local runtime cannot hold (Ray would wait for it forever).

    Raises:
        UsageError: names what the actors need, what this machine has, and the flags to change.
    """
    for kind, each, flag in (("CPU", options.cpus_per_actor, "--ray-cpus-per-actor"),
                             ("GPU", options.gpus_per_actor, "--ray-gpus-per-actor")):
        need, have = options.actors * each, float(resources.get(kind, 0.0))
        if need > have:
            raise UsageError(f"--ray-actors {options.actors} x {flag} {each:g} need {need:g} {kind}(s); the local Ray "
                             f"runtime has {have:g}. Use fewer actors or less per actor, or a cluster (--ray-address)")


def case_runner(engine: Engine | str, make_predictor: CasePredictorFactory,
                options: RayOptions | None = None) -> CaseRunner | None:
    """The runner for ``engine``: None for the local one (``predict_folder``'s default), else a
    :class:`RayCaseRunner` (its options checked here, before anything runs)."""
    if parse_engine(str(engine)) is Engine.LOCAL:
        if options is not None:
            raise UsageError("Ray options were given with --engine local; add --engine ray, or leave them out")
        return None
    import_ray()
    return RayCaseRunner(make_predictor, options or RayOptions())


# ----------------------------------------------------------------------------------- the runner


class RayCaseRunner:
    """A :data:`~medseg.engine.predict.CaseRunner` on Ray Data (see the module's docstring).

    Args:
        make_predictor: builds the task's case predictor in each actor.
        options: where and how wide (:class:`RayOptions`).

    Attributes:
        workers: after a run, case id -> the ``host:pid`` of the worker that predicted it.
        worker_peak_rss_mb: after a run, ``host:pid`` -> that worker's peak resident memory (MiB) when
            it last returned a case: what one actor needs (the model and one case at a time).
        stages: after a run, the Ray Data stages it ran: ``read``, ``network``, ``write`` (a staged
            case predictor), or ``case`` (one stage doing all three).
    """

    def __init__(self, make_predictor: CasePredictorFactory, options: RayOptions):
        options.check()
        self.make_predictor = make_predictor
        self.options = options
        self.workers: dict[str, str] = {}
        self.worker_peak_rss_mb: dict[str, float] = {}
        self.stages: tuple[str, ...] = ()

    def __call__(self, predictor: CasePredictor, cases: Sequence[InputCase], output_dir: Path,
                 options: PredictOptions, previous: dict[str, dict[str, str]], report_path: Path,
                 started: float) -> list[CaseResult]:
        if options.time_limit_s is not None:
            raise UsageError("--engine ray: a time limit per batch is the server's; run it with --engine local")
        columns = [*COMMON_COLUMNS, *predictor.output_columns, *predictor.value_columns]
        try:
            with ray_runtime(self.options) as ray, ReportAppender(report_path, columns) as appender:
                done = self._stream(ray, predictor, cases, output_dir, options, previous, appender)
                results = [done.get(i) or self._lost(case) for i, case in enumerate(cases)]
                appender.finish([r.row() for r in results])
        except OSError as err:  # the driver's disk filled up: every finished output is whole
            raise RunError(write_error(report_path, output_dir, err)) from err
        # the actors are gone: a temp file of this batch is one a killed worker was writing
        remove_case_temporaries(predictor, cases, output_dir, report_path.stem.removeprefix("predictions"))
        return results

    def _stream(self, ray: Any, predictor: CasePredictor, cases: Sequence[InputCase], output_dir: Path,
                options: PredictOptions, previous: dict[str, dict[str, str]],
                appender: ReportAppender) -> dict[int, CaseResult]:
        """Map the cases through the stages; each result appended to the report as it comes back."""
        from ray.data import DataContext

        context = DataContext.get_current()
        saved = (context.max_errored_blocks, context.enable_progress_bars, context.print_on_execution_start)
        if not options.progress:  # no "progress bars disabled" and "execution finished" lines in a log file
            logging.getLogger("ray.data").setLevel(logging.ERROR)
        # a case whose every try killed its worker is dropped by Ray Data and becomes a failed row here
        context.max_errored_blocks, context.enable_progress_bars, context.print_on_execution_start = (
            -1, options.progress, False)
        try:
            items = case_rows(list(cases), previous)
            dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))  # one case a block: a retry redoes one case
            mapped = self._stages(ray, dataset, isinstance(predictor, StagedCasePredictor), output_dir, options)
            done: dict[int, CaseResult] = {}
            started = time.monotonic()
            for row in mapped.iter_rows():
                index = int(row["index"])
                if index in done:  # pragma: no cover - a retried block is read once; keep the first
                    continue
                done[index] = result_from_json(str(row["result"]))
                self.workers[done[index].case_id] = str(row["worker"])
                self.worker_peak_rss_mb[str(row["worker"])] = float(row["worker_peak_rss_mb"])
                appender.append(done[index].row())
            log.info("Ray: %d of %d case(s) back in %.1f s", len(done), len(cases), time.monotonic() - started)
            return done
        finally:
            context.max_errored_blocks, context.enable_progress_bars, context.print_on_execution_start = saved

    def _stages(self, ray: Any, dataset: Any, staged: bool, output_dir: Path, options: PredictOptions) -> Any:
        """The Dataset mapped by the stages: read, network, write for a staged case predictor (the
        network's pool sized by ``actors``, the others by ``io_actors``), else one stage doing all three."""
        args = (self.make_predictor, str(output_dir), options.overwrite)
        pools = self.options

        def stage(data: Any, fn: Any, size: int, cpus: float, gpus: float, threads: int | None) -> Any:
            # one case per call and per actor at a time: an actor holds one case's data, and what waits
            # between stages is bounded by Ray Data's backpressure (spilled to disk beyond it)
            return data.map_batches(
                fn, fn_constructor_args=(*args, threads), batch_size=1, zero_copy_batch=True,
                compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1),
                num_cpus=cpus, num_gpus=gpus or None, max_restarts=-1, max_task_retries=pools.task_retries)

        with warnings.catch_warnings():
            # Ray 2.60 names no parameter for the retries that bound a case killing its worker on every
            # try (an unbounded retry would never end the batch), and warns about passing them as remote args
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            self.stages = ("read", "network", "write") if staged else ("case",)
            if not staged:
                return stage(dataset, CaseActor, pools.actors, pools.cpus_per_actor, pools.gpus_per_actor, None)
            io_threads = max(1, int(pools.io_cpus))
            read = stage(dataset, ReadStage, pools.io_actors or pools.actors, pools.io_cpus, 0.0, io_threads)
            inferred = stage(read, NetworkStage, pools.actors, pools.cpus_per_actor, pools.gpus_per_actor, None)
            return stage(inferred, WriteStage, pools.io_actors or pools.actors, pools.io_cpus, 0.0, io_threads)

    def _lost(self, case: InputCase) -> CaseResult:
        """The row of a case whose every try ended with its worker dead."""
        tries = self.options.task_retries + 1
        return CaseResult(case.case_id, case.shown, "failed",
                          f"{case.path}: not predicted: the Ray worker predicting it died on each of {tries} tries "
                          "(killed, out of memory, or a crash in native code). See `ray logs` or the dashboard for "
                          "why; the other cases went on, and a rerun tries this one again", 0.0)


def record_ray(report: BatchReport, runner: RayCaseRunner, tracker: Any | None = None) -> BatchReport:
    """Add what ran the batch to its summary (``engine``, the Ray options, each worker's cases and peak
    memory) and to the MLflow predict run (params ``engine``, ``ray_*``; metric
    ``predict/ray_worker_peak_rss_mb``, the largest worker's): the figures to size actors by."""
    cases: dict[str, int] = {}
    for worker in runner.workers.values():
        cases[worker] = cases.get(worker, 0) + 1
    workers = {w: {"cases": n, "peak_rss_mb": round(runner.worker_peak_rss_mb.get(w, 0.0), 1)}
               for w, n in sorted(cases.items())}
    if report.summary.is_file():
        summary = report.summary_dict()
        summary.update({"engine": Engine.RAY.value, "ray": {"options": asdict(runner.options), "stages": list(runner.stages),
                                                             "workers": workers}})
        atomic_write_text(report.summary, json.dumps(summary, indent=2))
    if tracker is not None:
        tracker.log_params({"engine": Engine.RAY.value, **{f"ray_{k}": v for k, v in asdict(runner.options).items()}})
        if runner.worker_peak_rss_mb:
            tracker.log_metrics({"predict/ray_worker_peak_rss_mb": max(runner.worker_peak_rss_mb.values()),
                                 "predict/ray_workers": len(workers)}, step=0)
    return report
