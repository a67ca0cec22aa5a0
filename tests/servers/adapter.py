"""The sidecar itself as a real process (``mesh-adapter`` / ``mesh-puller serve``), and a
small client that plays the mesh."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import grpc

from protos.mmesh import model_runtime_pb2 as pb
from protos.mmesh import model_runtime_pb2_grpc as pb_grpc
from tests.servers.process import ManagedProcess, free_port, port_open, wait_until

BIN = Path(sys.executable).parent


class SidecarProcess:
    """``mesh-adapter --runtime NAME`` (or ``mesh-puller serve``) with the given env."""

    def __init__(self, argv: list[str], env: Mapping[str, str], log_path: Path, port: int) -> None:
        self.port = port
        self.process = ManagedProcess(argv, log_path, env=dict(env))

    @classmethod
    def adapter(cls, runtime: str, env: Mapping[str, str], log_path: Path) -> SidecarProcess:
        port = free_port()
        full_env = {"ADAPTER_HOST": "127.0.0.1", "LOG_FORMAT": "json", **env, "ADAPTER_PORT": str(port)}
        return cls([str(BIN / "mesh-adapter"), "--runtime", runtime], full_env, log_path, port)

    @classmethod
    def puller(cls, env: Mapping[str, str], log_path: Path) -> SidecarProcess:
        port = free_port()
        full_env = {"ADAPTER_HOST": "127.0.0.1", "LOG_FORMAT": "json", **env, "PORT": str(port)}
        return cls([str(BIN / "mesh-puller"), "serve"], full_env, log_path, port)

    def start(self, timeout: float = 30) -> None:
        self.process.start()
        try:
            wait_until(lambda: port_open(self.port) or not self.process.alive(), timeout, "sidecar")
        except TimeoutError:
            self.process.stop()
            raise
        if not self.process.alive():
            raise RuntimeError(f"sidecar exited:\n{self.process.log_tail()}")

    def stop(self) -> None:
        self.process.stop()

    def log_lines(self) -> list[dict[str, object]]:
        lines = []
        for raw in self.process.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
        return lines


class MeshClient:
    """What ModelMesh does to a runtime container, over a real gRPC channel."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.ModelRuntimeStub(self.channel)

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
        request = pb.LoadModelRequest(
            modelId=model_id, modelPath=path, modelType=model_type, modelKey=key_text
        )
        response: pb.LoadModelResponse = self.stub.loadModel(request, timeout=timeout)
        return response

    def unload(self, model_id: str, timeout: float = 60) -> None:
        self.stub.unloadModel(pb.UnloadModelRequest(modelId=model_id), timeout=timeout)
