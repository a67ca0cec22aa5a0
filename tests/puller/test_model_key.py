"""ModelKey.parse and validate_model_id: what the network may send us."""

from __future__ import annotations

import json

import pytest

from adapter.errors import InvalidModelId, InvalidModelKey, InvalidRequest
from puller.model_key import MAX_MODEL_ID_LENGTH, ModelKey, validate_model_id

# --- ModelKey.parse: valid keys -------------------------------------------------------


def test_full_key_is_parsed() -> None:
    text = json.dumps(
        {
            "storage_key": "myStorage",
            "storage_params": {"type": "s3", "bucket": "b"},
            "model_type": {"name": "sklearn", "version": "1"},
            "schema_path": "path/to/schema.json",
            "bucket": "legacy",
            "disk_size_bytes": 123,
        }
    )
    key = ModelKey.parse(text)
    assert key.storage_key == "myStorage"
    assert key.storage_params == {"type": "s3", "bucket": "b"}
    assert key.model_type == {"name": "sklearn", "version": "1"}
    assert key.schema_path == "path/to/schema.json"
    assert key.bucket == "legacy"
    assert key.disk_size_bytes == 123


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_text_is_an_empty_key(text: str) -> None:
    assert ModelKey.parse(text) == ModelKey()


def test_empty_object_and_nulls_are_defaults() -> None:
    assert ModelKey.parse("{}") == ModelKey()
    key = ModelKey.parse(
        '{"storage_key": null, "storage_params": null, "model_type": null, '
        '"schema_path": null, "bucket": null, "disk_size_bytes": null}'
    )
    assert key == ModelKey()
    assert key.storage_params == {}


def test_unknown_fields_are_ignored() -> None:
    key = ModelKey.parse('{"storage_key": "s", "something_new": [1, 2, {"x": 3}]}')
    assert key.storage_key == "s"


def test_parsed_params_are_a_copy() -> None:
    data = {"storage_params": {"type": "s3"}}
    key = ModelKey.from_mapping(data)
    data["storage_params"]["type"] = "gcs"
    assert key.storage_params == {"type": "s3"}


def test_zero_disk_size_is_valid() -> None:
    assert ModelKey.parse('{"disk_size_bytes": 0}').disk_size_bytes == 0


# --- ModelKey.parse: malformed --------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "not json",
        '{"storage_key": "a",}',
        '{}{"model_type": {"name": "tensorflow"}}',
        "[" * 100_000 + "]" * 100_000,
    ],
)
def test_malformed_json_is_invalid_model_key(text: str) -> None:
    with pytest.raises(InvalidModelKey, match="not valid JSON"):
        ModelKey.parse(text)


@pytest.mark.parametrize("text", ["[]", '"a string"', "42", "null", "true"])
def test_non_object_is_invalid_model_key(text: str) -> None:
    with pytest.raises(InvalidModelKey, match="must be a JSON object"):
        ModelKey.parse(text)


def test_invalid_model_key_is_an_invalid_request() -> None:
    # the servicer maps InvalidRequest to INVALID_ARGUMENT: no load was attempted
    with pytest.raises(InvalidRequest):
        ModelKey.parse("{")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("storage_key", 1),
        ("storage_key", ["a"]),
        ("storage_key", {"a": "b"}),
        ("storage_key", True),
        ("schema_path", 2),
        ("schema_path", False),
        ("bucket", 3.5),
        ("bucket", {}),
    ],
)
def test_string_fields_of_wrong_type(field: str, value: object) -> None:
    with pytest.raises(InvalidModelKey, match=repr(field)):
        ModelKey.parse(json.dumps({field: value}))


@pytest.mark.parametrize(
    "params",
    [
        "s3",
        ["type", "s3"],
        42,
        {"type": 1},
        {"bucket": None},
        {"headers": {"Authorization": "x"}},
        {"anonymous": True},
    ],
)
def test_storage_params_must_be_an_object_of_strings(params: object) -> None:
    with pytest.raises(InvalidModelKey, match="storage_params"):
        ModelKey.parse(json.dumps({"storage_params": params}))


def test_storage_params_error_names_the_param() -> None:
    with pytest.raises(InvalidModelKey, match=r"storage_params\.bucket"):
        ModelKey.parse('{"storage_params": {"type": "s3", "bucket": 7}}')


@pytest.mark.parametrize("model_type", ["sklearn", ["sklearn"], {"name": 1}, {"name": "x", "version": 2}])
def test_model_type_must_be_an_object_of_strings(model_type: object) -> None:
    with pytest.raises(InvalidModelKey, match="model_type"):
        ModelKey.parse(json.dumps({"model_type": model_type}))


@pytest.mark.parametrize("size", [-1, 1.5, "12", True, False, [1], {"n": 1}])
def test_disk_size_must_be_a_non_negative_integer(size: object) -> None:
    with pytest.raises(InvalidModelKey, match="disk_size_bytes"):
        ModelKey.parse(json.dumps({"disk_size_bytes": size}))


def test_error_messages_do_not_echo_string_values() -> None:
    secret = "s3cr3t-value-do-not-echo"
    with pytest.raises(InvalidModelKey) as info:
        ModelKey.parse(json.dumps({"storage_params": {"secret_access_key": secret, "x": 1}}))
    assert secret not in str(info.value)


# --- layout_type ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "field", "expected"),
    [
        ({"name": "sklearn"}, "", "sklearn"),
        ({"name": "SKLearn"}, "", "sklearn"),
        ({"name": "tensorflow:2"}, "", "tensorflow"),
        ({"name": " XGBoost "}, "", "xgboost"),
        ({"name": "onnx"}, "mt:pytorch", "onnx"),  # the key wins over the field
        ({"name": ""}, "mt:lightgbm", "lightgbm"),  # an empty name falls back
        ({"version": "1"}, "mt:lightgbm", "lightgbm"),  # no name falls back
        (None, "mt:xgboost", "xgboost"),
        (None, "mt:xgboost:1", "xgboost"),
        (None, "mt:XGBoost:1|pv:v2", "xgboost"),
        (None, "mt:sklearn|pv:grpc-v2", "sklearn"),
        (None, "rt:triton", ""),
        (None, "", ""),
        (None, "garbage", ""),
    ],
)
def test_layout_type(model_type: dict[str, str] | None, field: str, expected: str) -> None:
    assert ModelKey(model_type=model_type).layout_type(field) == expected


def test_layout_type_defaults_to_empty_field() -> None:
    assert ModelKey().layout_type() == ""
    assert ModelKey.parse('{"model_type": {"name": "MLflow:1"}}').layout_type() == "mlflow"


# --- validate_model_id ----------------------------------------------------------------


@pytest.mark.parametrize(
    "model_id",
    [
        "mnist__isvc-04bd33724e",
        "example-sklearn-isvc__isvc-8d1dbd5e2b",
        "a",
        "model.v1",
        "...",
        "a..b",
        "x" * MAX_MODEL_ID_LENGTH,
        "modèle-ü",
        "with space",
    ],
)
def test_valid_model_ids(model_id: str) -> None:
    assert validate_model_id(model_id) == model_id


@pytest.mark.parametrize(
    ("model_id", "match"),
    [
        ("", "empty"),
        (".", "not a valid name"),
        ("..", "not a valid name"),
        ("a/b", "must not contain"),
        ("/abs", "must not contain"),
        ("../etc", "must not contain"),
        ("a\\b", "must not contain"),
        ("a\x00b", "control characters"),
        ("a\nb", "control characters"),
        ("a\tb", "control characters"),
        ("a\x1fb", "control characters"),
        ("a\x7fb", "control characters"),
        ("_cache", "start with '_'"),
        ("_mlserver_models", "start with '_'"),
        ("x" * (MAX_MODEL_ID_LENGTH + 1), "longer than"),
        ("é" * (MAX_MODEL_ID_LENGTH // 2 + 1), "longer than"),  # counted in UTF-8 bytes
    ],
)
def test_invalid_model_ids(model_id: str, match: str) -> None:
    with pytest.raises(InvalidModelId, match=match):
        validate_model_id(model_id)


def test_invalid_model_id_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest):
        validate_model_id("a/b")


@pytest.mark.parametrize("char", ["\x85", "\x9b"])
def test_c1_control_characters_are_refused(char: str) -> None:
    with pytest.raises(InvalidModelId):
        validate_model_id(f"a{char}b")
