"""The MLServer plugin through the runtime conformance kit, on the session's real
MLServer."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from adapter.testing.runtime_conformance import RuntimeConformance
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from puller.model_key import ModelKey
from puller.request import LocalModel
from runtimes.mlserver import MLServerPlugin
from tests.runtimes.conftest import mlserver_settings
from tests.runtimes.test_mlserver_plugin import int64_output, iris_request
from tests.servers.mlserver import MLServerProcess
from tests.servers.models import IRIS_EXPECTED, make_broken_model

pytestmark = pytest.mark.integration


class SklearnModels:
    def __init__(self, root: Path, trained: Path, mlserver: MLServerProcess) -> None:
        self.root, self.trained, self.mlserver = root, trained, mlserver

    def _local(self, model_id: str, path: Path) -> LocalModel:
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        key = ModelKey(model_type={"name": "sklearn"}, disk_size_bytes=size)
        return LocalModel(model_id, path, size, "sklearn", None, key)

    def good(self, model_id: str) -> LocalModel:
        target = self.root / model_id / "model"
        shutil.copytree(self.trained, target)
        return self._local(model_id, target)

    def broken(self, model_id: str) -> LocalModel:
        return self._local(model_id, make_broken_model(self.root / model_id / "model"))

    async def infer(self, model_id: str) -> None:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{self.mlserver.grpc_port}", options=[("grpc.enable_http_proxy", 0)]
        ) as channel:
            response = await v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                iris_request(model_id), metadata=[("mm-model-id", model_id)], timeout=30
            )
        assert int64_output(response) == list(IRIS_EXPECTED)


class TestMLServerConformance(RuntimeConformance):
    @pytest.fixture
    async def plugin(self, mlserver: MLServerProcess, mlserver_root: Path) -> AsyncIterator[MLServerPlugin]:
        plugin = MLServerPlugin(mlserver_settings(mlserver_root, mlserver.grpc_port).for_runtime(8001, 1.25))
        await plugin.start()
        try:
            yield plugin
        finally:
            await plugin.close()

    @pytest.fixture
    def model_factory(
        self, mlserver: MLServerProcess, mlserver_root: Path, trained_sklearn_model: Path
    ) -> SklearnModels:
        return SklearnModels(mlserver_root, trained_sklearn_model, mlserver)
