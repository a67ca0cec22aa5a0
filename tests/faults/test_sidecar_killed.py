"""The sidecar killed with SIGKILL mid-pull, then started again on the same
ROOT_MODEL_DIR (the real adapter process, embedded puller, content cache on).

The store holds the pull once 1 MiB of the weights went out, so the kill lands
mid-pull by construction (no timing). After the restart and the purge before READY:
no model directory and no staging leftover, the content cache holds only complete
entries (the one admitted before the kill survives), and loading the same models
again gives identical bytes, the cached one straight from the cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.faults._storage_faults import (
    BackgroundLoad,
    FaultyHTTPStore,
    MiB,
    cache_entries,
    cache_problems,
    model_dirs,
    staged_file,
    staging_leftovers,
    start_sidecar,
    wait_for,
    write_storage_config,
)
from tests.servers.process import running

pytestmark = pytest.mark.integration

KEY = {"storage_key": "store"}
SMALL = os.urandom(256 * 1024)
BIG = os.urandom(8 * MiB)
HOLD_AFTER = 1 * MiB
CALL_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def store() -> Iterator[FaultyHTTPStore]:
    server = FaultyHTTPStore()
    server.put("models/small.bin", SMALL)
    server.put("models/big.bin", BIG)
    with running(server):
        yield server


def test_a_sidecar_killed_mid_pull_leaves_nothing_half_done(tmp_path: Path, store: FaultyHTTPStore) -> None:
    root, config_dir = tmp_path / "models", tmp_path / "storage-config"
    write_storage_config(config_dir, "store", {"type": "http", "url": store.url})
    env = {"CACHE_MAX_BYTES": str(256 * MiB), "PULL_PART_BYTES": str(2 * MiB), "LOADTIME_TIMEOUT": "60000"}

    first = start_sidecar(root, config_dir, tmp_path / "first.log", **env)
    try:
        first.client.load("small", "models/small.bin", KEY, timeout=CALL_TIMEOUT)
        assert len(cache_entries(root)) == 1

        store.hold_after = HOLD_AFTER
        load = BackgroundLoad(first.client, "big", "models/big.bin", KEY, timeout=CALL_TIMEOUT)
        wait_for(lambda: store.held > 0 and staged_file(root, "big.bin") is not None, 30, "the pull to hold")
        assert load.running()
        first.kill()
        error = load.error(CALL_TIMEOUT)
        assert isinstance(error, grpc.RpcError), error
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    finally:
        first.stop()
        store.reset()
    # what the kill left: a half-written staging folder, the model loaded before it
    assert staging_leftovers(root) != []
    assert model_dirs(root) == ["small"]

    second = start_sidecar(root, config_dir, tmp_path / "second.log", **env)
    try:
        # the purge before READY removed the models of the previous life and the staging
        # leftovers; the cache entry admitted before the kill is complete and stays
        assert model_dirs(root) == []
        assert staging_leftovers(root) == []
        assert cache_problems(root) == []
        assert len(cache_entries(root)) == 1

        second.client.load("big", "models/big.bin", KEY, timeout=CALL_TIMEOUT)
        assert (root / "big" / "big.bin").read_bytes() == BIG
        second.client.load("small", "models/small.bin", KEY, timeout=CALL_TIMEOUT)
        assert (root / "small" / "small.bin").read_bytes() == SMALL
        assert [line["cache_hits"] for line in second.pulled_lines("small")] == [1]

        # the big model is now cached too: a second copy is a link to the same bytes
        second.client.load("big-again", "models/big.bin", KEY, timeout=CALL_TIMEOUT)
        assert [line["cache_hits"] for line in second.pulled_lines("big-again")] == [1]
        again = root / "big-again" / "big.bin"
        assert again.stat().st_ino == (root / "big" / "big.bin").stat().st_ino
        assert again.read_bytes() == BIG
        assert cache_problems(root) == []
        assert len(cache_entries(root)) == 2

        for model_id in ("big", "small", "big-again"):
            second.client.unload(model_id)
        assert model_dirs(root) == []
        assert staging_leftovers(root) == []
    finally:
        second.stop()
