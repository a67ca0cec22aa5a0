"""Our backends through the storage conformance kit, each on a real server."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from puller.testing.storage_conformance import StorageConformance
from tests.servers.s3 import MotoS3Server


class MotoStore:
    def __init__(self, server: MotoS3Server, bucket: str, base: str) -> None:
        self.server, self.bucket, self.base = server, bucket, base
        self.secret = f"conformance-secret-{uuid.uuid4().hex}"

    def put(self, key: str, data: bytes) -> None:
        self.server.put_object(self.bucket, f"{self.base}/{key}", data)

    def config(self) -> Mapping[str, Any]:
        return {
            "type": "s3",
            "access_key_id": "AKIACONFORMANCE00001",
            "secret_access_key": self.secret,
            "endpoint_url": self.server.endpoint_url,
            "bucket": self.bucket,
        }

    def model_path(self, key: str) -> str:
        return f"{self.base}/{key}"

    def bad_credentials_config(self) -> Mapping[str, Any] | None:
        # moto checks credentials only once told to; the fixture does that
        return None

    def secrets(self) -> list[str]:
        return [self.secret]


@pytest.mark.integration
class TestS3OnMoto(StorageConformance):
    large_object_bytes = 64 * 1024 * 1024  # moto re-reads the whole object per range

    @pytest.fixture
    def store(self, moto_s3: MotoS3Server, base: str) -> MotoStore:
        bucket = f"conf-{uuid.uuid4().hex[:10]}"
        moto_s3.create_bucket(bucket)
        return MotoStore(moto_s3, bucket, base)


class DirectoryStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, key: str, data: bytes) -> None:
        path = self.root.joinpath(*key.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def config(self) -> Mapping[str, Any]:
        return {"type": "file", "root": str(self.root)}

    def model_path(self, key: str) -> str:
        return key

    def bad_credentials_config(self) -> Mapping[str, Any] | None:
        return None

    def secrets(self) -> list[str]:
        return []


class TestFileStorage(StorageConformance):
    supports_dotdot_keys = False  # a directory cannot hold a file named through '..'
    large_object_bytes = 64 * 1024 * 1024

    @pytest.fixture
    def store(self, tmp_path: Path) -> DirectoryStore:
        root = tmp_path / "store"
        root.mkdir()
        return DirectoryStore(root)
