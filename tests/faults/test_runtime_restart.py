"""Fault 3: the runtime killed while idle and during a load, against a real MLServer
and the real sidecar process (`mesh-adapter --runtime mlserver`).

What must happen: loads fail with UNAVAILABLE while the runtime is down, the health
service says NOT_SERVING, the sidecar stays up; when the runtime returns (restarted on
the same ports, with no model loaded), the models the sidecar had loaded are loaded
into it again (the mesh still believes they are there) and the health service says
SERVING again. Every wait is bounded."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from protos.mmesh import model_runtime_pb2 as pb
from tests.servers.adapter import MeshClient, SidecarProcess
from tests.servers.mlserver import MLServerProcess
from tests.servers.models import IRIS_EXPECTED, IRIS_SAMPLE
from tests.servers.process import wait_until

pytestmark = pytest.mark.integration

KEY = {"model_type": {"name": "sklearn"}}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Stack:
    """One MLServer and one sidecar driving it, with a `file` storage of the iris model."""

    def __init__(self, root: Path, work: Path, trained: Path) -> None:
        self.root = root
        source = work / "source"
        shutil.copytree(trained, source / "iris")
        config = work / "storage-config"
        config.mkdir()
        (config / "default").write_text(json.dumps({"type": "file", "root": str(source)}))
        self.mlserver = MLServerProcess(models_dir=root / "_mlserver_models", workdir=work / "mlserver")
        self.mlserver.reserve_ports()
        self.sidecar = SidecarProcess.adapter(
            "mlserver",
            {
                "RUNTIME_PORT": str(self.mlserver.grpc_port),
                "ROOT_MODEL_DIR": str(root),
                "STORAGE_CONFIG_DIR": str(config),
                "USE_EMBEDDED_PULLER": "true",
                "CONTAINER_MEM_REQ_BYTES": str(2 << 30),
                "LOADTIME_TIMEOUT": "60000",
            },
            work / "adapter.log",
        )
        self.client: MeshClient | None = None

    def start(self) -> MeshClient:
        self.mlserver.start()
        self.sidecar.start()
        self.client = MeshClient(self.sidecar.port)
        self.client.wait_ready(timeout=60)
        return self.client

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.sidecar.stop()
        self.mlserver.stop()

    def health(self) -> int:
        with grpc.insecure_channel(f"127.0.0.1:{self.sidecar.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(answer.status)

    def wait_health(self, status: int, timeout: float) -> None:
        wait_until(lambda: self.health() == status, timeout, f"sidecar health {status}", interval=0.2)

    def runtime_models(self) -> list[str]:
        with grpc.insecure_channel(f"127.0.0.1:{self.mlserver.grpc_port}") as channel:
            index = v2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
                v2.RepositoryIndexRequest(ready=True), timeout=10
            )
        return sorted(m.name for m in index.models)

    def infer(self, model_id: str) -> list[int]:
        request = v2.ModelInferRequest(model_name=model_id)
        tensor = request.inputs.add(name="input-0", datatype="FP64", shape=[len(IRIS_SAMPLE), 4])
        tensor.contents.fp64_contents.extend(v for row in IRIS_SAMPLE for v in row)
        with grpc.insecure_channel(f"127.0.0.1:{self.mlserver.grpc_port}") as channel:
            response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        return list(response.outputs[0].contents.int64_contents)


@pytest.fixture
def stack(tmp_path: Path, trained_sklearn_model: Path) -> Iterator[Stack]:
    root = tmp_path / "models"
    root.mkdir()
    stack = Stack(root, tmp_path, trained_sklearn_model)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def test_runtime_killed_while_idle_then_restarted(stack: Stack):
    client = stack.client
    assert client is not None
    for model_id in ("iris-a__isvc-1", "iris-b__isvc-2"):
        client.load(model_id, "iris", KEY)
    assert stack.runtime_models() == ["iris-a__isvc-1", "iris-b__isvc-2"]
    assert stack.health() == SERVING

    stack.mlserver.kill()
    stack.wait_health(NOT_SERVING, timeout=30)
    with pytest.raises(grpc.RpcError) as failed:
        client.load("iris-c__isvc-3", "iris", KEY, timeout=30)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not (stack.root / "iris-c__isvc-3").exists()
    status = client.stub.runtimeStatus(pb.RuntimeStatusRequest(), timeout=10)
    assert status.status != pb.RuntimeStatusResponse.READY
    assert stack.sidecar.process.alive()

    stack.mlserver.start()  # same ports, no model loaded
    stack.wait_health(SERVING, timeout=90)
    assert stack.runtime_models() == ["iris-a__isvc-1", "iris-b__isvc-2"]
    assert stack.infer("iris-a__isvc-1") == list(IRIS_EXPECTED)
    assert client.wait_ready(timeout=10).status == pb.RuntimeStatusResponse.READY
    # the sidecar works as before: a new load, an unload
    client.load("iris-c__isvc-3", "iris", KEY)
    client.unload("iris-b__isvc-2")
    assert stack.runtime_models() == ["iris-a__isvc-1", "iris-c__isvc-3"]
    assert not (stack.root / "iris-b__isvc-2").exists()
    lines = [line.get("event") for line in stack.sidecar.log_lines()]
    assert "runtime stopped answering; models will be loaded again when it is back" in lines
    assert "runtime is back; models loaded again" in lines


def test_runtime_killed_during_a_load(stack: Stack):
    client = stack.client
    assert client is not None
    outcome: dict[str, object] = {}

    def load() -> None:
        try:
            client.load("during__isvc-4", "iris", KEY, timeout=60)
            outcome["code"] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            outcome["code"] = exc.code()

    loader = threading.Thread(target=load)
    loader.start()
    # the kill lands while the load is on its way (pull, layout or MLServer's load)
    time.sleep(0.15)
    stack.mlserver.kill()
    loader.join(timeout=90)
    assert not loader.is_alive(), "loadModel never answered"
    assert outcome["code"] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK), outcome
    stack.wait_health(NOT_SERVING, timeout=30)
    assert stack.sidecar.process.alive()

    stack.mlserver.start()
    stack.wait_health(SERVING, timeout=90)
    if outcome["code"] == grpc.StatusCode.OK:
        # the mesh believes it loaded: it is in the runtime again
        assert stack.runtime_models() == ["during__isvc-4"]
        assert (stack.root / "during__isvc-4").exists()
    else:
        # a failed load leaves nothing: not in the runtime, no files
        assert stack.runtime_models() == []
        assert not (stack.root / "during__isvc-4").exists()
    # either way, loading it now works
    client.load("during__isvc-4", "iris", KEY)
    assert stack.infer("during__isvc-4") == list(IRIS_EXPECTED)
