"""The MLServer view of a pulled model: every layout rule, on a real file system."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from adapter.errors import InvalidModelId, InvalidRequest, UnsafePath
from adapter.plugin import load_runtime_class
from adapter.settings import Settings
from puller.model_key import ModelKey
from puller.request import LocalModel
from runtimes.mlserver import IMPLEMENTATIONS, MODEL_SETTINGS_FILE, MLServerPlugin

MODEL_ID = "iris__isvc-0123456789"


@pytest.fixture
def plugin(root: Path) -> MLServerPlugin:
    return MLServerPlugin(Settings(root_model_dir=root))


def local_model(
    path: Path, model_type: str = "sklearn", schema: Path | None = None, model_id: str = MODEL_ID
) -> LocalModel:
    return LocalModel(
        model_id=model_id,
        path=path,
        disk_size_bytes=0,
        model_type=model_type,
        schema_path=schema,
        model_key=ModelKey(),
    )


def pulled_dir(root: Path, files: dict[str, str], model_id: str = MODEL_ID) -> Path:
    """A pulled model directory ROOT/<id>/model holding ``files``."""
    model_dir = root / model_id / "model"
    for name, text in files.items():
        (model_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / name).write_text(text)
    model_dir.mkdir(parents=True, exist_ok=True)
    return model_dir


def read_settings(view: Path) -> dict[str, object]:
    data = json.loads((view / MODEL_SETTINGS_FILE).read_text())
    assert isinstance(data, dict)
    return data


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[str, bytes | str | None]]:
    """Every entry under ``root`` (except under ``skip``): kind and content."""
    result: dict[str, tuple[str, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if skip is not None and (here == skip or skip in here.parents):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = here / name
            if skip is not None and path == skip:
                continue
            key = str(path.relative_to(root))
            if path.is_symlink():
                result[key] = ("link", os.readlink(path))
            elif path.is_dir():
                result[key] = ("dir", None)
            else:
                result[key] = ("file", path.read_bytes())
    return result


# --- generated model-settings.json ----------------------------------------------------


def test_generated_settings_for_a_model_directory(plugin: MLServerPlugin, root: Path) -> None:
    model_dir = pulled_dir(root, {"model.joblib": "weights"})
    view = plugin.layout(local_model(model_dir))
    assert view == root / "_mlserver_models" / MODEL_ID
    assert sorted(p.name for p in view.iterdir()) == [MODEL_SETTINGS_FILE]
    assert read_settings(view) == {
        "name": MODEL_ID,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": str(model_dir)},
    }


def test_generated_settings_for_a_single_file(plugin: MLServerPlugin, root: Path) -> None:
    model_file = root / MODEL_ID / "model.bst"
    model_file.parent.mkdir()
    model_file.write_bytes(b"booster")
    view = plugin.layout(local_model(model_file, model_type="xgboost"))
    settings = read_settings(view)
    assert settings["implementation"] == "mlserver_xgboost.XGBoostModel"
    assert settings["parameters"] == {"uri": str(model_file)}


@pytest.mark.parametrize(
    ("model_type", "implementation"),
    [
        ("sklearn", "mlserver_sklearn.SKLearnModel"),
        ("xgboost", "mlserver_xgboost.XGBoostModel"),
        ("lightgbm", "mlserver_lightgbm.LightGBMModel"),
        ("mllib", "mlserver_mllib.MLlibModel"),
        ("mlflow", "mlserver_mlflow.MLflowRuntime"),
        ("SKLearn", "mlserver_sklearn.SKLearnModel"),
        ("xgboost:1", "mlserver_xgboost.XGBoostModel"),
    ],
)
def test_implementation_by_model_type(
    plugin: MLServerPlugin, root: Path, model_type: str, implementation: str
) -> None:
    model_dir = pulled_dir(root, {"model.bin": "x"})
    assert (
        read_settings(plugin.layout(local_model(model_dir, model_type)))["implementation"] == implementation
    )


def test_every_supported_type_is_listed() -> None:
    assert set(IMPLEMENTATIONS) == {"sklearn", "xgboost", "lightgbm", "mllib", "mlflow"}


@pytest.mark.parametrize("model_type", ["onnx", "pytorch", ""])
def test_unknown_type_without_settings_is_invalid(
    plugin: MLServerPlugin, root: Path, model_type: str
) -> None:
    model_dir = pulled_dir(root, {"model.onnx": "graph"})
    with pytest.raises(InvalidRequest) as info:
        plugin.layout(local_model(model_dir, model_type))
    message = str(info.value)
    if model_type:
        assert repr(model_type) in message
    for supported in IMPLEMENTATIONS:
        assert supported in message
    assert not (root / "_mlserver_models" / MODEL_ID).exists()


# --- a model with its own model-settings.json ---------------------------------------


def test_own_settings_are_rewritten_and_the_rest_linked(plugin: MLServerPlugin, root: Path) -> None:
    own = {
        "name": "whatever-the-author-chose",
        "implementation": "custom.Runtime",
        "max_batch_size": 4,
        "parameters": {"uri": "./weights/model.joblib", "version": "v3", "extra": {"k": 1}},
    }
    model_dir = pulled_dir(
        root,
        {
            MODEL_SETTINGS_FILE: json.dumps(own),
            "weights/model.joblib": "weights",
            "runtime.py": "class Runtime: ...",
            ".hidden": "dot file",
        },
    )
    before = snapshot(root)
    view = plugin.layout(local_model(model_dir, model_type="onnx"))

    settings = read_settings(view)
    assert settings == {
        "name": MODEL_ID,
        "implementation": "custom.Runtime",
        "max_batch_size": 4,
        "parameters": {
            "uri": str(model_dir / "weights" / "model.joblib"),
            "version": "v3",
            "extra": {"k": 1},
        },
    }
    settings_file = view / MODEL_SETTINGS_FILE
    assert settings_file.is_file() and not settings_file.is_symlink()
    linked = {p.name for p in view.iterdir() if p.name != MODEL_SETTINGS_FILE}
    assert linked == {"weights", "runtime.py", ".hidden"}
    for name in linked:
        link = view / name
        assert link.is_symlink()
        assert Path(os.readlink(link)) == model_dir / name
    assert (view / "weights" / "model.joblib").read_text() == "weights"
    # the pulled files are untouched, and nothing was written outside the view
    assert snapshot(root, skip=view) == before | {"_mlserver_models": ("dir", None)}


def test_own_settings_without_uri_point_at_the_model_directory(plugin: MLServerPlugin, root: Path) -> None:
    model_dir = pulled_dir(
        root, {MODEL_SETTINGS_FILE: json.dumps({"implementation": "x.Y"}), "model.joblib": "w"}
    )
    settings = read_settings(plugin.layout(local_model(model_dir)))
    assert settings["name"] == MODEL_ID
    assert settings["parameters"] == {"uri": str(model_dir)}


@pytest.mark.parametrize("uri", ["/mnt/shared/model.joblib", "s3://bucket/model", "gs://b/m"])
def test_absolute_and_remote_uris_are_kept(plugin: MLServerPlugin, root: Path, uri: str) -> None:
    model_dir = pulled_dir(
        root, {MODEL_SETTINGS_FILE: json.dumps({"implementation": "x.Y", "parameters": {"uri": uri}})}
    )
    assert read_settings(plugin.layout(local_model(model_dir)))["parameters"] == {"uri": uri}


@pytest.mark.parametrize(
    ("uri", "expected"),
    [("model.joblib", "model.joblib"), ("./a/../b/m.pkl", "b/m.pkl"), (".", "")],
)
def test_relative_uri_is_relative_to_the_model_directory(
    plugin: MLServerPlugin, root: Path, uri: str, expected: str
) -> None:
    model_dir = pulled_dir(
        root, {MODEL_SETTINGS_FILE: json.dumps({"implementation": "x.Y", "parameters": {"uri": uri}})}
    )
    settings = read_settings(plugin.layout(local_model(model_dir)))
    assert settings["parameters"] == {"uri": str(model_dir / expected) if expected else str(model_dir)}


@pytest.mark.parametrize("uri", ["../other__model/secret", "a/../../..", "../model-evil"])
def test_relative_uri_may_not_leave_the_model_directory(plugin: MLServerPlugin, root: Path, uri: str) -> None:
    model_dir = pulled_dir(
        root, {MODEL_SETTINGS_FILE: json.dumps({"implementation": "x.Y", "parameters": {"uri": uri}})}
    )
    with pytest.raises(UnsafePath, match="outside the model directory"):
        plugin.layout(local_model(model_dir))


def test_missing_implementation_is_filled_in_from_a_known_type(plugin: MLServerPlugin, root: Path) -> None:
    model_dir = pulled_dir(root, {MODEL_SETTINGS_FILE: json.dumps({"parameters": {"version": "1"}})})
    settings = read_settings(plugin.layout(local_model(model_dir, "lightgbm")))
    assert settings["implementation"] == "mlserver_lightgbm.LightGBMModel"
    other = pulled_dir(root, {MODEL_SETTINGS_FILE: "{}"}, model_id="other")
    assert "implementation" not in read_settings(plugin.layout(local_model(other, "onnx", model_id="other")))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"parameters": "uri"}', "'parameters' must be an object"),
        ('{"parameters": {"uri": 7}}', "'parameters.uri' must be a string"),
    ],
)
def test_bad_model_settings_are_invalid_and_named(
    plugin: MLServerPlugin, root: Path, content: str, problem: str
) -> None:
    model_dir = pulled_dir(root, {MODEL_SETTINGS_FILE: content})
    with pytest.raises(InvalidRequest) as info:
        plugin.layout(local_model(model_dir))
    assert problem in str(info.value)
    assert str(model_dir / MODEL_SETTINGS_FILE) in str(info.value)


def test_model_settings_that_are_not_utf8_are_invalid(plugin: MLServerPlugin, root: Path) -> None:
    model_dir = pulled_dir(root, {})
    (model_dir / MODEL_SETTINGS_FILE).write_bytes(b"\xff\xfe{}")
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        plugin.layout(local_model(model_dir))


# --- schema ---------------------------------------------------------------------------

SCHEMA = {
    "inputs": [{"name": "predict", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "predict", "datatype": "int64", "shape": [-1], "extra": "ignored"}],
}
MLSERVER_TENSORS = {
    "inputs": [{"name": "predict", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1]}],
}


def write_schema(root: Path, content: object, model_id: str = MODEL_ID) -> Path:
    path = root / model_id / "_schema.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_schema_is_injected_into_generated_settings(plugin: MLServerPlugin, root: Path) -> None:
    model_dir = pulled_dir(root, {"model.joblib": "w"})
    view = plugin.layout(local_model(model_dir, schema=write_schema(root, SCHEMA)))
    assert read_settings(view) == {
        "name": MODEL_ID,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": str(model_dir)},
        **MLSERVER_TENSORS,
    }


def test_schema_overrides_tensors_of_own_settings(plugin: MLServerPlugin, root: Path) -> None:
    own = {
        "implementation": "x.Y",
        "inputs": [{"name": "old", "datatype": "BYTES", "shape": [1]}],
        "outputs": [{"name": "kept", "datatype": "BYTES", "shape": [1]}],
    }
    model_dir = pulled_dir(root, {MODEL_SETTINGS_FILE: json.dumps(own)})
    schema = write_schema(root, {"inputs": SCHEMA["inputs"]})
    settings = read_settings(plugin.layout(local_model(model_dir, schema=schema)))
    assert settings["inputs"] == MLSERVER_TENSORS["inputs"]
    assert settings["outputs"] == own["outputs"]


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ("{oops", "not valid JSON"),
        ([], "JSON object"),
        ({"inputs": {"name": "x"}}, "'inputs' must be a list"),
        ({"inputs": ["x"]}, "inputs[0] must be an object"),
        ({"inputs": [{"datatype": "FP32", "shape": [1]}]}, "'name'"),
        ({"outputs": [{"name": "y", "datatype": "FLOAT", "shape": [1]}]}, "outputs[0]: 'datatype'"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, "2"]}]}, "'shape'"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [True]}]}, "'shape'"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-2]}]}, "'shape'"),
    ],
)
def test_bad_schema_is_invalid_and_named(
    plugin: MLServerPlugin, root: Path, schema: object, problem: str
) -> None:
    model_dir = pulled_dir(root, {"model.joblib": "w"})
    path = write_schema(root, schema)
    with pytest.raises(InvalidRequest) as info:
        plugin.layout(local_model(model_dir, schema=path))
    assert problem in str(info.value)
    assert str(path) in str(info.value)


# --- replacing, removing, safety ------------------------------------------------------


def test_a_new_layout_replaces_the_old_view(plugin: MLServerPlugin, root: Path) -> None:
    first = pulled_dir(root, {MODEL_SETTINGS_FILE: '{"implementation": "x.Y"}', "old.bin": "1", "d/f": "2"})
    view = plugin.layout(local_model(first))
    assert (view / "old.bin").is_symlink()
    (view / "stray").write_text("left by someone")

    second = root / MODEL_ID / "model-v2"
    second.mkdir()
    (second / "model.joblib").write_text("w2")
    assert plugin.layout(local_model(second)) == view
    assert sorted(p.name for p in view.iterdir()) == [MODEL_SETTINGS_FILE]
    assert read_settings(view)["parameters"] == {"uri": str(second)}
    # replacing removed links, not what they pointed at
    assert (first / "old.bin").read_text() == "1"
    assert (first / "d" / "f").read_text() == "2"


def test_a_view_that_is_a_link_is_replaced_without_following_it(plugin: MLServerPlugin, root: Path) -> None:
    elsewhere = root.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    models_dir = root / "_mlserver_models"
    models_dir.mkdir()
    (models_dir / MODEL_ID).symlink_to(elsewhere)
    view = plugin.layout(local_model(pulled_dir(root, {"model.joblib": "w"})))
    assert view.is_dir() and not view.is_symlink()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]


def test_a_bad_request_leaves_the_existing_view_alone(plugin: MLServerPlugin, root: Path) -> None:
    model_dir = pulled_dir(root, {"model.joblib": "w"})
    view = plugin.layout(local_model(model_dir))
    before = snapshot(view)
    with pytest.raises(InvalidRequest):
        plugin.layout(local_model(model_dir, model_type="tensorflow"))
    assert snapshot(view) == before


def test_the_view_is_complete_readable_and_has_no_temporary_files(plugin: MLServerPlugin, root: Path) -> None:
    model_dir = pulled_dir(root, {MODEL_SETTINGS_FILE: "{}", "a": "1", "b": "2"})
    view = plugin.layout(local_model(model_dir))
    assert sorted(p.name for p in view.iterdir()) == sorted(["a", "b", MODEL_SETTINGS_FILE])
    mode = stat.S_IMODE((view / MODEL_SETTINGS_FILE).stat().st_mode)
    assert mode & 0o444 == 0o444


def test_remove_view_removes_links_but_not_the_pulled_files(plugin: MLServerPlugin, root: Path) -> None:
    model_dir = pulled_dir(root, {MODEL_SETTINGS_FILE: "{}", "weights/w.bin": "w"})
    view = plugin.layout(local_model(model_dir))
    plugin.remove_view(MODEL_ID)
    assert not view.exists()
    assert (model_dir / "weights" / "w.bin").read_text() == "w"
    assert (model_dir / MODEL_SETTINGS_FILE).read_text() == "{}"
    plugin.remove_view(MODEL_ID)  # a view that is already gone is fine


@pytest.mark.parametrize("model_id", ["../escape", "_mlserver_models", "a/b", ".."])
def test_unsafe_model_ids_are_refused(plugin: MLServerPlugin, root: Path, model_id: str) -> None:
    model_dir = pulled_dir(root, {"model.joblib": "w"})
    with pytest.raises(InvalidModelId):
        plugin.layout(local_model(model_dir, model_id=model_id))
    assert not (root / "_mlserver_models").exists()


def test_a_missing_model_path_is_invalid(plugin: MLServerPlugin, root: Path) -> None:
    with pytest.raises(InvalidRequest, match="does not exist"):
        plugin.layout(local_model(root / MODEL_ID / "model"))


def test_method_infos_route_v2_inference_by_field_one(plugin: MLServerPlugin) -> None:
    infos = {method: list(path) for method, path in plugin.method_infos().items()}
    assert infos == {
        "inference.GRPCInferenceService/ModelInfer": [1],
        "inference.GRPCInferenceService/ModelMetadata": [1],
    }


def test_the_plugin_is_registered_under_its_name() -> None:
    assert load_runtime_class("mlserver") is MLServerPlugin
    assert MLServerPlugin.name == "mlserver"
