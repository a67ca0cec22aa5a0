"""The storage backend conformance kit.

A backend's own test module subclasses :class:`StorageConformance` and provides one
pytest fixture, ``store``, returning a :class:`ConformanceStore` bound to a real server
of that backend (started by the test session). Every test here then pulls through the
real :class:`~puller.pull.Puller` (engine, placement, config resolution included) and
checks what lands on disk, byte for byte. Our own backends all run it; a third-party
backend proves it honours the contract the same way::

    class TestMyStorage(StorageConformance):
        @pytest.fixture
        def store(self, my_server) -> ConformanceStore:
            return MyStore(my_server)

The kit needs pytest (a test dependency only); importing it elsewhere is not supported.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import pytest

from adapter.errors import (
    SidecarError,
    StorageNotFound,
    StoragePermissionDenied,
    StorageUnauthenticated,
    UnsafePath,
)
from adapter.settings import Settings
from puller.model_key import ModelKey
from puller.pull import Puller
from puller.request import LocalModel, PullRequest

MiB = 1024 * 1024


class ConformanceStore(Protocol):
    """A place on a real server of the backend under test, fresh for each test."""

    def put(self, key: str, data: bytes) -> None:
        """Write one object at ``key`` (relative to this store's base, ``/``-separated)."""

    def config(self) -> Mapping[str, Any]:
        """The storage-config entry (with ``type``) that reaches this store."""

    def model_path(self, key: str) -> str:
        """The modelPath a load uses to name ``key`` (an object or a prefix)."""

    def bad_credentials_config(self) -> Mapping[str, Any] | None:
        """An entry with wrong credentials, or None when the backend has none."""

    def secrets(self) -> list[str]:
        """Values that must never appear in an error message or log line."""


class StorageConformance:
    """Contract tests every storage backend must pass. See the module docstring."""

    #: size of the object fetched in parallel ranges
    large_object_bytes: ClassVar[int] = 200 * MiB
    #: part size used for that test (so the object splits into many ranges)
    part_bytes: ClassVar[int] = 8 * MiB
    #: whether the store can hold an object whose key contains ``..`` segments
    supports_dotdot_keys: ClassVar[bool] = True

    # --- harness ----------------------------------------------------------------------

    @pytest.fixture
    def workdir(self, tmp_path: Path) -> Path:
        return tmp_path

    def settings(self, workdir: Path, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "root_model_dir": workdir / "models",
            "storage_config_dir": workdir / "storage-config",
            "pvc_mounts_dir": workdir / "pvc",
            "pull_workers": 4,
            "pull_part_bytes": self.part_bytes,
            "pull_retries": 2,
            "pull_timeout_seconds": 30.0,
        }
        values.update(overrides)
        return Settings(**values)

    def pull(
        self, workdir: Path, config: Mapping[str, Any], model_path: str, model_id: str = "model-under-test"
    ) -> LocalModel:
        settings = self.settings(workdir)
        settings.storage_config_dir.mkdir(parents=True, exist_ok=True)
        (settings.storage_config_dir / "store").write_text(json.dumps(dict(config)))
        puller = Puller(settings)
        puller.start()
        try:
            request = PullRequest(model_id, model_path, ModelKey(storage_key="store"))
            return asyncio.run(puller.pull(request))
        finally:
            puller.close()

    @staticmethod
    def files_under(path: Path) -> dict[str, bytes]:
        return {
            p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
        }

    @staticmethod
    def leftovers(workdir: Path) -> list[str]:
        """Everything under ROOT_MODEL_DIR except empty sidecar folders."""
        root = workdir / "models"
        if not root.exists():
            return []
        return sorted(
            str(p.relative_to(root))
            for p in root.rglob("*")
            if not (p.is_dir() and p.name.startswith("_") and p.parent == root)
        )

    @pytest.fixture
    def base(self) -> str:
        return f"conformance-{uuid.uuid4().hex[:10]}"

    # --- the contract -----------------------------------------------------------------

    def test_single_object_lands_as_a_file(self, store: ConformanceStore, workdir: Path) -> None:
        data = os.urandom(4096)
        store.put("single/model.bin", data)
        store.put("single/model.bin.other", b"a neighbour with the same prefix")
        model = self.pull(workdir, store.config(), store.model_path("single/model.bin"))
        assert model.path.name == "model.bin"
        assert model.path.is_file()
        assert model.path.read_bytes() == data
        assert model.disk_size_bytes == len(data)

    def test_prefix_with_nested_folders(self, store: ConformanceStore, workdir: Path) -> None:
        tree = {
            "tree/config.json": b'{"a": 1}',
            "tree/1/model.bin": os.urandom(10_000),
            "tree/1/sub/deeper/weights.bin": os.urandom(70_000),
            "tree/variables/variables.index": b"index",
        }
        for key, data in tree.items():
            store.put(key, data)
        store.put("treeish/not-part-of-it.bin", b"must not be pulled")
        model = self.pull(workdir, store.config(), store.model_path("tree"))
        assert model.path.is_dir()
        assert self.files_under(model.path) == {k.removeprefix("tree/"): v for k, v in tree.items()}
        assert model.disk_size_bytes == sum(len(v) for v in tree.values())

    def test_empty_object(self, store: ConformanceStore, workdir: Path) -> None:
        store.put("withempty/empty.txt", b"")
        store.put("withempty/full.txt", b"full")
        model = self.pull(workdir, store.config(), store.model_path("withempty"))
        assert self.files_under(model.path) == {"empty.txt": b"", "full.txt": b"full"}

    def test_unicode_and_spaces_in_names(self, store: ConformanceStore, workdir: Path) -> None:
        tree = {"odd/mödel wéights.bin": b"unicode", "odd/dir with space/a b.txt": b"spaces"}
        for key, data in tree.items():
            store.put(key, data)
        model = self.pull(workdir, store.config(), store.model_path("odd"))
        assert self.files_under(model.path) == {
            "mödel wéights.bin": b"unicode",
            "dir with space/a b.txt": b"spaces",
        }

    @pytest.mark.slow
    def test_large_object_in_parallel_ranges(self, store: ConformanceStore, workdir: Path) -> None:
        data = os.urandom(self.large_object_bytes)
        store.put("large/weights.bin", data)
        expected = hashlib.sha256(data).hexdigest()
        del data
        model = self.pull(workdir, store.config(), store.model_path("large"))
        digest = hashlib.sha256()
        with (model.path / "weights.bin").open("rb") as f:
            for chunk in iter(lambda: f.read(4 * MiB), b""):
                digest.update(chunk)
        assert digest.hexdigest() == expected

    def test_keys_leading_outside_are_refused(self, store: ConformanceStore, workdir: Path) -> None:
        if not self.supports_dotdot_keys:
            pytest.skip("this store cannot hold keys with '..' segments")
        store.put("evil/ok.txt", b"fine")
        store.put("evil/../../escape.txt", b"must never be written")
        with pytest.raises(UnsafePath):
            self.pull(workdir, store.config(), store.model_path("evil"))
        assert self.leftovers(workdir) == []
        assert not list(workdir.rglob("escape.txt"))

    def test_missing_object_is_not_found(self, store: ConformanceStore, workdir: Path) -> None:
        with pytest.raises(StorageNotFound) as info:
            self.pull(workdir, store.config(), store.model_path("no/such/model"))
        assert "no/such/model" in str(info.value)
        assert self.leftovers(workdir) == []

    def test_bad_credentials_are_refused_without_leaking(
        self, store: ConformanceStore, workdir: Path
    ) -> None:
        bad = store.bad_credentials_config()
        if bad is None:
            pytest.skip("this store has no credentials")
        store.put("guarded/model.bin", b"secret model")
        with pytest.raises((StoragePermissionDenied, StorageUnauthenticated)) as info:
            self.pull(workdir, bad, store.model_path("guarded/model.bin"))
        self.assert_no_secret(info.value, store, bad)
        assert self.leftovers(workdir) == []

    @staticmethod
    def assert_no_secret(error: SidecarError, store: ConformanceStore, config: Mapping[str, Any]) -> None:
        text = f"{error} {error!r}"
        for secret in store.secrets():
            assert secret not in text


def iter_secret_values(config: Mapping[str, Any], names: tuple[str, ...]) -> Iterator[str]:
    """The values of ``names`` in ``config`` that are non-empty strings."""
    for name in names:
        value = config.get(name)
        if isinstance(value, str) and value:
            yield value
