"""Fixtures of the puller tests: fresh buckets on the session's moto S3 server
(``moto_s3``, from ``tests/conftest.py``), and settings rooted in the test's temp
folder."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from adapter.settings import Settings
from tests.servers.s3 import MotoS3Server


@pytest.fixture
def bucket(moto_s3: MotoS3Server) -> str:
    """A new, empty bucket on the session's moto server."""
    name = f"bkt-{uuid.uuid4().hex[:12]}"
    moto_s3.create_bucket(name)
    return name


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings whose every directory lies under ``tmp_path``."""
    values: dict[str, Any] = {
        "root_model_dir": tmp_path / "models",
        "storage_config_dir": tmp_path / "storage-config",
        "pvc_mounts_dir": tmp_path / "pvc",
        "pull_workers": 4,
        "pull_part_bytes": 64 * 1024,
        "pull_retries": 3,
        "pull_timeout_seconds": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)
