"""Fixtures of the runtime tests: one real MLServer per session, serving the view
directory of a temporary ROOT_MODEL_DIR, and a trained sklearn model to copy from."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from adapter.settings import Settings
from runtimes.mlserver import MLServerPlugin
from tests.servers.mlserver import MLServerProcess


@pytest.fixture
def pulled_sklearn_model(mlserver_root: Path, trained_sklearn_model: Path) -> Callable[[str], Path]:
    """``pull(model_id)`` places a copy of the trained model where the puller would:
    ``ROOT_MODEL_DIR/<model_id>/model``."""

    def pull(model_id: str) -> Path:
        target = mlserver_root / model_id / "model"
        shutil.copytree(trained_sklearn_model, target)
        return target

    return pull


def mlserver_settings(root: Path, port: int) -> Settings:
    return Settings(root_model_dir=root, runtime_port=port, loadtime_timeout_ms=120_000)


@pytest.fixture
async def mlserver_plugin(mlserver: MLServerProcess, mlserver_root: Path) -> AsyncIterator[MLServerPlugin]:
    """The plugin under test, started against the session's MLServer."""
    plugin = MLServerPlugin(mlserver_settings(mlserver_root, mlserver.grpc_port))
    await plugin.start()
    try:
        yield plugin
    finally:
        await plugin.close()
