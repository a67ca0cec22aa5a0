"""The TorchServe plugin without a server: archive names, the configuration file,
the ``.mar`` view, endpoints and the size arithmetic."""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapter.errors import ConfigurationError, InvalidModelId, InvalidRequest, ModelNotFound, RuntimeRejected
from adapter.plugin import load_runtime_class
from adapter.settings import Settings
from puller.model_key import MAX_MODEL_ID_LENGTH, ModelKey
from puller.request import LocalModel
from runtimes.torchserve import (
    CONFIG_FILE_NAME,
    MEMORY_HEADROOM,
    TorchServeConfig,
    TorchServePlugin,
    data_endpoint_target,
    health_status,
    mar_file_name,
    model_id_from_mar,
    write_config,
)

MODEL_ID = "mnist__isvc-0123456789"


@pytest.fixture
def plugin(root: Path) -> TorchServePlugin:
    return TorchServePlugin(Settings(root_model_dir=root).for_runtime(7071, 2.75))


def make_mar(path: Path, size: int = 0) -> Path:
    """A zip file standing in for a model archive (``size`` bytes of padding)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", "{}")
        if size:
            archive.writestr("padding", b"\0" * size)
    return path


def local_model(path: Path, model_id: str = MODEL_ID) -> LocalModel:
    return LocalModel(model_id, path, 0, "pytorch-mar", None, ModelKey())


# --- registration ----------------------------------------------------------------------


def test_entry_point_and_defaults() -> None:
    cls = load_runtime_class("torchserve")
    assert cls is TorchServePlugin
    assert cls.name == "torchserve"
    assert cls.default_runtime_port == 7071
    assert cls.default_modelsize_multiplier == 2.75


def test_method_infos(plugin: TorchServePlugin) -> None:
    assert plugin.method_infos() == {
        "org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions": (1,),
        "inference.GRPCInferenceService/ModelInfer": (1,),
        "inference.GRPCInferenceService/ModelMetadata": (1,),
    }


# --- archive names -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "name"),
    [
        ("mnist__isvc-0123456789", "mnist__isvc-0123456789.mar"),
        ("resnet-v1.5", "resnet-v1.5.mar"),
        ("a:b", "a%3Ab.mar"),
        ("a..b", "a.%2Eb.mar"),
        (".hidden", "%2Ehidden.mar"),
        ("trailing.", "trailing%2E.mar"),
        ("100%", "100%25.mar"),
        ("with space", "with%20space.mar"),
        ("modèle", "mod%C3%A8le.mar"),
        ("http:x", "http%3Ax.mar"),
    ],
)
def test_mar_file_name_escapes(model_id: str, name: str) -> None:
    assert mar_file_name(model_id) == name
    assert model_id_from_mar(name) == model_id


def test_long_ids_are_hashed_and_stay_distinct() -> None:
    first, second = "x" * 251 + "a", "x" * 251 + "b"  # 252 bytes + ".mar": too long
    assert mar_file_name("x" * 251) == "x" * 251 + ".mar"  # 255 bytes: still fits
    names = {mar_file_name(first), mar_file_name(second)}
    assert len(names) == 2
    for name in names:
        assert len(name.encode()) <= 255
        assert "~" in name
        assert model_id_from_mar(name) is None  # hashed names are not reversible


@pytest.mark.parametrize("name", ["x.tar.gz", "a%41.mar", "a%zz.mar", "%C3.mar", "mmconfig.properties"])
def test_names_the_escaping_does_not_produce_are_not_model_ids(name: str) -> None:
    assert model_id_from_mar(name) is None


_ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/\\"),
    min_size=1,
    max_size=MAX_MODEL_ID_LENGTH // 4,
)


@given(_ids, _ids)
def test_mar_file_names_are_safe_and_injective(first: str, second: str) -> None:
    name = mar_file_name(first)
    stem = name.removesuffix(".mar")
    assert ".." not in name and ":" not in name and "/" not in name
    assert not name.startswith(".")
    assert len(name.encode()) <= 255
    assert set(stem) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.%~")
    if "~" not in stem:
        assert model_id_from_mar(name) == first
    assert (mar_file_name(second) == name) == (second == first)


# --- the configuration file ------------------------------------------------------------


def test_config_from_settings(root: Path) -> None:
    settings = Settings(
        root_model_dir=root, runtime_port=9071, runtime_host="127.0.0.2", runtime_data_endpoint="port:9070"
    )
    config = TorchServePlugin(settings).config()
    assert config.model_store == root / "_torchserve_models"
    props = config.properties()
    assert props["model_store"] == str(root / "_torchserve_models")
    assert props["grpc_management_address"] == props["grpc_inference_address"] == "127.0.0.2"
    assert props["grpc_management_port"] == "9071"
    assert props["grpc_inference_port"] == "9070"
    assert props["disable_token_authorization"] == "true"
    assert props["enable_model_api"] == "true"
    assert "inference_address" not in props  # TorchServe's own REST defaults


def test_config_defaults_are_torchserves_ports(root: Path) -> None:
    props = TorchServePlugin(Settings(root_model_dir=root).for_runtime(7071, 2.75)).config().properties()
    assert props["grpc_management_port"] == "7071"
    assert props["grpc_inference_port"] == "7070"


def test_render_is_one_property_a_line(root: Path) -> None:
    config = TorchServeConfig(
        model_store=root,
        grpc_address="127.0.0.1",
        grpc_management_port=1,
        grpc_inference_port=2,
        inference_address="http://127.0.0.1:3",
        extra={"metric_time_interval": "5"},
    )
    lines = config.render().splitlines()
    assert lines[0].startswith("#")
    pairs = dict(line.split("=", 1) for line in lines[1:])
    assert pairs == config.properties()
    assert pairs["inference_address"] == "http://127.0.0.1:3"
    assert pairs["metric_time_interval"] == "5"


@pytest.mark.parametrize("store", ["/models/a\nload_models=all", "/models/a\\b", " /models"])
def test_render_refuses_values_torchserve_would_misread(store: str) -> None:
    config = TorchServeConfig(Path(store), "127.0.0.1", 1, 2)
    with pytest.raises(ConfigurationError):
        config.render()


def test_write_config_is_complete_and_readable(tmp_path: Path) -> None:
    config = TorchServeConfig(tmp_path, "127.0.0.1", 1, 2)
    target = tmp_path / "sub" / CONFIG_FILE_NAME
    write_config(target, config)
    assert target.read_text() == config.render()
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in target.parent.iterdir()] == [CONFIG_FILE_NAME]


def test_prepare_writes_the_config_and_drops_stale_links(plugin: TorchServePlugin, root: Path) -> None:
    models = root / "_torchserve_models"
    models.mkdir()
    (models / "stale.mar").symlink_to(root / "gone.mar")
    (models / "keep.txt").write_text("not ours to judge")
    plugin.prepare()
    assert plugin.config_path == models / CONFIG_FILE_NAME
    assert plugin.config_path.read_text() == plugin.config().render()
    assert sorted(p.name for p in models.iterdir()) == ["keep.txt", CONFIG_FILE_NAME]
    plugin.prepare()  # again: same result
    assert plugin.config_path.read_text() == plugin.config().render()


def test_prepare_refuses_a_unix_data_endpoint(root: Path) -> None:
    plugin = TorchServePlugin(Settings(root_model_dir=root, runtime_data_endpoint="unix:/tmp/ts.sock"))
    assert plugin.inference_target == "unix:/tmp/ts.sock"
    with pytest.raises(ConfigurationError, match="TCP"):
        plugin.prepare()


@pytest.mark.parametrize(
    ("endpoint", "target"),
    [(None, "127.0.0.1:7070"), ("port:9000", "127.0.0.1:9000"), ("unix:/run/ts.sock", "unix:/run/ts.sock")],
)
def test_data_endpoint_target(endpoint: str | None, target: str) -> None:
    assert data_endpoint_target(endpoint, "127.0.0.1") == target


@pytest.mark.parametrize("endpoint", ["port:x", "port:0", "port:70000", "localhost:7070"])
def test_bad_data_endpoints(endpoint: str) -> None:
    with pytest.raises(ConfigurationError):
        data_endpoint_target(endpoint, "127.0.0.1")


def test_ipv6_runtime_host(root: Path) -> None:
    plugin = TorchServePlugin(Settings(root_model_dir=root, runtime_host="::1", runtime_port=7071))
    assert plugin.management_target == "[::1]:7071"
    assert plugin.inference_target == "[::1]:7070"
    assert plugin.config().grpc_address == "::1"


# --- the view --------------------------------------------------------------------------


def test_layout_links_the_archive_under_its_escaped_name(plugin: TorchServePlugin, root: Path) -> None:
    archive = make_mar(root / "a:b" / "model.mar")
    view = plugin.layout(local_model(archive, "a:b"))
    assert view == root / "_torchserve_models" / "a%3Ab.mar"
    assert view == plugin.view_dir("a:b")
    assert view.is_symlink()
    assert Path(os.readlink(view)) == archive.absolute()


def test_layout_of_a_directory_with_one_archive(plugin: TorchServePlugin, root: Path) -> None:
    archive = make_mar(root / MODEL_ID / "model" / "mnist.mar")
    (archive.parent / "README").write_text("beside it")
    view = plugin.layout(local_model(archive.parent))
    assert view.resolve() == archive.resolve()


def test_layout_of_a_file_of_another_name(plugin: TorchServePlugin, root: Path) -> None:
    archive = make_mar(root / MODEL_ID / "model")
    assert plugin.layout(local_model(archive)).resolve() == archive.resolve()


@pytest.mark.parametrize("names", [[], ["a.mar", "b.mar"], ["model.pt"]])
def test_layout_refuses_directories_without_exactly_one_archive(
    plugin: TorchServePlugin, root: Path, names: list[str]
) -> None:
    model_dir = root / MODEL_ID / "model"
    model_dir.mkdir(parents=True)
    for name in names:
        make_mar(model_dir / name)
    with pytest.raises(InvalidRequest, match="exactly one"):
        plugin.layout(local_model(model_dir))
    assert not plugin.view_dir(MODEL_ID).exists()


def test_layout_refuses_a_file_that_is_not_an_archive(plugin: TorchServePlugin, root: Path) -> None:
    path = root / MODEL_ID / "model.mar"
    path.parent.mkdir()
    path.write_bytes(b"not a zip")
    with pytest.raises(InvalidRequest, match="zip"):
        plugin.layout(local_model(path))


def test_layout_refuses_a_missing_path_and_bad_ids(plugin: TorchServePlugin, root: Path) -> None:
    with pytest.raises(InvalidRequest, match="does not exist"):
        plugin.layout(local_model(root / "nothing.mar"))
    archive = make_mar(root / "x" / "m.mar")
    with pytest.raises(InvalidModelId):
        plugin.layout(local_model(archive, "_reserved"))


def test_layout_replaces_the_old_link_and_remove_view_is_idempotent(
    plugin: TorchServePlugin, root: Path
) -> None:
    first = make_mar(root / MODEL_ID / "v1" / "m.mar")
    second = make_mar(root / MODEL_ID / "v2" / "m.mar")
    plugin.layout(local_model(first))
    view = plugin.layout(local_model(second))
    assert view.resolve() == second.resolve()
    assert sorted(p.name for p in view.parent.iterdir()) == [view.name]  # no temp left
    plugin.remove_view(MODEL_ID)
    plugin.remove_view(MODEL_ID)
    assert not view.is_symlink()
    assert first.exists() and second.exists()  # the pulled files are the puller's


# --- sizes and answers ---------------------------------------------------------------


def _describing(workers: list[dict[str, Any]]) -> Any:
    async def describe(model_id: str, timeout: float | None = None) -> list[dict[str, Any]]:
        return [{"modelName": model_id, "workers": workers}]

    return describe


async def test_model_size_sums_measured_workers(
    plugin: TorchServePlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plugin, "describe", _describing([{"memoryUsage": 1000}, {"memoryUsage": 3000}]))
    assert await plugin.model_size(MODEL_ID) == math.ceil(4000 * MEMORY_HEADROOM)


async def test_model_size_falls_back_to_the_archive(
    plugin: TorchServePlugin, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = make_mar(root / MODEL_ID / "m.mar", size=10_000)
    plugin.layout(local_model(archive))
    # one worker not measured yet: the sum would understate the model
    monkeypatch.setattr(plugin, "describe", _describing([{"memoryUsage": 5000}, {"memoryUsage": 0}]))
    assert await plugin.model_size(MODEL_ID) == math.ceil(archive.stat().st_size * 2.75)


async def test_model_size_falls_back_when_describe_fails(
    plugin: TorchServePlugin, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = make_mar(root / MODEL_ID / "m.mar")

    async def refuse(model_id: str, timeout: float | None = None) -> list[dict[str, Any]]:
        raise RuntimeRejected("busy", code="INTERNAL")

    monkeypatch.setattr(plugin, "describe", refuse)
    assert await plugin.model_size(MODEL_ID) is None  # no link: nothing known
    plugin.layout(local_model(archive))
    assert await plugin.model_size(MODEL_ID) == math.ceil(archive.stat().st_size * 2.75)


async def test_model_size_of_an_unknown_model(
    plugin: TorchServePlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unknown(model_id: str, timeout: float | None = None) -> list[dict[str, Any]]:
        raise ModelNotFound(model_id)

    monkeypatch.setattr(plugin, "describe", unknown)
    with pytest.raises(ModelNotFound):
        await plugin.model_size(MODEL_ID)


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        ('{\n  "status": "Healthy"\n}', "Healthy"),
        ('{"status": "Unhealthy"}', "Unhealthy"),
        ("Healthy\n", "Healthy"),
        ("[]", "[]"),
    ],
)
def test_health_status(answer: str, status: str) -> None:
    assert health_status(answer) == status


async def test_unreachable_torchserve_is_not_ready(plugin: TorchServePlugin) -> None:
    from tests.servers.process import free_port

    port = free_port()
    unreachable = TorchServePlugin(
        Settings(
            root_model_dir=plugin.settings.root_model_dir,
            runtime_port=port,
            runtime_data_endpoint=f"port:{port}",
        )
    )
    await unreachable.start()
    try:
        assert await unreachable.is_ready() is False
        assert await unreachable.is_alive() is False
        assert await unreachable.runtime_version() is None
    finally:
        await unreachable.close()
