"""Our backends through the storage conformance kit, each on a real server."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from puller.testing.storage_conformance import StorageConformance
from tests.servers.process import running
from tests.servers.rclone import RcloneS3Server
from tests.servers.s3 import MotoS3Server


class MotoStore:
    """A bucket on this module's moto server, written with the keys of an IAM user
    allowed s3:*. moto checks credentials only in its auth mode, which cannot serve
    presigned GETs (it answers 500), so the mode is switched on only by
    :meth:`bad_credentials_config`, for the one test that uses it, and off again by the
    fixture."""

    def __init__(self, server: MotoS3Server, keys: Mapping[str, str], bucket: str, base: str) -> None:
        self.server, self.keys, self.bucket, self.base = server, keys, bucket, base
        self.wrong_secret = f"wrong-secret-{uuid.uuid4().hex}"

    def client(self) -> Any:
        return self.server.client(key_id=self.keys["AccessKeyId"], secret=self.keys["SecretAccessKey"])

    def put(self, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=self.bucket, Key=f"{self.base}/{key}", Body=data)

    def config(self) -> Mapping[str, Any]:
        return {
            "type": "s3",
            "access_key_id": self.keys["AccessKeyId"],
            "secret_access_key": self.keys["SecretAccessKey"],
            "endpoint_url": self.server.endpoint_url,
            "bucket": self.bucket,
        }

    def model_path(self, key: str) -> str:
        return f"{self.base}/{key}"

    def bad_credentials_config(self) -> Mapping[str, Any] | None:
        self.server.require_auth()
        return {**self.config(), "secret_access_key": self.wrong_secret}

    def secrets(self) -> list[str]:
        return [self.keys["SecretAccessKey"], self.wrong_secret]


@pytest.fixture(scope="module")
def moto_s3_with_auth(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MotoS3Server, Mapping[str, str]]]:
    """A moto server of this module's own (its auth mode is switched per test), and the
    keys of an IAM user allowed to use S3."""
    server = MotoS3Server(log_dir=tmp_path_factory.mktemp("moto-auth-logs"))
    server.start()
    try:
        iam = server.client("iam")
        iam.create_user(UserName="conformance")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="conformance", PolicyName="s3", PolicyDocument=json.dumps(policy))
        keys = iam.create_access_key(UserName="conformance")["AccessKey"]
        yield server, {"AccessKeyId": keys["AccessKeyId"], "SecretAccessKey": keys["SecretAccessKey"]}
    finally:
        server.stop()


@pytest.mark.integration
class TestS3OnMoto(StorageConformance):
    large_object_bytes = 64 * 1024 * 1024  # moto re-reads the whole object per range

    @pytest.fixture
    def store(
        self, moto_s3_with_auth: tuple[MotoS3Server, Mapping[str, str]], base: str
    ) -> Iterator[MotoStore]:
        server, keys = moto_s3_with_auth
        store = MotoStore(server, keys, f"conf-{uuid.uuid4().hex[:10]}", base)
        store.client().create_bucket(Bucket=store.bucket)
        try:
            yield store
        finally:
            server.allow_any_auth()


class RcloneStore:
    """A bucket of ``rclone serve s3``, seeded by writing files."""

    def __init__(self, server: RcloneS3Server, bucket: str, base: str) -> None:
        self.server, self.bucket, self.base = server, bucket, base
        self.wrong_secret = f"wrong-secret-{uuid.uuid4().hex}"

    def put(self, key: str, data: bytes) -> None:
        self.server.put_object(self.bucket, f"{self.base}/{key}", data)

    def config(self) -> Mapping[str, Any]:
        return {
            "type": "s3",
            "access_key_id": self.server.access_key,
            "secret_access_key": self.server.secret_key,
            "endpoint_url": self.server.endpoint_url,
            "bucket": self.bucket,
        }

    def model_path(self, key: str) -> str:
        return f"{self.base}/{key}"

    def bad_credentials_config(self) -> Mapping[str, Any] | None:
        return {**self.config(), "secret_access_key": self.wrong_secret}

    def secrets(self) -> list[str]:
        return [self.server.secret_key, self.wrong_secret]


@pytest.fixture(scope="module")
def rclone_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3Server]:
    server = RcloneS3Server(
        tmp_path_factory.mktemp("rclone-root"),
        access_key="conformance-key-id",
        secret_key=f"conformance-secret-{uuid.uuid4().hex}",
        log_dir=tmp_path_factory.mktemp("rclone-logs"),
    )
    with running(server):
        yield server


@pytest.mark.integration
class TestS3OnRclone(StorageConformance):
    supports_dotdot_keys = False  # objects are files: a key cannot hold '..' segments

    @pytest.fixture
    def store(self, rclone_s3: RcloneS3Server, base: str) -> RcloneStore:
        bucket = f"conf-{uuid.uuid4().hex[:10]}"
        rclone_s3.create_bucket(bucket)
        return RcloneStore(rclone_s3, bucket, base)


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
