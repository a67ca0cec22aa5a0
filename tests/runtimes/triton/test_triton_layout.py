"""The Triton view of a pulled model: every layout rule, the config.pbtxt edit and the
generated config, on a real file system (no Triton needed)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from adapter.errors import InvalidModelId, InvalidRequest
from adapter.plugin import load_runtime_class
from adapter.settings import Settings
from puller.model_key import ModelKey
from puller.request import LocalModel
from runtimes.triton import TritonPlugin
from runtimes.triton_config import CONFIG_FILE, TRITON_DATA_TYPES, without_top_level_name
from tests.servers.triton_models import CONFIG_PBTXT

MODEL_ID = "resnet__isvc-0123456789"


@pytest.fixture
def plugin(root: Path) -> TritonPlugin:
    return TritonPlugin(Settings(root_model_dir=root))


def local_model(
    path: Path, model_type: str = "onnx", schema: Path | None = None, model_id: str = MODEL_ID
) -> LocalModel:
    return LocalModel(
        model_id=model_id,
        path=path,
        disk_size_bytes=0,
        model_type=model_type,
        schema_path=schema,
        model_key=ModelKey(),
    )


def pulled(root: Path, files: dict[str, str], name: str = "model", model_id: str = MODEL_ID) -> Path:
    """A pulled model ROOT/<id>/<name>: a directory holding ``files`` (a name ending
    in ``/`` is an empty directory)."""
    model_dir = root / model_id / name
    model_dir.mkdir(parents=True, exist_ok=True)
    for relative, text in files.items():
        target = model_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative.endswith("/"):
            target.mkdir(exist_ok=True)
        else:
            target.write_text(text)
    return model_dir


def pulled_file(root: Path, name: str, model_id: str = MODEL_ID) -> Path:
    path = root / model_id / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return path


def schema_file(root: Path, schema: dict[str, Any], model_id: str = MODEL_ID) -> Path:
    path = root / model_id / "_schema.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(schema))
    return path


def tree(view: Path) -> dict[str, str]:
    """Every entry under ``view``: ``-> target`` for links, ``dir`` or ``file``."""
    result: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(view):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(view))
            if path.is_symlink():
                result[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                result[key] = "dir"
            else:
                result[key] = "file"
    return result


def snapshot(path: Path) -> dict[str, tuple[str, bytes | str | None]]:
    result: dict[str, tuple[str, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            key = str(entry.relative_to(path))
            if entry.is_symlink():
                result[key] = ("link", os.readlink(entry))
            elif entry.is_dir():
                result[key] = ("dir", None)
            else:
                result[key] = ("file", entry.read_bytes())
    return result


# --- a model with its own config.pbtxt --------------------------------------------------


def test_own_config_is_copied_without_its_name_and_the_rest_linked(plugin: TritonPlugin, root: Path) -> None:
    model_dir = pulled(root, {CONFIG_FILE: CONFIG_PBTXT, "1/model.py": "code", "labels.txt": "a\n"})
    view = plugin.layout(local_model(model_dir, model_type="python"))
    assert view == root / "_triton_models" / MODEL_ID
    assert tree(view) == {
        CONFIG_FILE: "file",
        "1": f"-> {model_dir / '1'}",
        "labels.txt": f"-> {model_dir / 'labels.txt'}",
    }
    assert (view / CONFIG_FILE).read_text() == CONFIG_PBTXT.replace(
        'name: "the-authors-name"  # only valid in a directory of that name\n', ""
    )


def test_own_config_wins_over_a_schema_and_the_model_type(plugin: TritonPlugin, root: Path) -> None:
    model_dir = pulled(root, {CONFIG_FILE: 'backend: "python"\n', "1/model.py": "code"})
    schema = schema_file(root, {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]})
    view = plugin.layout(local_model(model_dir, model_type="keras", schema=schema))
    assert (view / CONFIG_FILE).read_text() == 'backend: "python"\n'


def test_own_config_keeps_its_bytes_exactly_without_a_name(plugin: TritonPlugin, root: Path) -> None:
    text = 'platform: "onnxruntime_onnx"\r\n\r\n# tuned\r\nmax_batch_size: 8\r\n'
    model_dir = pulled(root, {"1/": ""})
    (model_dir / CONFIG_FILE).write_bytes(text.encode())
    view = plugin.layout(local_model(model_dir))
    assert (view / CONFIG_FILE).read_bytes() == text.encode()


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ('name: "m"\nbackend: "python"\n', 'backend: "python"\n'),
        ('backend: "python"\nname: "m"\n', 'backend: "python"\n'),
        ('backend: "python"\nname: "m"', 'backend: "python"\n'),
        ('name:"m"\n', ""),
        ("name: 'm'\n", ""),
        ('name: "a" "b"\nbackend: "python"\n', 'backend: "python"\n'),
        ('  name: "m"   # the name\nbackend: "python"\n', 'backend: "python"\n'),
        ('name: "m" backend: "python"\n', 'backend: "python"\n'),
        ('backend: "python" name: "m"\n', 'backend: "python" \n'),
        ('name: "m", backend: "python"\n', 'backend: "python"\n'),
        ('name: "m";\nbackend: "python"\n', 'backend: "python"\n'),
        ('name: "m"\r\nbackend: "python"\r\n', 'backend: "python"\r\n'),
        ('name: "a"\nname: "b"\nbackend: "python"\n', 'backend: "python"\n'),
        ('name: "with \\" quote and # hash"\nbackend: "python"\n', 'backend: "python"\n'),
        # nested name fields, names in comments and strings stay
        (
            'input [ { name: "x" dims: [ -1 ] } ]\noutput { name: "y" }\n',
            'input [ { name: "x" dims: [ -1 ] } ]\noutput { name: "y" }\n',
        ),
        ("# name: \"m\"\nbackend: 'name: m'\n", "# name: \"m\"\nbackend: 'name: m'\n"),
        ('parameters < key: "name" value < string_value: "n" > >\n',) * 2,
        ("", ""),
        (
            'name: "m"\ninstance_group [ { kind: KIND_CPU, count: 2 } ]\n',
            "instance_group [ { kind: KIND_CPU, count: 2 } ]\n",
        ),
        ('named: "m"\nname_x: 1\n', 'named: "m"\nname_x: 1\n'),
        ('default_model_filename: "name"\nname: "m"\n', 'default_model_filename: "name"\n'),
    ],
)
def test_only_top_level_name_fields_are_removed(before: str, after: str) -> None:
    assert without_top_level_name(before, Path(CONFIG_FILE)) == after


@pytest.mark.parametrize(
    "text",
    [
        'name: "unterminated\n',
        'input [ { name: "x" }\n',
        'input { name: "x" ]\n',
        "}\n",
        "name\n",
        "name:\n",
        ': "m"\n',
        "name { first: 1 }\n",
        'backend: "python" @\n',
    ],
)
def test_a_config_that_is_not_text_format_is_refused(text: str) -> None:
    with pytest.raises(InvalidRequest, match=CONFIG_FILE):
        without_top_level_name(text, Path(CONFIG_FILE))


def test_a_config_that_is_not_utf8_is_refused_before_the_view_changes(
    plugin: TritonPlugin, root: Path
) -> None:
    old = plugin.layout(local_model(pulled_file(root, "net.onnx", model_id="other"), model_id="other"))
    before = snapshot(old)
    model_dir = pulled(root, {"1/": ""}, model_id="other")
    (model_dir / CONFIG_FILE).write_bytes(b'name: "\xff"\n')
    with pytest.raises(InvalidRequest, match="UTF-8"):
        plugin.layout(local_model(model_dir, model_id="other"))
    assert snapshot(old) == before


# --- a model file laid out by type ------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "file_name", "expected"),
    [
        ("onnx", "resnet.onnx", "model.onnx"),
        ("onnx", "weights.bin", "model.onnx"),
        ("pytorch", "traced.pt", "model.pt"),
        ("tensorrt", "engine.plan", "model.plan"),
        ("tensorflow", "frozen.pb", "model.graphdef"),
        ("python", "doubler.py", "model.py"),
        ("ONNX", "resnet.onnx", "model.onnx"),
        ("onnx:1", "resnet.onnx", "model.onnx"),
    ],
)
def test_a_bare_file_becomes_version_1(
    plugin: TritonPlugin, root: Path, model_type: str, file_name: str, expected: str
) -> None:
    model_file = pulled_file(root, file_name)
    view = plugin.layout(local_model(model_file, model_type=model_type))
    assert tree(view) == {"1": "dir", f"1/{expected}": f"-> {model_file}"}


def test_a_savedmodel_directory_becomes_model_savedmodel(plugin: TritonPlugin, root: Path) -> None:
    model_dir = pulled(root, {"saved_model.pb": "graph", "variables/variables.index": "v"})
    view = plugin.layout(local_model(model_dir, model_type="tensorflow"))
    assert tree(view) == {"1": "dir", "1/model.savedmodel": f"-> {model_dir}"}


def test_a_savedmodel_inside_the_directory(plugin: TritonPlugin, root: Path) -> None:
    model_dir = pulled(root, {"export/saved_model.pbtxt": "graph", "README.md": "about"})
    view = plugin.layout(local_model(model_dir, model_type="tensorflow"))
    assert tree(view) == {
        "1": "dir",
        "1/model.savedmodel": f"-> {model_dir / 'export'}",
        "1/README.md": f"-> {model_dir / 'README.md'}",
    }


def test_the_model_file_is_renamed_and_its_siblings_linked(plugin: TritonPlugin, root: Path) -> None:
    model_dir = pulled(root, {"net.onnx": "w", "vocab.txt": "v", ".hidden": "h"})
    view = plugin.layout(local_model(model_dir))
    assert tree(view) == {
        "1": "dir",
        "1/model.onnx": f"-> {model_dir / 'net.onnx'}",
        "1/vocab.txt": f"-> {model_dir / 'vocab.txt'}",
    }


def test_the_file_already_named_for_triton_wins(plugin: TritonPlugin, root: Path) -> None:
    model_dir = pulled(root, {"model.onnx": "w", "older.onnx": "w"})
    view = plugin.layout(local_model(model_dir))
    assert tree(view)["1/model.onnx"] == f"-> {model_dir / 'model.onnx'}"
    assert tree(view)["1/older.onnx"] == f"-> {model_dir / 'older.onnx'}"


def test_the_largest_numeric_version_is_used(plugin: TritonPlugin, root: Path) -> None:
    model_dir = pulled(
        root, {"2/model.onnx": "old", "10/net.onnx": "new", "9/model.onnx": "older", "labels.txt": "l"}
    )
    view = plugin.layout(local_model(model_dir))
    assert tree(view) == {
        "10": "dir",
        "10/model.onnx": f"-> {model_dir / '10' / 'net.onnx'}",
        "labels.txt": f"-> {model_dir / 'labels.txt'}",
    }


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"a.onnx": "w", "b.onnx": "w"}, "several onnx model candidates.*a.onnx, b.onnx"),
        ({"README.md": "r", "notes.txt": "n"}, "no onnx model found"),
        ({"sub/": ""}, "no onnx model found"),
    ],
)
def test_no_or_several_candidates_are_refused(
    plugin: TritonPlugin, root: Path, files: dict[str, str], match: str
) -> None:
    with pytest.raises(InvalidRequest, match=match):
        plugin.layout(local_model(pulled(root, files)))


def test_a_version_keeps_the_name_of_its_directory(plugin: TritonPlugin, root: Path) -> None:
    model_dir = pulled(root, {"007/net.pt": "w", "6/": ""})
    view = plugin.layout(local_model(model_dir, model_type="pytorch"))
    assert tree(view) == {"007": "dir", "007/model.pt": f"-> {model_dir / '007' / 'net.pt'}"}


def test_a_single_unrecognised_file_is_taken_as_the_model(plugin: TritonPlugin, root: Path) -> None:
    model_dir = pulled(root, {"weights": "w"})
    view = plugin.layout(local_model(model_dir, model_type="pytorch"))
    assert tree(view) == {"1": "dir", "1/model.pt": f"-> {model_dir / 'weights'}"}


def test_keras_needs_conversion(plugin: TritonPlugin, root: Path) -> None:
    with pytest.raises(InvalidRequest, match="convert it to a TensorFlow SavedModel"):
        plugin.layout(local_model(pulled_file(root, "model.h5"), model_type="keras"))


@pytest.mark.parametrize("model_type", ["", "sklearn", "xgboost"])
def test_a_type_triton_cannot_lay_out_without_a_config_is_refused(
    plugin: TritonPlugin, root: Path, model_type: str
) -> None:
    with pytest.raises(InvalidRequest, match=r"onnx, python, pytorch, tensorflow, tensorrt"):
        plugin.layout(local_model(pulled_file(root, "model.bin"), model_type=model_type))


@pytest.mark.parametrize("model_type", ["", "xgboost"])
def test_tritons_own_layout_is_linked_as_it_is(plugin: TritonPlugin, root: Path, model_type: str) -> None:
    model_dir = pulled(root, {"1/model.onnx": "w", "3/model.onnx": "w", "labels.txt": "l"})
    view = plugin.layout(local_model(model_dir, model_type=model_type))
    assert tree(view) == {
        "1": f"-> {model_dir / '1'}",
        "3": f"-> {model_dir / '3'}",
        "labels.txt": f"-> {model_dir / 'labels.txt'}",
    }


# --- config.pbtxt generated from the schema ------------------------------------------


def test_a_schema_generates_the_config(plugin: TritonPlugin, root: Path) -> None:
    model_file = pulled_file(root, "doubler.py")
    schema = schema_file(
        root,
        {
            "inputs": [
                {"name": "values", "datatype": "FP32", "shape": [-1, 3]},
                {"name": "mask", "datatype": "bool", "shape": [-1]},
            ],
            "outputs": [{"name": "doubled", "datatype": "FP32", "shape": [-1, 3]}],
        },
    )
    view = plugin.layout(local_model(model_file, model_type="python", schema=schema))
    assert tree(view) == {CONFIG_FILE: "file", "1": "dir", "1/model.py": f"-> {model_file}"}
    assert (view / CONFIG_FILE).read_text() == (
        "# from the model's schema _schema.json\n"
        'backend: "python"\n'
        "input [\n"
        "  {\n"
        '    name: "values"\n'
        "    data_type: TYPE_FP32\n"
        "    dims: [ -1, 3 ]\n"
        "  },\n"
        "  {\n"
        '    name: "mask"\n'
        "    data_type: TYPE_BOOL\n"
        "    dims: [ -1 ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        '    name: "doubled"\n'
        "    data_type: TYPE_FP32\n"
        "    dims: [ -1, 3 ]\n"
        "  }\n"
        "]\n"
    )
    # it is text format our own reader accepts, and carries no name to remove
    text = (view / CONFIG_FILE).read_text()
    assert without_top_level_name(text, view / CONFIG_FILE) == text


@pytest.mark.parametrize(
    ("model_type", "file_name", "lines"),
    [
        ("onnx", "net.onnx", ['backend: "onnxruntime"']),
        ("pytorch", "net.pt", ['backend: "pytorch"']),
        ("tensorrt", "net.plan", ['backend: "tensorrt"']),
        ("tensorflow", "net.graphdef", ['backend: "tensorflow"', 'platform: "tensorflow_graphdef"']),
        ("python", "m.py", ['backend: "python"']),
    ],
)
def test_the_generated_config_names_the_backend_of_the_type(
    plugin: TritonPlugin, root: Path, model_type: str, file_name: str, lines: list[str]
) -> None:
    schema = schema_file(root, {"outputs": [{"name": "y", "datatype": "INT64", "shape": [2]}]})
    view = plugin.layout(local_model(pulled_file(root, file_name), model_type=model_type, schema=schema))
    text = (view / CONFIG_FILE).read_text().splitlines()
    assert text[1 : 1 + len(lines)] == lines
    assert "input [" not in text


def test_a_savedmodel_config_names_its_platform(plugin: TritonPlugin, root: Path) -> None:
    model_dir = pulled(root, {"saved_model.pb": "g"})
    schema = schema_file(root, {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]})
    view = plugin.layout(local_model(model_dir, model_type="tensorflow", schema=schema))
    assert 'platform: "tensorflow_savedmodel"' in (view / CONFIG_FILE).read_text()


def test_tritons_own_layout_with_a_schema_leaves_the_backend_to_triton(
    plugin: TritonPlugin, root: Path
) -> None:
    model_dir = pulled(root, {"1/model.onnx": "w"})
    schema = schema_file(root, {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]})
    view = plugin.layout(local_model(model_dir, model_type="", schema=schema))
    text = (view / CONFIG_FILE).read_text()
    assert "backend" not in text
    assert "platform" not in text
    assert 'name: "x"' in text


@pytest.mark.parametrize(("datatype", "triton_type"), sorted(TRITON_DATA_TYPES.items()))
def test_every_v2_datatype_has_its_triton_type(
    plugin: TritonPlugin, root: Path, datatype: str, triton_type: str
) -> None:
    schema = schema_file(root, {"inputs": [{"name": "x", "datatype": datatype, "shape": [4]}]})
    view = plugin.layout(local_model(pulled_file(root, "m.onnx"), schema=schema))
    assert f"    data_type: {triton_type}\n" in (view / CONFIG_FILE).read_text()


def test_a_scalar_is_reshaped(plugin: TritonPlugin, root: Path) -> None:
    schema = schema_file(root, {"inputs": [{"name": "t", "datatype": "FP32", "shape": []}]})
    view = plugin.layout(local_model(pulled_file(root, "m.onnx"), schema=schema))
    text = (view / CONFIG_FILE).read_text()
    assert "    dims: [ 1 ]\n    reshape: { shape: [ ] }\n" in text


def test_tensor_names_are_quoted_as_text_format(plugin: TritonPlugin, root: Path) -> None:
    schema = schema_file(root, {"inputs": [{"name": 'a"b\\c', "datatype": "FP32", "shape": [1]}]})
    view = plugin.layout(local_model(pulled_file(root, "m.onnx"), schema=schema))
    assert '    name: "a\\"b\\\\c"\n' in (view / CONFIG_FILE).read_text()


@pytest.mark.parametrize(
    ("schema", "match"),
    [
        ([1, 2], "JSON object"),
        ({"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1]}]}, "datatype"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-2]}]}, "shape"),
        ({"inputs": [{"datatype": "FP32", "shape": [1]}]}, "name"),
        ({"inputs": {"name": "x"}}, "must be a list"),
    ],
)
def test_a_bad_schema_is_refused(plugin: TritonPlugin, root: Path, schema: object, match: str) -> None:
    path = root / MODEL_ID / "_schema.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(schema))
    with pytest.raises(InvalidRequest, match=match):
        plugin.layout(local_model(pulled_file(root, "m.onnx"), schema=path))


# --- the view as a whole --------------------------------------------------------------


def test_a_new_view_replaces_the_old_one_whole(plugin: TritonPlugin, root: Path) -> None:
    first = pulled_file(root, "net.onnx")
    view = plugin.layout(local_model(first))
    (view / "stale.txt").write_text("from before")
    second = pulled(root, {CONFIG_FILE: 'name: "x"\nbackend: "onnxruntime"\n', "1/model.onnx": "w"})
    assert plugin.layout(local_model(second)) == view
    assert tree(view) == {CONFIG_FILE: "file", "1": f"-> {second / '1'}"}
    # no temporary names are left beside it
    assert [p.name for p in plugin.models_dir.iterdir()] == [MODEL_ID]


def test_a_refused_request_leaves_the_old_view_as_it_was(plugin: TritonPlugin, root: Path) -> None:
    view = plugin.layout(local_model(pulled_file(root, "net.onnx")))
    before = snapshot(plugin.models_dir)
    with pytest.raises(InvalidRequest):
        plugin.layout(local_model(pulled(root, {"a.onnx": "", "b.onnx": ""}, name="other")))
    with pytest.raises(InvalidRequest):
        plugin.layout(local_model(root / MODEL_ID / "missing"))
    assert snapshot(plugin.models_dir) == before
    assert view.is_dir()


def test_a_failed_write_leaves_no_staging_and_the_old_view(
    plugin: TritonPlugin, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin.layout(local_model(pulled_file(root, "net.onnx")))
    before = snapshot(plugin.models_dir)

    def fail(self: object, root: Path) -> None:
        (root / "half").write_text("written before the failure")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("runtimes.triton.ViewPlan.write", fail)
    with pytest.raises(OSError, match="No space"):
        plugin.layout(local_model(pulled_file(root, "other.onnx")))
    assert snapshot(plugin.models_dir) == before


def test_the_pulled_files_are_never_touched(plugin: TritonPlugin, root: Path) -> None:
    model_dir = pulled(root, {CONFIG_FILE: CONFIG_PBTXT, "1/model.py": "code"})
    before = snapshot(model_dir)
    plugin.layout(local_model(model_dir, model_type="python"))
    plugin.remove_view(MODEL_ID)
    assert snapshot(model_dir) == before
    assert not plugin.view_dir(MODEL_ID).exists()


def test_the_view_is_readable_by_another_user(plugin: TritonPlugin, root: Path) -> None:
    model_dir = pulled(root, {CONFIG_FILE: 'backend: "python"\n', "1/model.py": "code"})
    view = plugin.layout(local_model(model_dir, model_type="python"))
    assert stat.S_IMODE(view.stat().st_mode) & 0o005 == 0o005
    assert stat.S_IMODE((view / CONFIG_FILE).stat().st_mode) == 0o644
    generated = plugin.layout(
        local_model(
            pulled_file(root, "m.py", model_id="gen"),
            model_type="python",
            schema=schema_file(root, {"inputs": []}, model_id="gen"),
            model_id="gen",
        )
    )
    assert stat.S_IMODE((generated / "1").stat().st_mode) & 0o005 == 0o005


def test_a_missing_model_path_is_refused(plugin: TritonPlugin, root: Path) -> None:
    with pytest.raises(InvalidRequest, match="does not exist"):
        plugin.layout(local_model(root / MODEL_ID / "model"))


@pytest.mark.parametrize("model_id", ["", "_triton_models", "../escape", "a/b"])
def test_an_unsafe_model_id_is_refused(plugin: TritonPlugin, root: Path, model_id: str) -> None:
    with pytest.raises(InvalidModelId):
        plugin.layout(local_model(pulled_file(root, "net.onnx"), model_id=model_id))


def test_the_entry_point_names_the_plugin() -> None:
    assert load_runtime_class("triton") is TritonPlugin
    assert TritonPlugin.name == "triton"
    assert TritonPlugin.default_runtime_port == 8001
