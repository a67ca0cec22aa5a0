"""Session-wide real servers shared by every test package: one MLServer per session,
serving ``<mlserver_root>/_mlserver_models``; a trained sklearn model to copy from."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.mlserver import MLServerProcess
from tests.servers.models import make_sklearn_model
from tests.servers.process import running
from tests.servers.s3 import MotoS3Server

#: the secrets guard (no configured secret in any log line or error message, see its
#: docstring) and pytester, which its self-test runs sessions with
pytest_plugins = ["tests.secrets_guard", "pytester"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty ROOT_MODEL_DIR (``tmp_path/models``) for in-process flows and layouts;
    a module with a root of another kind defines its own."""
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def mlserver_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ROOT_MODEL_DIR shared by MLServer and the plugin under test."""
    return tmp_path_factory.mktemp("root-model-dir")


@pytest.fixture(scope="session")
def mlserver(mlserver_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLServerProcess]:
    server = MLServerProcess(
        models_dir=mlserver_root / "_mlserver_models",
        workdir=tmp_path_factory.mktemp("mlserver-work"),
    )
    with running(server):
        yield server


@pytest.fixture(scope="session")
def trained_sklearn_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a trained iris model.joblib (built once per session)."""
    return make_sklearn_model(tmp_path_factory.mktemp("trained") / "iris")


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3Server]:
    """One moto S3 server for the whole session (any credentials accepted unless a
    test calls ``require_auth``)."""
    server = MotoS3Server(log_dir=tmp_path_factory.mktemp("moto-logs"))
    with running(server):
        yield server
