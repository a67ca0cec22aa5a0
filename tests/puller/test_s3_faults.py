"""Faults of a real S3 server (``rclone serve s3``) during a pull through a real
:class:`~puller.pull.Puller`: killed mid-pull and restarted, a corrupted byte, and a
server that never answers. The pull either completes with identical bytes or fails
with our error and leaves nothing under ROOT_MODEL_DIR."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapter.errors import IntegrityError, SidecarError, StorageUnavailable
from adapter.settings import Settings
from puller.config import StorageConfig
from puller.model_key import ModelKey
from puller.pull import Puller
from puller.request import LocalModel, PullRequest
from puller.storage.s3 import S3Storage
from tests.puller.conftest import make_settings
from tests.servers.process import running
from tests.servers.rclone import RcloneS3Server, rclone_store

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
#: the throttled server moves this many bytes per second in all (so a test can act
#: while a pull is under way)
THROTTLE = "16M"


@pytest.fixture(scope="module")
def rclone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3Server]:
    server = rclone_store(tmp_path_factory)
    with running(server):
        yield server


@pytest.fixture(scope="module")
def throttled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3Server]:
    server = rclone_store(tmp_path_factory, "--bwlimit", THROTTLE)
    with running(server):
        yield server


def bucket_on(server: RcloneS3Server) -> str:
    name = f"faults-{uuid.uuid4().hex[:10]}"
    server.create_bucket(name)
    return name


def config_for(server: RcloneS3Server, bucket: str) -> dict[str, Any]:
    return {
        "type": "s3",
        "endpoint_url": server.endpoint_url,
        "access_key_id": server.access_key,
        "secret_access_key": server.secret_key,
        "bucket": bucket,
    }


def fault_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"pull_part_bytes": 8 * MiB, "pull_retries": 8, "pull_timeout_seconds": 5.0}
    values.update(overrides)
    return make_settings(tmp_path, **values)


def pull(settings: Settings, config: dict[str, Any], model_path: str) -> LocalModel:
    settings.storage_config_dir.mkdir(parents=True, exist_ok=True)
    (settings.storage_config_dir / "store").write_text(json.dumps(config))
    puller = Puller(settings)
    puller.start()
    try:
        return asyncio.run(puller.pull(PullRequest("m1", model_path, ModelKey(storage_key="store"))))
    finally:
        puller.close()


class BackgroundPull:
    """A pull running in a thread; its outcome is read after :meth:`join`."""

    def __init__(self, settings: Settings, config: dict[str, Any], model_path: str) -> None:
        self.model: LocalModel | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(settings, config, model_path), daemon=True)

    def _run(self, settings: Settings, config: dict[str, Any], model_path: str) -> None:
        try:
            self.model = pull(settings, config, model_path)
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def start(self) -> None:
        self._thread.start()

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the pull did not end within {timeout}s"


def staged_bytes(root: Path, name: str) -> int:
    """Bytes written so far to the staging file ``name`` under ``root/_tmp`` (allocated
    blocks: the engine sizes each file up front, so its length says nothing)."""
    return sum(p.stat().st_blocks * 512 for p in (root / "_tmp").rglob(name) if p.is_file())


def wait_for_staged_bytes(root: Path, name: str, at_least: int, pull_job: BackgroundPull) -> int:
    """Poll (every 10 ms, for at most 60 s) until ``at_least`` bytes of ``name`` were
    written; fail when the pull ends first."""
    deadline = time.monotonic() + 60
    for _ in range(6000):
        written = staged_bytes(root, name)
        if written >= at_least:
            return written
        if not pull_job.running() or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    pytest.fail(f"{at_least} bytes of {name} never appeared (pull running: {pull_job.running()})")


def leftovers(root: Path) -> list[str]:
    """Everything under ROOT_MODEL_DIR but empty sidecar folders."""
    if not root.exists():
        return []
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if not (p.is_dir() and p.name.startswith("_") and p.parent == root)
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(4 * MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- (a) killed mid-pull, restarted on the same port ------------------------------------------


def test_a_server_killed_mid_pull_and_restarted(throttled: RcloneS3Server, tmp_path: Path) -> None:
    bucket = bucket_on(throttled)
    size = 40 * MiB
    data = os.urandom(size)
    throttled.put_object(bucket, "model/weights.bin", data)
    throttled.put_object(bucket, "model/config.json", b'{"small": true}')
    expected = hashlib.sha256(data).hexdigest()
    del data
    settings = fault_settings(tmp_path)

    job = BackgroundPull(settings, config_for(throttled, bucket), "model")
    job.start()
    written = wait_for_staged_bytes(settings.root_model_dir, "weights.bin", 6 * MiB, job)
    old_pid = throttled.pid
    throttled.kill()
    assert job.running(), "the pull must still be under way when the server dies"
    assert written < size
    time.sleep(0.5)
    throttled.start()
    assert throttled.pid != old_pid
    job.join(timeout=120)

    assert job.error is None, f"the pull failed: {job.error!r}"
    assert job.model is not None
    assert sha256_of(job.model.path / "weights.bin") == expected
    assert (job.model.path / "config.json").read_bytes() == b'{"small": true}'
    assert leftovers(settings.root_model_dir) == sorted(
        ["m1", "m1/model", "m1/model/config.json", "m1/model/weights.bin"]
    )


# --- (b) a corrupted byte on the server -----------------------------------------------------------


@pytest.mark.parametrize("size", [1 * MiB, 20 * MiB], ids=["one-range", "several-ranges"])
def test_a_corrupted_byte_fails_the_load_and_places_nothing(
    rclone: RcloneS3Server, tmp_path: Path, size: int
) -> None:
    bucket = bucket_on(rclone)
    data = os.urandom(size)
    rclone.put_object(bucket, "model/weights.bin", data)
    config = config_for(rclone, bucket)
    settings = fault_settings(tmp_path)

    # the store lists the object once and announces its MD5 (rclone keeps it) ...
    storage = S3Storage(StorageConfig(type="s3", fields=config), settings)
    try:
        (blob,) = storage.plan("model/weights.bin").blobs
    finally:
        storage.close()
    assert blob.checksums["md5"] == hashlib.md5(data).hexdigest()
    # ... then one byte changes on its disk, same size, same modification time
    rclone.flip_byte(bucket, "model/weights.bin", size // 2 + 7)

    with pytest.raises(IntegrityError) as info:
        pull(settings, config, "model")
    assert "weights.bin" in str(info.value)
    assert rclone.secret_key not in str(info.value)
    assert leftovers(settings.root_model_dir) == []


# --- (c) a server that never answers within the retries -------------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port where the kernel accepts connections that nothing ever reads or answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as sock:
        yield int(sock.getsockname()[1])


def test_a_store_that_never_answers_the_listing(silent_port: int, tmp_path: Path) -> None:
    settings = fault_settings(tmp_path, pull_retries=2, pull_timeout_seconds=0.5)
    config = {
        "type": "s3",
        "endpoint_url": f"http://127.0.0.1:{silent_port}",
        "access_key_id": "k",
        "secret_access_key": "silent-secret",
        "bucket": "models",
    }
    with pytest.raises(StorageUnavailable) as info:
        pull(settings, config, "model")
    assert "models" in str(info.value)
    assert "silent-secret" not in str(info.value)
    assert leftovers(settings.root_model_dir) == []


def test_a_store_that_stops_answering_mid_pull(throttled: RcloneS3Server, tmp_path: Path) -> None:
    bucket = bucket_on(throttled)
    throttled.put_object(bucket, "model/weights.bin", os.urandom(32 * MiB))
    settings = fault_settings(tmp_path, pull_retries=3, pull_timeout_seconds=1.0)

    job = BackgroundPull(settings, config_for(throttled, bucket), "model")
    job.start()
    try:
        wait_for_staged_bytes(settings.root_model_dir, "weights.bin", 4 * MiB, job)
        throttled.pause()
        job.join(timeout=120)
    finally:
        throttled.resume()

    assert isinstance(job.error, StorageUnavailable), f"expected StorageUnavailable, got {job.error!r}"
    assert isinstance(job.error, SidecarError)
    assert throttled.secret_key not in str(job.error)
    assert leftovers(settings.root_model_dir) == []
