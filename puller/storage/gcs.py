"""Google Cloud Storage, and anything speaking its JSON API (fake-gcs-server,
gcp-storage-emulator, private endpoints).

google-auth owns credentials, google-cloud-storage owns listing; the bytes travel
through :class:`~puller.storage.ranged_http.RangedHttp`: a ranged GET of the object's
media URL (``<endpoint>/download/storage/v1/b/<bucket>/o/<name>?alt=media&generation=N``)
with an ``Authorization: Bearer`` header, read straight into the engine's buffer.

Storage config fields:

``bucket``
    the bucket (required).
``private_key``, ``client_email``, ``token_uri``
    the service-account key fields (as in a service-account JSON key file).
    ``private_key`` and ``client_email`` go together (one without the other is a
    config error); ``token_uri`` defaults to Google's token endpoint.
``project_id``
    optional; listing and reading need no project.
``endpoint`` (or ``endpoint_url``)
    the JSON API base, for emulators and private endpoints (default
    ``https://storage.googleapis.com``; without a scheme ``https://`` is assumed). The
    same endpoint serves both listing and bytes; the SDK's ``STORAGE_EMULATOR_HOST``
    override does not apply.
``anonymous``
    ``true``: unauthenticated requests, whatever else is set.
``use_default_credentials``
    ``true``: application default credentials (see below).

Which credentials are used:

1. ``anonymous: true`` -> none (a public bucket).
2. ``private_key`` + ``client_email`` -> that service account.
3. neither key field, and ``use_default_credentials: true`` or ``anonymous: false``
   -> application default credentials through ``google.auth.default``
   (``GOOGLE_APPLICATION_CREDENTIALS``, workload identity, the metadata server).
4. neither key field and nothing else -> none. This is what the Go adapter does ("no
   key and no email = anonymous"), so existing storage configs keep their meaning;
   application default credentials are an explicit opt-in.

Proxies: the bytes go through the proxies of the settings (``HTTP_PROXY``,
``HTTPS_PROXY``, ``NO_PROXY``), like every backend's. Listing and token requests go
through ``requests``, which reads those same variables from the environment itself;
we give it no proxies of our own, because proxies set on a ``requests`` session are
used even for hosts that ``NO_PROXY`` names (the metadata server, for one).

Every SDK and HTTP error is translated here, by :func:`translate_gcs_error`. Messages
name the bucket, the object and the HTTP status, never a credential.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
import urllib.parse
from collections.abc import Mapping
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
from puller.storage.base import Blob, Plan, Storage
from puller.storage.ranged_http import RangedHttp, RangeStream, without_query

if TYPE_CHECKING:
    from google.auth.credentials import Credentials
    from google.auth.transport.requests import AuthorizedSession, Request

    from adapter.settings import Settings
    from puller.config import StorageConfig

DEFAULT_ENDPOINT = "https://storage.googleapis.com"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL, not a secret
#: reading objects needs no more than this
READ_ONLY_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"

_KEY_ACTION = "reading the service-account private_key"
_REASON_VALUE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,60}")
_REASON = re.compile(r'"reason"\s*:\s*"(' + _REASON_VALUE.pattern + r')"')
_OAUTH_ERROR = re.compile(r"^[a-z_]{1,40}$")

Mode = Literal["anonymous", "service_account", "default"]


def _checksum_hex(value: Any, size: int) -> str | None:
    """A base64 digest from the object metadata as lower-case hex, or None when it is
    absent or not ``size`` bytes of valid base64."""
    if not isinstance(value, str) or not value:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == size else None


def _reason(error: BaseException | int, body: bytes) -> str:
    """The GCS error ``reason`` (``notFound``, ``forbidden``...) when one is readable:
    from an SDK exception's ``errors``, else from a JSON error ``body``."""
    for item in getattr(error, "errors", None) or ():
        reason = item.get("reason") if isinstance(item, Mapping) else None
        if isinstance(reason, str) and _REASON_VALUE.fullmatch(reason):
            return reason
    found = _REASON.search(body[:4096].decode("utf-8", "replace"))
    return found.group(1) if found else ""


def _oauth_error(exc: BaseException) -> str:
    """The OAuth ``error`` code of a token refusal (``invalid_grant``), when present.
    Only the code: the rest of the answer is not ours to repeat."""
    for arg in getattr(exc, "args", ()):
        if isinstance(arg, Mapping):
            code = arg.get("error")
            if isinstance(code, str) and _OAUTH_ERROR.match(code):
                return code
    return ""


def translate_gcs_error(
    error: BaseException | int, *, bucket: str, name: str = "", action: str, body: bytes = b""
) -> SidecarError:
    """Map what went wrong talking to GCS to our error type: an exception from
    google-api-core, google-auth, requests or key parsing, or (an ``int``) the HTTP
    status of a failed read with the head of its ``body``. ``action`` says what was
    being done (``"listing"``, ``"reading"``). 404 is ``StorageNotFound`` (naming the
    bucket when listing, the object when reading), 401 ``StorageUnauthenticated``, 403
    ``StoragePermissionDenied``, 408/429/5xx and connection failures
    ``StorageUnavailable``; a key that cannot be parsed is ``StorageConfigError``.
    Messages carry the bucket, the object name, the status and GCS's error reason,
    never credentials, tokens or the server's free text."""
    if isinstance(error, SidecarError):
        return error
    where = f"gcs bucket '{bucket}'" + (f" at '{name}'" if name else "")
    status = error if isinstance(error, int) else getattr(error, "code", None)
    if isinstance(status, int) and 100 <= status <= 599:
        reason = _reason(error, body)
        detail = f"HTTP {status}" + (f" {reason}" if reason else "")
        if status == 404:
            if action == "listing":
                return StorageNotFound(f"gcs bucket '{bucket}' does not exist (while listing '{name}')")
            return StorageNotFound(
                f"nothing found in {where} ({detail}; deleted or replaced since it was listed?)"
            )
        if status == 401:
            return StorageUnauthenticated(f"gcs rejected the credentials ({detail}) while {action} {where}")
        if status == 403:
            return StoragePermissionDenied(f"gcs denied access ({detail}) while {action} {where}")
        if status == 416:
            return IntegrityError(f"{where} is shorter than when it was listed ({detail})")
        if status in (408, 429) or status >= 500:
            return StorageUnavailable(f"gcs is unavailable ({detail}) while {action} {where}")
        return StorageError(f"gcs answered {detail} while {action} {where}")

    from google.api_core import exceptions as api_exceptions  # deferred: the SDK is slow to import
    from google.auth import exceptions as auth_exceptions

    kind = type(error).__name__
    if isinstance(error, api_exceptions.RetryError) and error.cause is not None:
        cause = translate_gcs_error(error.cause, bucket=bucket, name=name, action=action)
        if isinstance(cause, StorageUnavailable):
            return StorageUnavailable(f"gcs stayed unavailable while {action} {where} ({cause.message})")
        return cause
    if isinstance(error, auth_exceptions.RefreshError):
        if getattr(error, "retryable", False):
            return StorageUnavailable(f"the gcs token endpoint is unavailable while {action} {where}")
        code = _oauth_error(error)
        return StorageUnauthenticated(
            f"the gcs token endpoint refused the credentials{f' ({code})' if code else ''} "
            f"while {action} {where}"
        )
    if isinstance(error, auth_exceptions.TransportError | auth_exceptions.TimeoutError):
        return StorageUnavailable(f"cannot reach the gcs token endpoint while {action} {where} ({kind})")
    if isinstance(error, auth_exceptions.InvalidOperation):
        # anonymous credentials asked to refresh after a 401
        return StorageUnauthenticated(f"gcs refused anonymous access while {action} {where}")
    if isinstance(error, auth_exceptions.MalformedError) or (
        action == _KEY_ACTION and isinstance(error, ValueError | TypeError)
    ):
        return StorageConfigError(f"gcs storage config for bucket '{bucket}': {action} failed ({kind})")
    if isinstance(error, auth_exceptions.DefaultCredentialsError):
        return StorageUnauthenticated(
            f"no application default credentials for {where}: give private_key and client_email "
            "in the storage config, or set up workload identity or GOOGLE_APPLICATION_CREDENTIALS"
        )
    if isinstance(error, auth_exceptions.GoogleAuthError):
        return StorageUnauthenticated(f"gcs authentication failed while {action} {where} ({kind})")
    if isinstance(error, api_exceptions.GoogleAPIError):
        return StorageError(f"gcs client error while {action} {where} ({kind})")
    if isinstance(error, OSError):  # requests' exceptions are OSErrors
        if "SSLError" in kind or "CertificateVerify" in kind:
            return StorageError(f"TLS failure talking to gcs while {action} {where} ({kind})")
        return StorageUnavailable(f"cannot reach gcs while {action} {where} ({kind})")
    return StorageError(f"unexpected error while {action} {where} ({kind})")


class _TokenRejected(StorageUnauthenticated):
    """A 401 on the byte path: the token may have been revoked or expired early."""


def _normalize_endpoint(raw: str) -> str:
    endpoint = raw.strip()
    if not endpoint:
        return DEFAULT_ENDPOINT
    if "://" not in endpoint:
        endpoint = "https://" + endpoint
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageConfigError("gcs storage config: 'endpoint' is not an http(s) URL")
    path = parts.path.rstrip("/").removesuffix("/storage/v1")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class GCSStorage(Storage):
    """A GCS bucket. Thread-safe: one SDK client and one set of credentials per
    storage, one HTTP connection per worker thread. The SDK is imported and the
    credentials are built on first use; a malformed key surfaces then, as a
    ``StorageConfigError`` that does not quote it."""

    types: ClassVar[tuple[str, ...]] = ("gcs",)

    def __init__(self, config: StorageConfig, settings: Settings) -> None:
        super().__init__(config, settings)
        self._bucket = str(config.get("bucket") or "").strip()
        self._endpoint = _normalize_endpoint(str(config.get("endpoint") or config.get("endpoint_url") or ""))
        self._mode = self._select_mode(config)
        # re-entrant: the client is built from the credentials under the same lock
        self._lock = threading.RLock()
        self._token_lock = threading.Lock()
        self._credentials_instance: Credentials | None = None
        self._token_request: Request | None = None
        self._project: str | None = str(config.get("project_id") or "").strip() or None
        self._client_instance: Any = None
        self._session: AuthorizedSession | None = None
        self._http = RangedHttp(settings, "gcs")

    @staticmethod
    def _select_mode(config: StorageConfig) -> Mode:
        has_key = bool(str(config.get("private_key") or "").strip())
        has_email = bool(str(config.get("client_email") or "").strip())
        if config.flag("anonymous"):
            return "anonymous"
        if has_key != has_email:
            raise StorageConfigError(
                "gcs storage config: private_key and client_email must be given together"
            )
        if has_key:
            return "service_account"
        if config.flag("use_default_credentials") or config.flag("anonymous") is False:
            return "default"
        return "anonymous"

    # --- contract ---------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        """Which credentials this storage uses: ``anonymous``, ``service_account`` or
        ``default`` (application default credentials)."""
        return self._mode

    def identity(self) -> str:
        return f"gcs:{without_query(self._endpoint)}/{self._bucket}"

    def plan(self, path: str) -> Plan:
        """An object named ``path`` is a single object; otherwise every object under
        ``path/`` (the whole bucket for an empty path), folder markers (names ending in
        ``/``) skipped, relpaths relative to the prefix. The generation becomes
        ``Blob.version``; the crc32c and md5 of the metadata, as hex, ``Blob.checksums``."""
        bucket = self._require_bucket()
        key = path.lstrip("/")
        client = self._client()
        options = self._call_options()
        try:
            if key and not key.endswith("/"):
                first = list(client.list_blobs(bucket, prefix=key, max_results=1, **options))
                if first and first[0].name == key:
                    return Plan(blobs=(self._blob(first[0], key.rsplit("/", 1)[-1]),), single_object=True)
                prefix = key + "/"
            else:
                prefix = key
            blobs = [
                self._blob(entry, entry.name[len(prefix) :])
                for entry in client.list_blobs(bucket, prefix=prefix, **options)
                if not entry.name.endswith("/")
            ]
        except Exception as exc:
            raise translate_gcs_error(exc, bucket=bucket, name=key, action="listing") from None
        if not blobs:
            raise StorageNotFound(f"nothing found in gcs bucket '{bucket}' at '{key}'")
        return Plan(blobs=tuple(blobs), single_object=False)

    def open_range(self, blob: Blob, start: int, end: int) -> RangeStream:
        """GET bytes ``[start, end)`` of the listed generation of ``blob`` from its media
        URL. A 401 refreshes the token once and tries again."""
        bucket = self._require_bucket()
        url = self.media_url(blob)
        where = f"gcs bucket '{bucket}' at '{blob.name}'"

        def error_for_status(status: int, body: bytes) -> SidecarError:
            error = translate_gcs_error(status, bucket=bucket, name=blob.name, action="reading", body=body)
            return _TokenRejected(error.message) if status == 401 else error

        headers = self._authorization()
        try:
            return self._http.get_range(
                url, blob, start, end, headers=headers, where=where, error_for_status=error_for_status
            )
        except _TokenRejected as rejected:
            if not headers:
                raise StorageUnauthenticated(rejected.message) from None
        headers = self._authorization(rejected=headers)
        try:
            return self._http.get_range(
                url, blob, start, end, headers=headers, where=where, error_for_status=error_for_status
            )
        except _TokenRejected as rejected:
            raise StorageUnauthenticated(rejected.message) from None

    def media_url(self, blob: Blob) -> str:
        """The download URL of ``blob``, pinned to its listed generation when known."""
        bucket = urllib.parse.quote(self._require_bucket(), safe="")
        name = urllib.parse.quote(blob.name, safe="")
        query = "alt=media" + (f"&generation={blob.version}" if blob.version else "")
        return f"{self._endpoint}/download/storage/v1/b/{bucket}/o/{name}?{query}"

    def close(self) -> None:
        """Close the byte path's connections and the SDK's and token sessions. The
        credentials are kept: a later call builds a new client with them."""
        with self._lock:
            client, self._client_instance = self._client_instance, None
            session, self._session = self._session, None
            token_request = self._token_request
        self._http.close()
        if client is not None:
            client.close()
        if session is not None:
            session.close()  # type: ignore[no-untyped-call]
        if token_request is not None:
            token_request.session.close()

    # --- listing helpers ----------------------------------------------------------------

    def _require_bucket(self) -> str:
        if not self._bucket:
            raise StorageConfigError("gcs storage config has no bucket")
        return self._bucket

    def _call_options(self) -> dict[str, Any]:
        """Timeout and retry of SDK calls: transient errors are retried for at most
        PULL_TIMEOUT_SECONDS (the SDK's own default is two minutes)."""
        from google.cloud.storage.retry import (  # type: ignore[import-untyped]  # no py.typed
            DEFAULT_RETRY,
        )

        timeout = self.settings.pull_timeout_seconds
        return {"timeout": timeout, "retry": DEFAULT_RETRY.with_timeout(timeout)}

    @staticmethod
    def _blob(entry: Any, relpath: str) -> Blob:
        checksums: dict[str, str] = {}
        crc32c = _checksum_hex(entry.crc32c, 4)
        if crc32c is not None:
            checksums["crc32c"] = crc32c
        md5 = _checksum_hex(entry.md5_hash, 16)
        if md5 is not None:
            checksums["md5"] = md5
        generation = entry.generation
        return Blob(
            name=entry.name,
            relpath=relpath,
            size=int(entry.size or 0),
            version=str(generation) if generation is not None else None,
            checksums=checksums,
        )

    # --- credentials and the SDK client --------------------------------------------------

    def _client(self) -> Any:
        """The google-cloud-storage client, built on first use (the SDK is imported here)."""
        with self._lock:
            if self._client_instance is None:
                self._client_instance = self._build_client()
            return self._client_instance

    def _build_client(self) -> Any:
        from google.auth.transport.requests import AuthorizedSession
        from google.cloud import storage  # type: ignore[import-untyped]  # no py.typed

        credentials, token_request = self._auth()
        # anonymous credentials cannot be refreshed: a 401 is then the answer, not a cue
        refresh_on = () if self._mode == "anonymous" else (401,)
        session = AuthorizedSession(  # type: ignore[no-untyped-call]
            credentials, refresh_status_codes=refresh_on, auth_request=token_request
        )
        self._session = session
        try:
            client = storage.Client(
                project=self._project,
                credentials=credentials,
                _http=session,
                client_options={"api_endpoint": self._endpoint},
            )
        except Exception as exc:
            raise translate_gcs_error(exc, bucket=self._bucket, action="connecting to") from None
        # Off: the SDK's bucket-metadata cache, which only feeds its tracing spans but
        # starts a background thread per bucket that GETs the bucket (one more request,
        # a second token refresh racing ours, and a permission a read-only key may
        # lack). Its own switch is an environment variable, which we do not set.
        client._bucket_metadata_cache = None
        return client

    def _auth(self) -> tuple[Credentials, Request]:
        """The credentials and the transport their token requests use, built once."""
        with self._lock:
            if self._credentials_instance is None or self._token_request is None:
                from google.auth.transport.requests import Request

                token_request = Request()
                self._credentials_instance = self._build_credentials(token_request)
                self._token_request = token_request
            return self._credentials_instance, self._token_request

    def _build_credentials(self, token_request: Request) -> Credentials:
        if self._mode == "anonymous":
            from google.auth.credentials import AnonymousCredentials

            return AnonymousCredentials()  # type: ignore[no-untyped-call]
        if self._mode == "default":
            import google.auth

            try:
                credentials, project = google.auth.default(scopes=[READ_ONLY_SCOPE], request=token_request)
            except Exception as exc:
                raise translate_gcs_error(
                    exc, bucket=self._bucket, action="finding application default credentials for"
                ) from None
            if self._project is None and project:
                self._project = project
            return credentials
        from google.oauth2 import service_account

        key = str(self.config.get("private_key") or "")
        if "\\n" in key and "\n" not in key:
            key = key.replace("\\n", "\n")  # a PEM pasted with escaped newlines
        info = {
            "type": "service_account",
            "private_key": key,
            "client_email": str(self.config.get("client_email") or "").strip(),
            "token_uri": str(self.config.get("token_uri") or "").strip() or DEFAULT_TOKEN_URI,
        }
        if self._project:
            info["project_id"] = self._project
        try:
            return service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call,no-any-return]
                info, scopes=[READ_ONLY_SCOPE]
            )
        except Exception as exc:
            raise translate_gcs_error(exc, bucket=self._bucket, action=_KEY_ACTION) from None

    def _authorization(self, rejected: Mapping[str, str] | None = None) -> dict[str, str]:
        """The ``Authorization`` header of a read, or nothing when anonymous: a bearer
        token, refreshed first when it has expired or is the one in ``rejected`` (the
        headers of a read that got 401; a token another thread already replaced is not
        refreshed again). One refresh at a time."""
        if self._mode == "anonymous":
            return {}
        credentials, token_request = self._auth()
        with self._token_lock:
            stale = rejected is not None and rejected.get("Authorization") == f"Bearer {credentials.token}"
            if stale or not credentials.valid:
                try:
                    credentials.refresh(token_request)  # type: ignore[no-untyped-call]
                except Exception as exc:
                    raise translate_gcs_error(
                        exc, bucket=self._bucket, action="getting an access token for"
                    ) from None
            token = credentials.token
        if not token:
            raise StorageUnauthenticated(f"no gcs access token for bucket '{self._bucket}'")
        return {"Authorization": f"Bearer {token}"}
