"""The storage-config directory (real files, real watchdog events) and the resolution
rules of a model key against it."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from adapter.errors import StorageConfigError
from puller.config import StorageConfig, StorageConfigDirectory, resolve_storage
from puller.model_key import ModelKey
from tests.servers.process import wait_until

KNOWN = frozenset({"s3", "gcs", "azure", "http", "pvc", "file"})
SECRET = "SECRET-9f8e7d6c5b4a"
RELOAD_TIMEOUT = 10.0


def write_entries(directory: Path, entries: Mapping[str, object]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in entries.items():
        text = value if isinstance(value, str) else json.dumps(value)
        (directory / name).write_text(text)


class SecretVolume:
    """A directory laid out the way the kubelet's atomic writer lays out a secret
    volume: the data in ``..<timestamp>/``, ``..data`` a link to it, and each key a
    link ``key -> ..data/key``. :meth:`publish` makes a new version the same way: a
    fresh timestamped directory, a ``..data_tmp`` link renamed over ``..data``, new
    key links added, links of removed keys deleted, the old directory removed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.version = 0

    def publish(self, entries: Mapping[str, object]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.version += 1
        stamp = f"..2026_01_02_03_04_{self.version:02d}.{123456789 + self.version}"
        data_dir = self.path / stamp
        data_dir.mkdir()
        for name, value in entries.items():
            text = value if isinstance(value, str) else json.dumps(value)
            (data_dir / name).write_text(text)
        data_link = self.path / "..data"
        old = os.readlink(data_link) if data_link.is_symlink() else None
        tmp_link = self.path / "..data_tmp"
        os.symlink(stamp, tmp_link)
        os.rename(tmp_link, data_link)
        for name in entries:
            link = self.path / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        for child in list(self.path.iterdir()):
            if not child.name.startswith(".") and child.name not in entries:
                child.unlink()
        if old is not None:
            shutil.rmtree(self.path / old)


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[StorageConfigDirectory]:
    directory = StorageConfigDirectory(tmp_path / "storage-config")
    directory.start()
    try:
        yield directory
    finally:
        directory.stop()


def key(**fields: Any) -> ModelKey:
    return ModelKey.from_mapping(fields)


def config_dir(tmp_path: Path, entries: Mapping[str, object]) -> StorageConfigDirectory:
    path = tmp_path / "storage-config"
    write_entries(path, entries)
    return StorageConfigDirectory(path)


S3_ENTRY = {
    "type": "s3",
    "access_key_id": "AKIA-EXAMPLE",
    "secret_access_key": SECRET,
    "endpoint_url": "http://127.0.0.1:9000",
    "region": "us-east-1",
}


# --- resolution: which entry ----------------------------------------------------------


def test_storage_key_selects_its_entry(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"myStorage": {**S3_ENTRY, "bucket": "b1"}, "default": {"type": "gcs"}})
    config = resolve_storage(key(storage_key="myStorage"), directory, KNOWN)
    assert config.type == "s3"
    assert config.name == "myStorage"
    assert config.fields["secret_access_key"] == SECRET
    assert config.fields["bucket"] == "b1"


def test_missing_storage_key_is_an_error_naming_it(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"default": S3_ENTRY})
    with pytest.raises(StorageConfigError, match="'otherStorage'"):
        resolve_storage(key(storage_key="otherStorage"), directory, KNOWN)


def test_storage_key_is_not_a_path(tmp_path: Path) -> None:
    write_entries(tmp_path / "outside", {"creds": S3_ENTRY})
    directory = config_dir(tmp_path, {"default": S3_ENTRY})
    for storage_key in ("../outside/creds", "..data", ".hidden", "/etc/passwd", ""):
        with pytest.raises(StorageConfigError, match="no entry"):
            resolve_storage(key(storage_key=storage_key), directory, KNOWN)


def test_storage_key_with_params_type_uses_the_entry(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"myStorage": S3_ENTRY, "default_s3": {"type": "s3", "region": "x"}})
    config = resolve_storage(
        key(storage_key="myStorage", storage_params={"type": "s3", "bucket": "b"}), directory, KNOWN
    )
    assert config.name == "myStorage"
    assert config.fields["region"] == "us-east-1"
    assert config.fields["bucket"] == "b"


def test_default_entry_without_storage_key(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"default": S3_ENTRY, "default_gcs": {"type": "gcs"}})
    config = resolve_storage(key(), directory, KNOWN)
    assert config.name == "default"
    assert config.type == "s3"


def test_typed_default_entry(tmp_path: Path) -> None:
    directory = config_dir(
        tmp_path,
        {"default": S3_ENTRY, "default_gcs": {"type": "gcs", "client_email": "a@b"}},
    )
    config = resolve_storage(key(storage_params={"type": "gcs", "bucket": "g"}), directory, KNOWN)
    assert config.name == "default_gcs"
    assert config.type == "gcs"
    assert dict(config.fields) == {"type": "gcs", "client_email": "a@b", "bucket": "g"}


def test_typed_request_does_not_fall_back_to_default(tmp_path: Path) -> None:
    # as the Go puller: only default_<type> is consulted; `default` may hold
    # credentials for another store
    directory = config_dir(tmp_path, {"default": S3_ENTRY})
    config = resolve_storage(key(storage_params={"type": "s3", "bucket": "b"}), directory, KNOWN)
    assert config.name is None
    assert dict(config.fields) == {"type": "s3", "bucket": "b"}


def test_no_entry_at_all_gives_the_params_only(tmp_path: Path) -> None:
    directory = StorageConfigDirectory(tmp_path / "does-not-exist")
    config = resolve_storage(key(storage_params={"type": "pvc", "name": "claim"}), directory, KNOWN)
    assert config == StorageConfig(type="pvc", fields={"type": "pvc", "name": "claim"}, name=None)


def test_no_type_anywhere_is_an_error(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"other": S3_ENTRY})
    with pytest.raises(StorageConfigError, match="no storage type"):
        resolve_storage(key(), directory, KNOWN)
    directory = config_dir(tmp_path / "2", {"default": {"bucket": "b"}})
    with pytest.raises(StorageConfigError, match=r"no storage type.*'default'"):
        resolve_storage(key(), directory, KNOWN)


def test_unknown_type_names_it_and_the_known_ones(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"weird": {"type": "ftp", "password": SECRET}})
    with pytest.raises(StorageConfigError) as info:
        resolve_storage(key(storage_key="weird"), directory, {"s3", "pvc"})
    message = str(info.value)
    assert "'ftp'" in message
    assert "pvc, s3" in message
    assert SECRET not in message


def test_unknown_type_from_params(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {})
    with pytest.raises(StorageConfigError, match="'generic'"):
        resolve_storage(key(storage_params={"type": "generic"}), directory, KNOWN)


def test_type_must_be_a_string(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"default": {"type": 3}})
    with pytest.raises(StorageConfigError, match="must be a string"):
        resolve_storage(key(), directory, KNOWN)


def test_params_type_overrides_the_entry_type(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"shared": {"type": "s3", "bucket": "b"}})
    config = resolve_storage(key(storage_key="shared", storage_params={"type": "gcs"}), directory, KNOWN)
    assert config.type == "gcs"


# --- resolution: bucket, legacy default_bucket, params --------------------------------


def test_top_level_bucket_is_applied(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"myStorage": {**S3_ENTRY, "bucket": "from-entry"}})
    config = resolve_storage(key(storage_key="myStorage", bucket="legacy"), directory, KNOWN)
    assert config.fields["bucket"] == "legacy"


def test_top_level_bucket_applies_to_an_entry_without_bucket(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"myStorage": S3_ENTRY})
    config = resolve_storage(key(storage_key="myStorage", bucket="legacy"), directory, KNOWN)
    assert config.fields["bucket"] == "legacy"


def test_params_bucket_beats_top_level_bucket(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"myStorage": S3_ENTRY})
    config = resolve_storage(
        key(storage_key="myStorage", bucket="legacy", storage_params={"bucket": "param"}), directory, KNOWN
    )
    assert config.fields["bucket"] == "param"


def test_legacy_default_bucket_is_read_as_bucket(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"myStorage": {**S3_ENTRY, "default_bucket": "dflt"}})
    config = resolve_storage(key(storage_key="myStorage"), directory, KNOWN)
    assert config.fields["bucket"] == "dflt"
    assert "default_bucket" not in config.fields


@pytest.mark.parametrize(
    ("entry_extra", "model_key", "expected"),
    [
        ({"bucket": "explicit", "default_bucket": "dflt"}, {}, "explicit"),
        ({"default_bucket": "dflt"}, {"bucket": "legacy"}, "legacy"),
        ({"default_bucket": "dflt"}, {"storage_params": {"bucket": "param"}}, "param"),
        ({"bucket": "", "default_bucket": "dflt"}, {}, "dflt"),
        ({"default_bucket": ""}, {"storage_params": {"bucket": "param"}}, "param"),
    ],
)
def test_default_bucket_only_when_no_bucket(
    tmp_path: Path, entry_extra: dict[str, str], model_key: dict[str, Any], expected: str
) -> None:
    directory = config_dir(tmp_path, {"myStorage": {**S3_ENTRY, **entry_extra}})
    config = resolve_storage(key(storage_key="myStorage", **model_key), directory, KNOWN)
    assert config.fields["bucket"] == expected
    assert "default_bucket" not in config.fields


def test_default_bucket_is_s3_only(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"g": {"type": "gcs", "default_bucket": "dflt"}})
    config = resolve_storage(key(storage_key="g"), directory, KNOWN)
    assert "bucket" not in config.fields


def test_params_override_entry_fields(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"myStorage": S3_ENTRY})
    config = resolve_storage(
        key(storage_key="myStorage", storage_params={"region": "eu-west-1", "new_field": "v"}),
        directory,
        KNOWN,
    )
    assert config.fields["region"] == "eu-west-1"
    assert config.fields["new_field"] == "v"
    assert config.fields["access_key_id"] == "AKIA-EXAMPLE"


def test_dotted_params_reach_nested_objects(tmp_path: Path) -> None:
    entry = {"type": "http", "url": "https://h", "headers": {"Accept": "a", "X-Keep": "k"}}
    directory = config_dir(tmp_path, {"web": entry})
    config = resolve_storage(
        key(
            storage_key="web",
            storage_params={"headers.Authorization": "Bearer t", "headers.Accept": "b", "a.b.c": "deep"},
        ),
        directory,
        KNOWN,
    )
    assert config.fields["headers"] == {"Accept": "b", "X-Keep": "k", "Authorization": "Bearer t"}
    assert config.fields["a"] == {"b": {"c": "deep"}}


def test_dotted_param_may_replace_a_list_value(tmp_path: Path) -> None:
    entry = {"type": "http", "url": "https://h", "headers": {"X-Multi": ["1", "2"]}}
    directory = config_dir(tmp_path, {"web": entry})
    config = resolve_storage(
        key(storage_key="web", storage_params={"headers.X-Multi": "3"}), directory, KNOWN
    )
    assert config.fields["headers"] == {"X-Multi": "3"}


def test_dotted_param_through_a_string_is_an_error(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"myStorage": S3_ENTRY})
    with pytest.raises(StorageConfigError) as info:
        resolve_storage(
            key(storage_key="myStorage", storage_params={"secret_access_key.x": "v"}), directory, KNOWN
        )
    assert "'secret_access_key'" in str(info.value)
    assert "not an object" in str(info.value)
    assert SECRET not in str(info.value)


def test_param_cannot_replace_an_object(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"web": {"type": "http", "headers": {"Authorization": SECRET}}})
    with pytest.raises(StorageConfigError, match="'headers'") as info:
        resolve_storage(key(storage_key="web", storage_params={"headers": "flat"}), directory, KNOWN)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("params", [{"headers": "x", "headers.A": "y"}, {"headers.A": "y", "headers": "x"}])
def test_conflicting_params_fail_whatever_their_order(tmp_path: Path, params: dict[str, str]) -> None:
    directory = config_dir(tmp_path, {"web": {"type": "http"}})
    with pytest.raises(StorageConfigError, match="'headers'"):
        resolve_storage(key(storage_key="web", storage_params=params), directory, KNOWN)


@pytest.mark.parametrize("dotted", ["a..b", ".a", "a.", "."])
def test_dotted_param_with_an_empty_part(tmp_path: Path, dotted: str) -> None:
    directory = config_dir(tmp_path, {"web": {"type": "http"}})
    with pytest.raises(StorageConfigError, match="empty part"):
        resolve_storage(key(storage_key="web", storage_params={dotted: "v"}), directory, KNOWN)


def test_resolution_does_not_change_the_cached_entry(tmp_path: Path) -> None:
    entry = {"type": "http", "headers": {"Accept": "a"}}
    directory = config_dir(tmp_path, {"web": entry})
    directory.start()
    try:
        first = resolve_storage(
            key(storage_key="web", bucket="b", storage_params={"headers.Accept": "changed"}), directory, KNOWN
        )
        second = resolve_storage(key(storage_key="web"), directory, KNOWN)
    finally:
        directory.stop()
    assert first.fields["headers"] == {"Accept": "changed"}
    assert dict(second.fields) == entry


def test_repr_shows_no_values(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"myStorage": S3_ENTRY})
    config = resolve_storage(key(storage_key="myStorage"), directory, KNOWN)
    assert SECRET not in repr(config)
    assert "secret_access_key" in repr(config)


# --- invalid entries ------------------------------------------------------------------


def test_entry_that_is_not_json_reads_as_absent_and_is_logged(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"good": S3_ENTRY, "broken": f'{{"type": "s3", "secret": "{SECRET}"'})
    with capture_logs() as logs:
        assert directory.names() == ["good"]
        assert directory.get("broken") is None
    warnings = [entry for entry in logs if entry["event"] == "storage_config_entry_invalid"]
    assert len(warnings) == 1
    assert warnings[0]["entry"] == "broken"
    assert warnings[0]["log_level"] == "warning"
    assert SECRET not in repr(logs)


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (f'{{"secret": "{SECRET}"', "not valid JSON"),
        (f'["{SECRET}"]', "expected an object, found an array"),
        (f'"{SECRET}"', "expected an object, found a string"),
        ("", "not valid JSON"),
        (b"\xff\xfe{", "not valid JSON"),
    ],
)
def test_resolving_an_invalid_entry_by_name(tmp_path: Path, content: str | bytes, detail: str) -> None:
    path = tmp_path / "storage-config"
    path.mkdir()
    if isinstance(content, bytes):
        (path / "broken").write_bytes(content)
    else:
        (path / "broken").write_text(content)
    directory = StorageConfigDirectory(path)
    with capture_logs() as logs, pytest.raises(StorageConfigError) as info:
        resolve_storage(key(storage_key="broken"), directory, KNOWN)
    assert "'broken'" in str(info.value)
    assert detail in str(info.value)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(logs)


def test_invalid_default_entry_is_reported_not_skipped(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"default_s3": "{not json"})
    with pytest.raises(StorageConfigError, match=r"'default_s3' is not valid JSON"):
        resolve_storage(key(storage_params={"type": "s3", "bucket": "b"}), directory, KNOWN)


def test_lookup_and_get(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"good": S3_ENTRY, "broken": "[1]"})
    assert directory.lookup("missing") is None
    assert directory.get("missing") is None
    with pytest.raises(StorageConfigError, match="'broken'"):
        directory.lookup("broken")
    got = directory.get("good")
    assert got == S3_ENTRY
    assert isinstance(got, dict)
    got["type"] = "changed"
    assert directory.get("good") == S3_ENTRY


def test_hidden_entries_directories_and_fifos_are_not_entries(tmp_path: Path) -> None:
    path = tmp_path / "storage-config"
    write_entries(path, {"good": S3_ENTRY, ".hidden": S3_ENTRY})
    (path / "subdir").mkdir()
    write_entries(path / "subdir", {"inner": S3_ENTRY})
    os.mkfifo(path / "pipe")
    os.symlink("nowhere", path / "dangling")
    directory = StorageConfigDirectory(path)
    result: list[list[str]] = []
    reader = threading.Thread(target=lambda: result.append(directory.names()), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading the directory blocked on a FIFO"
    assert result == [["good"]]
    assert directory.get(".hidden") is None


def test_kubernetes_layout_is_read_through_its_links(tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path / "storage-config")
    volume.publish({"default": S3_ENTRY, "myStorage": {"type": "gcs"}})
    directory = StorageConfigDirectory(volume.path)
    assert directory.names() == ["default", "myStorage"]
    assert directory.get("default") == S3_ENTRY


def test_an_unreadable_directory_path_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "storage-config"
    path.write_text("{}")
    directory = StorageConfigDirectory(path)
    assert directory.names() == []


# --- hot reload -----------------------------------------------------------------------


def test_reload_after_kubernetes_symlink_swap(tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path / "storage-config")
    volume.publish({"default": {**S3_ENTRY, "region": "r1"}, "old": {"type": "gcs"}})
    directory = StorageConfigDirectory(volume.path)
    directory.start()
    try:
        assert directory.watching
        assert directory.get("default") == {**S3_ENTRY, "region": "r1"}
        assert directory.names() == ["default", "old"]

        volume.publish({"default": {**S3_ENTRY, "region": "r2"}, "new": {"type": "pvc", "name": "c"}})

        wait_until(
            lambda: directory.names() == ["default", "new"],
            timeout=RELOAD_TIMEOUT,
            what="the new key set after the ..data swap",
        )
        assert directory.get("default") == {**S3_ENTRY, "region": "r2"}
        assert directory.get("old") is None
        config = resolve_storage(key(storage_key="new"), directory, KNOWN)
        assert config.type == "pvc"
    finally:
        directory.stop()


def test_reload_after_plain_rewrite(watched: StorageConfigDirectory) -> None:
    write_entries(watched.directory, {"default": {**S3_ENTRY, "region": "r1"}})
    wait_until(lambda: watched.get("default") is not None, timeout=RELOAD_TIMEOUT, what="the first entry")
    write_entries(watched.directory, {"default": {**S3_ENTRY, "region": "r2"}})
    wait_until(
        lambda: (watched.get("default") or {}).get("region") == "r2",
        timeout=RELOAD_TIMEOUT,
        what="the rewritten entry",
    )
    (watched.directory / "default").unlink()
    wait_until(lambda: watched.names() == [], timeout=RELOAD_TIMEOUT, what="the removed entry to go")


def test_reload_picks_up_an_entry_becoming_valid(watched: StorageConfigDirectory) -> None:
    write_entries(watched.directory, {"default": "{broken"})
    wait_until(lambda: watched.names() == [], timeout=RELOAD_TIMEOUT, what="the scan")
    with pytest.raises(StorageConfigError):
        watched.lookup("default")
    write_entries(watched.directory, {"default": S3_ENTRY})
    wait_until(lambda: watched.names() == ["default"], timeout=RELOAD_TIMEOUT, what="the fixed entry")


def test_directory_that_appears_later(tmp_path: Path) -> None:
    path = tmp_path / "not-yet"
    directory = StorageConfigDirectory(path)
    directory.start()
    try:
        assert directory.names() == []
        assert not directory.watching
        with pytest.raises(StorageConfigError, match="no entry"):
            resolve_storage(key(storage_key="default"), directory, KNOWN)

        volume = SecretVolume(path)
        volume.publish({"default": S3_ENTRY})
        assert directory.get("default") == S3_ENTRY  # reads re-check a missing directory
        assert directory.watching

        volume.publish({"default": {**S3_ENTRY, "region": "later"}})
        wait_until(
            lambda: (directory.get("default") or {}).get("region") == "later",
            timeout=RELOAD_TIMEOUT,
            what="a change in the directory that appeared",
        )
    finally:
        directory.stop()


def test_directory_removed_and_recreated(watched: StorageConfigDirectory) -> None:
    write_entries(watched.directory, {"default": S3_ENTRY})
    wait_until(lambda: watched.names() == ["default"], timeout=RELOAD_TIMEOUT, what="the first entry")
    shutil.rmtree(watched.directory)
    wait_until(lambda: watched.names() == [], timeout=RELOAD_TIMEOUT, what="the removed directory")
    write_entries(watched.directory, {"again": {"type": "gcs"}})
    wait_until(lambda: watched.names() == ["again"], timeout=RELOAD_TIMEOUT, what="the recreated directory")
    write_entries(watched.directory, {"third": {"type": "gcs"}})
    wait_until(
        lambda: watched.names() == ["again", "third"],
        timeout=RELOAD_TIMEOUT,
        what="a change in the recreated directory",
    )


def test_no_rereads_while_nothing_changes(tmp_path: Path) -> None:
    # plain files: reading them makes open/close events in the watched directory,
    # which must not count as changes
    directory = config_dir(tmp_path, {"default": S3_ENTRY, "other": {"type": "gcs"}})
    directory.start()
    try:
        assert directory.get("default") == S3_ENTRY
        time.sleep(0.5)  # let the events of our own reads arrive
        scans = directory.scans
        for _ in range(200):
            assert directory.get("default") == S3_ENTRY
            assert directory.names() == ["default", "other"]
        time.sleep(0.5)
        for _ in range(10):
            resolve_storage(key(), directory, KNOWN)
        assert directory.scans == scans

        write_entries(directory.directory, {"third": {"type": "pvc"}})
        wait_until(lambda: "third" in directory.names(), timeout=RELOAD_TIMEOUT, what="the new entry")
        assert directory.scans > scans
    finally:
        directory.stop()


def test_without_start_every_read_is_current(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"default": S3_ENTRY})
    assert directory.names() == ["default"]
    write_entries(directory.directory, {"more": {"type": "gcs"}})
    assert directory.names() == ["default", "more"]
    assert not directory.watching


def test_stop_is_idempotent_and_reads_still_work(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, {"default": S3_ENTRY})
    with directory:
        directory.start()  # a second start does nothing
        assert directory.watching
    directory.stop()
    assert not directory.watching
    write_entries(directory.directory, {"more": {"type": "gcs"}})
    assert directory.names() == ["default", "more"]


# --- secrets stay secret --------------------------------------------------------------


def test_no_secret_in_any_error_or_log_line(tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path / "storage-config")
    volume.publish(
        {
            "myStorage": S3_ENTRY,
            "weird": {"type": "ftp", "password": SECRET},
            "notype": {"password": SECRET},
            "broken": f'{{"password": "{SECRET}"',
            "array": [SECRET],
            "web": {"type": "http", "headers": {"Authorization": SECRET}},
        }
    )
    directory = StorageConfigDirectory(volume.path)
    failing = [
        key(storage_key="broken"),
        key(storage_key="array"),
        key(storage_key="weird"),
        key(storage_key="notype"),
        key(storage_key="missing", storage_params={"password": SECRET}),
        key(storage_key="myStorage", storage_params={"secret_access_key.inner": SECRET}),
        key(storage_key="web", storage_params={"headers": SECRET}),
        key(storage_params={"password": SECRET}),
    ]
    messages: list[str] = []
    with capture_logs() as logs:
        directory.start()
        try:
            for model_key in failing:
                with pytest.raises(StorageConfigError) as info:
                    resolve_storage(model_key, directory, KNOWN)
                messages.append(str(info.value))
            volume.publish({"broken": f"[{SECRET}", "myStorage": S3_ENTRY})
            wait_until(lambda: directory.names() == ["myStorage"], timeout=RELOAD_TIMEOUT, what="reload")
        finally:
            directory.stop()
    assert len(messages) == len(failing)
    for message in messages:
        assert SECRET not in message
    assert any(entry["event"] == "storage_config_entry_invalid" for entry in logs)
    assert SECRET not in repr(logs)
