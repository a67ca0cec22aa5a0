"""Destination files: blocks reserved, bytes written in full."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from puller import file_writes
from puller.file_writes import pwrite_all, reserve

needs_fallocate = pytest.mark.skipif(
    file_writes._fallocate is None, reason="fallocate(2) is for 64-bit Linux only"
)


def new_file(tmp_path: Path) -> int:
    return os.open(tmp_path / "f.bin", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)


@needs_fallocate
def test_blocks_are_reserved_without_changing_the_size(tmp_path: Path) -> None:
    fd = new_file(tmp_path)
    try:
        os.ftruncate(fd, 8 * 1024 * 1024)
        assert os.fstat(fd).st_blocks == 0
        reserve(fd, 1024 * 1024, 3 * 1024 * 1024)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    assert st.st_size == 8 * 1024 * 1024
    assert 3 * 1024 * 1024 <= st.st_blocks * 512 < 8 * 1024 * 1024, "only the span is reserved"
    assert (tmp_path / "f.bin").read_bytes() == bytes(st.st_size), "it reads as zeros until written"


@pytest.mark.parametrize("error", [errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EIO])
def test_a_filesystem_that_refuses_reserves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    monkeypatch.setattr(file_writes, "_fallocate", lambda fd, mode, offset, length: error)
    fd = new_file(tmp_path)
    try:
        reserve(fd, 0, 1024 * 1024)
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)


def test_an_interrupted_fallocate_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [errno.EINTR, errno.EINTR, 0]
    calls: list[tuple[int, int, int]] = []

    def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append((mode, offset, length))
        return answers.pop(0)

    monkeypatch.setattr(file_writes, "_fallocate", fallocate)
    fd = new_file(tmp_path)
    try:
        reserve(fd, 5, 10)
    finally:
        os.close(fd)
    assert calls == [(file_writes.FALLOC_FL_KEEP_SIZE, 5, 10)] * 3


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_fails_the_reservation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    monkeypatch.setattr(file_writes, "_fallocate", lambda fd, mode, offset, length: error)
    fd = new_file(tmp_path)
    try:
        with pytest.raises(OSError) as caught:
            reserve(fd, 0, 10)
    finally:
        os.close(fd)
    assert caught.value.errno == error


def test_an_empty_span_needs_no_fallocate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        raise AssertionError("fallocate(2) refuses a length of 0")

    monkeypatch.setattr(file_writes, "_fallocate", fallocate)
    fd = new_file(tmp_path)
    try:
        reserve(fd, 0, 0)
    finally:
        os.close(fd)


def test_short_writes_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite = os.pwrite

    def one_byte(fd: int, data: memoryview, offset: int) -> int:
        return real_pwrite(fd, data[:1], offset)

    monkeypatch.setattr(os, "pwrite", one_byte)
    fd = new_file(tmp_path)
    try:
        pwrite_all(fd, memoryview(b"hello"), 3)
    finally:
        os.close(fd)
    assert (tmp_path / "f.bin").read_bytes() == b"\0\0\0hello"


def test_a_write_that_makes_no_progress_is_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
    fd = new_file(tmp_path)
    try:
        with pytest.raises(OSError) as caught:
            pwrite_all(fd, memoryview(b"x"), 0)
    finally:
        os.close(fd)
    assert caught.value.errno == errno.ENOSPC
