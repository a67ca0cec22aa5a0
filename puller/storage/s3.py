"""S3 and S3-compatible stores (AWS, MinIO, Ceph, rclone, moto...).

boto3 owns credentials, listing and request signing; the bytes travel through a lean
path of our own: a presigned GET URL fetched with ``http.client`` over one keep-alive
connection per worker thread, read with ``readinto`` straight into the engine's buffer.

Storage config fields: ``access_key_id``, ``secret_access_key`` (both absent: boto3's
default credential chain, e.g. IRSA or an instance profile), ``endpoint_url``
(absent: AWS; without a scheme ``https://`` is assumed), ``region``, ``bucket`` (the
resolver maps the legacy ``default_bucket``), ``certificate`` (an inline PEM CA
bundle: when given it is the only trust anchor for this store, on both paths), and
``anonymous`` (``"true"``: unsigned requests to a public bucket).

Every SDK and HTTP error is translated here into :mod:`adapter.errors` types, by
:func:`translate_boto_error` and :func:`_http_error`. Messages name the bucket, the
key and the S3 error code, never a credential.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from adapter.errors import (
    IntegrityError,
    SidecarError,
    StorageConfigError,
    StorageError,
    StorageNotFound,
    StoragePermissionDenied,
    StorageUnauthenticated,
    StorageUnavailable,
)
from puller.storage.base import Blob, ByteStream, Plan, Storage
from puller.storage.ranged_http import RangedHttp

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from adapter.settings import Settings
    from puller.config import StorageConfig

#: folder-marker suffix written by Hadoop's s3n and some GUI tools
_HADOOP_FOLDER_MARKER = "_$folder$"
#: a presigned URL is signed for this long and reused for a fraction of it
_PRESIGN_SECONDS = 3600
_PRESIGN_REUSE_SECONDS = 600
#: how much of an error body is read to find the S3 error code
_ERROR_BODY_LIMIT = 64 * 1024

_UNAUTHENTICATED_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "InvalidSecurity",
        "AuthorizationHeaderMalformed",
    }
)
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidObjectState"})
_NOT_FOUND_CODES = frozenset({"NoSuchBucket", "NoSuchKey", "NotFound", "404"})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
    }
)
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")


def _truthy(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _public_endpoint(endpoint_url: str) -> str:
    """The endpoint without any ``user:password@`` part, for messages and identity."""
    parts = urllib.parse.urlsplit(endpoint_url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def translate_boto_error(exc: Exception, *, bucket: str, key: str | None = None, action: str) -> SidecarError:
    """Map a botocore/boto3 exception to our error type. ``action`` says what was being
    done (``"listing"``, ``"reading"``) for the message. The message carries the
    bucket, the key and the S3 error code, never credentials or the server's text."""
    from botocore import exceptions as bce  # deferred: importing botocore is slow

    where = f"s3 bucket '{bucket}'" + (f" at '{key}'" if key else "")
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "") or "")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code == "NoSuchBucket":
            return StorageNotFound(f"s3 bucket '{bucket}' does not exist")
        if code in _NOT_FOUND_CODES or status == 404:
            return StorageNotFound(f"nothing found in {where}")
        if code in _UNAUTHENTICATED_CODES:
            return StorageUnauthenticated(f"s3 rejected the credentials ({code}) while {action} {where}")
        if code in _DENIED_CODES or status == 403:
            return StoragePermissionDenied(f"s3 denied access ({code or status}) while {action} {where}")
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return StorageUnavailable(f"s3 is unavailable ({code or status}) while {action} {where}")
        return StorageError(f"s3 error ({code or status}) while {action} {where}")
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return StorageUnauthenticated(
            f"no complete s3 credentials for {where}: set access_key_id and secret_access_key in the "
            "storage config, or provide them through the default credential chain"
        )
    if isinstance(exc, bce.CredentialRetrievalError | bce.MetadataRetrievalError):
        return StorageUnavailable(f"could not obtain s3 credentials while {action} {where}")
    if isinstance(exc, bce.SSLError):
        return StorageError(f"TLS failure talking to s3 while {action} {where} (check the certificate)")
    if isinstance(exc, bce.ParamValidationError):
        return StorageConfigError(f"invalid s3 request while {action} {where} (check bucket and path)")
    if isinstance(
        exc,
        bce.EndpointConnectionError
        | bce.ConnectTimeoutError
        | bce.ReadTimeoutError
        | bce.ConnectionClosedError
        | bce.ConnectionError
        | bce.HTTPClientError
        | bce.IncompleteReadError
        | bce.ResponseStreamingError,
    ):
        return StorageUnavailable(f"cannot reach s3 while {action} {where} ({type(exc).__name__})")
    if isinstance(exc, bce.BotoCoreError):
        return StorageError(f"s3 client error while {action} {where} ({type(exc).__name__})")
    return StorageError(f"unexpected error while {action} {where} ({type(exc).__name__})")


def _http_error(status: int, body: bytes, *, bucket: str, key: str) -> SidecarError:
    """Map the status (and the S3 ``<Code>`` of the body) of a failed ranged GET."""
    found = _ERROR_CODE.search(body)
    code = found.group(1).decode("ascii", "replace") if found else ""
    where = f"s3 bucket '{bucket}' at '{key}'"
    if status == 404:
        if code == "NoSuchBucket":
            return StorageNotFound(f"s3 bucket '{bucket}' does not exist")
        return StorageNotFound(f"nothing found in {where}")
    if status in (401, 403):
        if code in _UNAUTHENTICATED_CODES or status == 401:
            return StorageUnauthenticated(
                f"s3 rejected the credentials ({code or status}) while reading {where}"
            )
        return StoragePermissionDenied(f"s3 denied access ({code or status}) while reading {where}")
    if status == 416:
        return IntegrityError(f"{where} is shorter than when it was listed (HTTP 416)")
    if status >= 500 or status in (408, 429):
        return StorageUnavailable(f"s3 is unavailable (HTTP {status} {code}) while reading {where}".strip())
    return StorageError(f"s3 answered HTTP {status} {code} while reading {where}")


class S3Storage(Storage):
    """An S3 bucket. Thread-safe: one boto3 client per storage, one HTTP connection per
    worker thread."""

    types: ClassVar[tuple[str, ...]] = ("s3",)

    def __init__(self, config: StorageConfig, settings: Settings) -> None:
        super().__init__(config, settings)
        raw_endpoint = str(config.get("endpoint_url") or "").strip()
        if raw_endpoint and "://" not in raw_endpoint:
            raw_endpoint = "https://" + raw_endpoint
        self._endpoint_url = raw_endpoint or None
        self._bucket = str(config.get("bucket") or "").strip()
        self._lock = threading.Lock()
        self._client_instance: S3Client | None = None
        self._ranged: RangedHttp | None = None
        self._presigned: dict[str, tuple[float, str]] = {}

    # --- contract ---------------------------------------------------------------------

    def identity(self) -> str:
        endpoint = _public_endpoint(self._endpoint_url) if self._endpoint_url else "https://s3.amazonaws.com"
        return f"s3:{endpoint}/{self._bucket}"

    def plan(self, path: str) -> Plan:
        """A key equal to ``path`` is a single object; otherwise every key under
        ``path/`` (the whole bucket for an empty path), folder markers skipped, with
        relpaths relative to the prefix. ETags become ``Blob.version``."""
        bucket = self._require_bucket()
        client = self._client()
        key = path.lstrip("/")
        try:
            if key and not key.endswith("/"):
                first = client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("Contents", [])
                if first and first[0].get("Key") == key:
                    return Plan(blobs=(self._blob(first[0], key.rsplit("/", 1)[-1]),), single_object=True)
                prefix = key + "/"
            else:
                prefix = key
            blobs: list[Blob] = []
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for entry in page.get("Contents", []):
                    name = entry.get("Key", "")
                    if name.endswith("/") or (
                        entry.get("Size", 0) == 0 and name.endswith(_HADOOP_FOLDER_MARKER)
                    ):
                        continue
                    blobs.append(self._blob(entry, name[len(prefix) :]))
        except Exception as exc:
            if isinstance(exc, SidecarError):
                raise
            raise translate_boto_error(exc, bucket=bucket, key=key or None, action="listing") from None
        if not blobs:
            raise StorageNotFound(f"nothing found in s3 bucket '{bucket}' at '{key}'")
        return Plan(blobs=tuple(blobs), single_object=False)

    def open_range(self, blob: Blob, start: int, end: int) -> ByteStream:
        """GET bytes ``[start, end)`` of ``blob`` with a presigned URL over the shared
        lean byte path (``puller.storage.ranged_http``)."""
        bucket = self._require_bucket()
        return self._http().get_range(
            self._presigned_url(bucket, blob.name),
            blob,
            start,
            end,
            where=f"s3 bucket '{bucket}' at '{blob.name}'",
            error_for_status=lambda status, body: _http_error(status, body, bucket=bucket, key=blob.name),
        )

    def close(self) -> None:
        with self._lock:
            self._presigned.clear()
            client, self._client_instance = self._client_instance, None
            http, self._ranged = self._ranged, None
        if http is not None:
            http.close()
        if client is not None:
            client.close()

    # --- listing helpers ----------------------------------------------------------------

    def _require_bucket(self) -> str:
        if not self._bucket:
            raise StorageConfigError("s3 storage config has no bucket")
        return self._bucket

    @staticmethod
    def _blob(entry: Any, relpath: str) -> Blob:
        etag = str(entry.get("ETag") or "").strip('"') or None
        return Blob(name=entry["Key"], relpath=relpath, size=int(entry.get("Size", 0)), version=etag)

    # --- the boto3 client ----------------------------------------------------------------

    def _client(self) -> S3Client:
        """The boto3 client, built on first use (boto3 is imported here: it is slow)."""
        with self._lock:
            if self._client_instance is None:
                self._client_instance = self._build_client()
            return self._client_instance

    def _build_client(self) -> S3Client:
        # deferred: importing boto3 costs ~0.3 s, kept off the start-up path
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        anonymous = _truthy(self.config.get("anonymous", False))
        access_key = self.config.get("access_key_id") or None
        secret_key = self.config.get("secret_access_key") or None
        region = self.config.get("region") or None
        timeout = self.settings.pull_timeout_seconds
        config = Config(
            signature_version=UNSIGNED if anonymous else "s3v4",
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path" if self._endpoint_url else "auto"},
        )
        try:
            session = boto3.session.Session(
                aws_access_key_id=None if anonymous else access_key,
                aws_secret_access_key=None if anonymous else secret_key,
                region_name=region,
            )
            return session.client(
                "s3",
                endpoint_url=self._endpoint_url,
                config=config,
                verify=self._ca_file(),
            )
        except Exception as exc:
            raise translate_boto_error(exc, bucket=self._bucket, action="connecting to") from None

    def _ca_file(self) -> str | None:
        """boto3 wants a CA file: the inline certificate is written once under
        ``ROOT_MODEL_DIR/_certs/<sha256>.pem`` (nowhere else)."""
        pem = str(self.config.get("certificate") or "").strip()
        if not pem:
            return None
        digest = hashlib.sha256(pem.encode()).hexdigest()
        folder = Path(self.settings.root_model_dir) / "_certs"
        path = folder / f"{digest}.pem"
        if path.is_file():
            return str(path)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            with os.fdopen(fd, "w") as handle:
                handle.write(pem + "\n")
            Path(tmp).replace(path)
        except OSError as exc:
            raise StorageError(f"cannot write the s3 CA certificate under {folder}: {exc.strerror}") from None
        return str(path)

    def _presigned_url(self, bucket: str, key: str) -> str:
        now = time.monotonic()
        with self._lock:
            cached = self._presigned.get(key)
        if cached is not None and now - cached[0] < _PRESIGN_REUSE_SECONDS:
            return cached[1]
        client = self._client()
        try:
            url = client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=_PRESIGN_SECONDS
            )
        except Exception as exc:
            raise translate_boto_error(exc, bucket=bucket, key=key, action="signing a read of") from None
        with self._lock:
            self._presigned[key] = (now, url)
        return url

    # --- the byte path -------------------------------------------------------------------

    def _http(self) -> RangedHttp:
        with self._lock:
            if self._ranged is None:
                pem = str(self.config.get("certificate") or "").strip()
                self._ranged = RangedHttp(self.settings, "s3", cadata=pem or None)
            return self._ranged
