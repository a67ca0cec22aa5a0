"""The storage registry: entry-point discovery (our own pyproject, and a real extra
distribution on sys.path built by the test), lazy import errors, instance reuse."""

from __future__ import annotations

import importlib
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from structlog.testing import capture_logs

from adapter.errors import MissingExtra, StorageConfigError
from adapter.settings import Settings
from puller.config import StorageConfig
from puller.storage import registry
from puller.storage.file import FileStorage
from puller.storage.pvc import PVCStorage
from puller.storage.registry import (
    StorageRegistry,
    extra_for,
    install_hint,
    known_types,
    reload_entry_points,
    storage_class,
)

PLUGIN_PACKAGE = "mmsidecar_registry_test_plugins"
SECRET = "SECRET-0a1b2c3d4e5f"

PLUGIN_SOURCE = """
from __future__ import annotations

import threading
import time

from puller.storage.base import Blob, Plan, Storage

CREATED = []
LOCK = threading.Lock()


class CountingStorage(Storage):
    types = ("counting",)

    def __init__(self, config, settings):
        super().__init__(config, settings)
        self.closed = False
        time.sleep(float(config.get("build_seconds", "0")))
        with LOCK:
            CREATED.append(self)

    def plan(self, path):
        return Plan(blobs=(Blob(name=path, relpath=path, size=0),), single_object=True)

    def open_range(self, blob, start, end):
        raise NotImplementedError

    def identity(self):
        return "counting:" + str(self.config.get("bucket", ""))

    def close(self):
        self.closed = True
        if self.config.get("fail_close") == "yes":
            raise RuntimeError("close failed")


class NotAStorage:
    pass
"""

ENTRY_POINTS = f"""
[modelmesh_sidecar.storage]
counting = {PLUGIN_PACKAGE}.counting:CountingStorage
counting-alias = {PLUGIN_PACKAGE}.counting:CountingStorage
needs-sdk = {PLUGIN_PACKAGE}.needs_sdk:NeedsSdkStorage
not-storage = {PLUGIN_PACKAGE}.counting:NotAStorage
absent-module = {PLUGIN_PACKAGE}.absent:Whatever
"""


def install_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Install a real distribution (a dist-info on sys.path) that declares extra
    storage backends through the same entry-point group as ours."""
    site = tmp_path / "site"
    package = site / PLUGIN_PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "counting.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    (package / "needs_sdk.py").write_text(
        "import mmsidecar_sdk_that_is_not_installed  # noqa\n\nclass NeedsSdkStorage:\n    pass\n"
    )
    dist_info = site / "mmsidecar_registry_test_plugins-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: mmsidecar-registry-test-plugins\nVersion: 0.1\n"
    )
    (dist_info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(site))


def forget_plugins() -> None:
    for name in list(sys.modules):
        if name == PLUGIN_PACKAGE or name.startswith(PLUGIN_PACKAGE + "."):
            del sys.modules[name]
    reload_entry_points()


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    install_plugins(tmp_path, monkeypatch)
    reload_entry_points()
    try:
        yield importlib.import_module(f"{PLUGIN_PACKAGE}.counting")
    finally:
        forget_plugins()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(root_model_dir=tmp_path / "models", pvc_mounts_dir=tmp_path / "pvc_mounts")


def file_config(root: Path, **extra: str) -> StorageConfig:
    return StorageConfig(type="file", fields={"type": "file", "root": str(root), **extra})


# --- discovery ------------------------------------------------------------------------


def test_our_backends_are_known() -> None:
    types = known_types()
    assert {"s3", "file", "pvc"} <= set(types)
    assert types == sorted(types)


def test_our_classes_load() -> None:
    assert storage_class("file") is FileStorage
    assert storage_class("pvc") is PVCStorage


def test_unknown_type_names_it_and_the_known_ones() -> None:
    with pytest.raises(StorageConfigError) as info:
        storage_class("ftp")
    message = str(info.value)
    assert "'ftp'" in message
    assert "file" in message
    assert "pvc" in message
    assert not isinstance(info.value, MissingExtra)


def test_extras() -> None:
    assert extra_for("s3") == "s3"
    assert extra_for("gcs") == "gcs"
    assert extra_for("azure") == "azure"
    assert extra_for("file") is None
    assert extra_for("pvc") is None
    assert install_hint("gcs") == "pip install 'modelmesh-sidecar[gcs]'"
    assert install_hint("file") is None


def test_third_party_plugin_is_a_first_class_citizen(plugins: ModuleType) -> None:
    assert {"counting", "counting-alias", "file"} <= set(known_types())
    assert storage_class("counting") is plugins.CountingStorage
    # one class may serve several type names
    assert storage_class("counting-alias") is plugins.CountingStorage


def test_plugins_installed_later_are_seen_after_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "counting" not in known_types()
    install_plugins(tmp_path, monkeypatch)
    try:
        assert "counting" not in known_types()  # discovery is cached...
        reload_entry_points()
        assert "counting" in known_types()  # ...until reloaded
    finally:
        forget_plugins()


def test_missing_sdk_names_the_extra(plugins: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.STORAGE_EXTRAS, "needs-sdk", "needs-sdk")
    with pytest.raises(MissingExtra) as info:
        storage_class("needs-sdk")
    assert "pip install 'modelmesh-sidecar[needs-sdk]'" in str(info.value)
    assert isinstance(info.value, StorageConfigError)


def test_missing_sdk_without_an_extra_names_the_module(plugins: ModuleType) -> None:
    with pytest.raises(MissingExtra, match="'mmsidecar_sdk_that_is_not_installed'"):
        storage_class("needs-sdk")


def test_missing_backend_module_is_not_a_missing_extra(plugins: ModuleType) -> None:
    with pytest.raises(StorageConfigError, match="backend module") as info:
        storage_class("absent-module")
    assert not isinstance(info.value, MissingExtra)


def test_entry_point_must_name_a_storage_class(plugins: ModuleType) -> None:
    with pytest.raises(StorageConfigError, match="not name a Storage subclass"):
        storage_class("not-storage")


# --- instances ------------------------------------------------------------------------


def test_same_config_same_instance(tmp_path: Path, settings: Settings) -> None:
    backends = StorageRegistry()
    first = backends.get(file_config(tmp_path), settings)
    again = backends.get(file_config(tmp_path), settings)
    assert isinstance(first, FileStorage)
    assert again is first
    assert len(backends) == 1


def test_field_order_does_not_matter(tmp_path: Path, settings: Settings) -> None:
    backends = StorageRegistry()
    a = StorageConfig(
        type="file",
        fields={"type": "file", "root": str(tmp_path), "nested": {"A": "1", "B": "2"}},
        name="one",
    )
    b = StorageConfig(
        type="file",
        fields={"nested": {"B": "2", "A": "1"}, "root": str(tmp_path), "type": "file"},
        name="two",
    )
    assert backends.get(a, settings) is backends.get(b, settings)


def test_different_configs_different_instances(tmp_path: Path, settings: Settings) -> None:
    backends = StorageRegistry()
    first = backends.get(file_config(tmp_path / "a"), settings)
    other_root = backends.get(file_config(tmp_path / "b"), settings)
    other_field = backends.get(file_config(tmp_path / "a", extra="1"), settings)
    pvc = backends.get(StorageConfig(type="pvc", fields={"type": "pvc", "name": "claim"}), settings)
    assert len({id(first), id(other_root), id(other_field), id(pvc)}) == 4
    assert isinstance(pvc, PVCStorage)
    assert len(backends) == 4


def test_constructor_errors_pass_through(settings: Settings) -> None:
    backends = StorageRegistry()
    with pytest.raises(StorageConfigError, match="root"):
        backends.get(StorageConfig(type="file", fields={"type": "file"}), settings)
    with pytest.raises(StorageConfigError, match="'nope'"):
        backends.get(StorageConfig(type="nope", fields={}), settings)
    assert len(backends) == 0


def test_concurrent_gets_share_one_instance(plugins: ModuleType, settings: Settings) -> None:
    backends = StorageRegistry()
    config = StorageConfig(type="counting", fields={"type": "counting", "build_seconds": "0.05"})
    start = threading.Barrier(16)
    results: list[object] = []
    lock = threading.Lock()

    def worker() -> None:
        start.wait(timeout=10)
        backend = backends.get(config, settings)
        with lock:
            results.append(backend)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    assert len(results) == 16
    kept = results[0]
    assert all(result is kept for result in results)
    # every extra instance built by a losing thread was closed, the kept one was not
    assert plugins.CREATED
    for created in plugins.CREATED:
        assert created.closed == (created is not kept)


def test_close_closes_all_even_when_one_fails(plugins: ModuleType, settings: Settings) -> None:
    backends = StorageRegistry()
    good = backends.get(StorageConfig(type="counting", fields={"bucket": "a", "secret": SECRET}), settings)
    bad = backends.get(StorageConfig(type="counting", fields={"bucket": "b", "fail_close": "yes"}), settings)
    other = backends.get(StorageConfig(type="counting", fields={"bucket": "c"}), settings)
    with capture_logs() as logs:
        backends.close()
    assert good.closed and bad.closed and other.closed  # type: ignore[attr-defined]
    failures = [entry for entry in logs if entry["event"] == "storage_backend_close_failed"]
    assert len(failures) == 1
    assert failures[0]["error"] == "RuntimeError"
    assert failures[0]["storage"] == "counting:b"
    assert len(backends) == 0
    # a closed registry builds afresh
    assert backends.get(StorageConfig(type="counting", fields={"bucket": "a"}), settings) is not good


def test_context_manager_closes(plugins: ModuleType, settings: Settings) -> None:
    with StorageRegistry() as backends:
        backend = backends.get(StorageConfig(type="counting", fields={"bucket": "x"}), settings)
    assert backend.closed  # type: ignore[attr-defined]


def test_no_config_value_is_logged(plugins: ModuleType, settings: Settings, tmp_path: Path) -> None:
    backends = StorageRegistry()
    with capture_logs() as logs:
        backends.get(StorageConfig(type="counting", fields={"secret": SECRET, "fail_close": "yes"}), settings)
        backends.get(file_config(tmp_path, secret=SECRET), settings)
        backends.close()
    assert {entry["event"] for entry in logs} >= {"storage_backend_created", "storage_backend_close_failed"}
    assert SECRET not in repr(logs)
