"""An S3 server (``rclone serve s3``, a real process) killed mid-pull, driven through the
real adapter process (loadModel over gRPC, embedded puller).

tests/puller/test_s3_faults.py drives the puller alone; here the same fault goes
through the sidecar: restarted on its port within the retries, the load completes
with identical bytes; never restarted, the load fails UNAVAILABLE well inside
LOADTIME_TIMEOUT (the retries give up first) and leaves no model directory."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator

import grpc
import pytest

from tests.faults._storage_faults import (
    BackgroundLoad,
    MiB,
    Sidecar,
    model_dirs,
    s3_config,
    sha256_of,
    staging_leftovers,
    start_sidecar,
    wait_for_written,
    write_storage_config,
)
from tests.servers.process import running
from tests.servers.rclone import RcloneS3Server, rclone_store

pytestmark = pytest.mark.integration

#: the store moves this many bytes per second in all, so that a kill lands mid-pull
THROTTLE = "16M"
SIZE = 24 * MiB
#: attempts of one read: 6 backoffs of 0.1-0.2, 0.2-0.4, 0.4-0.8, 0.8-1.6, 1.6-3.2 and
#: 2.5-5 s leave the store at least 5.6 s to come back, and give up within 11.2 s: well
#: inside LOADTIME_TIMEOUT
RETRIES = 7
LOADTIME_TIMEOUT_MS = 20000
CALL_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3Server]:
    server = rclone_store(tmp_path_factory, "--bwlimit", THROTTLE)
    with running(server):
        yield server


@pytest.fixture(scope="module")
def model(s3: RcloneS3Server) -> tuple[str, str]:
    """A bucket holding ``model/`` (big weights and a small config); the weights' sha256."""
    bucket = f"outage-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(bucket)
    weights = os.urandom(SIZE)
    s3.put_object(bucket, "model/weights.bin", weights)
    s3.put_object(bucket, "model/config.json", b'{"small": true}')
    return bucket, hashlib.sha256(weights).hexdigest()


@pytest.fixture(scope="module")
def sidecar(
    tmp_path_factory: pytest.TempPathFactory, s3: RcloneS3Server, model: tuple[str, str]
) -> Iterator[Sidecar]:
    work = tmp_path_factory.mktemp("outage")
    write_storage_config(work / "storage-config", "store", s3_config(s3, model[0]))
    running = start_sidecar(
        work / "models",
        work / "storage-config",
        work / "adapter.log",
        PULL_RETRIES=str(RETRIES),
        PULL_PART_BYTES=str(8 * MiB),
        PULL_TIMEOUT_SECONDS="5",
        LOADTIME_TIMEOUT=str(LOADTIME_TIMEOUT_MS),
    )
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(autouse=True)
def store_running(s3: RcloneS3Server) -> Iterator[None]:
    yield
    if not s3.alive():
        s3.start()


def _start_load(sidecar: Sidecar, model_id: str) -> BackgroundLoad:
    return BackgroundLoad(sidecar.client, model_id, "model", {"storage_key": "store"}, timeout=CALL_TIMEOUT)


def _kill_mid_pull(s3: RcloneS3Server, sidecar: Sidecar, load: BackgroundLoad) -> None:
    """Kill the store once a few MiB of the weights are written, the load still under way."""
    written = wait_for_written(sidecar.root, "weights.bin", 2 * MiB, load)
    s3.kill()
    assert load.running(), "the load must still be under way when the store dies"
    assert written < SIZE


def test_the_store_killed_mid_pull_and_restarted(
    s3: RcloneS3Server, model: tuple[str, str], sidecar: Sidecar
) -> None:
    load = _start_load(sidecar, "restarted")
    _kill_mid_pull(s3, sidecar, load)
    s3.start()  # the same port, within the retries

    response = load.result(CALL_TIMEOUT)
    assert response.sizeInBytes >= SIZE
    pulled = sidecar.root / "restarted" / "model"
    assert sha256_of(pulled / "weights.bin") == model[1]
    assert (pulled / "config.json").read_bytes() == b'{"small": true}'
    assert staging_leftovers(sidecar.root) == []

    sidecar.client.unload("restarted")
    assert model_dirs(sidecar.root) == []


def test_a_store_that_never_comes_back(s3: RcloneS3Server, model: tuple[str, str], sidecar: Sidecar) -> None:
    load = _start_load(sidecar, "abandoned")
    _kill_mid_pull(s3, sidecar, load)

    error = load.error(CALL_TIMEOUT)
    assert isinstance(error, grpc.RpcError), error
    # the retries gave up before LOADTIME_TIMEOUT would have (DEADLINE_EXCEEDED)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert "weights.bin" in (error.details() or "")
    assert s3.secret_key not in (error.details() or "")
    assert model_dirs(sidecar.root) == []
    assert staging_leftovers(sidecar.root) == []

    # once the store is back, the same load goes through
    s3.start()
    sidecar.client.load("abandoned", "model", {"storage_key": "store"}, timeout=CALL_TIMEOUT)
    assert sha256_of(sidecar.root / "abandoned" / "model" / "weights.bin") == model[1]
    sidecar.client.unload("abandoned")
    assert model_dirs(sidecar.root) == []
