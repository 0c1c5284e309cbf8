"""``medseg serve MODEL``: an HTTP server for clients nobody trusts (FastAPI + uvicorn).

Requests carry the scan itself; the server writes it into a private folder of its own making
(``mkdtemp`` under a 0700 work folder), predicts it with :class:`medseg.Predictor` in a worker
process it can kill, answers the mask (the scan's format) and the case's row, and deletes the
folder whatever happened. The client never names a server path, except in path mode, which the
operator turns on with both roots and where every path goes through
:func:`medseg.serving.guard.resolve_inside`. Every limit is the operator's
(:class:`~medseg.serving.guard.ServeLimits`); every refusal is a 4xx JSON body saying problem,
expected, found and fix (:class:`~medseg.serving.problems.Problem`).

Endpoints: ``GET /ping`` (alive), ``GET /health`` (workers ready, limits), ``GET /version``
(medseg version, weights sha256, backend), ``POST /predict`` (a scan in, mask and row out),
``POST /predict/paths`` (path mode), ``/docs`` and ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from medseg._version import __version__
from medseg.errors import UsageError
from medseg.serving import uploads
from medseg.serving.guard import PathRefused, ServeLimits, resolve_inside
from medseg.serving.problems import Problem
from medseg.serving.replies import Output, clean_row, mask_bytes
from medseg.serving.workers import WorkerPool, WorkerSpec, peak_rss_mb, pool_size

log = logging.getLogger(__name__)
SCAN_BODY = {"requestBody": {"required": True, "description": uploads.FORMATS_TEXT, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}},
                                       "required": ["file"]}}}}}
PATHS_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"paths": {"type": "array", "items": {"type": "string"}}}, "required": ["paths"]}}}}}


@dataclass(frozen=True)
class ServeOptions:
    """What the operator fixed when starting the server (never a request's choice)."""

    model_uri: str
    limits: ServeLimits
    device: str = "cpu"
    backend: str | None = None
    tracking_uri: str | None = None


def work_folder(limits: ServeLimits) -> Path:
    """The 0700 folder under which each request gets its private folder (made, or checked, here).

    Raises:
        UsageError: the folder is a link, or someone else's, or readable by others.
    """
    folder = limits.work_dir or Path(tempfile.gettempdir()) / f"medseg-serve-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    if folder.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise UsageError(f"--work-dir {folder}: must be a folder of this user's that no one else can read or write "
                         f"(mode 0700, not a link); found mode {oct(info.st_mode & 0o777)}, owner uid {info.st_uid}; "
                         "fix: chmod 700 it, or name another folder")
    return folder.resolve()


def create_app(options: ServeOptions) -> FastAPI:
    """The FastAPI app: its workers start (and the model loads) when the server starts."""
    limits = options.limits
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["work"] = work_folder(limits)
        threads = max(1, (os.cpu_count() or 1) // max(1, limits.max_concurrent or 1))
        pool = WorkerPool(WorkerSpec(options.model_uri, options.device, options.backend, options.tracking_uri, threads),
                          limits.queue)
        state["pool"] = pool
        try:
            info = await pool.start_first()
            from medseg.io.preflight import available_memory

            size = limits.max_concurrent or pool_size(info, limits.max_voxels, available_memory())
            await pool.grow_to(size)
            log.info("serving %s (%s, %s backend) with %d worker(s)", info["model_uri"], info["task"], info["backend"], size)
            yield
        finally:
            pool.close()

    app = FastAPI(title="medseg serve", version=__version__, lifespan=lifespan,
                  description="A medseg model served to clients nobody trusts: scans in, masks and rows out.")
    _add_error_handlers(app)
    _add_status_routes(app, state, limits)
    _add_predict_routes(app, state, limits)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Problems and invalid query parameters answer as problem JSON (RFC 9457), never a stack trace."""

    @app.exception_handler(Problem)
    async def problem(_: Request, err: Problem) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        found = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors())[:500]
        return JSONResponse(Problem(422, "a query parameter is not valid", "see /docs for the parameters", found,
                                    "fix the parameter").body(), status_code=422)


def _add_status_routes(app: FastAPI, state: dict[str, Any], limits: ServeLimits) -> None:
    """``/ping``, ``/health`` and ``/version``: what a load balancer and an auditor ask."""

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        """Liveness: the server answers."""
        return {"status": "ok"}

    @app.get("/health")
    async def health() -> JSONResponse:
        """Readiness: workers ready to predict, what is running and waiting, the limits in force."""
        pool: WorkerPool = state["pool"]
        ready = pool.ready
        body = {"status": "ok" if ready else "unavailable", "workers_ready": ready, "workers": pool.size,
                "busy": pool.busy, "in_progress": pool.admitted, "queue": limits.queue,
                "peak_rss_mb": {"server": peak_rss_mb(), "worker": pool.peak_worker_rss_mb},
                "path_mode": limits.path_mode,
                "limits": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(limits).items()
                           if k not in ("work_dir", "input_root", "output_root")}}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/version")
    async def version() -> dict[str, Any]:
        """medseg's version, the model (URI, weights sha256, task) and the backend running it."""
        info = state["pool"].info
        return {"medseg_version": __version__, "model_uri": info["model_uri"],
                "weights_sha256": info["weights_sha256"], "backend": info["backend"], "device": info["device"],
                "task": info["task"], "labels": info["labels"], "spatial_dims": info["spatial_dims"],
                "in_channels": info["in_channels"]}


def _add_predict_routes(app: FastAPI, state: dict[str, Any], limits: ServeLimits) -> None:
    """``/predict`` (the scan in the body) and ``/predict/paths`` (path mode, operator's roots only)."""

    @app.post("/predict", openapi_extra=SCAN_BODY)
    async def predict(request: Request, output: Output = Query(Output.MASK, description=(  # noqa: B008
            "mask: the mask (the scan's own format) as the body and the row in the X-Medseg-Row header; "
            "json: the row alone; dicom_seg: a DICOM SEG for a zipped DICOM series"))) -> Response:
        """Predict the scan in the body: its mask (or DICOM SEG) and its row of volumes, QC and uncertainty."""
        pool: WorkerPool = state["pool"]
        pool.admit()
        folder = Path(tempfile.mkdtemp(prefix="request-", dir=state["work"]))
        try:
            scan = await _receive_scan(request, folder, limits)
            result = await pool.run({"paths": [str(scan.path)], "output": str(folder / "out")}, limits.timeout_s)
            return _answer(result["rows"][0], scan, output, pool.info["task"], folder)
        finally:
            pool.leave()
            await asyncio.to_thread(shutil.rmtree, folder, True)

    @app.post("/predict/paths", openapi_extra=PATHS_BODY)
    async def predict_paths(request: Request) -> JSONResponse:
        """Path mode (operator's --input-root and --output-root only): predict files under the input
        root, named relative to it, into a fresh folder under the output root."""
        if not limits.path_mode:
            raise Problem(404, "path mode is off on this server", "scans in the request body (POST /predict)",
                          "a request naming paths", "send the scan itself to /predict")
        pool: WorkerPool = state["pool"]
        pool.admit()
        folder = Path(tempfile.mkdtemp(prefix="request-", dir=state["work"]))
        try:
            paths = await _read_paths(request, folder, limits)
            out = Path(tempfile.mkdtemp(prefix="request-", dir=Path(str(limits.output_root)).resolve()))
            result = await pool.run({"paths": [str(p) for p in paths], "output": str(out)}, limits.timeout_s)
            return JSONResponse(_path_rows(result["rows"], out, Path(str(limits.output_root)).resolve()))
        finally:
            pool.leave()
            await asyncio.to_thread(shutil.rmtree, folder, True)


async def _receive_scan(request: Request, folder: Path, limits: ServeLimits) -> uploads.Scan:
    """The request's scan, laid out in ``folder`` (see :func:`medseg.serving.uploads.accept`)."""
    kind, params = uploads.check_content_type(request.headers.get("content-type"))
    body = folder / "body.upload"
    await _receive_body(request, body, limits)
    if kind == "multipart/form-data":
        part = folder / "part.upload"
        await asyncio.to_thread(uploads.extract_part, body, params["boundary"], part)
        body.unlink()
        body = part
    return await asyncio.to_thread(uploads.accept, body, folder, limits)


async def _receive_body(request: Request, dest: Path, limits: ServeLimits) -> int:
    """The body to ``dest`` within the limits, and within the timeout (a slow client gets 408)."""
    declared_text = request.headers.get("content-length")
    try:
        declared = int(declared_text) if declared_text is not None else None
    except ValueError:
        raise Problem(400, "Content-Length is not a number", "a byte count", repr(declared_text)[:50],
                      "let the HTTP client set it") from None
    try:
        return await asyncio.wait_for(uploads.receive(request.stream(), declared, dest, limits), limits.timeout_s)
    except TimeoutError:
        raise Problem(408, f"the body did not arrive within {limits.timeout_s:.0f} s", "the whole upload in time",
                      "a body still arriving", "send from a faster connection, or a smaller (compressed) scan") from None
    except Problem:
        raise
    except Exception as err:  # noqa: BLE001 - the client went away mid-body (starlette's ClientDisconnect)
        raise Problem(400, "the body was cut off", "the whole upload", type(err).__name__, "send it again") from None


def _answer(row: dict[str, Any], scan: uploads.Scan, output: Output, task: str, folder: Path) -> Response:
    cleaned = clean_row(row, folder)
    if row["status"] != "ok":
        raise Problem(422, "the scan could not be predicted", "a scan the model takes (GET /version)",
                      cleaned["error"][:1000], "check the scan's format, channels and dimensions against the model")
    outputs = dict(row.get("outputs") or {})
    if output == Output.JSON or "output" not in outputs:  # a classifier writes no file
        return JSONResponse({"row": cleaned, "task": task})
    content, media, name = mask_bytes(outputs, scan.kind, output)
    return Response(content, media_type=media, headers={
        "Content-Disposition": f'attachment; filename="{name}"',
        "X-Medseg-Row": json.dumps(cleaned, ensure_ascii=True, separators=(",", ":"))})


async def _read_paths(request: Request, folder: Path, limits: ServeLimits) -> list[Path]:
    """The path-mode request's paths, each resolved inside the input root (403 for any that is not)."""
    body = folder / "paths.json"
    await _receive_body(request, body, limits)
    try:
        paths = json.loads(body.read_bytes()).get("paths")
    except (ValueError, AttributeError):
        paths = None
    if not isinstance(paths, list) or not paths:
        raise Problem(400, "the body is not a JSON object with a non-empty 'paths' list",
                      '{"paths": ["case_001.nii.gz", ...]} (relative to the input root)', "something else",
                      "send the paths as a JSON list")
    if len(paths) > limits.max_rows:
        raise Problem(413, "the request names too many paths", f"at most {limits.max_rows}", f"{len(paths)} paths",
                      "split the list over several requests")
    root = Path(str(limits.input_root))

    def resolve_all() -> list[Path]:
        out = []
        for index, item in enumerate(paths):
            try:
                out.append(resolve_inside(root, item))
            except PathRefused as err:
                raise Problem(403, f"row {index}: {err}", "files under the input root", repr(item)[:200],
                              "name files relative to the input root") from None
        return out

    return await asyncio.to_thread(resolve_all)


def _path_rows(rows: list[dict[str, Any]], out: Path, output_root: Path) -> dict[str, Any]:
    """The path-mode answer: each row, its outputs relative to the output root (no server paths)."""
    shown = []
    for row in rows:
        cleaned = {"case_id": row["case_id"], **clean_row(row, out)}
        cleaned["outputs"] = {k: str(Path(v).relative_to(output_root)) for k, v in dict(row.get("outputs") or {}).items()
                              if v and Path(v).is_relative_to(output_root)}
        shown.append(cleaned)
    return {"output_folder": out.name, "rows": shown,
            "counts": {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}}


def run(options: ServeOptions, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until interrupted (what ``medseg serve`` calls)."""
    import uvicorn

    limits = options.limits
    if limits.path_mode:
        for name, root in (("--input-root", limits.input_root), ("--output-root", limits.output_root)):
            if root is None or not Path(root).is_dir():
                raise UsageError(f"{name} {root}: not a folder; give an existing folder (path mode needs both roots)")
    work_folder(limits)  # refused before the model loads, not after
    uvicorn.run(create_app(options), host=host, port=port, log_level="info", timeout_keep_alive=5,
                limit_concurrency=64 + limits.queue, server_header=False)
