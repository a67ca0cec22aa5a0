"""The flow's runtime watch, in-process: a runtime that goes down after READY and comes
back empty gets every model the mesh believes loaded again; what it holds that the
mesh unloaded meanwhile is unloaded. The same fault against a real MLServer process is
in tests/faults/test_runtime_restart.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapter.errors import RuntimeUnavailable
from adapter.flow import ModelFlow
from puller.request import LocalModel
from tests.adapter.conftest import load_request, make_settings
from tests.adapter.recording_runtime import RecordingRuntime

#: every wait of these tests is bounded by this
DEADLINE = 10.0


class RestartableRuntime(RecordingRuntime):
    """A recording runtime that can be down (unreachable) and restarted (empty)."""

    name = "restartable"

    def __init__(self, settings) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings)
        self.down = False

    def crash(self) -> None:
        self.down = True
        self.ready = False

    def restart(self, *, keep: bool = False) -> None:
        if not keep:
            self.loaded.clear()
        self.down = False
        self.ready = True

    def _check(self) -> None:
        if self.down:
            raise RuntimeUnavailable("runtime unreachable (connection refused)")

    async def load(self, model_id: str, view: Path, model: LocalModel) -> int | None:
        self._check()
        return await super().load(model_id, view, model)

    async def unload(self, model_id: str) -> None:
        self._check()
        await super().unload(model_id)

    async def list_models(self) -> list[str]:
        self._check()
        return await super().list_models()


class Watch:
    """``flow.watch_runtime`` running with a short interval, recording its changes."""

    def __init__(self, flow: ModelFlow) -> None:
        self.changes: list[bool] = []
        self.task = asyncio.create_task(flow.watch_runtime(self._on_change, interval=0.05))

    async def _on_change(self, up: bool) -> None:
        self.changes.append(up)

    async def until(self, count: int) -> list[bool]:
        async with asyncio.timeout(DEADLINE):
            while len(self.changes) < count:
                assert not self.task.done(), self.task
                await asyncio.sleep(0.02)
        return self.changes

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


@pytest.fixture
def runtime(root: Path) -> RestartableRuntime:
    return RestartableRuntime(make_settings(root))


@pytest.fixture
async def ready_flow(root: Path, runtime: RestartableRuntime) -> ModelFlow:
    flow = ModelFlow(make_settings(root, loading_concurrency=2), runtime, None)
    assert (await flow.runtime_status()).ready
    return flow


async def test_models_are_loaded_again_when_the_runtime_comes_back(
    ready_flow: ModelFlow, runtime: RestartableRuntime, root: Path
):
    for model_id in ("a", "b", "c"):
        await ready_flow.load(load_request(root, model_id))
    watch = Watch(ready_flow)
    try:
        runtime.crash()
        assert await watch.until(1) == [False]
        assert not (await ready_flow.runtime_status()).ready
        with pytest.raises(RuntimeUnavailable):
            await ready_flow.load(load_request(root, "new"))
        assert not (root / "new").exists() or "new" not in ready_flow.loaded_ids()
        runtime.restart()
        assert await watch.until(2) == [False, True]
    finally:
        await watch.stop()
    assert sorted(runtime.loaded) == ["a", "b", "c"]
    assert sorted(ready_flow.loaded_ids()) == ["a", "b", "c"]
    assert (await ready_flow.runtime_status()).ready
    # the views were laid out again and still lead to the model files
    for model_id in ("a", "b", "c"):
        assert (runtime.view_dir(model_id) / "model.bin").is_file()


async def test_runtime_status_is_not_ready_until_the_models_are_back(
    ready_flow: ModelFlow, runtime: RestartableRuntime, root: Path
):
    await ready_flow.load(load_request(root, "slow"))
    watch = Watch(ready_flow)
    try:
        runtime.crash()
        await watch.until(1)
        runtime.load_delay = 0.5
        runtime.restart()
        await asyncio.sleep(0.2)  # the reload is under way, not finished
        assert not (await ready_flow.runtime_status()).ready
        await watch.until(2)
        assert (await ready_flow.runtime_status()).ready
    finally:
        await watch.stop()


async def test_an_unload_while_the_runtime_is_down_is_finished_when_it_returns(
    ready_flow: ModelFlow, runtime: RestartableRuntime, root: Path
):
    for model_id in ("keep", "gone"):
        await ready_flow.load(load_request(root, model_id))
    watch = Watch(ready_flow)
    try:
        runtime.crash()
        await watch.until(1)
        await ready_flow.unload("gone")  # not an error: the runtime holds nothing now
        assert ready_flow.loaded_ids() == ["keep"]
        # the runtime was only unreachable: it still holds both models
        runtime.restart(keep=True)
        await watch.until(2)
    finally:
        await watch.stop()
    assert sorted(runtime.loaded) == ["keep"]


async def test_a_model_that_fails_to_load_again_is_dropped(
    ready_flow: ModelFlow, runtime: RestartableRuntime, root: Path
):
    for model_id in ("good", "broken"):
        await ready_flow.load(load_request(root, model_id))
    watch = Watch(ready_flow)
    try:
        runtime.crash()
        await watch.until(1)
        runtime.fail_ids.add("broken")
        runtime.restart()
        await watch.until(2)
    finally:
        await watch.stop()
    assert sorted(runtime.loaded) == ["good"]
    assert ready_flow.loaded_ids() == ["good"]
    assert not runtime.view_dir("broken").exists()
    # the mesh's next loadModel of it starts afresh
    runtime.fail_ids.clear()
    await ready_flow.load(load_request(root, "broken"))
    assert "broken" in runtime.loaded


class BusyRuntime(RestartableRuntime):
    """Not ready while a model loads (as a server whose readiness counts its models),
    yet there all along."""

    async def is_alive(self) -> bool:
        return not self.down


async def test_a_runtime_not_ready_but_alive_is_not_taken_for_gone(root: Path):
    runtime = BusyRuntime(make_settings(root))
    flow = ModelFlow(make_settings(root), runtime, None)
    assert (await flow.runtime_status()).ready
    await flow.load(load_request(root, "kept"))
    watch = Watch(flow)
    try:
        runtime.ready = False  # e.g. another model is loading
        await asyncio.sleep(0.3)
        assert watch.changes == []
        assert (await flow.runtime_status()).ready
        assert runtime.calls.count(("load", "kept")) == 1  # not loaded again
    finally:
        await watch.stop()


async def test_nothing_is_watched_before_the_first_ready(root: Path, runtime: RestartableRuntime):
    flow = ModelFlow(make_settings(root), runtime, None)
    runtime.crash()
    watch = Watch(flow)
    try:
        await asyncio.sleep(0.3)
        assert watch.changes == []
    finally:
        await watch.stop()
