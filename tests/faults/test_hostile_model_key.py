"""Property tests of the model key parser and the modelId check (``puller.model_key``)
against hostile input: arbitrary text, arbitrary JSON, well-formed keys whose fields
hold the wrong types, huge numbers, deep nesting, lone surrogates spelled as JSON
escapes, and model ids made of traversal segments, separators and control characters.

Properties: parsing either gives a key whose fields have the types the sidecar relies
on, or fails with ``InvalidModelKey`` (an ``InvalidRequest``) whose message names the
field, can be sent as a gRPC status message (valid UTF-8), and never quotes a value;
no other exception escapes. A modelId is either refused with ``InvalidModelId`` or is
one directory name that can be created directly below ROOT_MODEL_DIR and is not one of
the sidecar's own names. The example-based cases are in ``tests/puller/test_model_key.py``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adapter.errors import InvalidModelId, InvalidModelKey, InvalidRequest
from puller.model_key import MAX_MODEL_ID_LENGTH, ModelKey, validate_model_id

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

#: a value no message may ever quote
SECRET = "s3cr3t-d0-n0t-ech0"

#: strings as JSON can carry them: any code point, lone surrogates included
any_text = st.text(st.characters(codec=None), max_size=20) | st.sampled_from(
    ["\ud800", "a\udfffb", "\udcff", "\x00", "../..", "/etc/hostile-key", ""]
)

#: words of field names whose values the secrets guard (``tests/secrets_guard.py``)
#: registers as secrets; generated names avoid them, so that no fuzzed value becomes a
#: "secret" that another test's message then quotes by coincidence (the one secret
#: here is :data:`SECRET`, under names chosen for it)
SECRETISH = re.compile(
    r"secret|pass|token|key|sas|sig|auth|cred|connection|header|url|endpoint", re.IGNORECASE
)


def field_names(max_size: int = 7) -> st.SearchStrategy[str]:
    """Names of JSON fields: any text, short, and not named like a secret."""
    return st.text(st.characters(codec=None), max_size=max_size).filter(lambda n: not SECRETISH.search(n))


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | any_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(field_names(), inner, max_size=3),
    max_leaves=10,
)

#: per field: plausible values, wrong types, and hostile strings
field_values: dict[str, st.SearchStrategy[Any]] = {
    "storage_key": json_values,
    "schema_path": json_values,
    "bucket": json_values,
    "storage_params": json_values | st.dictionaries(field_names(), any_text | json_values, max_size=4),
    "model_type": json_values | st.dictionaries(field_names(), any_text | json_values, max_size=3),
    "disk_size_bytes": json_values | st.integers(min_value=-(2**70), max_value=2**70),
}

model_keys = st.fixed_dictionaries({}, optional=field_values).flatmap(
    lambda known: st.dictionaries(field_names(), json_values, max_size=2).map(
        lambda extra: {**extra, **known}
    )
)


def check_refusal(exc: InvalidModelKey) -> None:
    """A refusal names what is wrong and fits in a gRPC status message."""
    assert isinstance(exc, InvalidRequest)
    message = str(exc)
    assert message.startswith("modelKey"), message
    message.encode("utf-8")  # a lone surrogate here would break the status message


def check_key(key: ModelKey) -> None:
    """The types the rest of the sidecar relies on, every string valid Unicode."""
    for text in (key.storage_key, key.schema_path, key.bucket):
        assert text is None or isinstance(text, str)
        if text is not None:
            text.encode("utf-8")
    assert isinstance(key.storage_params, dict)
    for name, value in key.storage_params.items():
        assert isinstance(name, str) and isinstance(value, str)
        (name + value).encode("utf-8")
    for name, value in (key.model_type or {}).items():
        assert isinstance(name, str) and isinstance(value, str)
        (name + value).encode("utf-8")
    size = key.disk_size_bytes
    assert size is None or (type(size) is int and size >= 0)


def parse_or_refuse(text: str) -> ModelKey | None:
    try:
        key = ModelKey.parse(text)
    except InvalidModelKey as exc:
        check_refusal(exc)
        return None
    check_key(key)
    return key


@FUZZ
@given(text=st.text(st.characters(codec=None), max_size=200))
@example(text="[" * 100_000)  # nested deeper than the interpreter recurses
@example(text='{"storage_params": {"a": "' + "\\ud800" + '"}}')
@example(text='{"storage_key": 1e999999}')
@example(text='{"disk_size_bytes": ' + "9" * 5000 + "}")  # over int's digit limit
@example(text="\ufeff{}")
def test_any_text_parses_or_is_refused(text: str) -> None:
    parse_or_refuse(text)


@FUZZ
@given(data=model_keys, ascii_only=st.booleans())
@example(data={"schema_path": "\ud800"}, ascii_only=True)
@example(data={"storage_params": {"\udcff": "x"}}, ascii_only=True)
@example(data={"model_type": {"name": "a\udfffb"}}, ascii_only=False)
def test_any_json_object_parses_or_is_refused(data: dict[str, Any], ascii_only: bool) -> None:
    key = parse_or_refuse(json.dumps(data, ensure_ascii=ascii_only))
    if key is None:
        return
    # what parsed is what was sent, for the fields read
    assert key.storage_params == (data.get("storage_params") or {})
    assert key.storage_key == data.get("storage_key")
    assert key.disk_size_bytes == data.get("disk_size_bytes")


#: a value under a name that says secret: the secret itself, or a wrong type
secret_or_not = (
    st.just(SECRET) | st.integers() | st.booleans() | st.none() | st.lists(st.just(SECRET), max_size=2)
)


@FUZZ
@given(
    params=st.fixed_dictionaries(
        {"secret_access_key": secret_or_not},
        optional=dict.fromkeys(("password", "token", "region", "a.b"), secret_or_not),
    ),
    field=st.sampled_from(["storage_params", "model_type"]),
)
@example(params={"secret_access_key": SECRET, "n": 1}, field="storage_params")
def test_no_refusal_quotes_a_value(params: dict[str, Any], field: str) -> None:
    """Values may be secrets (storage params carry credentials): a message names the
    field, never its value."""
    try:
        ModelKey.parse(json.dumps({field: params, "storage_key": SECRET + "!"}))
    except InvalidModelKey as exc:
        check_refusal(exc)
        assert SECRET not in str(exc)


@FUZZ
@given(data=model_keys, model_type_field=st.text(max_size=30))
def test_layout_type_of_any_key_is_a_plain_word(data: dict[str, Any], model_type_field: str) -> None:
    key = parse_or_refuse(json.dumps(data))
    if key is None:
        return
    kind = key.layout_type(model_type_field)
    assert isinstance(kind, str)
    assert ":" not in kind and kind == kind.lower()


# --- modelId ------------------------------------------------------------------------------------

#: pieces of hostile ids: traversal, separators, controls (C0 and C1), the sidecar's own
#: names, lone surrogates, and long runs of multi-byte characters
ID_PIECES = [
    ".",
    "..",
    "/",
    "\\",
    "\x00",
    "\n",
    "\x7f",
    "\x85",
    "_",
    "_tmp",
    "_cache",
    "mnist__isvc-1",
    "é",
    "数据",
    "\U0001f600",
    "\ud800",
    "\udcff",
    " ",
    "\u202e",
]

model_ids = st.lists(st.sampled_from(ID_PIECES) | st.text(max_size=8), max_size=6).map("".join) | st.text(
    st.characters(codec=None), max_size=300
)


@pytest.fixture(scope="module")
def id_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ROOT_MODEL_DIR in which accepted ids are created (and removed again)."""
    return tmp_path_factory.mktemp("root-model-dir")


@FUZZ
@given(model_id=model_ids)
@example(model_id="\ud800")  # no file name can hold a lone surrogate
@example(model_id="a\udcffb")
@example(model_id="é" * 127 + "x")  # 255 bytes: the longest that fits
@example(model_id="..\\..")
def test_a_model_id_is_refused_or_one_name_below_the_root(id_root: Path, model_id: str) -> None:
    try:
        accepted = validate_model_id(model_id)
    except InvalidModelId as exc:
        assert isinstance(exc, InvalidRequest)
        assert str(exc).startswith("modelId"), str(exc)
        str(exc).encode("utf-8")
        return
    assert accepted == model_id
    assert len(model_id.encode("utf-8")) <= MAX_MODEL_ID_LENGTH
    assert not model_id.startswith("_"), "names starting with '_' are the sidecar's"
    before = set(os.listdir(id_root))
    path = id_root / model_id
    assert path.parent == id_root and path.name == model_id
    path.mkdir()  # it can be made: no OSError, no UnicodeEncodeError
    try:
        assert os.path.realpath(path) == os.path.join(os.path.realpath(id_root), model_id)
        assert set(os.listdir(id_root)) == before | {model_id}
    finally:
        path.rmdir()
