from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from adapter.errors import (
    InvalidModelId,
    InvalidModelKey,
    LoadTimeout,
    ModelNotFound,
    NotImplementedByRuntime,
)
from adapter.flow import LoadRequest, ModelFlow
from adapter.sequencing import TurnQueue
from tests.adapter.conftest import load_request, make_settings
from tests.adapter.recording_runtime import RecordingRuntime


async def test_load_reports_disk_size_times_multiplier(
    flow: ModelFlow, runtime: RecordingRuntime, root: Path
):
    result = await flow.load(load_request(root, "m1", size=1000))
    assert result.size_bytes == math.ceil(1000 * 1.25)
    assert "m1" in runtime.loaded
    assert (runtime.view_dir("m1") / "model.bin").resolve() == (root / "m1" / "model.bin").resolve()


async def test_runtime_size_wins_over_disk_size(flow: ModelFlow, runtime: RecordingRuntime, root: Path):
    runtime.size = 4242
    assert (await flow.load(load_request(root, "m1"))).size_bytes == 4242


async def test_concurrent_loads_of_one_id_share_one_job(
    flow: ModelFlow, runtime: RecordingRuntime, root: Path
):
    runtime.load_delay = 0.2
    request = load_request(root, "shared")
    results = await asyncio.gather(*(flow.load(request) for _ in range(5)))
    assert len({r.size_bytes for r in results}) == 1
    assert runtime.calls.count(("load", "shared")) == 1


async def test_loading_concurrency_bounds_parallel_loads(
    flow: ModelFlow, runtime: RecordingRuntime, root: Path
):
    runtime.load_delay = 0.05
    await asyncio.gather(*(flow.load(load_request(root, f"m{i}")) for i in range(6)))
    assert runtime.max_in_flight == 2
    assert len(runtime.loaded) == 6


async def test_cancelled_load_leaves_nothing_loaded(flow: ModelFlow, runtime: RecordingRuntime, root: Path):
    runtime.load_delay = 0.3
    task = asyncio.create_task(flow.load(load_request(root, "gone")))
    await asyncio.sleep(0.1)  # the runtime has the load now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the mesh sends unloadModel right after cancelling
    await flow.unload("gone")
    assert runtime.loaded == {}
    assert ("unload", "gone") in runtime.calls
    assert not runtime.view_dir("gone").exists()
    assert flow.loaded_ids() == []


async def test_cancel_one_of_two_callers_keeps_the_shared_load(
    flow: ModelFlow, runtime: RecordingRuntime, root: Path
):
    runtime.load_delay = 0.2
    request = load_request(root, "two")
    first = asyncio.create_task(flow.load(request))
    second = asyncio.create_task(flow.load(request))
    await asyncio.sleep(0.05)
    first.cancel()
    result = await second
    assert result.size_bytes > 0
    assert "two" in runtime.loaded


@pytest.mark.parametrize("last", ["load", "unload"])
async def test_final_state_matches_the_last_call(
    flow: ModelFlow, runtime: RecordingRuntime, root: Path, last: str
):
    runtime.load_delay = 0.02
    request = load_request(root, "race")
    calls = [flow.load(request), flow.unload("race"), flow.load(request), flow.unload("race")]
    if last == "load":
        calls.append(flow.load(request))
    await asyncio.gather(*calls)
    assert ("race" in runtime.loaded) == (last == "load")


async def test_unload_of_unknown_model_succeeds(flow: ModelFlow, runtime: RecordingRuntime):
    await flow.unload("never-loaded")
    assert runtime.calls == [("unload", "never-loaded")]


async def test_failed_load_cleans_up(flow: ModelFlow, runtime: RecordingRuntime, root: Path):
    runtime.fail_ids.add("broken")
    with pytest.raises(Exception, match="broken"):
        await flow.load(load_request(root, "broken"))
    assert "broken" not in runtime.loaded
    assert not runtime.view_dir("broken").exists()


async def test_load_timeout(root: Path):
    runtime = RecordingRuntime(make_settings(root))
    runtime.load_delay = 1.0
    flow = ModelFlow(make_settings(root, loadtime_timeout_ms=200), runtime, None)
    with pytest.raises(LoadTimeout, match="LOADTIME_TIMEOUT"):
        await flow.load(load_request(root, "slow"))
    assert runtime.loaded == {}


async def test_status_is_starting_until_ready_then_purges(
    flow: ModelFlow, runtime: RecordingRuntime, root: Path
):
    runtime.ready = False
    runtime.loaded["leftover"] = Path("/nowhere")
    stale_view = runtime.view_dir("stale")
    stale_view.mkdir(parents=True)
    info = await flow.runtime_status()
    assert not info.ready
    assert "leftover" in runtime.loaded  # nothing purged before the runtime is ready
    runtime.ready = True
    info = await flow.runtime_status()
    assert info.ready
    assert info.runtime_version == "recording-1.0"
    assert info.capacity_bytes == (1 << 30) - 268435456
    assert info.max_loading_concurrency == 2
    assert runtime.loaded == {}
    assert not stale_view.exists()
    # purge happens once: a model loaded after READY survives the next status call
    await flow.load(load_request(root, "kept"))
    await flow.runtime_status()
    assert "kept" in runtime.loaded


async def test_bad_ids_and_keys_are_rejected_before_anything(flow: ModelFlow, runtime: RecordingRuntime):
    for bad in ["", "a/b", "..", "a\x00b", "_cache"]:
        with pytest.raises(InvalidModelId):
            LoadRequest.parse(bad, "p", "", "")
        with pytest.raises(InvalidModelId):
            await flow.unload(bad)
    with pytest.raises(InvalidModelKey):
        LoadRequest.parse("ok", "p", "", "{not json")
    assert runtime.calls == []


async def test_sizes(flow: ModelFlow, root: Path):
    keyed = LoadRequest.parse("p1", "x", "", '{"disk_size_bytes": 800}')
    assert await flow.predict_size(keyed) == 1000
    with pytest.raises(NotImplementedByRuntime):
        await flow.predict_size(LoadRequest.parse("p2", "x", "", "{}"))
    with pytest.raises(ModelNotFound):
        await flow.model_size("not-loaded")
    await flow.load(load_request(root, "sized", size=400))
    assert await flow.model_size("sized") == 500


async def test_model_path_outside_root_is_refused(flow: ModelFlow, tmp_path: Path):
    outside = tmp_path / "elsewhere" / "model.bin"
    outside.parent.mkdir()
    outside.write_bytes(b"x")
    with pytest.raises(Exception, match="not inside ROOT_MODEL_DIR"):
        await flow.load(LoadRequest.parse("esc", str(outside), "", ""))


async def test_turn_queue_runs_in_arrival_order_even_when_a_waiter_is_cancelled():
    turns = TurnQueue()
    order: list[str] = []

    async def op(name: str, turn, delay: float) -> None:  # type: ignore[no-untyped-def]
        async with turn:
            order.append(f"{name}+")
            await asyncio.sleep(delay)
            order.append(f"{name}-")

    a = asyncio.create_task(op("a", turns.take("k"), 0.1))
    b = asyncio.create_task(op("b", turns.take("k"), 0.0))
    c = asyncio.create_task(op("c", turns.take("k"), 0.0))
    await asyncio.sleep(0.02)
    b.cancel()  # b gives up while a runs: c must still wait for a
    await asyncio.gather(a, c, return_exceptions=True)
    assert order == ["a+", "a-", "c+", "c-"]
    assert not turns.busy("k")
