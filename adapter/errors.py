"""Our exception types.

Every failure the sidecar reports to a caller is one of these. Backends and runtime
plugins translate their SDK's errors into them at their edge; the servicers map them
to gRPC status codes through :func:`adapter.server.status_for` and nowhere else.

Messages must name the problem (the field, the path, the storage key) and must never
contain a secret: build them from names and public values only.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# --- bad input: no load was attempted -------------------------------------------------


class InvalidRequest(SidecarError):
    """The request itself is malformed (INVALID_ARGUMENT)."""


class InvalidModelId(InvalidRequest):
    """The modelId is empty, too long, or not safe as a directory name."""


class InvalidModelKey(InvalidRequest):
    """The modelKey JSON is malformed or a field has the wrong type."""


class UnsafePath(InvalidRequest):
    """A name (path, object key, archive entry, link) would lead outside its target."""


class ConfigurationError(SidecarError):
    """The process is configured wrongly (a bad env var, an unknown runtime)."""


class ArchiveTooLarge(InvalidRequest):
    """An archive would unpack to more than ``ARCHIVE_MAX_BYTES``, or holds more
    entries than allowed (INVALID_ARGUMENT)."""


class BadArchive(InvalidRequest):
    """A file that should be an archive cannot be read as one: not a tar or zip,
    truncated, corrupt (a CRC mismatch), encrypted, or entries that contradict each
    other (INVALID_ARGUMENT)."""


class StorageConfigError(SidecarError):
    """The storage configuration cannot serve this request (FAILED_PRECONDITION):
    an unknown storage_key, a config without a known type, a required field missing."""


class MissingExtra(StorageConfigError):
    """A backend's SDK is not installed; the message names the extra to install."""


# --- storage --------------------------------------------------------------------------


class StorageError(SidecarError):
    """A storage operation failed for a reason that retrying will not fix (INTERNAL)."""


class StorageNotFound(StorageError):
    """The bucket, container, object or prefix does not exist (NOT_FOUND)."""


class StoragePermissionDenied(StorageError):
    """The store refused the credentials or the access (PERMISSION_DENIED)."""


class StorageUnauthenticated(StorageError):
    """The store could not authenticate the caller (UNAUTHENTICATED)."""


class StorageUnavailable(StorageError):
    """A transient failure: connection refused or reset, timeout, 5xx, throttling
    (UNAVAILABLE). The engine retries these with backoff before giving up."""


class IntegrityError(StorageError):
    """The bytes written do not match the size or checksum the store announced
    (DATA_LOSS)."""


class DiskFull(SidecarError):
    """No space left under ROOT_MODEL_DIR (RESOURCE_EXHAUSTED)."""


# --- runtime --------------------------------------------------------------------------


class ModelNotFound(SidecarError):
    """The runtime (or the sidecar) does not know this model (NOT_FOUND)."""


class RuntimeUnavailable(SidecarError):
    """The model server cannot be reached or is not ready (UNAVAILABLE)."""


class RuntimeRejected(SidecarError):
    """The model server answered with an error; its gRPC status code is passed
    through to the caller unchanged.

    ``code`` is the name of a ``grpc.StatusCode`` member (e.g. ``"INTERNAL"``), kept as
    a string so that this module needs no gRPC import.
    """

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        super().__init__(message)
        self.code = code


class LoadTimeout(SidecarError):
    """The load did not finish within LOADTIME_TIMEOUT (DEADLINE_EXCEEDED)."""


class NotImplementedByRuntime(SidecarError):
    """The operation is not offered (UNIMPLEMENTED)."""
