"""Observability of pulls: the Prometheus metrics after real pulls from S3 on moto (and
failures), the /metrics endpoint, the per-pull log line and the progress lines."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from adapter.errors import StorageConfigError, StorageNotFound
from adapter.settings import Settings
from puller.config import StorageConfig
from puller.metrics import MetricsServer, PullMetrics, PullProgress, default_metrics, start_metrics_server
from puller.model_key import ModelKey
from puller.pull import Puller
from puller.request import PullRequest
from puller.storage.base import Blob, ByteStream, Plan, Storage
from puller.storage.registry import StorageRegistry
from tests.puller.conftest import make_settings
from tests.servers.s3 import MotoS3Server

MODEL = {"weights.bin": os.urandom(200_000), "config.json": b'{"a": 1}', "empty": b""}
TOTAL = sum(len(d) for d in MODEL.values())


@pytest.fixture
def settings(tmp_path: Path, moto_s3: MotoS3Server, bucket: str) -> Settings:
    settings = make_settings(tmp_path, cache_max_bytes=10 * 1024 * 1024)
    settings.storage_config_dir.mkdir(parents=True)
    (settings.storage_config_dir / "default").write_text(
        json.dumps(
            {
                "type": "s3",
                "endpoint_url": moto_s3.endpoint_url,
                "access_key_id": "key-id",
                "secret_access_key": "secret",
                "bucket": bucket,
            }
        )
    )
    client = moto_s3.client()  # one client: building one per object is slow
    for rel, data in MODEL.items():
        client.put_object(Bucket=bucket, Key=f"models/m/{rel}", Body=data)
    return settings


@pytest.fixture
def metrics() -> PullMetrics:
    return PullMetrics()


@pytest.fixture
async def puller(settings: Settings, metrics: PullMetrics) -> AsyncIterator[Puller]:
    p = Puller(settings, metrics=metrics)
    await asyncio.to_thread(p.start)
    yield p
    await asyncio.to_thread(p.close)


def request(model_id: str, path: str = "models/m", **key: Any) -> PullRequest:
    return PullRequest(model_id=model_id, model_path=path, model_key=ModelKey.from_mapping(key))


@pytest.mark.integration
async def test_metrics_after_pulls_and_failures(puller: Puller, metrics: PullMetrics) -> None:
    s3 = {"backend": "s3"}
    await puller.pull(request("m__isvc-1"))
    assert metrics.value("modelmesh_puller_pulled_bytes_total", s3) == TOTAL
    assert metrics.value("modelmesh_puller_pull_duration_seconds_count", s3) == 1
    assert metrics.value("modelmesh_puller_pull_duration_seconds_sum", s3) > 0
    assert metrics.value("modelmesh_puller_cache_hits_total") == 0
    assert metrics.value("modelmesh_puller_cache_bytes") == TOTAL
    assert metrics.value("modelmesh_puller_cache_entries") == 3

    await puller.remove("m__isvc-1")
    await puller.pull(request("m__isvc-1"))
    assert metrics.value("modelmesh_puller_pulled_bytes_total", s3) == TOTAL  # nothing new fetched
    assert metrics.value("modelmesh_puller_pull_duration_seconds_count", s3) == 2
    assert metrics.value("modelmesh_puller_cache_hits_total") == 3
    assert metrics.value("modelmesh_puller_cache_hit_bytes_total") == TOTAL

    with pytest.raises(StorageNotFound):
        await puller.pull(request("gone__isvc-2", "models/absent"))
    with pytest.raises(StorageConfigError):
        await puller.pull(request("key__isvc-3", storage_key="no-such-entry"))
    assert (
        metrics.value("modelmesh_puller_pull_failures_total", {"backend": "s3", "reason": "StorageNotFound"})
        == 1
    )
    assert (
        metrics.value(
            "modelmesh_puller_pull_failures_total", {"backend": "unknown", "reason": "StorageConfigError"}
        )
        == 1
    )
    assert metrics.value("modelmesh_puller_pull_duration_seconds_count", s3) == 2  # failures not timed


@pytest.mark.integration
async def test_the_pull_log_line(puller: Puller) -> None:
    with capture_logs() as logs:
        await puller.pull(request("l__isvc-4"))
        await puller.pull(request("l__isvc-5"))
    pulled = [e for e in logs if e["event"] == "model pulled"]
    assert len(pulled) == 2
    first, second = pulled
    assert (first["bytes"], first["files"], first["cache_hits"], first["bytes_from_cache"]) == (
        TOTAL,
        3,
        0,
        0,
    )
    assert (second["bytes"], second["files"], second["cache_hits"], second["bytes_from_cache"]) == (
        0,
        0,
        3,
        TOTAL,
    )
    for entry in pulled:
        assert entry["seconds"] >= 0
        assert entry["mb_per_s"] >= 0
        assert entry["storage"].startswith("s3:http://127.0.0.1:")


def test_the_metrics_endpoint_answers(metrics: PullMetrics) -> None:
    metrics.pull_succeeded("s3", 1.5, 1234)
    metrics.pull_failed("gcs", StorageNotFound("nothing there"))
    server = MetricsServer(0, "127.0.0.1", metrics.registry)
    port = server.start()
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            body = resp.read().decode()
        assert 'modelmesh_puller_pulled_bytes_total{backend="s3"} 1234.0' in body
        assert 'modelmesh_puller_pull_failures_total{backend="gcs",reason="StorageNotFound"} 1.0' in body
        assert 'modelmesh_puller_pull_duration_seconds_count{backend="s3"} 1.0' in body
        assert "modelmesh_puller_cache_bytes" in body
        # a second server cannot take the same port
        with pytest.raises(OSError):
            start_metrics_server(port, "127.0.0.1", PullMetrics().registry)
    finally:
        server.stop()
    server.stop()  # twice is fine


def test_the_default_metrics_are_one_per_process() -> None:
    assert default_metrics() is default_metrics()
    assert PullMetrics().registry is not default_metrics().registry


def test_progress_counts_bytes_from_threads() -> None:
    progress = PullProgress(total_bytes=4000)

    def add_many() -> None:
        for _ in range(100):
            progress.add(10)

    threads = [threading.Thread(target=add_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert progress.done == 4000
    fields = progress.fields()
    assert fields["bytes_done"] == 4000
    assert fields["bytes_total"] == 4000
    assert fields["percent"] == 100.0
    assert PullProgress(total_bytes=0).fields()["percent"] == 100.0


# --- progress lines during a long pull --------------------------------------------------


class GatedStorage(Storage):
    """Wraps a real backend; every read after the first chunk of a range waits until
    ``release`` is set (at most 10 s), so a pull stays in flight as long as a test
    needs."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner.config, inner.settings)
        self.inner = inner
        self.release = threading.Event()

    def plan(self, path: str) -> Plan:
        return self.inner.plan(path)

    def open_range(self, blob: Blob, start: int, end: int) -> ByteStream:
        return GatedStream(self.inner.open_range(blob, start, end), self.release)

    def identity(self) -> str:
        return self.inner.identity()


class GatedStream:
    def __init__(self, inner: ByteStream, release: threading.Event) -> None:
        self.inner = inner
        self.release = release
        self.reads = 0

    def readinto(self, buffer: memoryview) -> int:
        if self.reads:
            self.release.wait(10)
        self.reads += 1
        return self.inner.readinto(buffer[:4096])

    def close(self) -> None:
        self.inner.close()


class GatedRegistry(StorageRegistry):
    def __init__(self) -> None:
        super().__init__()
        self.gated: GatedStorage | None = None

    def get(self, config: StorageConfig, settings: Settings) -> Storage:
        if self.gated is None:
            self.gated = GatedStorage(super().get(config, settings))
        return self.gated


@pytest.fixture
def gated_registry() -> Iterator[GatedRegistry]:
    registry = GatedRegistry()
    try:
        yield registry
    finally:
        registry.close()


@pytest.mark.integration
async def test_progress_lines_while_bytes_arrive(
    settings: Settings, metrics: PullMetrics, gated_registry: GatedRegistry
) -> None:
    no_cache = replace(settings, cache_max_bytes=0)
    puller = Puller(no_cache, registry=gated_registry, metrics=metrics, progress_interval=0.05)
    await asyncio.to_thread(puller.start)
    try:
        with capture_logs() as logs:
            task = asyncio.create_task(puller.pull(request("p__isvc-6")))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(
                e["event"] == "pull progress" and e["bytes_done"] > 0 for e in logs
            ):
                await asyncio.sleep(0.02)
            assert gated_registry.gated is not None
            gated_registry.gated.release.set()
            local = await task
            lines_at_end = len([e for e in logs if e["event"] == "pull progress"])
            await asyncio.sleep(0.2)
            progress = [e for e in logs if e["event"] == "pull progress"]
        assert progress, "no progress line while the pull was held"
        assert len(progress) == lines_at_end, "progress lines went on after the pull"
        for line in progress:
            assert line["bytes_total"] == TOTAL
            assert 0 <= line["bytes_done"] <= TOTAL
            assert {"percent", "mb_per_s", "seconds"} <= set(line)
        assert progress[-1]["bytes_done"] > 0
        assert (local.path / "weights.bin").read_bytes() == MODEL["weights.bin"]
    finally:
        if gated_registry.gated is not None:
            gated_registry.gated.release.set()
        await asyncio.to_thread(puller.close)
