"""A disk that fills up during a pull: ROOT_MODEL_DIR is a small tmpfs of its own,
driven through the real adapter process (embedded puller) from a real S3 server
(``rclone serve s3``).

A model bigger than the free space fails the load with RESOURCE_EXHAUSTED and its
partial files are removed (the filesystem's usage goes back to what it was); a model
that fits loads; after the tmpfs is enlarged the big model loads with identical bytes.

Needs root and a working ``mount -t tmpfs``; skipped with the reason otherwise. The
tmpfs is always unmounted at the end."""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.faults._storage_faults import (
    MiB,
    Sidecar,
    disk_used,
    load_error,
    model_dirs,
    s3_config,
    sha256_of,
    staging_leftovers,
    start_sidecar,
    write_storage_config,
)
from tests.servers.process import running
from tests.servers.rclone import RcloneS3Server, rclone_store

pytestmark = pytest.mark.integration

TMPFS_MIB = 20
BIG = 32 * MiB
SMALL = 4 * MiB
KEY = {"storage_key": "store"}
CALL_TIMEOUT = 60.0


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def tmpfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tmpfs of TMPFS_MIB MiB mounted on a fresh folder, unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs as ROOT_MODEL_DIR needs root")
    where = tmp_path_factory.mktemp("tmpfs")
    try:
        mounted = _mount("-t", "tmpfs", "-o", f"size={TMPFS_MIB}m,mode=0755", "tmpfs", str(where))
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield where
    finally:
        unmounted = subprocess.run(
            ["umount", str(where)], capture_output=True, text=True, timeout=30, check=False
        )
        if unmounted.returncode != 0:  # still busy: detach it now, freed when released
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3Server]:
    server = rclone_store(tmp_path_factory)
    with running(server):
        yield server


@pytest.fixture(scope="module")
def models(s3: RcloneS3Server) -> tuple[str, str]:
    """A bucket with ``big/`` (more than the tmpfs holds) and ``small/``; the sha256 of
    the big weights."""
    bucket = f"diskfull-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(bucket)
    big = os.urandom(BIG)
    s3.put_object(bucket, "big/weights.bin", big)
    s3.put_object(bucket, "big/config.json", b"{}")
    s3.put_object(bucket, "small/weights.bin", os.urandom(SMALL))
    return bucket, hashlib.sha256(big).hexdigest()


@pytest.fixture(scope="module")
def sidecar(
    tmpfs: Path, s3: RcloneS3Server, models: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sidecar]:
    work = tmp_path_factory.mktemp("diskfull")
    write_storage_config(work / "storage-config", "store", s3_config(s3, models[0]))
    running = start_sidecar(
        tmpfs,
        work / "storage-config",
        work / "adapter.log",
        # small parts: the disk fills while bytes stream, not at the first reservation
        PULL_PART_BYTES=str(2 * MiB),
        LOADTIME_TIMEOUT="60000",
    )
    try:
        yield running
    finally:
        running.stop()


def test_a_model_bigger_than_the_disk(tmpfs: Path, models: tuple[str, str], sidecar: Sidecar) -> None:
    before = disk_used(tmpfs)
    error = load_error(lambda: sidecar.client.load("big", "big", KEY, timeout=CALL_TIMEOUT))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert "no space left" in (error.details() or "")
    assert model_dirs(tmpfs) == []
    assert staging_leftovers(tmpfs) == []
    assert disk_used(tmpfs) == before

    # a model that fits loads at once
    sidecar.client.load("small", "small", KEY, timeout=CALL_TIMEOUT)
    assert (tmpfs / "small" / "small" / "weights.bin").stat().st_size == SMALL
    sidecar.client.unload("small")
    assert disk_used(tmpfs) == before

    # more space: the big model loads, every byte right
    resized = _mount("-o", f"remount,size={BIG // MiB + 16}m", str(tmpfs))
    assert resized.returncode == 0, resized.stderr
    sidecar.client.load("big", "big", KEY, timeout=CALL_TIMEOUT)
    assert sha256_of(tmpfs / "big" / "big" / "weights.bin") == models[1]
    sidecar.client.unload("big")
    assert model_dirs(tmpfs) == []
    assert disk_used(tmpfs) == before
