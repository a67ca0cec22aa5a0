"""The checksums the pull engine verifies while bytes stream, and how it picks one.

Two families:

- **CRCs** (``crc32c``, ``crc32``) are linear over GF(2), so the CRC of ``A + B``
  follows from ``crc(A)``, ``crc(B)`` and ``len(B)`` alone (:func:`crc32c_combine`,
  :func:`crc32_combine`). Each parallel range of a blob computes its own CRC over the
  buffer in hand, and the engine combines them in order at the end: no ordering
  between ranges, no second pass.
- **digests** (``md5``, ``sha1``, ``sha256``, ``sha512``, through :mod:`hashlib`) are
  strictly sequential: the bytes must be fed from offset 0 to the end, in order.

Implementations: ``crc32`` is :func:`zlib.crc32` (takes the ``memoryview`` as it is
and releases the GIL). ``crc32c`` uses ``google_crc32c``'s C extension when it is
installed (it comes with the ``gcs`` extra). That extension only accepts ``bytes``, so
each chunk is copied once before it is checksummed: measured at 8.5 GB/s including the
copy on the CI machine kind, where md5 runs at 0.7 GB/s, so the copy is the cheaper
path by far. Without the extension, CRC-32C falls back to the pure-Python table
below (about 8 MB/s, holding the GIL): it is used only when no other announced
checksum can be verified and the blob is at most :data:`PURE_PYTHON_CRC32C_MAX_BYTES`;
a larger blob announcing only crc32c is then checked by size alone (the engine logs
that at debug level).

:func:`choose_checksum` picks, among the checksums a store announces, the cheapest one
that can be verified: ``crc32c`` (C) > ``crc32`` > ``md5`` > ``sha1`` > ``sha256`` >
``sha512`` > ``crc32c`` (pure Python, small blobs only). Every one of them catches the
corruption a download can suffer (a flipped bit, a truncated or shifted range); the
cryptographic strength of a digest adds nothing here, since whoever could forge the
bytes could forge the announced checksum too. CRCs also keep parallel ranges free.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

_google_crc32c: ModuleType | None
try:  # the gcs extra brings it; everything here works without it
    import google_crc32c as _google_crc32c
except ImportError:  # pragma: no cover - exercised through FAST_CRC32C in the tests
    _google_crc32c = None

#: True when CRC-32C runs in C (google-crc32c's extension is installed)
FAST_CRC32C: bool = _google_crc32c is not None and _google_crc32c.implementation == "c"

#: largest blob whose announced crc32c is checked in pure Python when it is the only
#: checksum available and google-crc32c's extension is missing (~0.5 s of CPU)
PURE_PYTHON_CRC32C_MAX_BYTES = 4 * 1024 * 1024

#: digest length in hex characters of every algorithm we verify
HEX_LENGTHS: Mapping[str, int] = {
    "crc32c": 8,
    "crc32": 8,
    "md5": 32,
    "sha1": 40,
    "sha256": 64,
    "sha512": 128,
}

#: the order of preference (cheapest first); crc32c comes first only when it runs in C
DIGEST_ALGORITHMS = ("md5", "sha1", "sha256", "sha512")
CRC_ALGORITHMS = ("crc32c", "crc32")

_CRC32_POLY = 0xEDB88320  # CRC-32 (zlib, gzip, zip), bit-reversed
_CRC32C_POLY = 0x82F63B78  # CRC-32C (Castagnoli: iSCSI, GCS, S3), bit-reversed
_X0 = 1 << 31  # the polynomial 1 in the bit-reversed representation


class Digest(Protocol):
    """What the engine needs of a :mod:`hashlib` object."""

    def update(self, data: memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


# --- CRC arithmetic -------------------------------------------------------------------
#
# A CRC register in the bit-reversed form holds a polynomial of degree < 32 whose
# coefficient of x^i is bit (31 - i). Multiplying by x is a right shift, and a
# coefficient pushed out of the top (x^32) comes back as the polynomial's low terms.


def _times_x(value: int, poly: int) -> int:
    return (value >> 1) ^ poly if value & 1 else value >> 1


def _multiply(a: int, b: int, poly: int) -> int:
    """``a * b`` modulo the CRC polynomial (both bit-reversed)."""
    product = 0
    bit = _X0
    while bit and a:
        if a & bit:
            product ^= b
            a ^= bit
        b = _times_x(b, poly)
        bit >>= 1
    return product


def _powers_of_x(poly: int) -> tuple[int, ...]:
    """``x^(2^k)`` modulo the polynomial for k = 0..63."""
    powers = [_X0 >> 1]  # x^1
    for _ in range(63):
        powers.append(_multiply(powers[-1], powers[-1], poly))
    return tuple(powers)


_CRC32_POWERS = _powers_of_x(_CRC32_POLY)
_CRC32C_POWERS = _powers_of_x(_CRC32C_POLY)


def _shift_bytes(count: int, poly: int, powers: tuple[int, ...]) -> int:
    """``x^(8 * count)`` modulo the polynomial."""
    result = _X0
    k = 3  # 8 * count = count * 2^3
    while count:
        if count & 1:
            result = _multiply(powers[k % 64], result, poly)
        count >>= 1
        k += 1
    return result


def _combine(crc_a: int, crc_b: int, length_b: int, poly: int, powers: tuple[int, ...]) -> int:
    if length_b < 0:
        raise ValueError("a length cannot be negative")
    return _multiply(_shift_bytes(length_b, poly, powers), crc_a, poly) ^ crc_b


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """The CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)``."""
    return _combine(crc_a, crc_b, length_b, _CRC32_POLY, _CRC32_POWERS)


def crc32c_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """The CRC-32C of ``A + B`` from ``crc32c(A)``, ``crc32c(B)`` and ``len(B)``."""
    return _combine(crc_a, crc_b, length_b, _CRC32C_POLY, _CRC32C_POWERS)


def _byte_table(poly: int) -> tuple[int, ...]:
    table = []
    for byte in range(256):
        value = byte
        for _ in range(8):
            value = _times_x(value, poly)
        table.append(value)
    return tuple(table)


_CRC32C_TABLE = _byte_table(_CRC32C_POLY)


def crc32c_python(crc: int, data: memoryview | bytes) -> int:
    """CRC-32C of ``data`` continuing from ``crc`` (0 to start), in pure Python."""
    table = _CRC32C_TABLE
    value = crc ^ 0xFFFFFFFF
    for byte in data:
        value = table[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ 0xFFFFFFFF


def _crc32c_c(crc: int, data: memoryview) -> int:
    assert _google_crc32c is not None
    # the extension takes only bytes: one copy of the chunk (see the module docstring)
    result: int = _google_crc32c.extend(crc, bytes(data))
    return result


def _crc32c_py(crc: int, data: memoryview) -> int:
    return crc32c_python(crc, data)


def crc32c_update(crc: int, data: memoryview) -> int:
    """CRC-32C of ``data`` continuing from ``crc`` (0 to start), in C when possible."""
    return _crc32c_c(crc, data) if FAST_CRC32C else crc32c_python(crc, data)


def crc32_update(crc: int, data: memoryview) -> int:
    """CRC-32 (zlib's) of ``data`` continuing from ``crc`` (0 to start)."""
    return zlib.crc32(data, crc)


# --- choosing what to verify ----------------------------------------------------------


@dataclass(frozen=True)
class ExpectedChecksum:
    """One checksum a store announced, chosen for verification.

    ``update``/``combine`` are set for CRCs (``combinable``): a CRC is computed per
    range and combined in order. For digests they are None and :meth:`new_digest`
    gives the object to feed the bytes to, in order.
    """

    algorithm: str
    hexdigest: str
    update: Callable[[int, memoryview], int] | None = None
    combine: Callable[[int, int, int], int] | None = None

    @property
    def combinable(self) -> bool:
        return self.update is not None

    def new_digest(self) -> Digest:
        """A fresh :mod:`hashlib` object of this algorithm (digests only)."""
        return hashlib.new(self.algorithm, usedforsecurity=False)


def crc_hex(value: int) -> str:
    """A CRC as the engine compares it: 8 lower-case hex digits, most significant
    first (the big-endian bytes S3 and GCS base64-encode)."""
    return f"{value & 0xFFFFFFFF:08x}"


def _well_formed(algorithm: str, digest: str) -> bool:
    if len(digest) != HEX_LENGTHS[algorithm]:
        return False
    try:
        int(digest, 16)
    except ValueError:
        return False
    return True


def choose_checksum(checksums: Mapping[str, str], size: int) -> ExpectedChecksum | None:
    """The cheapest announced checksum this process can verify for a blob of ``size``
    bytes (see the module docstring for the order), or None.

    Algorithm names are matched case-insensitively; a digest that is not well-formed
    hex of the algorithm's length is ignored (a backend bug must not fail every pull),
    as are algorithms we do not know (``crc64nvme``, ``sha224``...).
    """
    announced: dict[str, str] = {}
    for name, digest in checksums.items():
        algorithm = name.lower()
        value = digest.strip().lower()
        if algorithm in HEX_LENGTHS and _well_formed(algorithm, value):
            announced[algorithm] = value
    if FAST_CRC32C and "crc32c" in announced:
        return ExpectedChecksum("crc32c", announced["crc32c"], _crc32c_c, crc32c_combine)
    if "crc32" in announced:
        return ExpectedChecksum("crc32", announced["crc32"], crc32_update, crc32_combine)
    for algorithm in DIGEST_ALGORITHMS:
        if algorithm in announced:
            return ExpectedChecksum(algorithm, announced[algorithm])
    if "crc32c" in announced and size <= PURE_PYTHON_CRC32C_MAX_BYTES:
        return ExpectedChecksum("crc32c", announced["crc32c"], _crc32c_py, crc32c_combine)
    return None
