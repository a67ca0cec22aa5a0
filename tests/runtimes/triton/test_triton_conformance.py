"""The Triton plugin through the runtime conformance kit, on the session's real Triton,
with python models that bring their own config.pbtxt (bare model files laid out from a
schema go through the same calls in test_triton_plugin.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc.aio
import pytest

from adapter.testing.runtime_conformance import RuntimeConformance
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from puller.request import LocalModel
from runtimes.triton import TritonPlugin
from tests.runtimes.triton.conftest import triton_settings
from tests.servers.triton import TritonProcess
from tests.servers.triton_models import EXPECTED, broken_model, configured_model, fp32_output, infer_request

pytestmark = pytest.mark.integration


class PythonModels:
    """Doubling python models with their own config.pbtxt, and a broken one."""

    def __init__(self, root: Path, triton: TritonProcess) -> None:
        self.root, self.triton = root, triton

    def good(self, model_id: str) -> LocalModel:
        return configured_model(self.root, model_id)

    def broken(self, model_id: str) -> LocalModel:
        return broken_model(self.root, model_id)

    async def infer(self, model_id: str) -> None:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{self.triton.grpc_port}", options=[("grpc.enable_http_proxy", 0)]
        ) as channel:
            response = await v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request(model_id, "INPUT0"), metadata=[("mm-model-id", model_id)], timeout=30
            )
        assert response.model_name == model_id
        assert fp32_output(response) == list(EXPECTED)


class TestTritonConformance(RuntimeConformance):
    @pytest.fixture
    async def plugin(self, triton: TritonProcess, triton_root: Path) -> AsyncIterator[TritonPlugin]:
        plugin = TritonPlugin(
            triton_settings(triton_root, triton.grpc_port).for_runtime(
                TritonPlugin.default_runtime_port, TritonPlugin.default_modelsize_multiplier
            )
        )
        await plugin.start()
        try:
            yield plugin
        finally:
            await plugin.close()

    @pytest.fixture
    def model_factory(self, triton: TritonProcess, triton_root: Path) -> PythonModels:
        return PythonModels(triton_root, triton)
