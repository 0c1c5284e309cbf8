"""``medseg serve`` against clients nobody trusts (issue 26): a real server process on 127.0.0.1 with
tight operator limits and path mode on, hit by generated (seeded) attacks.

Checked over all of them: every answer is a 4xx with an explaining body, a 200 for a real scan,
or a deliberate 503/504 with a body; no read or write outside the roots (a canary's access time
and content, the files around the roots, names marked ``pwned``); the server's and its workers'
peak RSS bounded; the server still answering ``/ping`` after. ``MEDSEG_SERVE_REPORT=path`` writes
the tally (``make serve-attacks`` -> benchmarks/results/serve.json's ``attacks`` section).
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import os
import random
import socket
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import nibabel as nib
import numpy as np
import psutil
import pytest

from tests.conftest import make_case
from tests.serving.serve_support import Served, segmentation_model, serve

REPORT_ENV = "MEDSEG_SERVE_REPORT"
SEED = 26
MARK = "pwned"
JSON = {"Content-Type": "application/json"}
OCTET = {"Content-Type": "application/octet-stream"}
LIMITS = ["--max-concurrent", "2", "--queue", "2", "--max-body-mb", "2", "--max-voxels", "300000",
          "--max-decompressed-mb", "4", "--max-rows", "1000", "--timeout-s", "120"]


@dataclass
class Tally:
    """Attacks by kind, answers by status, and what each unexplained answer was."""

    kinds: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    unexplained: list[str] = field(default_factory=list)

    def record(self, kind: str, status: int, body: bytes) -> None:
        self.kinds[kind] += 1
        self.statuses[status] += 1
        explained = True
        if status >= 400:
            try:
                answer = json.loads(body)
                explained = bool(answer.get("problem")) and bool(answer.get("fix"))
            except (ValueError, AttributeError):
                explained = False
        if status >= 500 and status not in (503, 504) or not explained or status == 0 and kind not in TOLERATE_CLOSED:
            self.unexplained.append(f"{kind}: {status} {body[:200]!r}")


#: Attacks whose client closes before an answer can arrive (no status to read).
TOLERATE_CLOSED = {"truncated_body", "oversized_body"}
TALLY = Tally()


@dataclass
class Ground:
    """The served model's roots and what lies around them."""

    base: Path
    input_root: Path
    output_root: Path
    canary: Path
    secret: Path
    scan: bytes
    big_scan: bytes
    huge_scan: bytes


def _nifti(shape: tuple[int, ...], seed: int = 0, compressed: bool = True) -> bytes:
    image, _, affine = make_case(shape, seed=seed)  # type: ignore[arg-type]
    data = nib.Nifti1Image(image, affine).to_bytes()
    return gzip.compress(data, mtime=0) if compressed else data


def _files(base: Path, skip: tuple[Path, ...]) -> set[Path]:
    return {p for p in base.rglob("*") if not any(p.is_relative_to(s) for s in skip)}


@pytest.fixture(scope="module")
def ground(tmp_path_factory: pytest.TempPathFactory) -> Ground:
    base = tmp_path_factory.mktemp("hostile")
    (base / "in" / "sub").mkdir(parents=True)
    (base / "out").mkdir()
    (base / "outside").mkdir()
    scan = _nifti((29, 37, 23))
    (base / "in" / "case.nii.gz").write_bytes(scan)
    canary = base / "outside" / "canary.nii.gz"
    canary.write_bytes(scan)
    secret = base / "outside" / "secret.txt"
    secret.write_text("private key\n")
    for target in (canary, secret):  # relatime updates the access time of any read after this
        info = target.stat()
        os.utime(target, (info.st_mtime - 200_000, info.st_mtime))
    links = {"link_canary.nii.gz": canary, "link_secret": secret, "link_etc": Path("/etc/passwd"),
             "link_outside": base / "outside", "sub/link_up.nii.gz": base / "outside" / "canary.nii.gz"}
    for name, target in links.items():
        (base / "in" / name).symlink_to(target)
    (base / "in" / "loop_a").symlink_to(base / "in" / "loop_b")
    (base / "in" / "loop_b").symlink_to(base / "in" / "loop_a")
    return Ground(base, base / "in", base / "out", canary, secret, scan, _nifti((64, 64, 60), seed=3),
                  _nifti((160, 160, 100), seed=4))


@pytest.fixture(scope="module")
def server(ground: Ground, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("hostile_server")
    model, _ = segmentation_model(tmp / "model")
    with serve(model, tmp, *LIMITS, "--input-root", str(ground.input_root), "--output-root", str(ground.output_root),
               env={"MEDSEG_SERVE_MAX_ZIP_MEMBERS": "64"}) as served:
        yield served
        _report_memory(served)


@pytest.fixture(scope="module")
def quick(ground: Ground, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A second server whose timeout (2 s) every real prediction of the big scan and every slow upload passes."""
    tmp = tmp_path_factory.mktemp("hostile_quick")
    model, _ = segmentation_model(tmp / "model")
    with serve(model, tmp, "--max-concurrent", "1", "--timeout-s", "2") as served:
        yield served


def _report_memory(served: Served) -> None:
    server = psutil.Process(served.proc.pid)
    workers = server.children(recursive=True)  # the forkserver and the workers forked from it
    TALLY_MEMORY["server_peak_rss_mb"] = _hwm(server.pid)
    TALLY_MEMORY["worker_peak_rss_mb"] = max([_hwm(p.pid) for p in workers] or [0.0])


TALLY_MEMORY: dict[str, float] = {}


def _hwm(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _post(served: Served, kind: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    try:
        status, _, answer = served.request("POST", path, body, headers, timeout=180)
    except (ConnectionError, http.client.HTTPException):  # refused and closed while the body was still coming
        status, answer = 0, b""
    TALLY.record(kind, status, answer)
    return status, answer


def _paths(served: Served, kind: str, paths: object) -> tuple[int, dict]:
    status, answer = _post(served, kind, "/predict/paths", json.dumps({"paths": paths}).encode(), JSON)
    return status, json.loads(answer)


# ------------------------------------------------------------------------------------- path mode


def _traversals(ground: Ground, rng: random.Random) -> list[str]:
    targets = ["outside/canary.nii.gz", "outside/secret.txt", "etc/passwd", "outside", f"{MARK}.nii.gz"]
    out = []
    for _ in range(40):
        depth = rng.randint(1, 8)
        sep = rng.choice(["../", "..//", "./../", "sub/../../", "..\\", "%2e%2e/", "....//"])
        out.append(sep * depth + rng.choice(targets))
    out += [str(ground.canary), str(ground.secret), "/etc/passwd", "/etc/shadow", "/proc/self/environ",
            "/root/.ssh/id_rsa", "//etc/passwd", "~/.bashrc", "/" + "a/" * 300 + "x.nii.gz",
            str(ground.input_root / ".." / "outside" / "canary.nii.gz"), "\u2024\u2024/outside/canary.nii.gz"]
    return out


def test_traversal_and_absolute_paths_are_refused(server: Served, ground: Ground) -> None:
    for path in _traversals(ground, random.Random(SEED)):
        status, answer = _paths(server, "traversal", [path])
        assert status == 403, (path, answer)
        assert "refused" in answer["problem"]


def test_links_out_of_the_root_and_folders_are_refused(server: Served) -> None:
    for path in ["link_canary.nii.gz", "link_secret", "link_etc", "link_outside", "link_outside/canary.nii.gz",
                 "sub/link_up.nii.gz", "loop_a", "loop_b/x"]:
        assert _paths(server, "symlink", [path])[0] == 403, path
    for path in [".", "sub", "sub/", "./sub/.", "", "sub/..", "/"]:
        assert _paths(server, "folder_row", [path])[0] == 403, path
    for item in [None, 1, 2.5, {"path": "case.nii.gz"}, ["case.nii.gz"], True, "a\x00b"]:
        assert _paths(server, "not_a_string", [item])[0] == 403, item
    for body in [b"", b"{", b"[]", b'{"paths": []}', b'{"paths": "case.nii.gz"}', b"\xff\xfe", b"null"]:
        assert _post(server, "bad_json", "/predict/paths", body, JSON)[0] in (400, 403), body


def test_existence_probes_get_one_answer(server: Served, ground: Ground) -> None:
    rng = random.Random(SEED + 1)
    for _ in range(15):
        depth = "../" * rng.randint(1, 4)
        for existing, missing in [(f"{depth}outside/canary.nii.gz", f"{depth}outside/nothing{rng.random()}.nii.gz"),
                                  (str(ground.secret), str(ground.secret) + ".none")]:
            answers = []
            for path in (existing, missing):
                status, answer = _paths(server, "existence_probe", [path])
                answers.append((status, answer["problem"].replace(repr(path)[:200], "P"), answer["expected"],
                                answer["fix"]))
            assert answers[0] == answers[1]


def test_huge_row_counts(server: Served) -> None:
    assert _paths(server, "huge_rows", ["case.nii.gz"] * 1001)[0] == 413
    status, _ = _post(server, "huge_rows", "/predict/paths",
                      json.dumps({"paths": ["x" * 100] * 30_000}).encode(), JSON)
    assert status == 413
    status, answer = _paths(server, "huge_rows", ["case.nii.gz"] * 999)  # many rows, one file: failed rows, no crash
    assert status == 200 and answer["counts"]["failed"] == 999


# ------------------------------------------------------------------------------------- uploads


def _gzip_bomb(size_mb: int) -> bytes:
    header = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).to_bytes()[:352]
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as fh:
        fh.write(header)
        chunk = b"\0" * (1 << 20)
        for _ in range(size_mb):
            fh.write(chunk)
    return buffer.getvalue()


def _zip(members: dict[str, bytes], link: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (0o120777 << 16)
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def _malformed(ground: Ground, rng: random.Random) -> list[tuple[str, bytes]]:
    nifti = gzip.decompress(ground.scan)
    out = [("empty_gzip", gzip.compress(b"")), ("gzip_of_text", gzip.compress(b"hello" * 100)),
           ("gzip_in_gzip", gzip.compress(ground.scan)), ("cut_gzip", ground.scan[: len(ground.scan) // 2]),
           ("cut_nifti", nifti[:2000]), ("header_only", nifti[:352]),
           ("nrrd_detached", b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n"
                             b"data file: /etc/passwd\n\n"),
           ("nrrd_detached_rel", b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
                                 b"datafile: ../outside/secret.txt\n\n"),
           ("mha_detached", b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\n"
                            b"ElementDataFile = /etc/passwd\n"),
           ("mha_detached_rel", b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
                                b"ElementDataFile = ../outside/canary.nii.gz\n"),
           ("mha_list", b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
                        b"ElementDataFile = LIST\n/etc/passwd\n"),
           ("nrrd_huge", b"NRRD0004\ntype: float\ndimension: 3\nsizes: 2000 2000 2000\nencoding: raw\n\n" + b"\0" * 64),
           ("png_cut", b"\x89PNG\r\n\x1a\n" + b"\0" * 30), ("dicm_junk", b"\0" * 128 + b"DICM" + b"\x01" * 500),
           ("html", b"<html><body>not a scan</body></html>"), ("zeros", b"\0" * 4096)]
    for index in range(40):  # the real scan with bytes flipped in its header or data
        data = bytearray(nifti)
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(0, min(len(data), 352 if index % 2 else len(data)))] = rng.randrange(256)
        out.append((f"flipped_{index}", gzip.compress(bytes(data), mtime=0) if index % 3 else bytes(data)))
    huge_dims = bytearray(nifti[:352])
    huge_dims[40:56] = np.array([3, 1000, 1000, 1000, 1, 1, 1, 1], dtype="<i2").tobytes()
    out.append(("nifti_claims_1e9_voxels", bytes(huge_dims) + b"\0" * 1000))
    return out


def test_oversized_truncated_and_malformed_uploads(server: Served, ground: Ground) -> None:
    limit = 2 * 1024 * 1024
    for size in (limit + 1, limit * 2, limit * 8):
        assert _post(server, "oversized_body", "/predict", b"\x1f\x8b" + b"\0" * (size - 2), OCTET)[0] == 413
    assert _post(server, "oversized_body", "/predict", b"x", {**OCTET, "Content-Length": str(10 ** 12)})[0] in (400, 413)
    for size_mb in (5, 16, 64):
        assert _post(server, "gzip_bomb", "/predict", _gzip_bomb(size_mb), OCTET)[0] == 413
    for kind, data in _malformed(ground, random.Random(SEED + 2)):
        status, answer = _post(server, "malformed_file", "/predict", data, OCTET)
        assert 400 <= status < 500 or status == 200, (kind, status, answer)
        if kind.startswith(("nrrd_detached", "mha_detached", "mha_list")):
            assert status == 422 if kind != "mha_list" else status in (415, 422), (kind, status, answer)


def test_zip_bombs_and_zip_slip(server: Served) -> None:
    dicm = b"\0" * 128 + b"DICM" + b"\0" * 64
    cases = {"zip_slip": _zip({f"../../{MARK}.dcm": dicm}), "zip_absolute": _zip({f"/tmp/{MARK}.dcm": dicm}),
             "zip_backslash": _zip({f"..\\..\\{MARK}.dcm": dicm}), "zip_link": _zip({"a.dcm": dicm}, link=f"{MARK}"),
             "zip_bomb": _zip({"a.dcm": b"\0" * (8 << 20)}), "zip_many": _zip({f"{i}.dcm": dicm for i in range(100)}),
             "zip_empty": _zip({}), "zip_junk": _zip({"a.dcm": b"not dicom"}), "zip_cut": _zip({"a.dcm": dicm})[:40]}
    for kind, data in cases.items():
        status, answer = _post(server, kind, "/predict", data, OCTET)
        assert 400 <= status < 500, (kind, status, answer)


def test_wrong_content_types(server: Served, ground: Ground) -> None:
    for content_type in ["text/plain", "application/json", "application/x-www-form-urlencoded", "text/html",
                         "image/jpeg", "video/mp4", "application/xml", "multipart/form-data",
                         "multipart/form-data; boundary=", "multipart/mixed; boundary=x", "*/*", "x" * 300]:
        status, _ = _post(server, "content_type", "/predict", ground.scan, {"Content-Type": content_type})
        assert status in (400, 415), content_type
    no_file = b'--b\r\nContent-Disposition: form-data; name="other"\r\n\r\nxx\r\n--b--\r\n'
    cut = b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\n' + ground.scan[:100]
    for body in (no_file, cut, b"garbage"):
        assert _post(server, "multipart", "/predict", body, {"Content-Type": "multipart/form-data; boundary=b"})[0] == 400


def test_device_strings_never_reach_the_model(server: Served, ground: Ground) -> None:
    for device in ["cuda:99", "cpu:123456", "'; rm -rf /", "x" * 2000]:
        status, answer = _post(server, "device_string", "/predict?output=json&device=" + quote(device[:500]), ground.scan,
                               {**OCTET, "X-Device": quote(device[:500])})
        assert status == 200, answer
    assert server.json("GET", "/version")[1]["device"] == "cpu"


def test_truncated_bodies_and_slow_clients(server: Served, quick: Served, ground: Ground) -> None:
    for cut in (10, 1000, len(ground.scan) - 1):  # the client says more than it sends, then goes away
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                         f"Content-Length: {len(ground.scan)}\r\n\r\n".encode() + ground.scan[:cut])
            sock.shutdown(socket.SHUT_WR)
            answer = sock.recv(4096)
        status = int(answer.split()[1]) if answer.startswith(b"HTTP/1.1") else 0
        TALLY.record("truncated_body", status, answer.split(b"\r\n\r\n", 1)[-1] if status else b"")
        assert status in (0, 400), answer
    with socket.create_connection(("127.0.0.1", quick.port), timeout=30) as sock:  # slower than the 2 s timeout
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Length: {len(ground.scan)}\r\n\r\n".encode() + ground.scan[:100])
        time.sleep(4)
        answer = sock.recv(4096)
    body = answer.split(b"\r\n\r\n", 1)[-1]
    TALLY.record("slow_client", int(answer.split()[1]), body)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive" in body


def test_timeout_mid_request_stops_the_work(quick: Served, ground: Ground) -> None:
    for _ in range(2):
        status, answer = _post(quick, "timeout", "/predict?output=json", ground.huge_scan, OCTET)
        assert status in (503, 504), answer
        body = json.loads(answer)
        assert status != 504 or "stopped" in body["problem"] and "killed" in body["found"]
    assert quick.json("GET", "/ping")[0] == 200
    deadline = time.monotonic() + 120  # a fresh worker replaces the killed one
    while quick.json("GET", "/health")[1]["workers_ready"] < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert quick.json("GET", "/health")[0] == 200


def test_eight_concurrent_large_requests(server: Served, ground: Ground) -> None:
    statuses: list[int] = []

    def client() -> None:
        statuses.append(_post(server, "concurrent_large", "/predict", ground.big_scan, OCTET)[0])

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert len(statuses) == 8 and set(statuses) <= {200, 429, 503}, statuses
    assert statuses.count(200) >= 2  # two slots and two places in line: the rest are told to retry


def test_nothing_read_or_written_outside_the_roots(server: Served, quick: Served, ground: Ground) -> None:
    """Runs last in this module: the canary untouched, no new files around the roots, the work folder empty."""
    outside = _files(ground.base, (ground.output_root,))
    for target in (ground.canary, ground.secret):
        info = target.stat()
        assert info.st_atime < info.st_mtime - 100_000, f"{target} was read"
    assert ground.canary.read_bytes() == ground.scan and ground.secret.read_text() == "private key\n"
    expected = {ground.input_root / n for n in ("case.nii.gz", "sub", "link_canary.nii.gz", "link_secret", "link_etc",
                                                "link_outside", "sub/link_up.nii.gz", "loop_a", "loop_b")}
    expected |= {ground.base / "in", ground.base / "outside", ground.canary, ground.secret}
    assert outside == expected
    marked = [*Path("/tmp").glob(f"*{MARK}*"), *ground.base.rglob(f"*{MARK}*"),
              *server.work_dir.parent.rglob(f"*{MARK}*"), *quick.work_dir.parent.rglob(f"*{MARK}*")]
    assert not marked
    for served in (server, quick):
        assert not list(served.work_dir.iterdir()), "a request folder was left behind"
        assert served.json("GET", "/ping") == (200, {"status": "ok"})
    TALLY_MEMORY.update(outside_reads=0, outside_writes=0)
    assert not TALLY.unexplained, TALLY.unexplained
    _report_memory(server)
    assert TALLY_MEMORY["server_peak_rss_mb"] < 1500 and TALLY_MEMORY["worker_peak_rss_mb"] < 2500, TALLY_MEMORY
    assert sum(TALLY.kinds.values()) >= 200, TALLY.kinds


def tally_report() -> dict[str, object]:
    return {"attacks": sum(TALLY.kinds.values()), "by_kind": dict(sorted(TALLY.kinds.items())),
            "by_status": {str(k): v for k, v in sorted(TALLY.statuses.items())},
            "unexplained_5xx_or_bodies": len(TALLY.unexplained), **TALLY_MEMORY}


@pytest.fixture(scope="module", autouse=True)
def _write_report() -> Iterator[None]:
    yield
    report = os.environ.get(REPORT_ENV)
    if report:
        path = Path(report)
        existing = json.loads(path.read_text()) if path.is_file() else {}
        existing["attacks"] = tally_report()
        path.write_text(json.dumps(existing, indent=2) + "\n")

