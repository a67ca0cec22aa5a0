"""A runtime plugin that loads instantly, for the control-plane and density benchmarks.

``NullRuntime`` keeps its loaded models in a dict: ``layout`` touches no file,
``load``/``unload``/``list_models`` are O(1) in memory, so a benchmark through it
measures the sidecar (gRPC server, flow, puller) and nothing else.

Run as a script it is ``mesh-adapter --runtime null``: the same ``adapter.cli.run``
(settings from the environment, embedded puller, server, signals), with the plugin
looked up here instead of through the entry points, so pyproject stays untouched::

    CONTAINER_MEM_REQ_BYTES=... ROOT_MODEL_DIR=... .venv/bin/python benchmarks/null_runtime.py

With ``NULL_RUNTIME_PRELOADED=N`` the runtime starts with N models already loaded
(``preloaded-0`` ...), which the purge before the first READY then unloads.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from adapter.errors import ModelNotFound
from adapter.plugin import RuntimePlugin

if TYPE_CHECKING:
    from adapter.settings import Settings
    from puller.request import LocalModel


class NullRuntime(RuntimePlugin):
    """Always ready; loads and unloads by updating a dict."""

    name = "null"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        preloaded = int(os.environ.get("NULL_RUNTIME_PRELOADED", "0") or 0)
        self.loaded: dict[str, Path] = {f"preloaded-{i}": Path() for i in range(preloaded)}

    async def is_ready(self) -> bool:
        return True

    async def runtime_version(self) -> str | None:
        return "null-1"

    def method_infos(self) -> Mapping[str, Sequence[int]]:
        return {"inference.GRPCInferenceService/ModelInfer": [1]}

    def layout(self, model: LocalModel) -> Path:
        return self.view_dir(model.model_id)

    async def load(self, model_id: str, view: Path, model: LocalModel) -> int | None:
        self.loaded[model_id] = view
        return None

    async def unload(self, model_id: str) -> None:
        if self.loaded.pop(model_id, None) is None:
            raise ModelNotFound(f"model {model_id} not found")

    async def list_models(self) -> list[str]:
        return list(self.loaded)

    def remove_view(self, model_id: str) -> None:
        """No view was written."""


def main() -> int:
    """``mesh-adapter --runtime null``: ``adapter.cli.main`` with this plugin."""
    import adapter.cli

    def load_runtime_class(name: str) -> type[RuntimePlugin]:
        return NullRuntime

    adapter.cli.load_runtime_class = load_runtime_class  # type: ignore[attr-defined]
    return adapter.cli.main(["--runtime", "null", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
