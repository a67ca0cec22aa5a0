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
import http.client
import os
import re
import ssl
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
from puller.storage.base import Blob, Plan, Storage

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
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")
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


def _connection_error(exc: BaseException, bucket: str, key: str) -> SidecarError:
    """A failed request on the byte path: transient, except an untrusted certificate
    (it does not fix itself)."""
    where = f"s3 bucket '{bucket}' at '{key}'"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return StorageError(
            f"TLS failure talking to s3 for {where} ({type(exc).__name__}; check the certificate)"
        )
    return StorageUnavailable(f"cannot reach s3 for {where} ({type(exc).__name__})")


class _Connections(threading.local):
    """This thread's keep-alive connections, one per (scheme, host, port)."""

    def __init__(self) -> None:
        self.by_origin: dict[tuple[str, str, int], http.client.HTTPConnection] = {}


class _RangeStream:
    """The body of one ranged GET. Reading past the range is impossible: http.client
    stops at Content-Length. A connection that ends before the range does is a
    transient failure (http.client itself would just return 0). On close, a fully read
    connection stays open for the next range; a half-read one is closed."""

    def __init__(
        self,
        owner: S3Storage,
        origin: tuple[str, str, int],
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
        length: int,
    ) -> None:
        self._owner = owner
        self._origin = origin
        self._conn = conn
        self._resp = resp
        self._remaining = length

    def readinto(self, buffer: memoryview) -> int:
        if self._remaining <= 0 or not len(buffer):
            return 0
        try:
            count = self._resp.readinto(buffer)
        except (OSError, http.client.HTTPException) as exc:
            self._owner._drop(self._origin, self._conn)
            raise StorageUnavailable(f"s3 connection failed while reading ({type(exc).__name__})") from None
        if not count:
            self._owner._drop(self._origin, self._conn)
            raise StorageUnavailable(
                f"s3 closed the connection with {self._remaining} bytes of the range unread"
            )
        self._remaining -= count
        return count

    def close(self) -> None:
        if not self._resp.isclosed():
            self._owner._drop(self._origin, self._conn)


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
        self._ssl_context: ssl.SSLContext | None = None
        self._presigned: dict[str, tuple[float, str]] = {}
        self._local = _Connections()
        self._all_connections: set[http.client.HTTPConnection] = set()

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

    def open_range(self, blob: Blob, start: int, end: int) -> _RangeStream:
        """GET bytes ``[start, end)`` of ``blob`` with a presigned URL. Accepts 206 and
        200 with a matching Content-Range (and a plain 200 for the whole object);
        checks the range start, Content-Length and the object's total size."""
        bucket = self._require_bucket()
        url = urllib.parse.urlsplit(self._presigned_url(bucket, blob.name))
        origin = (url.scheme, url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
        target = url.path + (f"?{url.query}" if url.query else "")
        headers = {"Range": f"bytes={start}-{end - 1}"}
        conn, reused = self._connection(origin)
        try:
            resp = self._get(conn, target, headers)
        except (OSError, http.client.HTTPException) as exc:
            self._drop(origin, conn)
            if not reused or isinstance(exc, ssl.SSLCertVerificationError):
                raise _connection_error(exc, bucket, blob.name) from None
            # the server may have closed an idle keep-alive connection: one fresh try
            conn, _ = self._connection(origin)
            try:
                resp = self._get(conn, target, headers)
            except (OSError, http.client.HTTPException) as again:
                self._drop(origin, conn)
                raise _connection_error(again, bucket, blob.name) from None
        try:
            self._check_response(resp, blob, bucket, start, end)
        except BaseException:
            self._drop(origin, conn)
            raise
        return _RangeStream(self, origin, conn, resp, end - start)

    @staticmethod
    def _get(
        conn: http.client.HTTPConnection, target: str, headers: dict[str, str]
    ) -> http.client.HTTPResponse:
        conn.request("GET", target, headers=headers)
        return conn.getresponse()

    def close(self) -> None:
        with self._lock:
            connections = list(self._all_connections)
            self._all_connections.clear()
            self._presigned.clear()
            client, self._client_instance = self._client_instance, None
        for conn in connections:
            conn.close()
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

    def _context(self) -> ssl.SSLContext:
        with self._lock:
            if self._ssl_context is None:
                pem = str(self.config.get("certificate") or "").strip()
                try:
                    self._ssl_context = (
                        ssl.create_default_context(cadata=pem) if pem else ssl.create_default_context()
                    )
                except ssl.SSLError:
                    raise StorageConfigError(
                        "s3 storage config: 'certificate' is not a valid PEM CA bundle"
                    ) from None
            return self._ssl_context

    def _connection(self, origin: tuple[str, str, int]) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection to ``origin`` and whether it served a request before."""
        conn = self._local.by_origin.get(origin)
        if conn is not None:
            return conn, True
        scheme, host, port = origin
        timeout = self.settings.pull_timeout_seconds
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self._local.by_origin[origin] = conn
        with self._lock:
            self._all_connections.add(conn)
        return conn, False

    def _drop(self, origin: tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
        """Close ``conn`` and forget it (it is in an unknown state)."""
        conn.close()
        if self._local.by_origin.get(origin) is conn:
            del self._local.by_origin[origin]
        with self._lock:
            self._all_connections.discard(conn)

    @staticmethod
    def _check_response(
        resp: http.client.HTTPResponse, blob: Blob, bucket: str, start: int, end: int
    ) -> None:
        status = resp.status
        if status not in (200, 206):
            try:
                body = resp.read(_ERROR_BODY_LIMIT)
            except (OSError, http.client.HTTPException):
                body = b""
            raise _http_error(status, body, bucket=bucket, key=blob.name)
        where = f"s3 bucket '{bucket}' at '{blob.name}'"
        content_range = resp.getheader("Content-Range")
        if content_range:
            found = _CONTENT_RANGE.match(content_range)
            if found is None:
                raise StorageUnavailable(f"s3 sent an unreadable Content-Range for {where}")
            first, last, total = int(found.group(1)), int(found.group(2)), found.group(3)
            if total != "*" and int(total) != blob.size:
                raise IntegrityError(
                    f"{where} has {total} bytes now, {blob.size} when it was listed (it changed)"
                )
            if first != start or last != end - 1:
                raise StorageUnavailable(
                    f"s3 sent bytes {first}-{last} of {where}, bytes {start}-{end - 1} were asked"
                )
        elif status == 206:
            raise StorageUnavailable(f"s3 sent a partial answer without Content-Range for {where}")
        elif start != 0 or end != blob.size:
            raise StorageError(f"s3 ignored the byte range asked for {where}")
        length = resp.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) != end - start:
            raise StorageUnavailable(
                f"s3 announced {length} bytes for bytes {start}-{end - 1} of {where} ({end - start} asked)"
            )
