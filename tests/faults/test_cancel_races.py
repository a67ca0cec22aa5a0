"""loadModel cancelled at random points, and unloadModel racing loadModel for one id.

The contract: the final state of a model is that of the last call the mesh made (loaded
in the runtime iff that call was a load that succeeded), and a load the mesh cancels
must not leave the model loaded, whether nothing or an unloadModel follows.

Through the real sidecar process against a real MLServer and a moto bucket
(``tests/faults/_soak.py``), :data:`ROUNDS` seeded rounds on a few reused model ids:

* ``cancel``: a load cancelled by the client (``future.cancel()``) or by its gRPC
  deadline at a seeded delay: within the pull, anywhere in the load (both measured on
  this machine first), or a little after the sidecar logs that it pulled the model
  (during layout and the runtime load); followed by nothing;
* ``cancel+unload``: the same, and the unload the mesh sends at once;
* ``interleave``: from a random initial state, 2-4 loads, unloads and cancelled loads
  issued at seeded offsets so that they overlap, then a last load or unload.

All calls of a round are issued from one thread in a fixed time order (so their order
of arrival is known, and checked against the sidecar's log), each with a deadline. The
state is then read from MLServer (repository index and ModelReady) and from the files
under ROOT_MODEL_DIR. A round ending in a cancelled load is checked once the state has
held still for :data:`STABLE_FOR` seconds (the sidecar's clean-up runs after the
cancelled call has returned).

In process (ModelFlow over a gated RecordingRuntime), the points a real server's timing
cannot be made to hit on purpose: cancelled while queued behind another call of the same
id, while waiting for a loading slot, during layout, while the runtime loads; and many
more seeded interleavings, several ids at once, sharing loading slots.

The focused tests below also pin two bugs these rounds found in adapter/flow.py (a
load joining the job of a cancelled load of the same request; a cancelled layout
writing its view after the clean-up).
"""

from __future__ import annotations

import asyncio
import collections
import random
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from adapter.flow import LoadRequest, ModelFlow
from adapter.server import AdapterServer
from protos.mmesh import model_runtime_pb2 as pb
from protos.mmesh import model_runtime_pb2_grpc as pb_grpc
from puller.request import LocalModel
from tests.adapter.conftest import load_request, make_settings, place_model
from tests.adapter.recording_runtime import RecordingRuntime
from tests.faults._soak import MODEL_KEY, MODEL_PATH, LogCursor, MeshStack
from tests.servers.s3 import MotoS3Server

SEED = 20261122
#: rounds through the real sidecar
ROUNDS = 48
#: rounds in process (three ids at once in each)
IN_PROCESS_ROUNDS = 100
#: model ids the real rounds reuse, so that what one round leaves is the next one's start
IDS = ("race__isvc-00000000a1", "race__isvc-00000000b2", "race__isvc-00000000c3")
#: deadline of the calls that set a round up and clean up after it
CALL_DEADLINE = 30.0
#: deadline of a call of a round that is not meant to be cancelled (a warm load takes
#: about 50 ms here; a round holds at most five calls of one id)
ROUND_DEADLINE = 8.0
#: how long the clean-up after a cancelled load may take, and how long the state must
#: then hold still
SETTLE_TIMEOUT = 15.0
STABLE_FOR = 0.5
#: random bytes beside model.joblib, so that the pull is a good share of a load
PADDING_BYTES = 2 << 20

CANCELLING = "loadModel cancelled by the caller; cancelling the load"
CANCELLED_CODES = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)


# --------------------------------------------------------------------- the real stack


@dataclass(frozen=True)
class Timing:
    """Seconds the sidecar logs for a warm load: the pull, and the whole load."""

    pull: float
    load: float


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, moto_s3: MotoS3Server, trained_sklearn_model: Path
) -> Iterator[tuple[MeshStack, Timing]]:
    stack = MeshStack(
        tmp_path_factory.mktemp("cancel-races"),
        moto_s3,
        trained_sklearn_model,
        padding_bytes=PADDING_BYTES,
        env={"LOADING_CONCURRENCY": "1"},
    )
    try:
        stack.start()
        cursor = stack.log_cursor()
        for _ in range(4):
            stack.mesh.load(IDS[0], MODEL_PATH, MODEL_KEY, timeout=CALL_DEADLINE)
            stack.mesh.unload(IDS[0], timeout=CALL_DEADLINE)
        lines = cursor.read()
        # the first load warms MLServer's sklearn runtime up: not counted
        pulls = [float(x["seconds"]) for x in lines if x.get("event") == "model pulled"][1:]
        loads = [float(x["seconds"]) for x in lines if x.get("event") == "model loaded"][1:]
        yield stack, Timing(pull=statistics.median(pulls), load=statistics.median(loads))
    finally:
        stack.stop()


@dataclass
class Call:
    """One call of a round: issued ``at`` seconds into the round; cancelled by the
    client ``cancel_after`` seconds later (counted from when the sidecar logs that it
    pulled the model, with ``on_pull``), or given a gRPC ``deadline``."""

    kind: str  # "load" or "unload"
    at: float
    cancel_after: float | None = None
    deadline: float | None = None
    on_pull: bool = False
    future: Any = None
    issued: float = 0.0
    issued_wall: float = 0.0
    finished: float = 0.0
    code: grpc.StatusCode | None = None
    details: str = ""

    @property
    def cancelled(self) -> bool:
        return self.cancel_after is not None or self.deadline is not None

    @property
    def ends(self) -> float:
        """When, into the round, the client stops waiting for it at the latest."""
        return self.at + (self.cancel_after or self.deadline or 0.0)

    def __str__(self) -> str:
        how = (
            f" cancel@{'pulled+' if self.on_pull else ''}{self.cancel_after * 1000:.0f}ms"
            if self.cancel_after is not None
            else (f" deadline {self.deadline * 1000:.0f}ms" if self.deadline is not None else "")
        )
        took = (self.finished - self.issued) * 1000
        code = self.code.name if self.code is not None else "?"
        return f"{self.kind}@{self.at * 1000:.0f}ms{how} -> {code} in {took:.0f}ms"


@dataclass
class Round:
    number: int
    kind: str
    model_id: str
    initially_loaded: bool
    calls: list[Call]
    lines: list[dict[str, Any]] = field(default_factory=list)
    runtime_lines: list[str] = field(default_factory=list)

    def events(self) -> list[str]:
        return [str(x.get("event")) for x in self.lines if x.get("model_id") == self.model_id]

    def describe(self) -> str:
        calls = "; ".join(str(c) for c in self.calls)
        return (
            f"round {self.number} ({self.kind}, {self.model_id}, start loaded={self.initially_loaded}): "
            f"{calls}; the sidecar logged {self.events()}"
        )


def cancelled_load(rng: random.Random, at: float, timing: Timing, *, alone: bool) -> Call:
    """A load cancelled by the client within the pull, or by its deadline anywhere in
    the load; or (``alone``: the only load of its round) by the client a little after
    the sidecar says it pulled the model, that is during layout or the runtime load,
    however fast this machine is right now."""
    pick = rng.random()
    if alone and pick < 1 / 3:
        after_pull = rng.uniform(0.0, max(timing.load - timing.pull, 0.005))
        return Call("load", at, cancel_after=after_pull, on_pull=True)
    if pick < 2 / 3:
        return Call("load", at, cancel_after=rng.uniform(0.0, timing.pull))
    return Call("load", at, deadline=rng.uniform(0.001, timing.load * 1.15))


def make_round(number: int, rng: random.Random, timing: Timing) -> Round:
    model_id = rng.choice(IDS)
    kind = rng.choice(["cancel", "cancel+unload", "interleave"])
    if kind == "cancel":
        return Round(number, kind, model_id, False, [cancelled_load(rng, 0.0, timing, alone=True)])
    if kind == "cancel+unload":
        load = cancelled_load(rng, 0.0, timing, alone=True)
        # at once after the cancel (issued right after it, even when that waits for the pull)
        return Round(number, kind, model_id, False, [load, Call("unload", load.ends)])
    calls: list[Call] = []
    for _ in range(rng.randint(2, 4)):
        at = rng.uniform(0.0, timing.load)
        pick = rng.random()
        if pick < 0.35:
            calls.append(Call("load", at))
        elif pick < 0.6:
            calls.append(Call("unload", at))
        else:
            calls.append(cancelled_load(rng, at, timing, alone=False))
    # the last call: after every other was issued and every cancelled one given up, but
    # while the others may still run
    last = max(c.ends for c in calls) + rng.uniform(0.02, 0.04)
    calls.append(Call(rng.choice(["load", "unload"]), last))
    return Round(number, kind, model_id, rng.random() < 0.5, calls)


def wait_for_pull(cursor: LogCursor, model_id: str, call: Call) -> None:
    """Until the sidecar logs ``model pulled`` for ``model_id`` (bounded: the call
    may end first, and the pull may have failed)."""
    deadline = time.monotonic() + ROUND_DEADLINE
    while time.monotonic() < deadline and not call.future.done():
        if any(x.get("event") == "model pulled" and x.get("model_id") == model_id for x in cursor.read()):
            return
        time.sleep(0.001)


def run_calls(stack: MeshStack, model_id: str, calls: list[Call]) -> None:
    """Issue and cancel the calls in time order from this one thread, then wait for
    every one of them (each has a deadline, so this returns)."""
    stub = stack.mesh.stub
    pulls = stack.log_cursor()
    events = sorted(
        [(c.at, 1, i) for i, c in enumerate(calls)]
        + [(c.at + c.cancel_after, 0, i) for i, c in enumerate(calls) if c.cancel_after is not None]
    )
    start = time.monotonic()
    for at, is_issue, i in events:
        pause = start + at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        call = calls[i]
        if not is_issue:
            if call.on_pull:
                assert call.cancel_after is not None
                wait_for_pull(pulls, model_id, call)
                time.sleep(call.cancel_after)
            call.future.cancel()
            continue
        timeout = call.deadline if call.deadline is not None else ROUND_DEADLINE
        if call.kind == "load":
            call.future = stub.loadModel.future(stack.load_request(model_id), timeout=timeout)
        else:
            call.future = stub.unloadModel.future(pb.UnloadModelRequest(modelId=model_id), timeout=timeout)
        call.issued, call.issued_wall = time.monotonic(), time.time()
        call.future.add_done_callback(lambda _f, c=call: setattr(c, "finished", time.monotonic()))
    for call in calls:
        call.code = call.future.code()
        call.details = call.future.details() or ""
        if not call.finished:
            call.finished = time.monotonic()


def state_problems(stack: MeshStack, model_id: str, loaded: bool) -> list[str]:
    """How the runtime and the disk differ from ``model_id`` loaded (or not)."""
    problems = []
    ready = stack.model_ready(model_id)
    listed = stack.repository_index().get(model_id)
    entries = stack.model_disk_entries(model_id)
    if ready != loaded:
        problems.append(f"MLServer ModelReady={ready}")
    if listed != ("READY" if loaded else None):
        problems.append(f"MLServer repository index lists it as {listed}")
    expected = stack.loaded_entries(model_id) if loaded else []
    if entries != expected:
        problems.append(f"files {entries}, expected {expected}")
    return problems


def wait_settled(stack: MeshStack, rnd: Round, cursor: Any, runtime_cursor: Any) -> list[str]:
    """After a round ending in a cancelled load: wait until the state matches what the
    sidecar did (loaded iff it logged ``model loaded`` for this round) and has held
    still for STABLE_FOR seconds; return the problems left at SETTLE_TIMEOUT."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    stable_since: float | None = None
    problems: list[str] = ["not checked"]
    while time.monotonic() < deadline:
        rnd.lines += cursor.read()
        rnd.runtime_lines += runtime_cursor.read_text()
        loaded = "model loaded" in rnd.events()
        problems = state_problems(stack, rnd.model_id, loaded)
        if problems:
            stable_since = None
        elif stable_since is None:
            stable_since = time.monotonic()
        elif time.monotonic() - stable_since >= STABLE_FOR:
            return []
        time.sleep(0.05)
    return problems


def phase_of(rnd: Round) -> str:
    """Where the single cancelled load of a round was when the sidecar saw the cancel."""
    events = rnd.events()
    if "loadModel" not in events:
        return "never arrived"
    if "model loaded" in events:
        return "after the load completed"
    if CANCELLING not in events:
        return "other"
    if "model pulled" in events[: events.index(CANCELLING)]:
        runtime_loaded = any(f"Loaded model '{rnd.model_id}'" in line for line in rnd.runtime_lines)
        return "runtime load (MLServer loaded it)" if runtime_loaded else "layout or runtime load"
    return "pull"


@pytest.mark.integration
@pytest.mark.slow
def test_cancelled_and_racing_calls_leave_the_state_of_the_last_call(stack: tuple[MeshStack, Timing]) -> None:
    stack_, timing = stack
    rng = random.Random(SEED)
    failures: list[str] = []
    phases: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    for number in range(ROUNDS):
        rnd = make_round(number, rng, timing)
        # the starting state, set up with plain calls (which return once it holds)
        if rnd.initially_loaded:
            stack_.mesh.load(rnd.model_id, MODEL_PATH, MODEL_KEY, timeout=CALL_DEADLINE)
        else:
            stack_.mesh.unload(rnd.model_id, timeout=CALL_DEADLINE)
        cursor, runtime_cursor = stack_.log_cursor(), stack_.runtime_log_cursor()
        run_calls(stack_, rnd.model_id, rnd.calls)
        rnd.lines += cursor.read()
        rnd.runtime_lines += runtime_cursor.read_text()

        for call in rnd.calls:
            if call.cancelled:
                if call.code not in (grpc.StatusCode.OK, *CANCELLED_CODES):
                    failures.append(f"{rnd.describe()}: a cancelled load ended {call.code} {call.details!r}")
            elif call.code != grpc.StatusCode.OK:
                failures.append(f"{rnd.describe()}: {call.kind} failed: {call.code} {call.details!r}")

        if rnd.kind == "cancel":
            problems = wait_settled(stack_, rnd, cursor, runtime_cursor)
        else:
            last = rnd.calls[-1]
            arrivals = [e for e in rnd.events() if e in ("loadModel", "unloadModel")]
            if not arrivals or arrivals[-1] != f"{last.kind}Model":
                failures.append(f"{rnd.describe()}: the sidecar saw the calls in the order {arrivals}")
                continue
            # the last call returned, so every earlier call of the id had finished
            problems = state_problems(
                stack_, rnd.model_id, last.kind == "load" and last.code == grpc.StatusCode.OK
            )
        if problems:
            failures.append(f"{rnd.describe()}: final state wrong: {'; '.join(problems)}")
        if rnd.kind != "interleave":
            phases[phase_of(rnd)] += 1

    for model_id in IDS:
        stack_.mesh.unload(model_id, timeout=CALL_DEADLINE)
    leftovers = stack_.disk_entries()
    index = stack_.repository_index()
    summary = (
        f"{ROUNDS} rounds in {time.monotonic() - started:.1f}s; warm load {timing.load * 1000:.0f}ms "
        f"(pull {timing.pull * 1000:.0f}ms); the sidecar saw the cancel during: {dict(phases)}"
    )
    print(summary)
    assert not failures, "\n".join([summary, *failures])
    assert leftovers == [], f"left under ROOT_MODEL_DIR after unloading every id: {leftovers}"
    assert index == {}, f"MLServer still has {index}"
    # the seeded delays did reach the phases they aim at
    assert phases["pull"] >= 1, summary
    assert phases["layout or runtime load"] + phases["runtime load (MLServer loaded it)"] >= 1, summary


# ----------------------------------------------------------------------- in process


class GatedRuntime(RecordingRuntime):
    """The recording runtime, with gates that hold layout (a worker thread), load
    and unload until a test opens them."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.layout_gate = threading.Event()
        self.layout_gate.set()
        self.in_layout = threading.Event()
        self.layouts_done = 0
        self.load_gate = asyncio.Event()
        self.load_gate.set()
        self.in_load = asyncio.Event()
        self.unload_gate = asyncio.Event()
        self.unload_gate.set()
        self.in_unload = asyncio.Event()
        self.views_removed: list[str] = []

    def layout(self, model: LocalModel) -> Path:
        self.in_layout.set()
        self.layout_gate.wait(10)
        try:
            return super().layout(model)
        finally:
            self.layouts_done += 1

    async def load(self, model_id: str, view: Path, model: LocalModel) -> int | None:
        self.in_load.set()
        await self.load_gate.wait()
        return await super().load(model_id, view, model)

    async def unload(self, model_id: str) -> None:
        self.in_unload.set()
        await self.unload_gate.wait()
        await super().unload(model_id)

    def remove_view(self, model_id: str) -> None:
        super().remove_view(model_id)
        self.views_removed.append(model_id)


@pytest.fixture
def gated(root: Path) -> tuple[ModelFlow, GatedRuntime]:
    runtime = GatedRuntime(make_settings(root))
    return ModelFlow(make_settings(root, loading_concurrency=1), runtime, None), runtime


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _settle() -> None:
    """Give the flow's clean-up tasks and threads time to finish."""
    for _ in range(5):
        await asyncio.sleep(0.02)


def _nothing_left(flow: ModelFlow, runtime: GatedRuntime, model_id: str) -> None:
    assert model_id not in runtime.loaded
    assert not runtime.view_dir(model_id).exists()
    assert model_id not in flow.loaded_ids()


async def _loads_again(flow: ModelFlow, runtime: GatedRuntime, request: LoadRequest) -> None:
    """Nothing of the cancelled load stays in the way: the id loads again at once (a
    turn never handed on would hang this)."""
    await asyncio.wait_for(flow.load(request), timeout=5)
    assert request.model_id in runtime.loaded


async def test_load_cancelled_while_queued_behind_an_unload_of_the_same_id(
    gated: tuple[ModelFlow, GatedRuntime], root: Path
) -> None:
    flow, runtime = gated
    request = load_request(root, "queued")
    await flow.load(request)
    runtime.unload_gate.clear()
    unload = asyncio.create_task(flow.unload("queued"))
    await asyncio.wait_for(runtime.in_unload.wait(), 5)
    load = asyncio.create_task(flow.load(request))
    await asyncio.sleep(0.02)
    await _cancel(load)  # still waiting for its turn
    runtime.unload_gate.set()
    await asyncio.wait_for(unload, 5)
    await _settle()
    _nothing_left(flow, runtime, "queued")
    assert runtime.calls.count(("load", "queued")) == 1  # the cancelled load never ran
    await _loads_again(flow, runtime, request)


async def test_load_cancelled_while_waiting_for_a_loading_slot(
    gated: tuple[ModelFlow, GatedRuntime], root: Path
) -> None:
    flow, runtime = gated
    runtime.load_gate.clear()
    holder = asyncio.create_task(flow.load(load_request(root, "holder")))
    await asyncio.wait_for(runtime.in_load.wait(), 5)
    request = load_request(root, "waiting")
    load = asyncio.create_task(flow.load(request))
    await asyncio.sleep(0.02)
    await _cancel(load)  # LOADING_CONCURRENCY=1: it never got a slot
    runtime.load_gate.set()
    await asyncio.wait_for(holder, 5)
    await _settle()
    _nothing_left(flow, runtime, "waiting")
    assert "holder" in runtime.loaded
    await _loads_again(flow, runtime, request)


async def test_load_cancelled_while_the_runtime_loads_followed_by_nothing(
    gated: tuple[ModelFlow, GatedRuntime], root: Path
) -> None:
    flow, runtime = gated
    runtime.load_gate.clear()
    request = load_request(root, "inflight")
    load = asyncio.create_task(flow.load(request))
    await asyncio.wait_for(runtime.in_load.wait(), 5)
    await _cancel(load)
    assert not runtime.loaded  # the runtime has not finished the load yet ...
    runtime.load_gate.set()  # ... it does now, and the sidecar takes it back out
    await _settle()
    _nothing_left(flow, runtime, "inflight")
    assert runtime.calls == [("load", "inflight"), ("unload", "inflight")]
    await _loads_again(flow, runtime, request)


async def test_load_cancelled_during_layout(gated: tuple[ModelFlow, GatedRuntime], root: Path) -> None:
    flow, runtime = gated
    runtime.layout_gate.clear()
    request = load_request(root, "midlayout")
    load = asyncio.create_task(flow.load(request))
    await asyncio.to_thread(runtime.in_layout.wait, 5)
    await _cancel(load)
    for _ in range(100):  # the clean-up removes the view (there is none yet) ...
        if "midlayout" in runtime.views_removed:
            break
        await asyncio.sleep(0.01)
    runtime.layout_gate.set()  # ... before the layout thread is done
    for _ in range(100):
        if runtime.layouts_done:
            break
        await asyncio.sleep(0.01)
    await _settle()
    assert not runtime.loaded
    assert not runtime.view_dir("midlayout").exists(), "a cancelled load left its view behind"


async def test_load_right_after_a_cancelled_load_of_the_same_model(
    gated: tuple[ModelFlow, GatedRuntime], root: Path
) -> None:
    flow, runtime = gated
    runtime.load_gate.clear()
    request = load_request(root, "again")
    first = asyncio.create_task(flow.load(request))
    await asyncio.wait_for(runtime.in_load.wait(), 5)
    await _cancel(first)  # its clean-up waits for the runtime's load to settle ...
    second = asyncio.create_task(flow.load(request))  # ... when the mesh loads it again
    await asyncio.sleep(0.02)
    runtime.load_gate.set()
    try:
        result = await asyncio.wait_for(second, 5)
    except asyncio.CancelledError:
        pytest.fail("the second load was cancelled, though its caller never cancelled it")
    assert result.size_bytes > 0
    assert "again" in runtime.loaded


async def test_load_resent_after_a_cancel_is_answered_over_grpc(root: Path) -> None:
    """The same race as above through the adapter's gRPC server: the mesh's second
    loadModel must be answered, not left waiting until its deadline."""
    settings = make_settings(root, adapter_port=0, adapter_host="127.0.0.1", loading_concurrency=1)
    runtime = GatedRuntime(settings)
    server = AdapterServer(settings, ModelFlow(settings, runtime, None))
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.ModelRuntimeStub(channel)
        path = place_model(root, "resent")
        request = pb.LoadModelRequest(modelId="resent", modelPath=str(path), modelKey="{}")
        runtime.load_gate.clear()
        first = stub.loadModel(request, timeout=10)
        await asyncio.wait_for(runtime.in_load.wait(), 5)
        first.cancel()
        await asyncio.sleep(0.1)  # the sidecar has seen the cancel; its clean-up waits for the runtime
        second = stub.loadModel(request, timeout=2)
        await asyncio.sleep(0.1)
        runtime.load_gate.set()
        response = await second
        assert response.sizeInBytes > 0
        assert "resent" in runtime.loaded
    finally:
        await channel.close()
        await server.stop(grace=0)


@dataclass
class Op:
    kind: str
    model_id: str
    cancel_after: float | None = None
    task: asyncio.Task[Any] | None = None

    def outcome(self) -> str:
        assert self.task is not None and self.task.done()
        if self.task.cancelled():
            return "cancelled"
        return "ok" if self.task.exception() is None else f"error {self.task.exception()!r}"


@pytest.mark.slow
async def test_random_interleavings_in_process(root: Path) -> None:
    """Three ids at once, LOADING_CONCURRENCY=2: loads, unloads and loads cancelled at
    seeded points (queued, waiting for a slot, in the runtime), and then a last call per
    id; once every call returned, the runtime holds exactly the ids whose last call was
    a load that succeeded, no other view is left, and every id loads again at once."""
    rng = random.Random(SEED)
    runtime = RecordingRuntime(make_settings(root))
    flow = ModelFlow(make_settings(root, loading_concurrency=2), runtime, None)
    ids = ["ip-a", "ip-b", "ip-c"]
    requests = {model_id: load_request(root, model_id) for model_id in ids}
    failures: list[str] = []
    for number in range(IN_PROCESS_ROUNDS):
        runtime.load_delay = rng.uniform(0.002, 0.02)
        ops: list[tuple[float, Op]] = []
        for model_id in ids:
            for _ in range(rng.randint(1, 4)):
                kind = rng.choice(["load", "unload", "cancelled"])
                at = rng.uniform(0.0, 0.03)
                if kind == "cancelled":
                    ops.append((at, Op("load", model_id, cancel_after=rng.uniform(0.0, 0.04))))
                else:
                    ops.append((at, Op(kind, model_id)))
            ops.append((0.08 + rng.uniform(0.0, 0.01), Op(rng.choice(["load", "unload"]), model_id)))
        ops.sort(key=lambda pair: pair[0])
        started = time.monotonic()
        cancels: list[asyncio.Task[None]] = []
        for at, op in ops:
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            coro = flow.load(requests[op.model_id]) if op.kind == "load" else flow.unload(op.model_id)
            op.task = asyncio.create_task(coro)
            await asyncio.sleep(0)  # it takes its turn now, in this order
            if op.cancel_after is not None:
                cancels.append(asyncio.create_task(_cancel_later(op.task, op.cancel_after)))
        await asyncio.wait_for(
            asyncio.gather(*(op.task for _, op in ops if op.task), return_exceptions=True), 30
        )
        await asyncio.gather(*cancels)
        for model_id in ids:
            mine = [op for _, op in ops if op.model_id == model_id]
            for op in mine:
                if op.cancel_after is None and op.outcome() != "ok":
                    failures.append(f"round {number} {model_id}: uncancelled {op.kind} -> {op.outcome()}")
            last = mine[-1]
            expected = last.kind == "load" and last.outcome() == "ok"
            if (model_id in runtime.loaded) != expected or (model_id in flow.loaded_ids()) != expected:
                failures.append(
                    f"round {number} {model_id}: last call {last.kind} -> {last.outcome()}, but "
                    f"runtime has it: {model_id in runtime.loaded}, "
                    f"sidecar thinks so: {model_id in flow.loaded_ids()}"
                )
            if runtime.view_dir(model_id).exists() != expected:
                failures.append(f"round {number} {model_id}: view exists={not expected}")
    for model_id in ids:  # no turn was left hanging
        await asyncio.wait_for(flow.unload(model_id), 5)
        await asyncio.wait_for(flow.load(requests[model_id]), 5)
    print(f"{IN_PROCESS_ROUNDS} in-process rounds")
    assert not failures, "\n".join(failures[:20])


async def _cancel_later(task: asyncio.Task[Any], delay: float) -> None:
    await asyncio.sleep(delay)
    task.cancel()
