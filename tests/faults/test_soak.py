"""Soak: 64 mesh clients at once loading, unloading and re-loading 50 models through the
real sidecar process, against a real MLServer and a moto bucket (``tests/faults/_soak.py``).

Bounded: the workload runs WARM_UP_SECONDS + SOAK_SECONDS (45 s) or MAX_CALLS calls,
whichever comes first; every call carries a gRPC deadline, and the whole workload an
outer bound, so the test ends in about a minute whatever the sidecar does.

What it proves:

* every call is answered, and none fails. Which errors are expected: none. An unload of
  an id the runtime does not know is a success in this contract (the sidecar answers OK;
  a NOT_FOUND would also count as success for the mesh, so it is tolerated but counted),
  and concurrent loads and unloads of one id are ordered by the sidecar, never refused;
* the sidecar does not grow: its RSS, open file descriptors and threads, sampled from
  /proc at the same point of quiet (every client connected, no call in flight) after the
  warm-up and at the end, stay within RSS_GROWTH_KIB, FD_GROWTH and THREAD_GROWTH;
* once every id is unloaded, MLServer holds no model (repository index and ModelReady)
  and ROOT_MODEL_DIR holds nothing but the sidecar's own empty folders (``_tmp``,
  ``_mlserver_models``: what the contract lets it keep);
* the sidecar logged nothing at warning level or above.

And, with the same stack, that the sidecar stays READY while MLServer loads a model:
MLServer's ServerReady says False while any model loads, which the sidecar read as
"runtime down" (runtimeStatus STARTING, health NOT_SERVING, every model loaded again)
until runtimes/mlserver.py asked ServerLive instead; the soak showed it first.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.mmesh import model_runtime_pb2 as pb
from protos.mmesh import model_runtime_pb2_grpc as pb_grpc
from tests.faults._soak import MeshStack, footprint
from tests.servers.s3 import MotoS3Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 64_50
CLIENTS = 64
MODEL_IDS = tuple(f"soak__isvc-{i:010d}" for i in range(50))
#: the workload: a warm-up, a sample, the soak proper, a sample
WARM_UP_SECONDS = 10.0
SOAK_SECONDS = 35.0
#: calls of the whole workload at most (about 2,500 run here in 45 s)
MAX_CALLS = 8000
#: share of loads among the calls (the rest are unloads)
LOAD_SHARE = 0.6
#: gRPC deadlines of one call
LOAD_DEADLINE = 30.0
UNLOAD_DEADLINE = 15.0
#: outer bound of one phase beyond its length: the longest call deadline and some
PHASE_GRACE = LOAD_DEADLINE + 15.0
#: growth of the sidecar allowed between the two samples. RSS: the allocator keeps what
#: the busiest moment needed, so some MiB come and go (measured here: -15 to +1 MiB);
#: a leak of 10 KiB per call over the ~2,000 calls of the soak proper passes it.
RSS_GROWTH_KIB = 16 * 1024
#: descriptors: the S3 connection pool and MLServer's channel may open a few more
#: sockets (measured: no change); one leaked per load would be hundreds
FD_GROWTH = 8
#: threads: the worker pools are bounded (asyncio's default executor: cores + 4;
#: measured: no change)
THREAD_GROWTH = 4

OK = grpc.StatusCode.OK
#: codes that count as success: NOT_FOUND only for an unload (the contract's rule)
TOLERATED = {"unload": {OK, grpc.StatusCode.NOT_FOUND}, "load": {OK}}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, moto_s3: MotoS3Server, trained_sklearn_model: Path
) -> Iterator[MeshStack]:
    stack = MeshStack(
        tmp_path_factory.mktemp("soak"),
        moto_s3,
        trained_sklearn_model,
        env={"LOADING_CONCURRENCY": "4"},
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


#: a custom MLServer runtime whose load takes SLOW_LOAD_SECONDS
SLOW_RUNTIME = """
import asyncio

from mlserver import MLModel


class SlowModel(MLModel):
    async def load(self) -> bool:
        await asyncio.sleep({seconds})
        return True
"""
#: longer than the sidecar's runtime watch interval (2 s), so that it looks meanwhile
SLOW_LOAD_SECONDS = 3.0


def test_sidecar_stays_ready_while_mlserver_loads_a_model(stack: MeshStack, tmp_path: Path) -> None:
    """MLServer answers ServerReady with "every model of my registry is ready": False
    while any model loads. The sidecar must not read that as the runtime being down
    (it did: runtimeStatus went STARTING, health NOT_SERVING, and every loaded model was
    loaded again, over and over under load)."""
    model = tmp_path / "slow"
    model.mkdir()
    (model / "slow_runtime.py").write_text(SLOW_RUNTIME.format(seconds=SLOW_LOAD_SECONDS))
    (model / "model-settings.json").write_text(
        json.dumps({"name": "slow", "implementation": "slow_runtime.SlowModel"})
    )
    stack.upload("slow", model)
    health = health_pb2_grpc.HealthStub(stack.mesh.channel)
    cursor = stack.log_cursor()
    load = stack.mesh.stub.loadModel.future(stack.load_request("slow__isvc-0000000001", "slow"), timeout=60)
    seen = []
    while not load.done():
        status = stack.mesh.stub.runtimeStatus(pb.RuntimeStatusRequest(), timeout=10).status
        serving = health.Check(health_pb2.HealthCheckRequest(service="mmesh.ModelRuntime"), timeout=10).status
        seen.append((status, serving))
        time.sleep(0.2)
    assert load.code() == grpc.StatusCode.OK, load.details()
    assert stack.model_ready("slow__isvc-0000000001")
    stack.mesh.unload("slow__isvc-0000000001")
    assert len(seen) >= SLOW_LOAD_SECONDS / 0.4  # it was polled the whole time
    expected = (pb.RuntimeStatusResponse.READY, health_pb2.HealthCheckResponse.SERVING)
    assert set(seen) == {expected}, seen
    warnings = [x["event"] for x in cursor.read() if x.get("level") != "info"]
    assert warnings == []


@dataclass
class Tally:
    """What the clients did."""

    started: int = 0
    finished: int = 0
    codes: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    errors: list[str] = field(default_factory=list)
    seconds: dict[str, list[float]] = field(default_factory=lambda: {"load": [], "unload": []})

    def record(self, kind: str, model_id: str, code: grpc.StatusCode, details: str, seconds: float) -> None:
        self.finished += 1
        self.codes[(kind, code.name)] += 1
        self.seconds[kind].append(seconds)
        if code not in TOLERATED[kind]:
            self.errors.append(f"{kind} {model_id}: {code.name} {details!r} after {seconds:.1f}s")

    def latencies(self) -> str:
        parts = []
        for kind, values in self.seconds.items():
            ordered = sorted(values) or [0.0]
            p50, p99 = ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.99)]
            parts.append(f"{kind} p50 {p50 * 1000:.0f}ms p99 {p99 * 1000:.0f}ms max {ordered[-1]:.2f}s")
        return "; ".join(parts)


async def client(
    stub: pb_grpc.ModelRuntimeStub, rng: random.Random, until: float, tally: Tally, stack: MeshStack
) -> None:
    """One mesh client: calls one after the other until ``until`` or MAX_CALLS."""
    while time.monotonic() < until and tally.started < MAX_CALLS:
        model_id = rng.choice(MODEL_IDS)
        kind = "load" if rng.random() < LOAD_SHARE else "unload"
        tally.started += 1
        began = time.monotonic()
        try:
            if kind == "load":
                await stub.loadModel(stack.load_request(model_id), timeout=LOAD_DEADLINE)
            else:
                await stub.unloadModel(pb.UnloadModelRequest(modelId=model_id), timeout=UNLOAD_DEADLINE)
        except grpc.aio.AioRpcError as exc:
            tally.record(kind, model_id, exc.code(), exc.details() or "", time.monotonic() - began)
        else:
            tally.record(kind, model_id, OK, "", time.monotonic() - began)


async def phase(
    stubs: list[pb_grpc.ModelRuntimeStub],
    rngs: list[random.Random],
    seconds: float,
    tally: Tally,
    stack: MeshStack,
) -> None:
    """Every client at once for ``seconds``; returns when every call has returned."""
    until = time.monotonic() + seconds
    clients = [client(stub, rng, until, tally, stack) for stub, rng in zip(stubs, rngs, strict=True)]
    await asyncio.wait_for(asyncio.gather(*clients), timeout=seconds + PHASE_GRACE)


async def test_soak(stack: MeshStack) -> None:
    pid = stack.adapter.process.pid
    soak_log_start = len(stack.adapter.log_lines())
    idle = footprint(pid)
    # a connection of its own for every client (channels share one by default)
    channels = [
        grpc.aio.insecure_channel(stack.adapter_target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CLIENTS)
    ]
    try:
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 10) for c in channels))
        stubs = [pb_grpc.ModelRuntimeStub(c) for c in channels]
        master = random.Random(SEED)
        rngs = [random.Random(master.random()) for _ in range(CLIENTS)]
        tally = Tally()
        started = time.monotonic()

        await phase(stubs, rngs, WARM_UP_SECONDS, tally, stack)
        warm = footprint(pid)
        await phase(stubs, rngs, SOAK_SECONDS, tally, stack)
        end = footprint(pid)
        seconds = time.monotonic() - started

        await asyncio.gather(
            *(
                stubs[0].unloadModel(pb.UnloadModelRequest(modelId=m), timeout=UNLOAD_DEADLINE)
                for m in MODEL_IDS
            )
        )
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    closed = footprint(pid)
    for _ in range(100):  # the sidecar closes its ends of the 64 connections (bounded wait)
        if closed.fds <= idle.fds + FD_GROWTH:
            break
        await asyncio.sleep(0.1)
        closed = footprint(pid)

    report = (
        f"{tally.finished} calls by {CLIENTS} clients in {seconds:.1f}s; {tally.latencies()}; "
        f"{dict(tally.codes)}\nsidecar idle: {idle}; after warm-up: {warm}; at the end: {end}; "
        f"clients gone: {closed}"
    )
    print(report)
    assert tally.started == tally.finished, report  # every call was answered
    assert not tally.errors, "\n".join([report, *tally.errors[:20]])
    assert tally.codes[("load", "OK")] >= 500, report  # the soak did soak

    assert end.rss_kib - warm.rss_kib <= RSS_GROWTH_KIB, report
    assert end.fds - warm.fds <= FD_GROWTH, report
    assert end.threads - warm.threads <= THREAD_GROWTH, report
    assert closed.fds <= idle.fds + FD_GROWTH, report  # the 64 connections are gone

    assert stack.repository_index() == {}
    assert [m for m in MODEL_IDS if stack.model_ready(m)] == []
    assert stack.disk_entries() == [], "left under ROOT_MODEL_DIR"
    # nothing the sidecar found worth a warning: a loaded runtime is not a broken one
    lines = stack.adapter.log_lines()[soak_log_start:]
    levels = collections.Counter(str(line.get("level")) for line in lines)
    print(f"sidecar log lines by level: {dict(levels)}")
    assert set(levels) <= {"debug", "info"}, [x for x in lines if x.get("level") not in ("debug", "info")][:5]
