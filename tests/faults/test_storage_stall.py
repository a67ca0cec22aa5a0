"""A store that stalls, driven through the real adapter process (loadModel over gRPC).

The store is a TCP server on 127.0.0.1 that accepts and then sends nothing, answers
HEAD but never a GET, or sends a GET's headers and stops mid-body. With a short
PULL_TIMEOUT_SECONDS the read timeout fires, each attempt is retried (resuming where
the last one stopped) and the load fails with UNAVAILABLE. With LOADTIME_TIMEOUT
shorter than the read timeout the load fails with DEADLINE_EXCEEDED when
LOADTIME_TIMEOUT says, not when the stalled read gives up, and the next load runs at
once. Nothing is left under ROOT_MODEL_DIR either way."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest

from puller.engine import BUFFER_BYTES
from tests.faults._storage_faults import (
    FaultyHTTPStore,
    MiB,
    Sidecar,
    load_error,
    model_dirs,
    staging_leftovers,
    start_sidecar,
    write_storage_config,
)
from tests.servers.process import running

pytestmark = pytest.mark.integration

KEY = {"storage_key": "stalling"}
HEALTHY_KEY = {"storage_key": "healthy"}
WEIGHTS = os.urandom(1 * MiB)
#: what a stalled GET sends before it stops: whole buffers of the engine (the bytes of
#: a buffer that was being filled when the read timed out are read again)
STALL_AFTER = 2 * BUFFER_BYTES
#: attempts of one read (PULL_RETRIES) in the sidecar with a short read timeout
RETRIES = 3
#: the read timeout of the sidecar whose LOADTIME_TIMEOUT is shorter than it
LONG_READ_TIMEOUT = 30.0
#: bound on a loadModel call: well past every timeout of the sidecar under test and
#: well short of LONG_READ_TIMEOUT
CALL_TIMEOUT = 15.0


@pytest.fixture(scope="module")
def store() -> Iterator[FaultyHTTPStore]:
    server = FaultyHTTPStore()
    server.put("models/weights.bin", WEIGHTS)
    server.put("models/ok.bin", b"fine" * 1024)
    with running(server):
        yield server


@pytest.fixture(scope="module")
def healthy() -> Iterator[FaultyHTTPStore]:
    """A second store that never stalls."""
    server = FaultyHTTPStore()
    server.put("models/ok.bin", b"fine" * 1024)
    with running(server):
        yield server


@pytest.fixture(autouse=True)
def healthy_store_after(store: FaultyHTTPStore) -> Iterator[None]:
    yield
    store.reset()


def _sidecar(
    tmp_path_factory: pytest.TempPathFactory, store: FaultyHTTPStore, healthy: FaultyHTTPStore, **env: str
) -> Sidecar:
    work = tmp_path_factory.mktemp("stall")
    write_storage_config(work / "storage-config", "stalling", {"type": "http", "url": store.url})
    write_storage_config(work / "storage-config", "healthy", {"type": "http", "url": healthy.url})
    return start_sidecar(work / "models", work / "storage-config", work / "adapter.log", **env)


@pytest.fixture(scope="module")
def short_read_timeout(
    tmp_path_factory: pytest.TempPathFactory, store: FaultyHTTPStore, healthy: FaultyHTTPStore
) -> Iterator[Sidecar]:
    sidecar = _sidecar(
        tmp_path_factory,
        store,
        healthy,
        PULL_TIMEOUT_SECONDS="0.5",
        PULL_RETRIES=str(RETRIES),
        LOADTIME_TIMEOUT="10000",
    )
    try:
        yield sidecar
    finally:
        sidecar.stop()


@pytest.fixture(scope="module")
def short_load_timeout(
    tmp_path_factory: pytest.TempPathFactory, store: FaultyHTTPStore, healthy: FaultyHTTPStore
) -> Iterator[Sidecar]:
    sidecar = _sidecar(
        tmp_path_factory,
        store,
        healthy,
        PULL_TIMEOUT_SECONDS=str(LONG_READ_TIMEOUT),
        PULL_RETRIES="2",
        LOADTIME_TIMEOUT="2000",
    )
    try:
        yield sidecar
    finally:
        sidecar.stop()


def _assert_nothing_left(sidecar: Sidecar) -> None:
    assert model_dirs(sidecar.root) == []
    assert staging_leftovers(sidecar.root) == []


# --- the read timeout fires, is retried, and the load fails UNAVAILABLE ----------------------


def test_a_store_that_accepts_and_never_answers(store: FaultyHTTPStore, short_read_timeout: Sidecar) -> None:
    store.silent = True
    error = load_error(
        lambda: short_read_timeout.client.load("silent", "models/weights.bin", KEY, timeout=CALL_TIMEOUT)
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert "/models/weights.bin" in (error.details() or "")
    # the listing (a HEAD) timed out on every attempt
    assert [method for method, _, _ in store.seen()] == ["HEAD"] * RETRIES
    _assert_nothing_left(short_read_timeout)


def test_a_get_that_is_never_answered(store: FaultyHTTPStore, short_read_timeout: Sidecar) -> None:
    store.silent_get = True
    error = load_error(
        lambda: short_read_timeout.client.load("silent-get", "models/weights.bin", KEY, timeout=CALL_TIMEOUT)
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert len(store.seen("GET")) == RETRIES
    _assert_nothing_left(short_read_timeout)


def test_a_body_that_stops_midway(store: FaultyHTTPStore, short_read_timeout: Sidecar) -> None:
    store.stall_body_after = STALL_AFTER
    error = load_error(
        lambda: short_read_timeout.client.load("mid-body", "models/weights.bin", KEY, timeout=CALL_TIMEOUT)
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert "weights.bin" in (error.details() or "")
    # every attempt resumed where the one before stopped (at its last whole buffer)
    last = len(WEIGHTS) - 1
    assert [r for _, _, r in store.seen("GET")] == [f"bytes={i * STALL_AFTER}-{last}" for i in range(RETRIES)]
    _assert_nothing_left(short_read_timeout)


def test_the_load_succeeds_once_the_store_answers(
    store: FaultyHTTPStore, short_read_timeout: Sidecar
) -> None:
    response = short_read_timeout.client.load("healthy", "models/weights.bin", KEY, timeout=CALL_TIMEOUT)
    assert response.sizeInBytes > 0
    assert (short_read_timeout.root / "healthy" / "weights.bin").read_bytes() == WEIGHTS
    short_read_timeout.client.unload("healthy")
    _assert_nothing_left(short_read_timeout)


# --- LOADTIME_TIMEOUT shorter than the read timeout: no hung load -----------------------------


@pytest.mark.parametrize("fault", ["silent", "silent_get", "stall_body_after"])
def test_the_load_timeout_wins_over_a_stalled_read(
    store: FaultyHTTPStore, short_load_timeout: Sidecar, fault: str
) -> None:
    setattr(store, fault, STALL_AFTER if fault == "stall_body_after" else True)
    model_id = f"deadline-{fault.replace('_', '-')}"
    error = load_error(
        lambda: short_load_timeout.client.load(model_id, "models/weights.bin", KEY, timeout=CALL_TIMEOUT)
    )
    # the sidecar's own deadline (not the client's): it answered long before the
    # stalled read would have timed out
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
    assert "LOADTIME_TIMEOUT" in (error.details() or ""), error
    _assert_nothing_left(short_load_timeout)

    # the loading slot (LOADING_CONCURRENCY=1) is free: a load from another store runs
    # now, while the stalled store still holds its connections
    response = short_load_timeout.client.load("after", "models/ok.bin", HEALTHY_KEY, timeout=CALL_TIMEOUT)
    assert response.sizeInBytes > 0
    short_load_timeout.client.unload("after")
    _assert_nothing_left(short_load_timeout)
