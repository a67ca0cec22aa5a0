from __future__ import annotations

from pathlib import Path

import pytest

from adapter.flow import LoadRequest, ModelFlow
from adapter.settings import Settings
from tests.adapter.recording_runtime import RecordingRuntime


def make_settings(root: Path, **overrides: object) -> Settings:
    env = {"ROOT_MODEL_DIR": str(root), "CONTAINER_MEM_REQ_BYTES": str(1 << 30)}
    return Settings.from_env(env, **overrides)


def place_model(root: Path, model_id: str, size: int = 1000) -> Path:
    """A model as a standalone puller leaves it: ROOT/<id>/model.bin."""
    path = root / model_id / "model.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def load_request(root: Path, model_id: str, size: int = 1000) -> LoadRequest:
    path = place_model(root, model_id, size)
    return LoadRequest.parse(model_id, str(path), "mt:sklearn", '{"model_type": {"name": "sklearn"}}')


@pytest.fixture
def runtime(root: Path) -> RecordingRuntime:
    return RecordingRuntime(make_settings(root))


@pytest.fixture
def flow(root: Path, runtime: RecordingRuntime) -> ModelFlow:
    return ModelFlow(make_settings(root, loading_concurrency=2), runtime, None)
