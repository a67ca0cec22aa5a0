"""The TinyServe plugin proves itself with the sidecar's conformance kit, against a real
TinyServe process, and runs behind ``mesh-adapter`` through its entry point.

This is how a third-party plugin's own test suite looks; it therefore starts its server
itself rather than with the sidecar's test helpers. The package must be installed
(``pip install -e tests/example_plugin``; ``make venv`` does it).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from importlib.metadata import entry_points
from pathlib import Path

import grpc
import pytest

from adapter.plugin import ENTRY_POINT_GROUP, load_runtime_class
from adapter.settings import Settings
from adapter.testing.runtime_conformance import RuntimeConformance
from protos.mmesh import model_runtime_pb2 as pb
from protos.mmesh import model_runtime_pb2_grpc as pb_grpc
from puller.model_key import ModelKey
from puller.request import LocalModel

try:
    from tinyserve_plugin import TinyServePlugin
    from tinyserve_plugin.server import VERSION
except ImportError:  # pragma: no cover - a set-up mistake, reported plainly
    pytest.fail(
        "the example plugin is not installed: pip install -e tests/example_plugin (make venv does it)",
        pytrace=False,
    )

pytestmark = pytest.mark.integration

#: talks to 127.0.0.1 directly, whatever proxy the environment names
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
IRIS = {"outputs": {"setosa-ish": "setosa", "virginica-ish": "virginica"}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call(port: int, method: str, path: str, body: object = None) -> object:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    with _DIRECT.open(request, timeout=10) as response:
        return json.loads(response.read())


class TinyServeProcess:
    """``python -m tinyserve_plugin.server`` on a free port, stopped by PID."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tinyserve_plugin.server", "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                call(self.port, "GET", "/v1/health")
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"TinyServe did not start:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tinyserve_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tinyserve-root")


@pytest.fixture(scope="module")
def tinyserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyServeProcess]:
    server = TinyServeProcess(tmp_path_factory.mktemp("tinyserve-logs") / "tinyserve.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class TinyModels:
    """TinyServe models placed where the puller would put them."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port

    def _place(self, model_id: str, document: object) -> LocalModel:
        path = self.root / model_id / "iris"
        path.mkdir(parents=True)
        (path / "model.json").write_text(json.dumps(document))
        (path / "LICENSE").write_text("example data")
        size = sum(p.stat().st_size for p in path.iterdir())
        key = ModelKey(model_type={"name": "tinyserve"}, disk_size_bytes=size)
        return LocalModel(model_id, path, size, "tinyserve", None, key)

    def good(self, model_id: str) -> LocalModel:
        return self._place(model_id, IRIS)

    def broken(self, model_id: str) -> LocalModel:
        return self._place(model_id, {"outputs": ["not", "a", "mapping"]})

    async def infer(self, model_id: str) -> None:
        answer = await asyncio.to_thread(
            call, self.port, "POST", f"/v1/models/{model_id}/infer", {"input": "virginica-ish"}
        )
        assert answer == {"output": "virginica"}


class TestTinyServeConformance(RuntimeConformance):
    @pytest.fixture
    async def plugin(
        self, tinyserve: TinyServeProcess, tinyserve_root: Path
    ) -> AsyncIterator[TinyServePlugin]:
        settings = Settings(root_model_dir=tinyserve_root, runtime_port=tinyserve.port)
        plugin = TinyServePlugin(settings.for_runtime(TinyServePlugin.default_runtime_port, 1.25))
        await plugin.start()
        try:
            yield plugin
        finally:
            await plugin.close()

    @pytest.fixture
    def model_factory(self, tinyserve: TinyServeProcess, tinyserve_root: Path) -> TinyModels:
        return TinyModels(tinyserve_root, tinyserve.port)


def test_the_entry_point_names_the_plugin():
    (entry,) = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == "tinyserve"]
    assert entry.value == "tinyserve_plugin:TinyServePlugin"
    assert load_runtime_class("tinyserve") is TinyServePlugin


def test_mesh_adapter_runs_the_plugin_through_its_entry_point(tinyserve: TinyServeProcess, tmp_path: Path):
    """``mesh-adapter --runtime tinyserve`` finds the plugin, reports READY once
    TinyServe answers, and loads a model the mesh asks for."""
    root = tmp_path / "models"
    model = TinyModels(root, tinyserve.port).good("iris-mesh")
    adapter_port = free_port()
    env = {
        "ADAPTER_HOST": "127.0.0.1",
        "ADAPTER_PORT": str(adapter_port),
        "RUNTIME_PORT": str(tinyserve.port),
        "ROOT_MODEL_DIR": str(root),
        "CONTAINER_MEM_REQ_BYTES": str(1 << 30),
        "LOG_FORMAT": "json",
    }
    log_path = tmp_path / "adapter.log"
    with log_path.open("ab") as log:
        adapter = subprocess.Popen(
            [str(Path(sys.executable).parent / "mesh-adapter"), "--runtime", "tinyserve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    channel = grpc.insecure_channel(f"127.0.0.1:{adapter_port}")
    try:
        stub = pb_grpc.ModelRuntimeStub(channel)
        status = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and adapter.poll() is None:
            try:
                status = stub.runtimeStatus(pb.RuntimeStatusRequest(), timeout=5)
            except grpc.RpcError:
                time.sleep(0.2)
                continue
            if status.status == pb.RuntimeStatusResponse.READY:
                break
            time.sleep(0.2)
        assert status is not None, log_path.read_text()
        assert status.status == pb.RuntimeStatusResponse.READY
        assert status.runtimeVersion == VERSION
        assert list(status.methodInfos) == ["tinyserve.v1.InferenceService/Infer"]

        loaded = stub.loadModel(
            pb.LoadModelRequest(
                modelId="iris-mesh",
                modelPath=str(model.path),
                modelType="tinyserve",
                modelKey=model.rewritten_key(),
            ),
            timeout=60,
        )
        assert loaded.sizeInBytes > 0
        assert call(tinyserve.port, "POST", "/v1/models/iris-mesh/infer", {"input": "setosa-ish"}) == {
            "output": "setosa"
        }
        stub.unloadModel(pb.UnloadModelRequest(modelId="iris-mesh"), timeout=60)
        assert "iris-mesh" not in json.dumps(call(tinyserve.port, "GET", "/v1/models"))
    finally:
        channel.close()
        if adapter.poll() is None:
            os.killpg(adapter.pid, signal.SIGTERM)
            adapter.wait(timeout=30)
