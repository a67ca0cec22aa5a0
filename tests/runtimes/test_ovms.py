"""The OVMS plugin, against a test double of OVMS.

OpenVINO Model Server cannot run on the machines this suite runs on (it ships as
container images and source only, and there is no container engine). These tests
therefore run the plugin against ``tests/servers/ovms_double.py``: a small HTTP server,
started as a process on a free port, that implements OVMS's ``GET /v1/config`` and
``POST /v1/config/reload`` over the same config file the plugin writes. They prove the
plugin's side (the config file, reloads and their batching, the layout, the errors it
passes on); they cannot prove that a real OVMS loads or serves a model. The conformance
kit's inference check, in particular, can only read the double's ``/v1/config`` state
of the model.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from adapter.errors import InvalidRequest, ModelNotFound, RuntimeRejected, RuntimeUnavailable
from adapter.settings import Settings
from adapter.testing.runtime_conformance import RuntimeConformance
from puller.model_key import ModelKey
from puller.request import LocalModel
from runtimes.ovms import CONFIG_FILE_NAME, OVMSPlugin
from tests.servers.ovms_double import BROKEN_MARKER, VERSION, OVMSDouble
from tests.servers.process import free_port

pytestmark = pytest.mark.integration


class FastOVMSPlugin(OVMSPlugin):
    """Short batch windows, so that the tests do not wait for the production ones."""

    load_batch_window: ClassVar[float] = 0.05
    unload_batch_window: ClassVar[float] = 0.2


class SlowUnloadOVMSPlugin(OVMSPlugin):
    """An unload-only batch that would stay open for a minute."""

    load_batch_window: ClassVar[float] = 0.05
    unload_batch_window: ClassVar[float] = 60.0


def ovms_settings(root: Path, port: int) -> Settings:
    return Settings(root_model_dir=root, runtime_port=port, loadtime_timeout_ms=30_000).for_runtime(
        OVMSPlugin.default_runtime_port, OVMSPlugin.default_modelsize_multiplier
    )


# --- models as the puller leaves them ---------------------------------------------------


def local_model(model_id: str, path: Path, model_type: str) -> LocalModel:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    key = ModelKey(model_type={"name": model_type}, disk_size_bytes=size)
    return LocalModel(model_id, path, size, model_type, None, key)


def versioned_model(root: Path, model_id: str, versions: tuple[str, ...] = ("1",)) -> LocalModel:
    """``ROOT/<id>/model/<v>/model.xml + model.bin`` for each version (an IR model)."""
    base = root / model_id / "model"
    for version in versions:
        (base / version).mkdir(parents=True)
        (base / version / "model.xml").write_text(f"<net version='{version}'/>")
        (base / version / "model.bin").write_bytes(b"\0" * 64)
    return local_model(model_id, base, "openvino_ir")


def broken_model(root: Path, model_id: str, reason: str = "weights do not match the graph") -> LocalModel:
    model = versioned_model(root, model_id)
    (model.path / "1" / BROKEN_MARKER).write_text(reason)
    return model


def onnx_file(root: Path, model_id: str, name: str = "mnist.onnx", model_type: str = "onnx") -> LocalModel:
    path = root / model_id / name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"onnx-bytes")
    return local_model(model_id, path, model_type)


def config_entries(root: Path) -> dict[str, str]:
    document = json.loads((root / CONFIG_FILE_NAME).read_text())
    return {e["config"]["name"]: e["config"]["base_path"] for e in document["model_config_list"]}


def states(double: OVMSDouble, model_id: str) -> list[str]:
    entry = double.config_answer().get(model_id, {})
    return [v["state"] for v in entry.get("model_version_status", [])]


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ovms_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT_MODEL_DIR shared by the double and the plugins under test."""
    return tmp_path_factory.mktemp("ovms-root")


@pytest.fixture(scope="module")
def ovms(ovms_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OVMSDouble]:
    # as in a pod: the adapter writes the config file, then OVMS starts on it
    OVMSPlugin(ovms_settings(ovms_root, 1)).prepare()
    double = OVMSDouble(ovms_root / CONFIG_FILE_NAME, tmp_path_factory.mktemp("ovms-logs") / "double.log")
    double.start()
    try:
        yield double
    finally:
        double.stop()


@pytest.fixture
async def plugin(ovms: OVMSDouble, ovms_root: Path) -> AsyncIterator[OVMSPlugin]:
    plugin = FastOVMSPlugin(ovms_settings(ovms_root, ovms.port))
    await plugin.start()
    try:
        yield plugin
    finally:
        await plugin.close()


# --- layout -----------------------------------------------------------------------------


def layout_of(root: Path, model: LocalModel) -> tuple[Path, dict[str, Path]]:
    """The view and its links: relative path -> link target."""
    view = OVMSPlugin(ovms_settings(root, 1)).layout(model)
    links = {str(p.relative_to(view)): p.readlink() for p in sorted(view.rglob("*")) if p.is_symlink()}
    return view, links


def test_the_largest_numeric_version_directory_is_linked_as_the_version(root: Path):
    model = versioned_model(root, "m", versions=("1", "9", "10"))
    (model.path / "README.txt").write_text("files beside the versions are ignored")
    view, links = layout_of(root, model)
    assert view == root / "_ovms_models" / "m"
    assert links == {"10": model.path / "10"}


def test_a_lone_onnx_file_becomes_model_onnx(root: Path):
    _, links = layout_of(root, onnx_file(root, "typed", name="mnist-8.onnx"))
    assert links == {"1/model.onnx": root / "typed" / "mnist-8.onnx"}
    # the suffix is enough when the key names no type
    _, links = layout_of(root, onnx_file(root, "untyped", name="net.ONNX", model_type=""))
    assert links == {"1/model.onnx": root / "untyped" / "net.ONNX"}
    # the only file of a pulled directory too
    only = root / "dir" / "model"
    only.mkdir(parents=True)
    (only / "resnet.onnx").write_bytes(b"x")
    _, links = layout_of(root, local_model("dir", only, "onnx"))
    assert links == {"1/model.onnx": only / "resnet.onnx"}


def test_other_single_files_keep_their_name_under_version_1(root: Path):
    _, links = layout_of(root, onnx_file(root, "ir", name="model.xml", model_type="openvino_ir"))
    assert links == {"1/model.xml": root / "ir" / "model.xml"}


def test_an_unversioned_directory_is_linked_entry_by_entry_under_version_1(root: Path):
    base = root / "flat" / "model"
    (base / "variables").mkdir(parents=True)
    (base / "saved_model.pb").write_bytes(b"pb")
    (base / "2").mkdir()  # a numeric directory beside a non-numeric one is no version
    _, links = layout_of(root, local_model("flat", base, "tensorflow"))
    assert links == {
        "1/2": base / "2",
        "1/saved_model.pb": base / "saved_model.pb",
        "1/variables": base / "variables",
    }


def test_bad_model_paths_are_invalid_requests(root: Path):
    (root / "empty" / "model").mkdir(parents=True)
    with pytest.raises(InvalidRequest, match="empty"):
        layout_of(root, local_model("empty", root / "empty" / "model", "onnx"))
    with pytest.raises(InvalidRequest, match="does not exist"):
        layout_of(root, local_model("gone", root / "gone" / "model", "onnx"))
    assert not (root / "_ovms_models" / "gone").exists()


def test_layout_replaces_an_old_view_whole_and_leaves_nothing_beside_it(root: Path):
    plugin = OVMSPlugin(ovms_settings(root, 1))
    first = versioned_model(root, "m", versions=("1",))
    plugin.layout(first)
    second = versioned_model(root, "m2", versions=("4",))
    renamed = local_model("m", second.path, "openvino_ir")
    view = plugin.layout(renamed)
    assert sorted(p.name for p in view.iterdir()) == ["4"]
    assert [p.name for p in (root / "_ovms_models").iterdir()] == ["m"]  # no staging leftovers
    assert (first.path / "1" / "model.bin").is_file()  # the pulled files are untouched
    plugin.remove_view("m")
    assert not view.exists()
    assert (second.path / "4" / "model.bin").is_file()


async def test_prepare_writes_an_empty_config_and_start_reads_an_existing_one(root: Path):
    plugin = OVMSPlugin(ovms_settings(root, free_port()))
    plugin.prepare()
    assert config_entries(root) == {}
    (root / CONFIG_FILE_NAME).write_text(
        json.dumps({"model_config_list": [{"config": {"name": "old", "base_path": "/models/x"}}]})
    )
    plugin.prepare()  # an existing file is kept
    restarted = OVMSPlugin(ovms_settings(root, free_port()))
    await restarted.start()
    assert restarted.configured == {"old": "/models/x"}


def test_method_infos():
    assert OVMSPlugin(Settings()).method_infos() == {
        "tensorflow.serving.PredictionService/Predict": (1, 1),
        "inference.GRPCInferenceService/ModelInfer": (1,),
        "inference.GRPCInferenceService/ModelMetadata": (1,),
    }


# --- through the double -----------------------------------------------------------------


async def test_status_and_version(plugin: OVMSPlugin, ovms_root: Path):
    assert await plugin.is_ready() is True
    assert await plugin.runtime_version() == VERSION
    nobody = OVMSPlugin(ovms_settings(ovms_root, free_port()))
    assert await nobody.is_ready() is False
    assert await nobody.runtime_version() is None


async def test_load_list_unload_through_the_config_file(
    plugin: OVMSPlugin, ovms: OVMSDouble, ovms_root: Path
):
    model = versioned_model(ovms_root, "cycle", versions=("1", "2"))
    view = await asyncio.to_thread(plugin.layout, model)
    assert await plugin.load("cycle", view, model) is None
    assert config_entries(ovms_root)["cycle"] == str(view)
    assert states(ovms, "cycle") == ["AVAILABLE"]
    assert "cycle" in await plugin.list_models()

    await plugin.unload("cycle")
    assert "cycle" not in config_entries(ovms_root)
    assert states(ovms, "cycle") == ["END"]
    assert "cycle" not in await plugin.list_models()
    await asyncio.to_thread(plugin.remove_view, "cycle")


async def test_concurrent_loads_are_applied_by_one_reload(
    plugin: OVMSPlugin, ovms: OVMSDouble, ovms_root: Path
):
    good = [versioned_model(ovms_root, f"batch-{i}") for i in range(5)]
    bad = broken_model(ovms_root, "batch-broken", reason="bad batch member")
    models = [*good, bad]
    views = [await asyncio.to_thread(plugin.layout, m) for m in models]
    before = ovms.reloads()

    outcomes = await asyncio.gather(
        *(plugin.load(m.model_id, v, m) for m, v in zip(models, views, strict=True)), return_exceptions=True
    )

    assert ovms.reloads() == before + 1
    assert outcomes[:5] == [None] * 5
    assert isinstance(outcomes[5], RuntimeRejected)
    assert "bad batch member" in str(outcomes[5])
    assert {m.model_id for m in good} <= set(await plugin.list_models())

    before = ovms.reloads()
    await asyncio.gather(*(plugin.unload(m.model_id) for m in good))
    assert ovms.reloads() == before + 1
    assert not set(config_entries(ovms_root)) & {m.model_id for m in models}


async def test_a_load_closes_an_open_unload_batch_early(ovms: OVMSDouble, ovms_root: Path):
    plugin = SlowUnloadOVMSPlugin(ovms_settings(ovms_root, ovms.port))
    await plugin.start()
    leaving, coming = versioned_model(ovms_root, "leaving"), versioned_model(ovms_root, "coming")
    await plugin.load("leaving", await asyncio.to_thread(plugin.layout, leaving), leaving)
    before = ovms.reloads()
    unload = asyncio.create_task(plugin.unload("leaving"))
    await asyncio.sleep(0)  # the unload opens a batch that would stay open for a minute
    view = await asyncio.to_thread(plugin.layout, coming)
    # bounded far below the unload window: only the load's window can end this batch
    await asyncio.wait_for(asyncio.gather(unload, plugin.load("coming", view, coming)), timeout=20)
    assert ovms.reloads() == before + 1
    assert states(ovms, "leaving") == ["END"]
    assert states(ovms, "coming") == ["AVAILABLE"]
    last = asyncio.create_task(plugin.unload("coming"))
    await asyncio.sleep(0)
    await asyncio.wait_for(plugin.close(), timeout=20)  # applies it now, not in a minute
    await last


async def test_close_applies_an_open_batch_at_once(ovms: OVMSDouble, ovms_root: Path):
    plugin = SlowUnloadOVMSPlugin(ovms_settings(ovms_root, ovms.port))
    await plugin.start()
    model = versioned_model(ovms_root, "closing")
    await plugin.load("closing", await asyncio.to_thread(plugin.layout, model), model)
    unload = asyncio.create_task(plugin.unload("closing"))
    await asyncio.sleep(0)
    await asyncio.wait_for(plugin.close(), timeout=20)
    assert unload.done()
    await unload
    assert states(ovms, "closing") == ["END"]


async def test_a_broken_model_fails_with_the_runtimes_error(
    plugin: OVMSPlugin, ovms: OVMSDouble, ovms_root: Path
):
    model = broken_model(ovms_root, "broken", reason="unsupported layer Foo")
    view = await asyncio.to_thread(plugin.layout, model)
    with pytest.raises(RuntimeRejected) as info:
        await plugin.load("broken", view, model)
    assert info.value.code == "UNKNOWN"
    assert "unsupported layer Foo" in str(info.value)
    assert states(ovms, "broken") == ["LOADING"]
    # a failed load leaves the config, and is not listed as loaded
    assert "broken" not in plugin.configured
    assert "broken" not in await plugin.list_models()
    with pytest.raises(ModelNotFound):
        await plugin.unload("broken")


async def test_a_model_without_model_files_fails(plugin: OVMSPlugin, ovms_root: Path):
    base = ovms_root / "hollow" / "model" / "1"
    base.mkdir(parents=True)
    model = local_model("hollow", base.parent, "openvino_ir")
    view = await asyncio.to_thread(plugin.layout, model)
    with pytest.raises(RuntimeRejected, match="no model files"):
        await plugin.load("hollow", view, model)


async def test_unload_of_an_unknown_model_is_model_not_found_without_a_reload(
    plugin: OVMSPlugin, ovms: OVMSDouble
):
    before = ovms.reloads()
    with pytest.raises(ModelNotFound):
        await plugin.unload("never-loaded")
    assert ovms.reloads() == before


async def test_a_model_ovms_serves_outside_our_config_is_unloaded(
    plugin: OVMSPlugin, ovms: OVMSDouble, ovms_root: Path
):
    """A model OVMS still serves although our config lost it (an adapter that lost
    its state) is listed, and unloading it reloads OVMS without it."""
    model = versioned_model(ovms_root, "stray")
    await plugin.load("stray", await asyncio.to_thread(plugin.layout, model), model)
    forgetful = FastOVMSPlugin(ovms_settings(ovms_root, ovms.port))  # never started: knows nothing
    assert "stray" in await forgetful.list_models()
    await forgetful.unload("stray")
    assert states(ovms, "stray") == ["END"]
    await forgetful.close()


async def test_an_unreachable_ovms_fails_the_load_and_keeps_it_out_of_the_config(tmp_path: Path):
    plugin = FastOVMSPlugin(ovms_settings(tmp_path, free_port()))
    await plugin.start()
    model = versioned_model(tmp_path, "m")
    view = await asyncio.to_thread(plugin.layout, model)
    with pytest.raises(RuntimeUnavailable):
        await plugin.load("m", view, model)
    assert plugin.configured == {}
    with pytest.raises(ModelNotFound):
        await plugin.unload("m")
    with pytest.raises(RuntimeUnavailable):
        await plugin.list_models()
    await plugin.close()


async def test_two_unloads_of_one_model_share_the_reload(
    plugin: OVMSPlugin, ovms: OVMSDouble, ovms_root: Path
):
    model = versioned_model(ovms_root, "twice")
    await plugin.load("twice", await asyncio.to_thread(plugin.layout, model), model)
    before = ovms.reloads()
    await asyncio.gather(plugin.unload("twice"), plugin.unload("twice"))
    assert ovms.reloads() == before + 1


# --- the conformance kit ----------------------------------------------------------------


class DoubleModels:
    """Models for the double; ``infer`` can only check that the double reports the
    model AVAILABLE in ``GET /v1/config`` (no OVMS here to send an inference to)."""

    def __init__(self, root: Path, ovms: OVMSDouble) -> None:
        self.root, self.ovms = root, ovms

    def good(self, model_id: str) -> LocalModel:
        return versioned_model(self.root, model_id, versions=("1", "2"))

    def broken(self, model_id: str) -> LocalModel:
        return broken_model(self.root, model_id)

    async def infer(self, model_id: str) -> None:
        answer = await asyncio.to_thread(self.ovms.config_answer)
        versions = answer[model_id]["model_version_status"]
        assert [v["state"] for v in versions] == ["AVAILABLE"], versions


class TestOVMSConformance(RuntimeConformance):
    @pytest.fixture
    async def plugin(self, ovms: OVMSDouble, ovms_root: Path) -> AsyncIterator[OVMSPlugin]:
        plugin = FastOVMSPlugin(ovms_settings(ovms_root, ovms.port))
        await plugin.start()
        try:
            yield plugin
        finally:
            await plugin.close()

    @pytest.fixture
    def model_factory(self, ovms: OVMSDouble, ovms_root: Path) -> DoubleModels:
        return DoubleModels(ovms_root, ovms)
