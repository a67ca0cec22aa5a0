"""The TorchServe plugin against one real TorchServe 0.12 for the whole session: load
(register), inference through TorchServe's own Predictions under the model id,
unload, reload, two models at once, a broken model, sizes from DescribeModel, the
purge before the first READY, ``mesh-adapter --runtime torchserve`` as a process, and
the runtime conformance kit.

Every model is registered with one worker (each worker is a Python process of about
230 MB), and every test unloads what it loaded. The session fixtures live here
because this module is the only user of the server: a second module would need them
moved to ``tests/conftest.py`` (a fixture imported into two modules runs twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import grpc
import grpc.aio
import pytest

import runtimes.torchserve as torchserve_module
from adapter.errors import ModelNotFound, RuntimeRejected, SidecarError
from adapter.flow import LoadRequest, ModelFlow
from adapter.settings import Settings
from adapter.testing.runtime_conformance import RuntimeConformance
from protos.mmesh import model_runtime_pb2 as pb
from protos.torchserve import inference_pb2, inference_pb2_grpc
from puller.model_key import ModelKey
from puller.request import LocalModel
from runtimes.torchserve import MEMORY_HEADROOM, TorchServePlugin, mar_file_name, write_config
from tests.servers.adapter import MeshClient, SidecarProcess
from tests.servers.process import running
from tests.servers.torchserve import TorchServeProcess
from tests.servers.torchserve_models import (
    AFFINE_EXPECTED,
    affine_answer,
    affine_input,
    make_affine_mar,
    make_broken_mar,
)

pytestmark = pytest.mark.integration


# --- the server and the models -----------------------------------------------------------


@pytest.fixture(scope="session")
def torchserve_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ROOT_MODEL_DIR shared by TorchServe (its model store is
    ``_torchserve_models`` in it) and the plugins under test."""
    return tmp_path_factory.mktemp("torchserve-root")


def torchserve_settings(root: Path, server: TorchServeProcess) -> Settings:
    return Settings(
        root_model_dir=root,
        runtime_port=server.management_port,
        runtime_data_endpoint=f"port:{server.inference_port}",
        loadtime_timeout_ms=120_000,
    ).for_runtime(TorchServePlugin.default_runtime_port, TorchServePlugin.default_modelsize_multiplier)


@pytest.fixture(scope="session")
def torchserve(
    torchserve_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TorchServeProcess]:
    """One TorchServe, started from the configuration the plugin writes (with the
    REST ports moved to free ones and frequent memory measurements)."""
    server = TorchServeProcess(
        torchserve_root / "_torchserve_models", tmp_path_factory.mktemp("torchserve-work")
    )
    server.reserve_ports()
    plugin = TorchServePlugin(torchserve_settings(torchserve_root, server))
    write_config(plugin.config_path, server.adjust(plugin.config()))
    with running(server):
        yield server


@pytest.fixture(scope="session")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The affine and the broken model archives, built once."""
    workdir = tmp_path_factory.mktemp("torchserve-archives")
    return {"affine": make_affine_mar(workdir / "affine"), "broken": make_broken_mar(workdir / "broken")}


class MarModels:
    """The conformance kit's model factory: archives placed where the puller would,
    inference through TorchServe's own Predictions."""

    def __init__(self, root: Path, archives: Mapping[str, Path], server: TorchServeProcess) -> None:
        self.root, self.archives, self.server = root, archives, server

    def _place(self, model_id: str, kind: str, as_directory: bool) -> LocalModel:
        target = self.root / model_id / "model"
        if as_directory:
            target.mkdir(parents=True)
            shutil.copy(self.archives[kind], target / f"{kind}.mar")
        else:
            target.parent.mkdir(parents=True)
            shutil.copy(self.archives[kind], target)
        size = sum(p.stat().st_size for p in target.parent.rglob("*") if p.is_file())
        key = ModelKey(model_type={"name": "pytorch-mar"}, disk_size_bytes=size)
        return LocalModel(model_id, target, size, "pytorch-mar", None, key)

    def good(self, model_id: str) -> LocalModel:
        return self._place(model_id, "affine", as_directory=True)

    def good_file(self, model_id: str) -> LocalModel:
        return self._place(model_id, "affine", as_directory=False)

    def broken(self, model_id: str) -> LocalModel:
        return self._place(model_id, "broken", as_directory=True)

    async def predict(self, model_id: str) -> list[float]:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{self.server.inference_port}", options=[("grpc.enable_http_proxy", 0)]
        ) as channel:
            request = inference_pb2.PredictionsRequest(model_name=model_id, input=affine_input())
            response = await inference_pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(
                request, timeout=30
            )
        return affine_answer(response.prediction)

    async def infer(self, model_id: str) -> None:
        assert await self.predict(model_id) == list(AFFINE_EXPECTED)


@pytest.fixture
def models(torchserve_root: Path, archives: dict[str, Path], torchserve: TorchServeProcess) -> MarModels:
    return MarModels(torchserve_root, archives, torchserve)


@pytest.fixture
async def plugin(torchserve: TorchServeProcess, torchserve_root: Path) -> AsyncIterator[TorchServePlugin]:
    plugin = TorchServePlugin(torchserve_settings(torchserve_root, torchserve))
    await plugin.start()
    try:
        yield plugin
    finally:
        await plugin.close()


def fresh_id(tag: str) -> str:
    return f"ts-{tag}__{uuid.uuid4().hex[:10]}"


@contextlib.asynccontextmanager
async def unloaded_after(plugin: TorchServePlugin, *model_ids: str) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for model_id in model_ids:
            with contextlib.suppress(SidecarError):
                await plugin.unload(model_id)


async def load(plugin: TorchServePlugin, model: LocalModel) -> int | None:
    view = await asyncio.to_thread(plugin.layout, model)
    return await plugin.load(model.model_id, view, model)


# --- status ---------------------------------------------------------------------------------


async def test_ready_on_the_data_endpoint(plugin: TorchServePlugin, torchserve: TorchServeProcess) -> None:
    assert plugin.inference_target == f"127.0.0.1:{torchserve.inference_port}"
    assert await plugin.is_ready() is True
    assert await plugin.is_alive() is True
    assert await plugin.runtime_version() is None
    assert torchserve.config_path.read_text().startswith("# TorchServe configuration")


# --- sizes --------------------------------------------------------------------------------


async def _measured_workers(plugin: TorchServePlugin, model_id: str, timeout: float = 60) -> list[int]:
    """The workers' memory once TorchServe has measured each of them (every
    METRIC_INTERVAL_SECONDS here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = (await plugin.describe(model_id))[0]["workers"]
        memory = [int(w["memoryUsage"]) for w in workers]
        if memory and all(m > 0 for m in memory):
            return memory
        await asyncio.sleep(0.5)
    raise TimeoutError(f"TorchServe measured no worker memory of {model_id} in {timeout:.0f}s")


async def test_model_size_from_describe_model(plugin: TorchServePlugin, models: MarModels) -> None:
    """Runs before any worker of this TorchServe has exited: TorchServe 0.12 stops
    measuring worker memory for good when a worker exits while it measures (its
    collector then reads an error line as a pid and its scheduled task dies), after
    which the plugin sizes models from their archives."""
    model_id = fresh_id("size")
    model = models.good(model_id)
    async with unloaded_after(plugin, model_id):
        await load(plugin, model)
        size = await plugin.model_size(model_id)
        archive = plugin.view_dir(model_id).stat().st_size
        assert size is not None and size > 0  # measured, or the archive fallback
        memory = await _measured_workers(plugin, model_id)
        size = await plugin.model_size(model_id)
        assert size == math.ceil(sum(memory) * MEMORY_HEADROOM)
        assert size > math.ceil(archive * 2.75)  # a worker is a whole Python process
    with pytest.raises(ModelNotFound):
        await plugin.model_size(model_id)


# --- load / infer / unload ------------------------------------------------------------------


async def test_load_infer_unload(plugin: TorchServePlugin, models: MarModels) -> None:
    model_id = fresh_id("cycle")
    model = models.good_file(model_id)
    async with unloaded_after(plugin, model_id):
        assert await load(plugin, model) == 0  # the mesh then asks modelSize
        view = plugin.view_dir(model_id)
        assert view.is_symlink() and view.resolve() == model.path.resolve()
        assert await models.predict(model_id) == list(AFFINE_EXPECTED)
        assert model_id in await plugin.list_models()
        description = await plugin.describe(model_id)
        assert description[0]["modelUrl"] == mar_file_name(model_id)
        assert [w["status"] for w in description[0]["workers"]] == ["READY"]

        await plugin.unload(model_id)
        assert model_id not in await plugin.list_models()
        assert not view.is_symlink()
        assert model.path.exists()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await models.predict(model_id)
        assert "not found" in (info.value.details() or "").lower()


async def test_a_model_id_that_needs_escaping(plugin: TorchServePlugin, models: MarModels) -> None:
    model_id = f"team:vision..mnist v1.{uuid.uuid4().hex[:6]}é"
    model = models.good(model_id)
    async with unloaded_after(plugin, model_id):
        await load(plugin, model)
        assert plugin.view_dir(model_id).name == mar_file_name(model_id)
        await models.infer(model_id)  # served under the id itself, not the file name
        assert model_id in await plugin.list_models()


async def test_unload_of_an_unknown_model(plugin: TorchServePlugin) -> None:
    with pytest.raises(ModelNotFound):
        await plugin.unload(fresh_id("unknown"))


async def test_reload_without_unload_registers_afresh(plugin: TorchServePlugin, models: MarModels) -> None:
    model_id = fresh_id("reload")
    model = models.good(model_id)
    async with unloaded_after(plugin, model_id):
        await load(plugin, model)
        first_pid = (await plugin.describe(model_id))[0]["workers"][0]["pid"]
        # TorchServe refuses a second register of a name: load unregisters first
        await load(plugin, model)
        second_pid = (await plugin.describe(model_id))[0]["workers"][0]["pid"]
        assert second_pid != first_pid
        await models.infer(model_id)
        assert (await plugin.list_models()).count(model_id) == 1


async def test_load_after_unload(plugin: TorchServePlugin, models: MarModels) -> None:
    model_id = fresh_id("again")
    model = models.good(model_id)
    async with unloaded_after(plugin, model_id):
        await load(plugin, model)
        await plugin.unload(model_id)
        await load(plugin, model)
        await models.infer(model_id)


async def test_two_models_at_once(
    plugin: TorchServePlugin, models: MarModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = fresh_id("two-a"), fresh_id("two-b")
    pair = [models.good(first), models.good_file(second)]
    async with unloaded_after(plugin, first, second):
        await asyncio.gather(*(load(plugin, m) for m in pair))
        results = await asyncio.gather(models.predict(first), models.predict(second))
        assert list(results) == [list(AFFINE_EXPECTED)] * 2
        # one model per ListModels page: the plugin follows nextPageToken
        monkeypatch.setattr(torchserve_module, "LIST_PAGE_SIZE", 1)
        assert {first, second} <= set(await plugin.list_models())


async def test_a_broken_model_is_refused_with_torchserves_code(
    plugin: TorchServePlugin, models: MarModels
) -> None:
    model_id = fresh_id("broken")
    model = models.broken(model_id)
    async with unloaded_after(plugin, model_id):
        with pytest.raises(RuntimeRejected) as info:
            await load(plugin, model)
        assert info.value.code == "INTERNAL"
        assert "Failed to start workers" in info.value.message
        # the load leaves nothing registered, and TorchServe stays healthy
        assert model_id not in await plugin.list_models()
        assert await plugin.is_ready() is True


# --- through the flow ---------------------------------------------------------------------


def _request(model: LocalModel) -> LoadRequest:
    return LoadRequest.parse(model.model_id, str(model.path), f"mt:{model.model_type}", model.rewritten_key())


async def test_purge_on_start_through_the_flow(plugin: TorchServePlugin, models: MarModels) -> None:
    leftovers = [fresh_id("left-a"), fresh_id("left-b")]
    async with unloaded_after(plugin, *leftovers):
        for model_id in leftovers:
            await load(plugin, models.good(model_id))  # "from before a restart"
        flow = ModelFlow(plugin.settings, plugin, None)
        info = await flow.runtime_status()
        assert info.ready
        assert info.method_infos == plugin.method_infos()
        assert info.runtime_version == plugin.settings.runtime_version
        listed = await plugin.list_models()
        for model_id in leftovers:
            assert model_id not in listed
            assert not plugin.view_dir(model_id).is_symlink()


async def test_flow_load_reports_zero_then_model_size(plugin: TorchServePlugin, models: MarModels) -> None:
    model_id = fresh_id("flow")
    model = models.good(model_id)
    flow = ModelFlow(plugin.settings, plugin, None)
    assert (await flow.runtime_status()).ready
    async with unloaded_after(plugin, model_id):
        result = await flow.load(_request(model))
        assert result.size_bytes == 0  # the mesh asks modelSize next
        await models.infer(model_id)
        assert await flow.model_size(model_id) > 0
        await flow.unload(model_id)
        assert model_id not in await plugin.list_models()
        assert not plugin.view_dir(model_id).is_symlink()
        await flow.unload(model_id)  # again: unknown is fine


async def test_flow_passes_the_runtime_refusal_through(plugin: TorchServePlugin, models: MarModels) -> None:
    model_id = fresh_id("flow-broken")
    model = models.broken(model_id)
    flow = ModelFlow(plugin.settings, plugin, None)
    assert (await flow.runtime_status()).ready
    async with unloaded_after(plugin, model_id):
        with pytest.raises(RuntimeRejected) as info:
            await flow.load(_request(model))
        assert info.value.code == "INTERNAL"
        assert model_id not in await plugin.list_models()
        assert not plugin.view_dir(model_id).is_symlink()


# --- the drop-in command ------------------------------------------------------------------


def test_mesh_adapter_runtime_torchserve(
    torchserve: TorchServeProcess, torchserve_root: Path, models: MarModels, tmp_path: Path
) -> None:
    """``mesh-adapter --runtime torchserve`` as a real process, configured by the
    upstream env vars alone, driven the way ModelMesh drives it. (Its ``prepare``
    rewrites the configuration file of the running TorchServe, which read it at
    start and does not read it again.)"""
    env = {
        "ROOT_MODEL_DIR": str(torchserve_root),
        "RUNTIME_PORT": str(torchserve.management_port),
        "RUNTIME_DATA_ENDPOINT": f"port:{torchserve.inference_port}",
        "CONTAINER_MEM_REQ_BYTES": str(4 * 1024**3),
        "USE_EMBEDDED_PULLER": "false",
        "LOADTIME_TIMEOUT": "120000",
    }
    reference = TorchServePlugin(Settings.from_env(env).for_runtime(7071, 2.75))
    sidecar = SidecarProcess.adapter("torchserve", env, tmp_path / "adapter.log")
    sidecar.start()
    mesh = MeshClient(sidecar.port)
    model_id, broken_id = fresh_id("mesh"), fresh_id("mesh-broken")
    model, broken = models.good(model_id), models.broken(broken_id)
    try:
        status = mesh.wait_ready()
        infos = {name: list(info.idInjectionPath) for name, info in status.methodInfos.items()}
        assert infos == {name: list(path) for name, path in reference.method_infos().items()}
        assert torchserve.config_path.read_text() == reference.config().render()  # its prepare()

        response = mesh.load(model_id, str(model.path), model.rewritten_key())
        assert response.sizeInBytes == 0  # ModelMesh asks modelSize next
        size = mesh.stub.modelSize(pb.ModelSizeRequest(modelId=model_id), timeout=30)
        assert size.sizeInBytes > 0
        assert asyncio.run(models.predict(model_id)) == list(AFFINE_EXPECTED)
        mesh.unload(model_id)
        mesh.unload(model_id)  # unknown by now: still fine

        with pytest.raises(grpc.RpcError) as info:
            mesh.load(broken_id, str(broken.path), broken.rewritten_key())
        assert info.value.code() == grpc.StatusCode.INTERNAL  # TorchServe's own code
        assert "Failed to start workers" in (info.value.details() or "")
    finally:
        mesh.close()
        sidecar.stop()
    assert not reference.view_dir(model_id).is_symlink()
    assert not reference.view_dir(broken_id).is_symlink()


# --- the conformance kit ------------------------------------------------------------------


class TestTorchServeConformance(RuntimeConformance):
    @pytest.fixture
    async def plugin(
        self, torchserve: TorchServeProcess, torchserve_root: Path
    ) -> AsyncIterator[TorchServePlugin]:
        plugin = TorchServePlugin(torchserve_settings(torchserve_root, torchserve))
        await plugin.start()
        try:
            yield plugin
        finally:
            await plugin.close()

    @pytest.fixture
    def model_factory(self, models: MarModels) -> MarModels:
        return models
