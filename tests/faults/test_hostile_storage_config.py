"""Property tests of storage-config resolution (``puller.config``) and storage URIs
(``puller.uri``) against hostile input.

A storage-config directory of arbitrary entries (JSON objects of any shape, JSON that
is no object, bytes that are no JSON, hidden names) is resolved for arbitrary model
keys: storage keys that look like paths (``../secret``, an absolute path, ``..data``),
typed and untyped storage params, dotted params that run into strings, lists and
objects, and a top-level bucket. Properties: resolution gives a config of a known type
built only from the named entry and the key, never from a file outside the directory
nor from a hidden one, or fails with ``StorageConfigError``; no message quotes a
secret; no other exception escapes; the cached entries are never changed.

Storage URIs of any text either map to storage params of a known type and a path, or
are refused with ``InvalidRequest``. The example-based rules are in
``tests/puller/test_config.py`` and ``tests/puller/test_uri.py``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from adapter.errors import InvalidModelKey, InvalidRequest, StorageConfigError
from puller.config import StorageConfig, StorageConfigDirectory, resolve_storage
from puller.model_key import ModelKey
from puller.uri import params_for_uri
from tests.faults.test_hostile_model_key import field_names

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

KNOWN = frozenset({"s3", "gcs", "azure", "http", "https", "pvc", "file", "oci"})
#: a credential in the entries: it must never reach a message or a repr
SECRET = "S3CR3T-7a6b5c4d3e2f"
#: what the file beside the directory holds: never part of a resolved config
OUTSIDE_MARK = "OUTSIDE-1f2e3d4c"

#: entry names: ordinary, hidden (Kubernetes' own), and ones that look like paths
ENTRY_NAMES = ["default", "default_s3", "default_pvc", "s3", "myStorage", ".hidden", "..data", "a b", "é"]

#: storage keys: entry names, and names that lead out of the directory or into it
STORAGE_KEYS = [
    *ENTRY_NAMES,
    "",
    ".",
    "..",
    "../outside",
    "../storage-config/default",
    "/etc/passwd",
    "{DIR}/default",
    "{ROOT}/outside",
    "default/",
    "./default",
    "default\x00",
    "..data/default",
]

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(field_names(4), inner, max_size=3),
    max_leaves=8,
)
#: field names: the ones backends read, dotted ones, and arbitrary text
entry_field_names = st.sampled_from(
    ["type", "bucket", "default_bucket", "root", "name", "region", "a", "a.b", "unpack", ""]
) | field_names(5)

entry_objects = st.dictionaries(
    entry_field_names,
    json_values | st.sampled_from(sorted(KNOWN)),
    max_size=5,
).map(lambda fields: {**fields, "secret_access_key": SECRET})

#: what a file of the directory holds: a JSON object, JSON that is no object, or bytes
entry_contents = (
    entry_objects.map(lambda obj: json.dumps(obj).encode())
    | json_values.map(lambda value: json.dumps(value).encode())
    | st.binary(max_size=40)
    | st.sampled_from([b"[" * 100_000, b'{"type": 1e999999}', b"\xff\xfe{}", b""])
)

#: dotted storage params, names that run into objects, strings and lists
param_names = st.sampled_from(
    ["type", "bucket", "a", "a.b", "a.b.c", "bucket.x", "a..b", ".a", "a.", "."]
) | field_names(6)
param_values = st.sampled_from(sorted(KNOWN)) | st.text(max_size=8)


@contextmanager
def config_tree(parent: Path, entries: Mapping[str, bytes]) -> Iterator[tuple[Path, Path]]:
    """``(root, directory)``: a fresh folder holding the storage-config ``directory``
    with ``entries``, and beside it a file ``outside`` that is a valid entry of its own
    (an attack that reads it shows up as :data:`OUTSIDE_MARK` in a config)."""
    root = Path(tempfile.mkdtemp(prefix="ex.", dir=parent))
    try:
        directory = root / "storage-config"
        directory.mkdir()
        outside = json.dumps({"type": "s3", "bucket": OUTSIDE_MARK, "secret_access_key": SECRET})
        (root / "outside").write_text(outside)
        (root / "default").write_text(outside)
        for name, content in entries.items():
            (directory / name).write_bytes(content)
        yield root, directory
    finally:
        shutil.rmtree(root)


def expand(text: str, root: Path, directory: Path) -> str:
    return text.replace("{DIR}", str(directory)).replace("{ROOT}", str(root))


def check_config(config: StorageConfig, key: ModelKey, directory: StorageConfigDirectory) -> None:
    """A resolved config: a known type, from a visible entry (or none), nothing from
    outside the directory, and a repr without values."""
    assert config.type in KNOWN
    assert config.name is None or config.name in directory.names(), config.name
    if config.name is not None:
        assert not config.name.startswith(".")
    assert OUTSIDE_MARK not in json.dumps(dict(config.fields), default=str)
    assert SECRET not in repr(config)
    if key.storage_key is not None:
        assert config.name == key.storage_key


def check_refusal(exc: StorageConfigError) -> None:
    message = str(exc)
    assert message.strip()
    message.encode("utf-8")
    assert SECRET not in message, message
    assert OUTSIDE_MARK not in message, message


@FUZZ
@given(
    entries=st.dictionaries(st.sampled_from(ENTRY_NAMES), entry_contents, max_size=4),
    storage_key=st.none() | st.sampled_from(STORAGE_KEYS),
    params=st.dictionaries(param_names, param_values, max_size=4),
    bucket=st.none() | st.text(max_size=5),
)
@example(entries={}, storage_key="../outside", params={}, bucket=None)
@example(entries={}, storage_key="{ROOT}/outside", params={"type": "s3"}, bucket=None)
@example(entries={"..data": b'{"type": "s3"}'}, storage_key="..data", params={}, bucket=None)
@example(entries={"default": b"[" * 100_000}, storage_key=None, params={}, bucket=None)
@example(
    entries={"s3": json.dumps({"type": "s3", "a": ["x"], "secret_access_key": SECRET}).encode()},
    storage_key="s3",
    params={"a.b": "x", "bucket.x": "y"},
    bucket="b",
)
def test_resolution_uses_only_the_named_entry(
    tmp_path: Path,
    entries: dict[str, bytes],
    storage_key: str | None,
    params: dict[str, str],
    bucket: str | None,
) -> None:
    with config_tree(tmp_path, entries) as (root, path):
        directory = StorageConfigDirectory(path)
        raw_key: dict[str, Any] = {"storage_params": params, "bucket": bucket}
        if storage_key is not None:
            raw_key["storage_key"] = expand(storage_key, root, path)
        try:
            key = ModelKey.from_mapping(raw_key)
        except InvalidModelKey:  # pragma: no cover - the strategies make valid keys
            assume(False)
            return
        snapshot = {name: copy.deepcopy(directory.get(name)) for name in directory.names()}
        try:
            config = resolve_storage(key, directory, KNOWN)
        except StorageConfigError as exc:
            check_refusal(exc)
        else:
            check_config(config, key, directory)
        # resolution works on copies: the cached entries are as they were read
        assert {name: directory.get(name) for name in directory.names()} == snapshot


# --- storage URIs ---------------------------------------------------------------------------------

uri_schemes = st.sampled_from(["s3", "gs", "pvc", "http", "https", "oci", "file", "S3", "ftp", "", "s3a"])
uri_hosts = st.sampled_from(
    [
        "bucket",
        "",
        "..",
        "[",
        "[::1",
        "[::1]",
        "user:pass@host",
        "acct.blob.core.windows.net",
        ".blob.core.windows.net",
        "host:99999999",
        "host:port",
        "%2e%2e",
    ]
) | st.text(max_size=8)
uri_paths = st.sampled_from(
    [
        "",
        "/",
        "/model",
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/x",
        "/a%00b",
        "/a%2fb",
        "/c/d?sig=x",
        "/%ff",
        "//x",
    ]
) | st.text(max_size=12)

uris = st.builds(lambda s, h, p: f"{s}://{h}{p}", uri_schemes, uri_hosts, uri_paths) | st.text(max_size=40)


@FUZZ
@given(uri=uris)
@example(uri="s3://[")  # an unbalanced '[' in the host: urlsplit raises ValueError
@example(uri="https://[::1/x")
@example(uri="gs://bucket/a%00b")  # a NUL once decoded
@example(uri="file:///a\x00b")
@example(uri="http://.blob.core.windows.net/model")  # an Azure host without its account
def test_a_storage_uri_maps_or_is_refused(uri: str) -> None:
    try:
        params, path = params_for_uri(uri)
    except InvalidRequest as exc:
        assert str(exc).strip()
        str(exc).encode("utf-8", "surrogatepass")
        return
    assert params["type"] in KNOWN
    assert all(isinstance(value, str) and value for value in params.values())
    assert "\x00" not in path
    if params["type"] in ("s3", "gcs", "pvc", "azure", "oci"):
        assert not path.startswith("/")
    # and the params resolve, on their own, to a config of that type
    config = resolve_storage(ModelKey(storage_params=params), StorageConfigDirectory(os.devnull), KNOWN)
    assert config.type == params["type"]
    assert config.name is None


@pytest.mark.parametrize("name", ["../outside", "{DIR}/default", "{ROOT}/outside", "..data"])
def test_a_storage_key_is_a_name_not_a_path(tmp_path: Path, name: str) -> None:
    """The example the property starts from: a key naming a file outside the directory
    (or a hidden one) is no entry, however it is spelled, and reading it is never
    attempted (the message names the key only)."""
    entries = {"..data": json.dumps({"type": "s3", "bucket": OUTSIDE_MARK}).encode()}
    with config_tree(tmp_path, entries) as (root, path):
        key = ModelKey(storage_key=expand(name, root, path))
        with pytest.raises(StorageConfigError, match="no entry for storage_key") as caught:
            resolve_storage(key, StorageConfigDirectory(path), KNOWN)
        check_refusal(caught.value)
