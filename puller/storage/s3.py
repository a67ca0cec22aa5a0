"""S3 and S3-compatible stores (AWS, MinIO, Ceph, rclone, moto...).

boto3 owns credentials, listing and request signing; the bytes travel through a lean
path of our own: a presigned GET URL fetched with ``http.client`` over one keep-alive
connection per worker thread, read with ``readinto`` straight into the engine's buffer
(:mod:`puller.storage.ranged_http`).

Storage config fields:

``bucket``
    the bucket (required; the resolver maps the legacy ``default_bucket``).
``endpoint_url``
    any S3-compatible endpoint (absent: AWS; without a scheme ``https://`` is assumed).
``region``
    the signing region (absent: the region of the profile or ``AWS_REGION``, else
    ``us-east-1``).
``access_key_id``, ``secret_access_key`` (and optionally ``session_token``)
    static credentials; the two go together (one without the other is a config error).
``profile``, ``credentials_file``
    with no static keys: a named profile, and a shared credentials file to read it from
    (instead of ``~/.aws/credentials``); either may be given alone.
``anonymous``
    ``true``: unsigned requests to a public bucket, whatever else is set.
``addressing_style``
    ``path`` (``endpoint/bucket/key``), ``virtual`` (``bucket.endpoint/key``) or
    ``auto``. Default: ``path`` when ``endpoint_url`` is set (what MinIO, Ceph RGW and
    most S3-compatible stores serve without DNS set up for buckets; the Go adapter
    always used it), ``auto`` on AWS (virtual-hosted).
``certificate``, ``certificate_file``
    a PEM CA bundle, inline or as a path (one or the other): when given it is the only
    trust anchor for this store, on both paths.
``verify_etag``
    ``false``: never take an ETag for the object's MD5 (see *Checksums*).

Credentials, in order: ``anonymous``; the static keys; otherwise boto3's default chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, the shared credentials and config
files with ``AWS_PROFILE``, web identity as IRSA sets it up, ECS and EC2 instance
roles), steered by ``profile`` and ``credentials_file``. Empty fields count as absent.

Proxies come from the settings (``HTTP_PROXY``, ``HTTPS_PROXY``, ``NO_PROXY``) for
boto3's requests as for the bytes; boto3 is never left to read them itself.

Checksums (:attr:`Blob.checksums`, verified by the engine while the bytes stream):

- ``md5``: a single-part ETag (32 hex digits, no ``-N``) is the MD5 of the object,
  except for SSE-KMS and SSE-C objects. The listing does not say how an object is
  encrypted, so the largest object with such an ETag is asked with one HEAD; when it is
  encrypted with a KMS or customer key, no ETag of the plan is taken for an MD5 (the
  objects of one model are normally stored alike).
- ``sha256``, ``crc32c``, ``crc32``: full-object checksums, asked with
  ``HeadObject(ChecksumMode=ENABLED)`` for objects of at least
  :data:`CHECKSUM_HEAD_MIN_BYTES` whose listing names such an algorithm and that have
  no usable MD5 (multipart uploads, or KMS-encrypted objects); at most
  :data:`MAX_CHECKSUM_HEADS` per plan, largest first. Composite (per-part) checksums,
  ``xxx-N`` or ``ChecksumType: COMPOSITE``, are not checksums of the bytes: skipped.

Every SDK and HTTP error is translated here into :mod:`adapter.errors` types, by
:func:`translate_boto_error` and :func:`_http_error`. Messages name the bucket, the
key and the S3 error code, never a credential.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

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
from puller.storage.ranged_http import RangedHttp, bypasses_proxy

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from adapter.settings import Settings
    from puller.config import StorageConfig

#: folder-marker suffix written by Hadoop's s3n and some GUI tools
_HADOOP_FOLDER_MARKER = "_$folder$"
#: a presigned URL is signed for this long and reused for a fraction of it
_PRESIGN_SECONDS = 3600
_PRESIGN_REUSE_SECONDS = 600
#: objects at least this large are worth a HEAD to learn a full-object checksum
CHECKSUM_HEAD_MIN_BYTES = 8 * 1024 * 1024
#: the most HEADs one plan sends for checksums
MAX_CHECKSUM_HEADS = 32
_HEAD_THREADS = 8
AddressingStyle = Literal["path", "virtual", "auto"]
ADDRESSING_STYLES: dict[str, AddressingStyle] = {"path": "path", "virtual": "virtual", "auto": "auto"}

#: S3 checksum algorithm -> (our name, digest bytes)
_FULL_OBJECT_CHECKSUMS = {"SHA256": ("sha256", 32), "CRC32C": ("crc32c", 4), "CRC32": ("crc32", 4)}
_MD5_ETAG = re.compile(r"^[0-9a-fA-F]{32}$")
#: server-side encryption modes whose ETag is not the MD5 of the bytes
_OPAQUE_ETAG_ENCRYPTION = frozenset({"aws:kms", "aws:kms:dsse"})

_UNAUTHENTICATED_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "InvalidSecurity",
        "AuthorizationHeaderMalformed",
        "MissingSecurityHeader",
        # rclone (gofakes3) refuses an unsigned request with this code and HTTP 400
        "UnsupportedAlgorithm",
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


def _public_endpoint(endpoint_url: str) -> str:
    """The endpoint without any ``user:password@`` part, for messages and identity."""
    parts = urllib.parse.urlsplit(endpoint_url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


# --- the storage config ---------------------------------------------------------------------


def _text(config: StorageConfig, name: str) -> str | None:
    """Field ``name`` as a stripped string; None when absent or empty (an empty string
    must never reach boto3 as a credential: it would stop the default chain)."""
    value = config.get(name)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, Mapping | list):
        raise StorageConfigError(f"s3 storage config: {name} must be a string")
    return str(value).strip() or None


@dataclass(frozen=True)
class S3Options:
    """The fields of one s3 storage config, checked. Secrets are left out of the repr."""

    bucket: str
    endpoint_url: str | None
    region: str | None
    anonymous: bool
    addressing_style: AddressingStyle
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    profile: str | None = None
    credentials_file: str | None = None
    certificate: str | None = field(default=None, repr=False)
    certificate_file: str | None = None
    verify_etag: bool = True

    @classmethod
    def from_config(cls, config: StorageConfig) -> S3Options:
        """Read and check the fields (no I/O). Raises :class:`StorageConfigError` for a
        key without its secret, both CA fields at once, or an unknown addressing style;
        messages name fields, never their values (except the addressing style)."""
        endpoint = _text(config, "endpoint_url")
        if endpoint and "://" not in endpoint:
            endpoint = "https://" + endpoint
        key_id, secret = _text(config, "access_key_id"), _text(config, "secret_access_key")
        anonymous = config.flag("anonymous") is True
        if not anonymous and (key_id is None) != (secret is None):
            missing = "secret_access_key" if secret is None else "access_key_id"
            raise StorageConfigError(f"s3 storage config: {missing} is missing (the two keys go together)")
        certificate, certificate_file = _text(config, "certificate"), _text(config, "certificate_file")
        if certificate and certificate_file:
            raise StorageConfigError("s3 storage config: set certificate or certificate_file, not both")
        raw_style = (_text(config, "addressing_style") or ("path" if endpoint else "auto")).lower()
        style = ADDRESSING_STYLES.get(raw_style)
        if style is None:
            raise StorageConfigError(
                f"s3 storage config: addressing_style {raw_style[:32]!r} is not one of "
                f"{', '.join(ADDRESSING_STYLES)}"
            )
        return cls(
            bucket=_text(config, "bucket") or "",
            endpoint_url=endpoint,
            region=_text(config, "region"),
            anonymous=anonymous,
            addressing_style=style,
            access_key_id=None if anonymous else key_id,
            secret_access_key=None if anonymous else secret,
            session_token=None if anonymous or key_id is None else _text(config, "session_token"),
            profile=None if anonymous else _text(config, "profile"),
            credentials_file=None if anonymous else _text(config, "credentials_file"),
            certificate=certificate,
            certificate_file=certificate_file,
            verify_etag=config.flag("verify_etag") is not False,
        )

    def endpoint_host(self) -> str:
        """The host boto3 talks to (for NO_PROXY matching)."""
        if self.endpoint_url:
            return urllib.parse.urlsplit(self.endpoint_url).hostname or ""
        region = self.region or "us-east-1"
        return "s3.amazonaws.com" if region == "us-east-1" else f"s3.{region}.amazonaws.com"


def boto_proxies(settings: Settings, host: str) -> dict[str, str]:
    """botocore's ``proxies`` for ``host`` from the settings: empty when NO_PROXY names
    the host or no proxy is set (an explicit empty dict: botocore then reads no proxy
    from the environment on its own)."""
    proxies: dict[str, str] = {}
    for scheme, raw in (("http", settings.http_proxy), ("https", settings.https_proxy)):
        value = raw.strip()
        if value:
            proxies[scheme] = value if "://" in value else "http://" + value
    if proxies and bypasses_proxy(host, settings.no_proxy):
        return {}
    return proxies


# --- checksums ------------------------------------------------------------------------------


def _etag(entry: Mapping[str, Any]) -> str | None:
    return str(entry.get("ETag") or "").strip().strip('"') or None


def is_md5_etag(etag: str | None) -> bool:
    """True for a single-part ETag (32 hex digits): the MD5 of the bytes unless the
    object is encrypted with a KMS or customer key."""
    return etag is not None and _MD5_ETAG.match(etag) is not None


def etag_is_opaque(head: Mapping[str, Any]) -> bool:
    """True when a HeadObject answer says the ETag is not the MD5 of the bytes
    (SSE-KMS, DSSE-KMS, SSE-C)."""
    return str(head.get("ServerSideEncryption") or "") in _OPAQUE_ETAG_ENCRYPTION or bool(
        head.get("SSECustomerAlgorithm")
    )


def full_object_checksums(head: Mapping[str, Any], etag: str | None) -> dict[str, str]:
    """The full-object checksums of a HeadObject answer (``ChecksumMode=ENABLED``), as
    lower-case hex by our algorithm names. Composite checksums (``-N`` suffix, or
    ``ChecksumType: COMPOSITE``) are skipped, and so is everything of a multipart object
    that is not marked ``FULL_OBJECT`` (some servers send per-part checksums unmarked)."""
    kind = str(head.get("ChecksumType") or "").upper()
    if kind == "COMPOSITE" or (etag is not None and "-" in etag and kind != "FULL_OBJECT"):
        return {}
    found: dict[str, str] = {}
    for algorithm, (name, length) in _FULL_OBJECT_CHECKSUMS.items():
        value = str(head.get(f"Checksum{algorithm}") or "").strip()
        if not value or "-" in value:
            continue
        try:
            digest = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(digest) == length:
            found[name] = digest.hex()
    return found


def _verifiable_listed(entry: Mapping[str, Any]) -> bool:
    """The listing says the object carries a checksum we could verify."""
    return any(str(a).upper() in _FULL_OBJECT_CHECKSUMS for a in entry.get("ChecksumAlgorithm") or ())


# --- errors -----------------------------------------------------------------------------------


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
    if isinstance(exc, bce.ProfileNotFound):
        profile = str(exc.kwargs.get("profile", ""))[:64]
        return StorageConfigError(f"s3 storage config: profile {profile!r} is not in the shared files")
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
    if code in _UNAUTHENTICATED_CODES or status == 401:
        return StorageUnauthenticated(f"s3 rejected the credentials ({code or status}) while reading {where}")
    if status == 403:
        return StoragePermissionDenied(f"s3 denied access ({code or status}) while reading {where}")
    if status == 416:
        return IntegrityError(f"{where} is shorter than when it was listed (HTTP 416)")
    if status >= 500 or status in (408, 429):
        return StorageUnavailable(f"s3 is unavailable (HTTP {status} {code}) while reading {where}".strip())
    return StorageError(f"s3 answered HTTP {status} {code} while reading {where}")


# --- the backend ------------------------------------------------------------------------------


class S3Storage(Storage):
    """An S3 bucket. Thread-safe: one boto3 client per storage, one HTTP connection per
    worker thread."""

    types: ClassVar[tuple[str, ...]] = ("s3",)

    def __init__(self, config: StorageConfig, settings: Settings) -> None:
        """Raises :class:`StorageConfigError` for fields that cannot work together (see
        :meth:`S3Options.from_config`); nothing is contacted yet."""
        super().__init__(config, settings)
        self.options = S3Options.from_config(config)
        self._lock = threading.Lock()
        self._client_instance: S3Client | None = None
        self._ranged: RangedHttp | None = None
        self._presigned: dict[str, tuple[float, str]] = {}

    # --- contract ---------------------------------------------------------------------

    def identity(self) -> str:
        endpoint = self.options.endpoint_url
        public = _public_endpoint(endpoint) if endpoint else "https://s3.amazonaws.com"
        return f"s3:{public}/{self.options.bucket}"

    def plan(self, path: str) -> Plan:
        """A key equal to ``path`` is a single object; otherwise every key under
        ``path/`` (the whole bucket for an empty path), folder markers skipped, with
        relpaths relative to the prefix. ETags become ``Blob.version``; checksums the
        store offers become ``Blob.checksums`` (module docstring)."""
        bucket = self._require_bucket()
        client = self._client()
        key = path.lstrip("/")
        listed: list[tuple[Mapping[str, Any], str]] = []
        single = False
        try:
            if key and not key.endswith("/"):
                first = client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("Contents", [])
                if first and first[0].get("Key") == key:
                    listed, single = [(first[0], key.rsplit("/", 1)[-1])], True
                prefix = key + "/"
            else:
                prefix = key
            if not single:
                paginator = client.get_paginator("list_objects_v2")
                for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                    for entry in page.get("Contents", []):
                        name = entry.get("Key", "")
                        if name.endswith("/") or (
                            entry.get("Size", 0) == 0 and name.endswith(_HADOOP_FOLDER_MARKER)
                        ):
                            continue
                        listed.append((entry, name[len(prefix) :]))
        except Exception as exc:
            if isinstance(exc, SidecarError):
                raise
            raise translate_boto_error(exc, bucket=bucket, key=key or None, action="listing") from None
        if not listed:
            raise StorageNotFound(f"nothing found in s3 bucket '{bucket}' at '{key}'")
        return Plan(blobs=self._blobs(bucket, listed), single_object=single)

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
        if not self.options.bucket:
            raise StorageConfigError("s3 storage config has no bucket")
        return self.options.bucket

    def _blobs(self, bucket: str, listed: list[tuple[Mapping[str, Any], str]]) -> tuple[Blob, ...]:
        """The blobs of a listing, with the checksums the store announces. Sends the
        HEADs the checksum policy asks for (module docstring); their errors are
        translated like a read's."""
        entries = [entry for entry, _ in listed]
        heads: dict[str, Mapping[str, Any]] = {}
        md5_etags = self.options.verify_etag
        with_md5 = [e for e in entries if is_md5_etag(_etag(e))]
        if md5_etags and with_md5:
            probe = max(with_md5, key=lambda e: int(e.get("Size", 0)))
            heads.update(self._heads(bucket, [probe]))
            md5_etags = not any(etag_is_opaque(h) for h in heads.values())
        wanted = [
            e
            for e in entries
            if e["Key"] not in heads
            and int(e.get("Size", 0)) >= CHECKSUM_HEAD_MIN_BYTES
            and _verifiable_listed(e)
            and not (md5_etags and is_md5_etag(_etag(e)))
        ]
        wanted.sort(key=lambda e: -int(e.get("Size", 0)))
        heads.update(self._heads(bucket, wanted[:MAX_CHECKSUM_HEADS]))

        blobs: list[Blob] = []
        for entry, relpath in listed:
            etag = _etag(entry)
            checksums: dict[str, str] = {}
            head = heads.get(entry["Key"])
            if head is not None and _etag(head) != etag:
                head = None  # replaced since the listing: its checksums are not of these bytes
            if head is not None:
                checksums.update(full_object_checksums(head, etag))
            plain = (not etag_is_opaque(head)) if head is not None else md5_etags
            if etag is not None and self.options.verify_etag and plain and is_md5_etag(etag):
                checksums["md5"] = etag.lower()
            blobs.append(
                Blob(
                    name=entry["Key"],
                    relpath=relpath,
                    size=int(entry.get("Size", 0)),
                    version=etag,
                    checksums=checksums,
                )
            )
        return tuple(blobs)

    def _heads(self, bucket: str, entries: list[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
        """``HeadObject(ChecksumMode=ENABLED)`` of each entry, a few at a time."""
        if not entries:
            return {}
        client = self._client()

        def head(key: str) -> Mapping[str, Any]:
            try:
                return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            except Exception as exc:
                raise translate_boto_error(exc, bucket=bucket, key=key, action="reading") from None

        keys = [str(e["Key"]) for e in entries]
        if len(keys) == 1:
            return {keys[0]: head(keys[0])}
        with ThreadPoolExecutor(
            max_workers=min(_HEAD_THREADS, len(keys)), thread_name_prefix="s3-head"
        ) as pool:
            return dict(zip(keys, pool.map(head, keys), strict=True))

    # --- the boto3 client ----------------------------------------------------------------

    def _client(self) -> S3Client:
        """The boto3 client, built on first use (boto3 is imported here: it is slow).
        Built outside the lock; when two threads race, one client is kept."""
        with self._lock:
            if self._client_instance is not None:
                return self._client_instance
        built = self._build_client()
        with self._lock:
            if self._client_instance is None:
                self._client_instance = built
                return built
            kept = self._client_instance
        built.close()
        return kept

    def _build_client(self) -> S3Client:
        # deferred: importing boto3 costs ~0.3 s, kept off the start-up path
        import boto3
        import botocore.session
        from botocore import UNSIGNED
        from botocore.config import Config

        options = self.options
        verify = self._ca_file()
        if verify is not None:
            self._http().ssl_context()  # a broken bundle is a config error, found now
        timeout = self.settings.pull_timeout_seconds
        config = Config(
            signature_version=UNSIGNED if options.anonymous else "s3v4",
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": options.addressing_style},
            proxies=boto_proxies(self.settings, options.endpoint_host()),
            max_pool_connections=max(10, _HEAD_THREADS),
        )
        try:
            core = botocore.session.Session()
            if options.credentials_file:
                core.set_config_variable("credentials_file", options.credentials_file)
            session = boto3.session.Session(
                aws_access_key_id=options.access_key_id,
                aws_secret_access_key=options.secret_access_key,
                aws_session_token=options.session_token,
                region_name=options.region,
                botocore_session=core,
                profile_name=options.profile,
            )
            return session.client("s3", endpoint_url=options.endpoint_url, config=config, verify=verify)
        except Exception as exc:
            raise translate_boto_error(exc, bucket=options.bucket, action="connecting to") from None

    def _ca_file(self) -> str | None:
        """The CA bundle file for boto3: ``certificate_file`` (checked to be a file), or
        the inline certificate written once under ``ROOT_MODEL_DIR/_certs/<sha256>.pem``
        (nowhere else); None when neither is set."""
        options = self.options
        if options.certificate_file:
            if not Path(options.certificate_file).is_file():
                raise StorageConfigError(
                    f"s3 storage config: certificate_file {options.certificate_file!r} is not a readable file"
                )
            return options.certificate_file
        pem = options.certificate
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
                self._ranged = RangedHttp(
                    self.settings,
                    "s3",
                    cadata=self.options.certificate,
                    cafile=self.options.certificate_file,
                )
            return self._ranged
