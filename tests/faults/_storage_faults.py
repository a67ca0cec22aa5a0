"""What the storage and sidecar fault tests share.

- :func:`start_sidecar`: the sidecar as a real process. It is ``adapter.cli.main`` (what
  ``mesh-adapter`` runs) with the embedded puller and the null runtime of
  ``benchmarks/null_runtime.py``: these tests are about pulls, so the runtime loads
  instantly and keeps nothing on disk.
- :class:`FaultyHTTPStore`: an HTTP store (a ``type: http`` storage config) on
  127.0.0.1, in a thread of the test process, serving in-memory objects with HEAD,
  ranged GET and an ETag, whose faults a test switches on: silence, a GET that is never
  answered, a stall mid-body, a hold once some bytes went out.
- :func:`s3_config`: the storage config of an ``rclone serve s3`` server
  (``tests.servers.rclone.rclone_store``: a real S3 server process that can be killed
  and restarted on its port).
- Checks of ROOT_MODEL_DIR: model folders, staging leftovers, bytes written to a
  staging file so far, the content cache's consistency.

Every wait here is bounded in count and time.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.server
import json
import os
import re
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.mmesh import model_runtime_pb2 as pb
from tests.servers.adapter import MeshClient, SidecarProcess
from tests.servers.process import free_port
from tests.servers.rclone import RcloneS3Server

MiB = 1024 * 1024
NULL_RUNTIME = Path(__file__).resolve().parents[2] / "benchmarks" / "null_runtime.py"
#: a held or silent connection is let go after this long, whatever the test does
HOLD_LIMIT_SECONDS = 120.0
#: how often the polling helpers look again
POLL_SECONDS = 0.01


# --- the sidecar --------------------------------------------------------------------------------


@dataclass
class Sidecar:
    """A running sidecar process and a client playing the mesh."""

    process: SidecarProcess
    client: MeshClient
    root: Path

    def stop(self) -> None:
        self.client.close()
        self.process.stop()

    def kill(self) -> None:
        """SIGKILL to its process group, at once."""
        self.process.process.kill()

    def pulled_lines(self, model_id: str) -> list[dict[str, object]]:
        """The ``model pulled`` log lines of ``model_id``."""
        return [
            line
            for line in self.process.log_lines()
            if line.get("event") == "model pulled" and line.get("model_id") == model_id
        ]


def start_sidecar(root: Path, config_dir: Path, log_path: Path, **env: str) -> Sidecar:
    """Start the sidecar on a free port with ROOT_MODEL_DIR ``root`` and the storage
    config in ``config_dir``; ``env`` adds or overrides variables. Returns once
    runtimeStatus says READY (after the purge of leftovers)."""
    port = free_port()
    full_env = {
        "ADAPTER_HOST": "127.0.0.1",
        "ADAPTER_PORT": str(port),
        "LOG_FORMAT": "json",
        "ROOT_MODEL_DIR": str(root),
        "STORAGE_CONFIG_DIR": str(config_dir),
        "USE_EMBEDDED_PULLER": "true",
        "CONTAINER_MEM_REQ_BYTES": str(1 << 30),
        "SHUTDOWN_GRACE_SECONDS": "2",
        **env,
    }
    process = SidecarProcess([sys.executable, str(NULL_RUNTIME)], full_env, log_path, port)
    process.start()
    client = MeshClient(port)
    try:
        client.wait_ready(timeout=60)
    except BaseException:
        client.close()
        process.stop()
        raise
    return Sidecar(process, client, root)


def load_error(call: Callable[[], object]) -> grpc.RpcError:
    """The gRPC error ``call`` raised (the test fails when it succeeded)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc
    pytest.fail("the call succeeded; an error was expected")


class BackgroundLoad:
    """A loadModel running in a thread of the test; its outcome is read after it ends."""

    def __init__(
        self, client: MeshClient, model_id: str, path: str, key: dict[str, object], timeout: float
    ) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self.future = self._pool.submit(client.load, model_id, path, key, timeout=timeout)
        self._pool.shutdown(wait=False)

    def running(self) -> bool:
        return not self.future.done()

    def result(self, timeout: float) -> pb.LoadModelResponse:
        response: pb.LoadModelResponse = self.future.result(timeout)
        return response

    def error(self, timeout: float) -> BaseException | None:
        return self.future.exception(timeout)


# --- an HTTP store with switchable faults --------------------------------------------------------

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_CHUNK = 64 * 1024


class FaultyHTTPStore:
    """Objects served over HTTP/1.1 on 127.0.0.1 (any free port), with faults.

    Faults (set the attributes; :meth:`reset` turns them all off and lets every held
    connection go):

    ``silent``
        every request is read and never answered (a store that accepts and then hangs);
    ``silent_get``
        HEAD is answered, GET never is;
    ``stall_body_after``
        every GET sends its headers and this many body bytes, then nothing more;
    ``hold_after``
        GETs are served until this many body bytes went out in all, then every
        response holds where it is until :meth:`reset`.

    ``requests`` lists ``(method, path, Range header)`` of every request, in order;
    ``held`` counts the connections holding right now; ``body_bytes`` the body bytes
    sent. A held connection is closed without an answer when it is let go.
    """

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.silent = False
        self.silent_get = False
        self.stall_body_after: int | None = None
        self.hold_after: int | None = None
        self.requests: list[tuple[str, str, str]] = []
        self.body_bytes = 0
        self.held = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._server = _StoreServer(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.reset()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def put(self, path: str, data: bytes) -> None:
        self.objects["/" + path.lstrip("/")] = data

    def reset(self) -> None:
        """Every fault off, every held connection let go, the records cleared."""
        with self._lock:
            self.silent = self.silent_get = False
            self.stall_body_after = self.hold_after = None
            self.requests = []
            self.body_bytes = 0
            released, self._release = self._release, threading.Event()
        released.set()

    def seen(self, method: str | None = None) -> list[tuple[str, str, str]]:
        with self._lock:
            return [r for r in self.requests if method is None or r[0] == method]

    # --- used by the handler ----------------------------------------------------------

    def record(self, method: str, path: str, byte_range: str) -> None:
        with self._lock:
            self.requests.append((method, path, byte_range))

    def hold(self) -> None:
        """Block this connection until :meth:`reset` (or HOLD_LIMIT_SECONDS)."""
        with self._lock:
            release = self._release
            self.held += 1
        try:
            release.wait(HOLD_LIMIT_SECONDS)
        finally:
            with self._lock:
                self.held -= 1

    def allowance(self, sent_here: int, want: int) -> tuple[int, bool]:
        """How many of the next ``want`` body bytes may go out now (``sent_here``
        already went out on this response), and whether to hold after them."""
        with self._lock:
            allowed = want
            if self.stall_body_after is not None:
                allowed = min(allowed, max(0, self.stall_body_after - sent_here))
            if self.hold_after is not None:
                allowed = min(allowed, max(0, self.hold_after - self.body_bytes))
            self.body_bytes += allowed
            return allowed, allowed < want


class _StoreServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, store: FaultyHTTPStore) -> None:
        super().__init__(("127.0.0.1", 0), _StoreHandler)
        self.store = store


class _StoreHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _StoreServer

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        store = self.server.store
        byte_range = self.headers.get("Range", "")
        store.record(self.command, self.path, byte_range)
        if store.silent or (body and store.silent_get):
            self._hold_and_close()
            return
        data = store.objects.get(urllib.parse.urlsplit(self.path).path)
        if data is None:
            self.send_error(404)
            return
        start, end = 0, len(data)
        found = _RANGE.match(byte_range.strip())
        if found:
            start = int(found.group(1))
            end = min(len(data), int(found.group(2)) + 1 if found.group(2) else len(data))
        self.send_response(206 if found else 200)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()[:32]}"')
        if found:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        sent = 0
        while start + sent < end:
            want = min(_CHUNK, end - start - sent)
            allowed, stop = store.allowance(sent, want)
            if allowed:
                self.wfile.write(data[start + sent : start + sent + allowed])
                sent += allowed
            if stop:
                self.wfile.flush()
                self._hold_and_close()
                return

    def _hold_and_close(self) -> None:
        self.server.store.hold()
        self.close_connection = True


# --- rclone, a real S3 server process ------------------------------------------------------------


def s3_config(server: RcloneS3Server, bucket: str) -> dict[str, str]:
    return {
        "type": "s3",
        "endpoint_url": server.endpoint_url,
        "access_key_id": server.access_key,
        "secret_access_key": server.secret_key,
        "region": "us-east-1",
        "bucket": bucket,
    }


def write_storage_config(config_dir: Path, key: str, config: dict[str, str]) -> None:
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / key).write_text(json.dumps(config))


# --- ROOT_MODEL_DIR -------------------------------------------------------------------------------


def model_dirs(root: Path) -> list[str]:
    """The model folders (and links) at the top of ROOT_MODEL_DIR."""
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("_"))


def staging_leftovers(root: Path) -> list[str]:
    """Everything under ROOT_MODEL_DIR/_tmp."""
    staging = root / "_tmp"
    return sorted(str(p.relative_to(staging)) for p in staging.rglob("*")) if staging.exists() else []


def written_bytes(path: Path) -> int:
    """Bytes of ``path`` already written, counted in 64 KiB blocks that are not all
    zero (the engine sizes and reserves its files before the bytes arrive, so neither
    the size nor the allocated blocks say how far a pull has come; the test objects are
    random bytes)."""
    zero = bytes(_CHUNK)
    count = 0
    try:
        with path.open("rb") as handle:
            while block := handle.read(_CHUNK):
                if block != zero[: len(block)]:
                    count += len(block)
    except FileNotFoundError:
        return 0
    return count


def staged_file(root: Path, name: str) -> Path | None:
    """The staging file ``name`` of a pull under way, if there is one."""
    found = sorted((root / "_tmp").rglob(name)) if (root / "_tmp").exists() else []
    return found[0] if found else None


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` every POLL_SECONDS for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL_SECONDS) + 1):
        if check():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_SECONDS)
    pytest.fail(f"{what} did not happen within {timeout:g}s")


def wait_for_written(root: Path, name: str, at_least: int, load: BackgroundLoad, timeout: float = 60) -> int:
    """Wait until ``at_least`` bytes of the staging file ``name`` are written while
    ``load`` still runs; return the count."""
    written = 0

    def enough() -> bool:
        nonlocal written
        if not load.running():
            pytest.fail(f"the load ended before {at_least} bytes of {name} were written: {load.error(0)!r}")
        path = staged_file(root, name)
        written = written_bytes(path) if path is not None else 0
        return written >= at_least

    wait_for(enough, timeout, f"{at_least} bytes of {name} written")
    return written


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def cache_problems(root: Path) -> list[str]:
    """What is wrong with the content cache under ``root/_cache``, read without
    repairing anything: a leftover in ``tmp/``, an entry whose metadata has no blob
    (or a blob of another size), a blob without metadata."""
    cache = root / "_cache"
    problems = [f"leftover in tmp: {p.name}" for p in sorted((cache / "tmp").glob("*"))]
    for shard in sorted((cache / "blobs").glob("*")):
        for item in sorted(shard.iterdir()):
            if item.name.endswith(".json"):
                blob = item.with_suffix("")
                meta = json.loads(item.read_text())
                if not blob.exists():
                    problems.append(f"entry {blob.name} has no data")
                elif meta.get("kind") != "tree" and blob.stat().st_size != meta["size"]:
                    problems.append(f"entry {blob.name} has {blob.stat().st_size} bytes, not {meta['size']}")
            elif not item.with_name(item.name + ".json").exists():
                problems.append(f"data {item.name} has no entry")
    return problems


def cache_entries(root: Path) -> list[Path]:
    """The data files (or trees) of the content cache's complete entries."""
    return sorted(m.with_suffix("") for m in (root / "_cache" / "blobs").glob("*/*.json"))


def disk_used(path: Path) -> int:
    """Bytes in use on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize
