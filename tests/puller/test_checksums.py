"""CRC combination against zlib and google-crc32c on random data, the pure-Python
CRC-32C, and which announced checksum the engine picks."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import zlib

import pytest

from puller import checksums
from puller.checksums import (
    ExpectedChecksum,
    choose_checksum,
    crc32_combine,
    crc32_update,
    crc32c_combine,
    crc32c_python,
    crc32c_update,
    crc_hex,
)

google_crc32c = pytest.importorskip("google_crc32c")

SPLIT_LENGTHS = [0, 1, 3, 7, 8, 255, 256, 4096, 65_537, 1_000_003]


def crc32c(data: bytes) -> int:
    value: int = google_crc32c.value(data)
    return value


@pytest.mark.parametrize("length_b", SPLIT_LENGTHS)
def test_crc32_combine_matches_zlib(length_b: int) -> None:
    rng = random.Random(length_b)
    a = rng.randbytes(rng.randrange(0, 5000))
    b = rng.randbytes(length_b)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@pytest.mark.parametrize("length_b", SPLIT_LENGTHS)
def test_crc32c_combine_matches_google_crc32c(length_b: int) -> None:
    rng = random.Random(1000 + length_b)
    a = rng.randbytes(rng.randrange(0, 5000))
    b = rng.randbytes(length_b)
    assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)


def test_many_ranges_combine_in_order() -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    bounds = sorted({0, len(data), *random.Random(7).sample(range(1, len(data)), 40)})
    total32 = total32c = 0
    for start, end in itertools.pairwise(bounds):
        piece = memoryview(data)[start:end]
        total32 = (
            crc32_combine(total32, crc32_update(0, piece), end - start) if start else crc32_update(0, piece)
        )
        part32c = crc32c_update(0, piece)
        total32c = crc32c_combine(total32c, part32c, end - start) if start else part32c
    assert total32 == zlib.crc32(data)
    assert total32c == crc32c(data)


def test_combining_with_an_empty_range_changes_nothing() -> None:
    data = os.urandom(1000)
    assert crc32c_combine(crc32c(data), 0, 0) == crc32c(data)
    assert crc32_combine(zlib.crc32(data), 0, 0) == zlib.crc32(data)
    assert crc32_combine(0, zlib.crc32(data), len(data)) == zlib.crc32(data)


def test_long_second_parts_are_combined() -> None:
    # a real 20 MiB second part (the length's bits reach past 2^24)...
    a, b = os.urandom(100), os.urandom(20 * 1024 * 1024 + 3)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)
    # ...and lengths no test can hash: shifting by n then m equals shifting by n + m
    x, y, z = 0x12345678, 0x9ABCDEF0, 0x0F1E2D3C
    n, m = (1 << 41) + 12345, (1 << 50) + 777
    for combine in (crc32_combine, crc32c_combine):
        assert combine(combine(x, y, n), z, m) == combine(x, combine(y, z, m), n + m)
    with pytest.raises(ValueError):
        crc32_combine(0, 0, -1)


def test_pure_python_crc32c_matches_the_c_extension() -> None:
    for size in (0, 1, 31, 4096, 100_003):
        data = os.urandom(size)
        assert crc32c_python(0, memoryview(data)) == crc32c(data)
    head, tail = os.urandom(5000), os.urandom(3000)
    assert crc32c_python(crc32c_python(0, head), tail) == crc32c(head + tail)


def test_crc_hex_is_eight_lower_case_digits() -> None:
    assert crc_hex(0) == "00000000"
    assert crc_hex(0xDEADBEEF) == "deadbeef"
    assert crc_hex(crc32c(b"hello")) == bytes(google_crc32c.Checksum(b"hello").digest()).hex()


# --- choosing -------------------------------------------------------------------------


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def test_the_cheapest_verifiable_checksum_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"weights"
    announced = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "md5": md5(data),
        "crc32c": crc_hex(crc32c(data)),
        "crc32": crc_hex(zlib.crc32(data)),
    }
    monkeypatch.setattr(checksums, "FAST_CRC32C", True)
    chosen = choose_checksum(announced, len(data))
    assert chosen is not None and chosen.algorithm == "crc32c" and chosen.combinable
    del announced["crc32c"]
    chosen = choose_checksum(announced, len(data))
    assert chosen is not None and chosen.algorithm == "crc32" and chosen.combinable
    del announced["crc32"]
    chosen = choose_checksum(announced, len(data))
    assert chosen is not None and chosen.algorithm == "md5" and not chosen.combinable
    del announced["md5"]
    chosen = choose_checksum(announced, len(data))
    assert chosen is not None and chosen.algorithm == "sha256"
    assert choose_checksum({}, 10) is None


def test_without_the_c_extension_crc32c_gives_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksums, "FAST_CRC32C", False)
    both = {"crc32c": "0" * 8, "md5": "0" * 32}
    chosen = choose_checksum(both, 10 * 1024 * 1024)
    assert chosen is not None and chosen.algorithm == "md5"
    small = choose_checksum({"crc32c": "0" * 8}, checksums.PURE_PYTHON_CRC32C_MAX_BYTES)
    assert small is not None and small.algorithm == "crc32c"
    assert choose_checksum({"crc32c": "0" * 8}, checksums.PURE_PYTHON_CRC32C_MAX_BYTES + 1) is None


def test_malformed_and_unknown_checksums_are_ignored() -> None:
    assert choose_checksum({"md5": "not-hex" + "0" * 25}, 1) is None
    assert choose_checksum({"md5": "abc"}, 1) is None
    assert choose_checksum({"crc64nvme": "0" * 16, "sha224": "0" * 56}, 1) is None
    chosen = choose_checksum({"MD5": "ABCDEF0123456789ABCDEF0123456789", "sha256": "zz"}, 1)
    assert chosen == ExpectedChecksum("md5", "abcdef0123456789abcdef0123456789")


def test_digests_are_fresh_hashlib_objects() -> None:
    chosen = choose_checksum({"sha256": hashlib.sha256(b"").hexdigest()}, 0)
    assert chosen is not None
    digest = chosen.new_digest()
    digest.update(memoryview(b"abc"))
    assert digest.hexdigest() == hashlib.sha256(b"abc").hexdigest()
    assert chosen.new_digest().hexdigest() == chosen.hexdigest
