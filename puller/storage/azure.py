"""Azure Blob Storage (and Azurite, the emulator).

azure-storage-blob owns listing and azure-identity owns Entra ID tokens; the bytes
travel through the shared lean path (:mod:`puller.storage.ranged_http`): a ranged GET
of the blob's URL, authorised by the one means the storage config gives.

Storage config fields: ``account_name`` and ``container``, and at most one way in:

- ``connection_string``: its ``AccountKey`` (a short-lived read SAS is signed per blob
  for the byte path), or its ``SharedAccessSignature``; its endpoint is used unless an
  explicit one is given;
- ``account_key`` with ``account_name`` (shared key, as in a connection string);
- ``client_id`` + ``client_secret`` + ``tenant_id``: a service principal
  (``ClientSecretCredential``), its bearer token sent on every GET;
- ``use_default_credential: true``: ``DefaultAzureCredential`` (workload identity,
  managed identity...; ``client_id`` then picks a user-assigned identity);
- ``sas_token`` (with or without its leading ``?``), appended to every URL;
- none of these: anonymous access to a public container.

The endpoint is ``endpoint`` (or ``endpoint_url``) when given (Azurite:
``http://127.0.0.1:10000/devstoreaccount1``), else the connection string's, else
``https://<account_name>.blob.core.windows.net``.

Every SDK error and HTTP status is translated here by :func:`translate_azure_error`.
Messages name the container, the blob path and the endpoint, never a key, a token, a
SAS or a connection string.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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
from puller.storage.ranged_http import RangedHttp, without_query

if TYPE_CHECKING:
    from azure.core.credentials import AccessToken, TokenCredential
    from azure.storage.blob import BlobProperties, ContainerClient

    from adapter.settings import Settings
    from puller.config import StorageConfig

#: the Entra ID scope of Azure Storage
STORAGE_SCOPE = "https://storage.azure.com/.default"
#: a token is renewed when it has less than this left
_TOKEN_MARGIN_SECONDS = 300
#: lifetime of the read SAS signed per blob with an account key
_SAS_SECONDS = 3600
#: Azurite's published development account, for ``UseDevelopmentStorage=true``
_DEV_ACCOUNT = "devstoreaccount1"
_DEV_ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_DEV_ENDPOINT = "http://127.0.0.1:10000/devstoreaccount1"

_NOT_FOUND_CODES = frozenset({"BlobNotFound", "ContainerNotFound", "ResourceNotFound", "ParentNotFound"})
_UNAUTHENTICATED_CODES = frozenset(
    {"AuthenticationFailed", "InvalidAuthenticationInfo", "NoAuthenticationInformation"}
)
_DENIED_CODES = frozenset(
    {
        "AuthorizationFailure",
        "AuthorizationPermissionMismatch",
        "AuthorizationResourceTypeMismatch",
        "AuthorizationServiceMismatch",
        "AuthorizationProtocolMismatch",
        "AuthorizationSourceIPMismatch",
        "InsufficientAccountPermissions",
        "AccountIsDisabled",
        "PublicAccessNotPermitted",
        "KeyBasedAuthenticationNotPermitted",
    }
)
_TRANSIENT_CODES = frozenset({"ServerBusy", "OperationTimedOut", "InternalError", "ServiceUnavailable"})
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")

AuthMode = Literal["shared_key", "sas", "token", "anonymous"]


def _where(container: str, name: str | None, endpoint: str) -> str:
    return f"azure container '{container}'" + (f" at '{name}'" if name else "") + f" ({endpoint})"


def translate_azure_error(
    failure: BaseException | tuple[int, bytes],
    *,
    container: str,
    name: str | None,
    endpoint: str,
    action: str,
    anonymous: bool = False,
) -> SidecarError:
    """Map an azure-core / azure-identity exception, or the ``(status, body head)`` of
    a failed GET on the byte path, to our error type. ``action`` says what was being
    done (``"listing"``, ``"reading"``). The message names the container, the blob,
    the endpoint and the storage error code; never the SDK's text (it may quote a URL
    with its SAS) nor any credential."""
    where = _where(container, name, endpoint)
    if isinstance(failure, tuple):
        status, body = failure
        found = _ERROR_CODE.search(body)
        code = found.group(1).decode("ascii", "replace") if found else ""
    else:
        from azure.core import exceptions as ace  # deferred: azure-core is imported on first use

        if isinstance(failure, ace.ClientAuthenticationError) and not getattr(failure, "error_code", None):
            # raised by azure-identity while getting a token (CredentialUnavailableError
            # included), or a storage 401/403 without an error code
            return StorageUnauthenticated(
                f"azure could not authenticate ({type(failure).__name__}) while {action} {where}"
            )
        if isinstance(failure, ace.HttpResponseError):
            status = int(failure.status_code or 0)
            error_code = getattr(failure, "error_code", None)
            code = str(getattr(error_code, "value", error_code) or "")
        elif isinstance(failure, ace.ServiceRequestError | ace.ServiceResponseError):
            return StorageUnavailable(f"cannot reach azure while {action} {where} ({type(failure).__name__})")
        elif isinstance(failure, ValueError):
            return StorageConfigError(
                f"azure storage config: a value was refused ({type(failure).__name__}) while {action} {where}"
            )
        else:
            return StorageError(f"azure client error while {action} {where} ({type(failure).__name__})")
    if code == "ContainerNotFound":
        return StorageNotFound(f"azure container '{container}' does not exist ({endpoint})")
    if code in _NOT_FOUND_CODES or status == 404:
        hint = " (anonymous access: the container may be private)" if anonymous else ""
        return StorageNotFound(f"nothing found in {where}{hint}")
    if code in _UNAUTHENTICATED_CODES or status == 401:
        return StorageUnauthenticated(
            f"azure rejected the credentials ({code or status}) while {action} {where}"
        )
    if code in _DENIED_CODES or status == 403:
        return StoragePermissionDenied(f"azure denied access ({code or status}) while {action} {where}")
    if status == 416:
        return IntegrityError(f"{where} is shorter than when it was listed (HTTP 416)")
    if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
        return StorageUnavailable(f"azure is unavailable ({code or status}) while {action} {where}")
    return StorageError(f"azure answered HTTP {status} {code} while {action} {where}".replace("  ", " "))


@dataclass(frozen=True)
class ConnectionString:
    """What a connection string says: its endpoint and its one credential (the repr
    leaves the secrets out)."""

    endpoint: str
    account_name: str | None
    account_key: str | None = field(repr=False)
    sas: str | None = field(repr=False)


def parse_connection_string(text: str) -> ConnectionString:
    """Parse ``Key=Value;...`` as Azure documents it (keys case-insensitive). Raises
    :class:`StorageConfigError` naming what is missing, never quoting the text."""
    pairs = [part.split("=", 1) for part in text.strip().rstrip(";").split(";") if part.strip()]
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise StorageConfigError("azure storage config: the connection_string is malformed")
    fields = {key.strip().lower(): value.strip() for key, value in pairs}
    if fields.get("usedevelopmentstorage", "").lower() == "true":
        return ConnectionString(_DEV_ENDPOINT, _DEV_ACCOUNT, _DEV_ACCOUNT_KEY, None)
    account = fields.get("accountname") or None
    endpoint = fields.get("blobendpoint", "")
    if not endpoint:
        if account is None:
            raise StorageConfigError(
                "azure storage config: the connection_string has neither BlobEndpoint nor AccountName"
            )
        protocol = fields.get("defaultendpointsprotocol") or "https"
        suffix = fields.get("endpointsuffix") or "core.windows.net"
        endpoint = f"{protocol}://{account}.blob.{suffix}"
    key = fields.get("accountkey") or None
    if key is not None and account is None:
        raise StorageConfigError(
            "azure storage config: the connection_string has an AccountKey but no AccountName"
        )
    return ConnectionString(
        endpoint, account, key, (fields.get("sharedaccesssignature") or "").lstrip("?") or None
    )


@dataclass(frozen=True)
class _Access:
    """How this store is reached: endpoint (no query), container and the auth mode."""

    endpoint: str
    container: str
    mode: AuthMode
    account_name: str | None = None
    account_key: str | None = field(default=None, repr=False)
    sas: str | None = field(default=None, repr=False)

    @property
    def container_url(self) -> str:
        return f"{self.endpoint}/{urllib.parse.quote(self.container)}"

    def blob_url(self, name: str) -> str:
        return f"{self.container_url}/{urllib.parse.quote(name, safe='~/')}"


class AzureBlobStorage(Storage):
    """One container of an Azure storage account. Thread-safe: one SDK client for
    listing, one credential, one HTTP connection per worker thread."""

    types: ClassVar[tuple[str, ...]] = ("azure",)

    def __init__(self, config: StorageConfig, settings: Settings) -> None:
        """Reads the config (no network, no SDK import). Raises
        :class:`StorageConfigError` when the container, the endpoint or a credential
        field is missing or malformed, naming the field, never its value."""
        super().__init__(config, settings)
        self._access = self._resolve_access()
        self._lock = threading.Lock()
        self._token_lock = threading.Lock()
        self._client_instance: ContainerClient | None = None
        self._credential_instance: TokenCredential | None = None
        self._token: AccessToken | None = None
        self._ranged: RangedHttp | None = None

    # --- config -------------------------------------------------------------------------

    def _text(self, name: str) -> str:
        return str(self.config.get(name) or "").strip()

    def _resolve_access(self) -> _Access:
        container = self._text("container")
        if not container:
            raise StorageConfigError("azure storage config has no container")
        account = self._text("account_name") or None
        explicit = self._text("endpoint") or self._text("endpoint_url")
        conn_text = self._text("connection_string")
        conn = parse_connection_string(conn_text) if conn_text else None
        if explicit:
            endpoint = explicit if "://" in explicit else "https://" + explicit
        elif conn is not None:
            endpoint = conn.endpoint
        elif account:
            endpoint = f"https://{account}.blob.core.windows.net"
        else:
            raise StorageConfigError(
                "azure storage config needs account_name, an endpoint or a connection_string"
            )
        endpoint = without_query(endpoint).rstrip("/")
        if urllib.parse.urlsplit(endpoint).scheme not in ("http", "https"):
            raise StorageConfigError(f"azure storage config: the endpoint is not an http(s) URL: {endpoint}")
        if conn is not None:
            if conn.account_key:
                return self._shared_key(endpoint, container, conn.account_name or "", conn.account_key)
            if conn.sas:
                return _Access(endpoint, container, "sas", sas=conn.sas)
            raise StorageConfigError(
                "azure storage config: the connection_string has neither AccountKey nor SharedAccessSignature"
            )
        if self._text("account_key"):
            if not account:
                raise StorageConfigError("azure storage config: account_key needs account_name")
            return self._shared_key(endpoint, container, account, self._text("account_key"))
        if self._text("client_secret"):
            missing = [n for n in ("client_id", "tenant_id") if not self._text(n)]
            if missing:
                raise StorageConfigError(
                    f"azure storage config: a service principal needs {' and '.join(missing)} as well"
                )
            return self._token_access(endpoint, container)
        if self.config.flag("use_default_credential"):
            return self._token_access(endpoint, container)
        stray = [n for n in ("client_id", "tenant_id") if self._text(n)]
        if stray:
            raise StorageConfigError(
                f"azure storage config: {' and '.join(stray)} without client_secret: add client_secret "
                "for a service principal, or use_default_credential: true for a managed or workload identity"
            )
        sas = self._text("sas_token").lstrip("?")
        if sas:
            return _Access(endpoint, container, "sas", sas=sas)
        return _Access(endpoint, container, "anonymous")

    @staticmethod
    def _shared_key(endpoint: str, container: str, account: str, key: str) -> _Access:
        try:
            base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError):
            raise StorageConfigError("azure storage config: the account key is not valid base64") from None
        return _Access(endpoint, container, "shared_key", account_name=account, account_key=key)

    @staticmethod
    def _token_access(endpoint: str, container: str) -> _Access:
        if not endpoint.startswith("https://"):
            raise StorageConfigError(
                f"azure storage config: a bearer token is only sent over https, the endpoint is {endpoint}"
            )
        return _Access(endpoint, container, "token")

    @property
    def auth_mode(self) -> AuthMode:
        """How requests are authorised: ``shared_key``, ``sas``, ``token`` or ``anonymous``."""
        return self._access.mode

    def identity(self) -> str:
        return f"azure:{self._access.container_url}"

    def credential(self) -> TokenCredential | None:
        """The azure-identity credential of a store that authenticates with Entra ID
        tokens (built on first use, then shared); None for the other auth modes."""
        if self._access.mode != "token":
            return None
        with self._lock:
            return self._credential_locked()

    # --- the contract -------------------------------------------------------------------

    def plan(self, path: str) -> Plan:
        """A blob named exactly ``path`` (not a folder marker) is a single object;
        otherwise every blob under ``path/`` (the whole container for an empty path),
        with relpaths relative to the prefix. Folder markers (names ending in ``/``,
        empty blobs with ``hdi_isfolder`` metadata) are skipped. ETags become
        ``Blob.version``, Content-MD5 ``Blob.checksums["md5"]``."""
        access = self._access
        key = path.lstrip("/")
        try:
            client = self._client()
            if key and not key.endswith("/"):
                pages = client.list_blobs(name_starts_with=key, include=["metadata"], results_per_page=1)
                first = next(iter(next(pages.by_page(), [])), None)
                if first is not None and first.name == key and not self._is_folder(first):
                    return Plan(blobs=(self._blob(first, key.rsplit("/", 1)[-1]),), single_object=True)
                prefix = key + "/"
            else:
                prefix = key
            blobs = [
                self._blob(item, item.name[len(prefix) :])
                for item in client.list_blobs(name_starts_with=prefix or None, include=["metadata"])
                if not self._is_folder(item)
            ]
        except SidecarError:
            raise
        except Exception as exc:
            raise self._error(exc, key or None, "listing") from None
        if not blobs:
            raise StorageNotFound(f"nothing found in {_where(access.container, key, access.endpoint)}")
        return Plan(blobs=tuple(blobs), single_object=False)

    def open_range(self, blob: Blob, start: int, end: int) -> ByteStream:
        """GET bytes ``[start, end)`` of ``blob`` over the shared lean byte path, with a
        read SAS (signed here for an account key, or the configured one) or a bearer
        token; no authorisation for an anonymous store."""
        access = self._access
        headers = {"x-ms-version": self._api_version()}
        url = access.blob_url(blob.name)
        if access.mode == "shared_key":
            url += "?" + self._blob_sas(blob.name)
        elif access.mode == "sas":
            url += "?" + (access.sas or "")
        elif access.mode == "token":
            headers["Authorization"] = "Bearer " + self._bearer_token(blob.name)
        return self._http().get_range(
            url,
            blob,
            start,
            end,
            headers=headers,
            where=_where(access.container, blob.name, access.endpoint),
            error_for_status=lambda status, body: self._error((status, body), blob.name, "reading"),
        )

    def close(self) -> None:
        with self._lock:
            client, self._client_instance = self._client_instance, None
            credential, self._credential_instance = self._credential_instance, None
            ranged, self._ranged = self._ranged, None
        with self._token_lock:
            self._token = None
        if ranged is not None:
            ranged.close()
        if client is not None:
            client.close()
        closer = getattr(credential, "close", None)
        if callable(closer):
            closer()

    # --- helpers ------------------------------------------------------------------------

    def _error(
        self, failure: BaseException | tuple[int, bytes], name: str | None, action: str
    ) -> SidecarError:
        return translate_azure_error(
            failure,
            container=self._access.container,
            name=name,
            endpoint=self._access.endpoint,
            action=action,
            anonymous=self._access.mode == "anonymous",
        )

    @staticmethod
    def _is_folder(item: BlobProperties) -> bool:
        if item.name.endswith("/"):
            return True
        metadata = item.metadata or {}
        flag = next((v for k, v in metadata.items() if k.lower() == "hdi_isfolder"), "")
        return not item.size and str(flag).lower() == "true"

    @staticmethod
    def _blob(item: BlobProperties, relpath: str) -> Blob:
        etag = str(item.etag or "").strip('"') or None
        settings = item.content_settings
        md5 = bytes(settings.content_md5) if settings is not None and settings.content_md5 else b""
        checksums = {"md5": md5.hex()} if len(md5) == 16 else {}
        return Blob(
            name=item.name, relpath=relpath, size=int(item.size or 0), version=etag, checksums=checksums
        )

    def _http(self) -> RangedHttp:
        with self._lock:
            if self._ranged is None:
                self._ranged = RangedHttp(self.settings, "azure")
            return self._ranged

    def _client_options(self) -> dict[str, Any]:
        settings = self.settings
        options: dict[str, Any] = {
            "connection_timeout": settings.pull_timeout_seconds,
            "read_timeout": settings.pull_timeout_seconds,
        }
        proxies = {
            scheme: value
            for scheme, value in (("http", settings.http_proxy), ("https", settings.https_proxy))
            if value
        }
        if proxies:
            if settings.no_proxy:
                proxies["no_proxy"] = settings.no_proxy
            options["proxies"] = proxies
        return options

    def _client(self) -> ContainerClient:
        """The SDK's container client, built on first use (the SDK is imported here)."""
        with self._lock:
            if self._client_instance is None:
                self._client_instance = self._build_client()
            return self._client_instance

    def _build_client(self) -> ContainerClient:
        from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
        from azure.storage.blob import ContainerClient, LinearRetry

        access = self._access
        credential: Any = None
        if access.mode == "shared_key":
            credential = AzureNamedKeyCredential(access.account_name or "", access.account_key or "")
        elif access.mode == "sas":
            credential = AzureSasCredential(access.sas or "")
        elif access.mode == "token":
            credential = self._credential_locked()
        try:
            return ContainerClient(
                access.endpoint,
                access.container,
                credential=credential,
                # the SDK's default waits 15 s and more between its retries of a listing
                retry_policy=LinearRetry(backoff=1, retry_total=2, random_jitter_range=1),
                **self._client_options(),
            )
        except Exception as exc:
            raise self._error(exc, None, "connecting to") from None

    def _credential_locked(self) -> TokenCredential:
        """The token credential (caller holds ``self._lock``)."""
        if self._credential_instance is None:
            self._credential_instance = self._build_credential()
        return self._credential_instance

    def _build_credential(self) -> TokenCredential:
        """``ClientSecretCredential`` for a service principal, else
        ``DefaultAzureCredential`` (``client_id`` as the managed identity's)."""
        from azure.identity import ClientSecretCredential, DefaultAzureCredential

        options: dict[str, Any] = {}
        if "proxies" in (client_options := self._client_options()):
            options["proxies"] = client_options["proxies"]
        client_id = self._text("client_id")
        try:
            if self._text("client_secret"):
                return ClientSecretCredential(
                    self._text("tenant_id"), client_id, self._text("client_secret"), **options
                )
            if client_id:
                options["managed_identity_client_id"] = client_id
            if self._text("tenant_id"):
                options["workload_identity_tenant_id"] = self._text("tenant_id")
            return DefaultAzureCredential(**options)
        except Exception as exc:
            raise self._error(exc, None, "setting up the credential for") from None

    def _api_version(self) -> str:
        return str(self._client().api_version)

    def _bearer_token(self, name: str) -> str:
        """A token for Azure Storage with at least a few minutes left, renewed by one
        thread at a time."""
        with self._token_lock:
            token = self._token
            if token is None or token.expires_on - time.time() < _TOKEN_MARGIN_SECONDS:
                with self._lock:
                    credential = self._credential_locked()
                try:
                    token = credential.get_token(STORAGE_SCOPE)
                except Exception as exc:
                    raise self._error(exc, name, "getting a token to read") from None
                self._token = token
            return token.token

    def _blob_sas(self, name: str) -> str:
        """A read-only SAS for one blob, valid for an hour, signed with the account key."""
        from azure.storage.blob import BlobSasPermissions, generate_blob_sas

        access = self._access
        try:
            return generate_blob_sas(
                account_name=access.account_name or "",
                container_name=access.container,
                blob_name=name,
                account_key=access.account_key,
                permission=BlobSasPermissions(read=True),
                expiry=datetime.now(UTC) + timedelta(seconds=_SAS_SECONDS),
            )
        except Exception as exc:
            raise self._error(exc, name, "signing a read of") from None
