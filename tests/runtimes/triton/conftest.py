"""Fixtures of the Triton tests: one real Triton (2.51, CPU) per session, serving the
view directory of its own temporary ROOT_MODEL_DIR, and the plugin talking to it."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc.aio
import pytest

from adapter.settings import Settings
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from runtimes.triton import TritonPlugin
from tests.servers.process import running
from tests.servers.triton import TritonProcess


def triton_settings(root: Path, port: int, **overrides: Any) -> Settings:
    settings = Settings(root_model_dir=root, runtime_port=port, loadtime_timeout_ms=120_000)
    return dataclasses.replace(settings, **overrides)


@pytest.fixture(scope="session")
def triton_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ROOT_MODEL_DIR shared by Triton and the plugin under test."""
    return tmp_path_factory.mktemp("triton-root")


@pytest.fixture(scope="session")
def triton(triton_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    server = TritonProcess(
        models_dir=triton_root / "_triton_models",
        workdir=tmp_path_factory.mktemp("triton-work"),
    )
    with running(server):
        yield server


@pytest.fixture
async def triton_plugin(triton: TritonProcess, triton_root: Path) -> AsyncIterator[TritonPlugin]:
    """The plugin under test, started against the session's Triton."""
    plugin = TritonPlugin(triton_settings(triton_root, triton.grpc_port))
    await plugin.start()
    try:
        yield plugin
    finally:
        await plugin.close()


@pytest.fixture
async def inference(triton: TritonProcess) -> AsyncIterator[v2_grpc.GRPCInferenceServiceStub]:
    """A stub of the generated v2 inference client, the way the mesh reaches Triton."""
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{triton.grpc_port}", options=[("grpc.enable_http_proxy", 0)]
    ) as channel:
        yield v2_grpc.GRPCInferenceServiceStub(channel)
