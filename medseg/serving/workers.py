"""Predictions run in worker processes that the server can kill: a timeout really stops the work.

Each worker loads the model once (``Predictor.from_uri``: the model's JSON and safetensors) and
then predicts one job at a time, sent over a pipe. The server holds a fixed number of workers,
its concurrency; a job that runs past its deadline has its worker killed (SIGKILL: the compute
stops with it) and a fresh worker started in its place. Workers are forked from a forkserver that
has already imported medseg, so a replacement costs the model load, not the imports.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from medseg.serving.problems import Problem

log = logging.getLogger(__name__)
#: Seconds a worker may take to load the model before the server gives up on it.
LOAD_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker loads, fixed by the operator when the server starts."""

    model_uri: str
    device: str = "cpu"
    backend: str | None = None
    tracking_uri: str | None = None
    threads: int = 1


class WorkerTimeout(Exception):
    """The job ran past its deadline (its worker has been killed)."""


class WorkerDied(Exception):
    """The worker exited mid-job (killed for memory, crashed)."""


def peak_rss_mb(pid: int | str = "self") -> float:
    """``VmHWM`` of a process in MiB (0 when unknown)."""
    try:
        for line in open(f"/proc/{pid}/status").read().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Load the model, say ready (with what ``/version`` shows), then predict each job received."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops its workers itself
    import torch

    torch.set_num_threads(max(1, spec.threads))
    from medseg.api import Predictor
    from medseg.errors import cause_text

    try:
        predictor = Predictor.from_uri(spec.model_uri, device=spec.device, backend=spec.backend,
                                       tracking_uri=spec.tracking_uri)
    except Exception as err:  # noqa: BLE001 - reported to the server, which says it and stops
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return
    model = predictor.model
    conn.send(("ready", {
        "task": predictor.task.name, "backend": model.backend, "weights_sha256": list(model.weights_sha256),
        "model_uri": model.uri, "device": str(predictor.device), "output_columns": list(predictor.output_columns),
        "spatial_dims": int(model.contract.get("spatial_dims", 3)), "in_channels": int(model.contract.get("in_channels", 1)),
        "labels": {str(k): v for k, v in model.label_names.items()}, "rss_mb": peak_rss_mb()}))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        try:
            report = predictor.predict_paths(job["paths"], job["output"], overwrite=False)
            rows = [{"case_id": r.case_id, "input": r.input, "status": r.status, "error": r.error,
                     "seconds": r.seconds, "outputs": dict(r.outputs), "values": dict(r.values)}
                    for r in report.results]
            conn.send(("done", {"rows": rows, "peak_rss_mb": peak_rss_mb()}))
        except Exception as err:  # noqa: BLE001 - a failed job is the request's answer, the worker goes on
            conn.send(("error", cause_text(err) if not str(err) else f"{type(err).__name__}: {err}"))


class Worker:
    """One worker process and the server's end of its pipe."""

    def __init__(self, context: Any, spec: WorkerSpec):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, spec), daemon=True, name="medseg-serve-worker")
        self.process.start()
        child.close()
        self.info: dict[str, Any] = {}

    def wait_ready(self, timeout: float = LOAD_TIMEOUT_S) -> dict[str, Any]:
        """Block until the model is loaded; the worker's description. Raises RuntimeError if it failed."""
        if not self.conn.poll(timeout):
            self.kill()
            raise RuntimeError(f"the worker did not load the model within {timeout:.0f} s")
        try:
            kind, payload = self.conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"the worker exited while loading the model (exit code {self.process.exitcode})") from None
        if kind != "ready":
            raise RuntimeError(f"the worker could not load the model: {payload}")
        self.info = payload
        return payload

    def run(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one job and wait for its answer (blocking; the server calls it from a thread).

        Raises:
            WorkerTimeout: no answer within ``timeout`` seconds; the worker is killed first.
            WorkerDied: the worker exited. RuntimeError: the job failed (its message).
        """
        try:
            self.conn.send(job)
            ready = self.conn.poll(timeout)
        except (OSError, EOFError):
            raise WorkerDied(f"exit code {self.process.exitcode}") from None
        if not ready:
            self.kill()
            raise WorkerTimeout()
        try:
            kind, payload = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            raise WorkerDied(f"exit code {self.process.exitcode}") from None
        if kind != "done":
            raise RuntimeError(str(payload))
        return dict(payload)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()


class WorkerPool:
    """A fixed number of workers, a bounded line of requests waiting for one, and a deadline per job.

    Args:
        spec: what each worker loads.
        queue: requests that may wait for a free worker beyond those running.
    """

    def __init__(self, spec: WorkerSpec, queue: int):
        self.spec = spec
        self.queue = queue
        self.size = 0
        self.admitted = 0
        self.busy = 0
        self.peak_worker_rss_mb = 0.0
        self.info: dict[str, Any] = {}
        self._context = mp.get_context("forkserver")
        self._context.set_forkserver_preload(["medseg.api", "medseg.serving.workers"])
        self._idle: asyncio.Queue[Worker] = asyncio.Queue()
        self._workers: set[Worker] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._replacing: set[asyncio.Task[None]] = set()

    async def start_first(self) -> dict[str, Any]:
        """Start one worker and wait for its model (what sizing the pool needs to know)."""
        self._executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="medseg-serve")
        worker = Worker(self._context, self.spec)
        self.info = await asyncio.get_running_loop().run_in_executor(self._executor, worker.wait_ready)
        self._add(worker)
        self.size = 1
        return self.info

    async def grow_to(self, size: int) -> None:
        """Start workers until there are ``size`` (loading in parallel)."""
        extra = [Worker(self._context, self.spec) for _ in range(size - self.size)]
        self.size = size
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._executor, w.wait_ready) for w in extra))
        for worker in extra:
            self._add(worker)

    def _add(self, worker: Worker) -> None:
        self._workers.add(worker)
        self.peak_worker_rss_mb = max(self.peak_worker_rss_mb, float(worker.info.get("rss_mb", 0.0)))
        self._idle.put_nowait(worker)

    @property
    def ready(self) -> int:
        return sum(w.process.is_alive() for w in self._workers)

    def admit(self) -> None:
        """Count a request in, or refuse it (429) when the running and waiting places are all taken."""
        if self.admitted >= self.size + self.queue:
            raise Problem(429, "the server is busy: every prediction slot and every place in line is taken",
                          f"at most {self.size} predictions at once and {self.queue} waiting",
                          f"{self.admitted} requests in progress", "retry after a few seconds (with backoff)")
        self.admitted += 1

    def leave(self) -> None:
        self.admitted -= 1

    async def run(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run ``job`` on the next free worker, within ``timeout`` seconds of waiting and as many of work.

        Raises:
            Problem: 503 when no worker came free in time or the worker died, 504 when the job ran
                past its deadline (its worker killed, so the work has stopped), 422 when it failed.
        """
        try:
            worker = await asyncio.wait_for(self._idle.get(), timeout)
        except TimeoutError:
            raise Problem(503, f"no prediction slot came free within {timeout:.0f} s",
                          "a free slot within the request timeout", f"{self.busy} predictions running",
                          "retry later; the operator can raise --max-concurrent or --timeout-s") from None
        self.busy += 1
        started = time.monotonic()
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, worker.run, job, timeout)
        except WorkerTimeout:
            self._replace(worker)
            raise Problem(504, f"the prediction did not finish within the server's timeout of {timeout:.0f} s, so it "
                          "was stopped", f"a prediction within {timeout:.0f} s",
                          f"still running after {time.monotonic() - started:.1f} s (its worker was killed)",
                          "send a smaller scan, or ask the operator to raise --timeout-s") from None
        except WorkerDied as err:
            self._replace(worker)
            raise Problem(503, "the prediction's worker process died (out of memory?)", "a prediction that finishes",
                          f"worker {err}", "retry once; if it happens again send a smaller scan or tell the operator") \
                from None
        except RuntimeError as err:
            self._idle.put_nowait(worker)
            raise Problem(422, "the scan could not be predicted", "a scan the model takes", str(err)[:1000],
                          "check the scan against the model's contract (GET /version)") from None
        finally:
            self.busy -= 1
        self.peak_worker_rss_mb = max(self.peak_worker_rss_mb, float(result.get("peak_rss_mb", 0.0)))
        self._idle.put_nowait(worker)
        return result

    def _replace(self, dead: Worker) -> None:
        dead.kill()
        self._workers.discard(dead)

        async def start() -> None:
            fresh = Worker(self._context, self.spec)
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, fresh.wait_ready)
            except RuntimeError as err:
                log.error("a replacement worker failed to start: %s", err)
                return
            self._add(fresh)

        task = asyncio.get_running_loop().create_task(start())
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    def close(self) -> None:
        for worker in list(self._workers):
            worker.kill()
        self._workers.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def worker_pids(self) -> list[int]:
        return [int(w.process.pid) for w in self._workers if w.process.pid is not None]


def pool_size(info: dict[str, Any], max_voxels: int, available: int, cpus: int | None = None) -> int:
    """Predictions that fit at once: available memory over one worker's model plus its largest image.

    One image's working set is taken as float32 copies of the input channels and of the output
    probabilities, three times over (read, preprocessed, inverted), at the largest voxel count the
    server accepts; never more workers than CPU cores.
    """
    classes = max(2, len(info.get("labels", {})))
    per_image = max_voxels * 4 * (int(info.get("in_channels", 1)) + classes) * 3
    per_worker = int(float(info.get("rss_mb", 500.0)) * 1024 * 1024) + per_image
    return max(1, min(cpus or os.cpu_count() or 1, available // max(per_worker, 1)))
