"""The sidecar itself as a real process (``mesh-adapter`` / ``mesh-puller serve``), and a
small client that plays the mesh.

Both feed the secrets guard (``tests/secrets_guard.py``): a sidecar's log file is
scanned at the end of the session and the secrets of its storage-config folder are
registered; the client registers the secrets of the model keys it sends and records
the status details of every failed call.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from protos.mmesh import model_runtime_pb2 as pb
from protos.mmesh import model_runtime_pb2_grpc as pb_grpc
from tests import secrets_guard
from tests.servers.process import ManagedProcess, free_port, port_open, wait_until

BIN = Path(sys.executable).parent


def unix_socket_open(path: Path) -> bool:
    """True when something accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(str(path)) == 0


class SidecarProcess:
    """``mesh-adapter --runtime NAME`` (or ``mesh-puller serve``) with the given env,
    listening on ``port``, or on the Unix socket ``socket_path`` when given (then
    ``port`` is 0)."""

    def __init__(
        self,
        argv: list[str],
        env: Mapping[str, str],
        log_path: Path,
        port: int,
        socket_path: Path | None = None,
    ) -> None:
        self.port = port
        self.socket_path = socket_path
        self.process = ManagedProcess(argv, log_path, env=dict(env))
        self._storage_config = env.get("STORAGE_CONFIG_DIR")
        secrets_guard.register_fields(
            {name.lower(): env.get(name, "") for name in ("HTTP_PROXY", "HTTPS_PROXY")},
            "a sidecar's proxy variables",
        )
        secrets_guard.watch_log_file(log_path, f"the log of {Path(argv[0]).name}")

    @property
    def target(self) -> str:
        """The gRPC target to dial: ``127.0.0.1:PORT`` or ``unix:/path``."""
        return f"unix:{self.socket_path}" if self.socket_path is not None else f"127.0.0.1:{self.port}"

    @classmethod
    def adapter(
        cls, runtime: str, env: Mapping[str, str], log_path: Path, socket_path: Path | None = None
    ) -> SidecarProcess:
        """``mesh-adapter --runtime RUNTIME`` on a free port, or on ``socket_path``
        (``ADAPTER_ENDPOINT=unix:PATH``)."""
        port = 0 if socket_path is not None else free_port()
        full_env = {"ADAPTER_HOST": "127.0.0.1", "LOG_FORMAT": "json", **env, "ADAPTER_PORT": str(port)}
        if socket_path is not None:
            full_env["ADAPTER_ENDPOINT"] = f"unix:{socket_path}"
        return cls([str(BIN / "mesh-adapter"), "--runtime", runtime], full_env, log_path, port, socket_path)

    @classmethod
    def puller(cls, env: Mapping[str, str], log_path: Path) -> SidecarProcess:
        port = free_port()
        full_env = {"ADAPTER_HOST": "127.0.0.1", "LOG_FORMAT": "json", **env, "PORT": str(port)}
        return cls([str(BIN / "mesh-puller"), "serve"], full_env, log_path, port)

    def listening(self) -> bool:
        if self.socket_path is not None:
            return unix_socket_open(self.socket_path)
        return port_open(self.port)

    def _register_storage_secrets(self) -> None:
        if self._storage_config:
            secrets_guard.register_config_dir(Path(self._storage_config), "a sidecar's storage config")

    def start(self, timeout: float = 30) -> None:
        self._register_storage_secrets()
        self.process.start()
        try:
            wait_until(lambda: self.listening() or not self.process.alive(), timeout, "sidecar")
        except TimeoutError:
            self.process.stop()
            raise
        if not self.process.alive():
            raise RuntimeError(f"sidecar exited:\n{self.process.log_tail()}")

    def stop(self) -> None:
        self._register_storage_secrets()  # entries a test added while it ran
        self.process.stop()

    def log_lines(self) -> list[dict[str, object]]:
        lines = []
        for raw in self.process.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
        return lines


class _RecordFailures(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Hands the status details of every failed call to the secrets guard (without
    waiting for a call that is still running: ``.future()`` calls stay asynchronous)."""

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        outcome = continuation(client_call_details, request)
        method = str(client_call_details.method)

        def record(call: Any) -> None:
            if call.code() != grpc.StatusCode.OK:
                secrets_guard.record_text(call.details(), f"gRPC status details of {method}")

        outcome.add_done_callback(record)
        return outcome


class MeshClient:
    """What ModelMesh does to a runtime container, over a real gRPC channel: to
    ``127.0.0.1:PORT``, or to a target such as ``unix:/path``."""

    def __init__(self, port: int | str) -> None:
        self.channel = grpc.insecure_channel(port if isinstance(port, str) else f"127.0.0.1:{port}")
        self.stub = pb_grpc.ModelRuntimeStub(grpc.intercept_channel(self.channel, _RecordFailures()))

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 60) -> pb.RuntimeStatusResponse:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.stub.runtimeStatus(pb.RuntimeStatusRequest(), timeout=5)
                if status.status == pb.RuntimeStatusResponse.READY:
                    return status
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("runtimeStatus never reported READY")
            time.sleep(0.2)

    def load(
        self,
        model_id: str,
        path: str,
        key: Mapping[str, object] | str,
        model_type: str = "",
        timeout: float = 120,
    ) -> pb.LoadModelResponse:
        key_text = key if isinstance(key, str) else json.dumps(key)
        secrets_guard.register_text(key_text, "a model key sent by MeshClient")
        request = pb.LoadModelRequest(
            modelId=model_id, modelPath=path, modelType=model_type, modelKey=key_text
        )
        response: pb.LoadModelResponse = self.stub.loadModel(request, timeout=timeout)
        return response

    def unload(self, model_id: str, timeout: float = 60) -> None:
        self.stub.unloadModel(pb.UnloadModelRequest(modelId=model_id), timeout=timeout)
