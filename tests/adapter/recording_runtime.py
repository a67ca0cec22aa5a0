"""An in-process runtime for the flow's own tests: it keeps its loaded models in a
dict, can be told to be slow or to fail, and records every call. It stands in for a
model server only where the test is about the sidecar's sequencing (cancellation,
races, concurrency bounds) and a real server's timing would make the test flaky; the
same behaviours are also exercised against real MLServer in tests/e2e."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

from adapter.errors import ModelNotFound, RuntimeRejected
from adapter.plugin import RuntimePlugin, link, remove_tree
from puller.request import LocalModel


class RecordingRuntime(RuntimePlugin):
    name = "recording"

    def __init__(self, settings) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings)
        self.ready = True
        self.loaded: dict[str, Path] = {}
        self.calls: list[tuple[str, str]] = []
        self.load_delay = 0.0
        self.fail_ids: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.size: int | None = None

    async def is_ready(self) -> bool:
        return self.ready

    async def runtime_version(self) -> str | None:
        return "recording-1.0"

    def method_infos(self) -> Mapping[str, Sequence[int]]:
        return {"inference.GRPCInferenceService/ModelInfer": [1]}

    def layout(self, model: LocalModel) -> Path:
        view = self.view_dir(model.model_id)
        remove_tree(view)
        view.mkdir(parents=True)
        link(model.path, view / model.path.name)
        return view

    async def load(self, model_id: str, view: Path, model: LocalModel) -> int | None:
        self.calls.append(("load", model_id))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.load_delay)
            if model_id in self.fail_ids:
                raise RuntimeRejected(f"model {model_id} is broken", code="INTERNAL")
            self.loaded[model_id] = view
            return self.size
        finally:
            self.in_flight -= 1

    async def unload(self, model_id: str) -> None:
        self.calls.append(("unload", model_id))
        if self.loaded.pop(model_id, None) is None:
            raise ModelNotFound(f"model {model_id} not found")

    async def list_models(self) -> list[str]:
        return list(self.loaded)
