"""What the ``medseg serve`` tests share: a tiny model folder, a real server process, HTTP calls."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import REPO, free_port, tiny_config, wait_until_answering, write_msd_dataset


def seeded_model_folder(config: Path, out: Path, seed: int = 0) -> Path:
    """A medseg model folder (network spec, contract, safetensors) of ``config``'s network with seeded
    weights: what ``medseg run`` packages, without the training (serving does not care what it learned)."""
    import torch

    from medseg import load_config
    from medseg.engine.loop import network_spec
    from medseg.engine.model_format import write_model_folder
    from medseg.tasks.registry import get_task

    cfg = load_config(config)
    task = get_task(str(cfg.task))
    torch.manual_seed(seed)
    write_model_folder(out, task.build_network(cfg), network_spec(cfg), task.contract(cfg))
    return out


def segmentation_model(folder: Path) -> tuple[Path, Path]:
    """The tests' tiny 3-class U-Net as a model folder, and the synthetic MSD dataset beside it."""
    dataset = write_msd_dataset(folder / "dataset", n_cases=3)
    manifest = folder / "manifest.csv"
    manifest.write_text("case_id,image,label,split\n")
    config = tiny_config(folder, dataset, manifest, f"sqlite:///{folder / 'unused.db'}")
    return seeded_model_folder(config, folder / "model"), dataset


@dataclass
class Served:
    """A running ``medseg serve`` process."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    work_dir: Path
    port: int

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 120.0) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request: (status, headers in lower case, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             timeout: float = 120.0) -> tuple[int, Any]:
        status, _, data = self.request(method, path, body, headers, timeout)
        return status, json.loads(data) if data else None


@contextmanager
def serve(model: Path | str, tmp: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    """``medseg serve MODEL`` on a free port of 127.0.0.1, torch backend, stopped afterwards."""
    port = free_port()
    work = tmp / "work"
    log = tmp / f"serve-{port}.log"
    command = [sys.executable, "-m", "medseg", "serve", str(model), "--port", str(port), "--backend", "torch",
               "--work-dir", str(work), *args]
    environment = {**os.environ, "MEDSEG_BACKEND": "torch", "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=environment, cwd=REPO,
                                start_new_session=True)
    served = Served(f"http://127.0.0.1:{port}", proc, log, work, port)
    try:
        wait_until_answering(f"{served.url}/health", proc, 180, log, "medseg serve")
        yield served
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
