"""The lean byte path every HTTP-speaking backend shares.

The SDKs (boto3, google-cloud-storage, azure-storage-blob) own credentials, listing and
signing; the bytes travel here: a ranged ``GET`` over one keep-alive ``http.client``
connection per worker thread and origin, read with ``readinto`` straight into the
engine's reused buffer (no ``bytes`` object per chunk).

Checks on every answer: 206, or 200 with a ``Content-Range`` (rclone answers so), or a
plain 200 only when the whole object was asked; the range start and end, the object's
total size and ``Content-Length`` must match what was asked. A connection that fails or
ends early is a :class:`StorageUnavailable` (the engine retries it); a keep-alive
connection the server closed while idle is replaced once, silently (a timeout is not
taken for that: it is the engine's to retry). Inside a pull's
:func:`puller.cancel.watching` block, every connection is watched while it waits, so
that cancelling the pull ends the wait at once.

Proxies come from the settings (``HTTP_PROXY``, ``HTTPS_PROXY``, ``NO_PROXY``): HTTPS
goes through a ``CONNECT`` tunnel, plain HTTP is sent to the proxy with the absolute
URL. Messages never carry a URL's query string (it holds signatures and tokens).
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import re
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapter.errors import (
    IntegrityError,
    SidecarError,
    StorageConfigError,
    StorageError,
    StorageUnavailable,
)
from puller.cancel import watch

if TYPE_CHECKING:
    from adapter.settings import Settings
    from puller.storage.base import Blob

#: how much of an error body is read, for the backend's error mapping
ERROR_BODY_LIMIT = 64 * 1024
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")

Origin = tuple[str, str, int]
ErrorForStatus = Callable[[int, bytes], SidecarError]


def without_query(url: str) -> str:
    """``url`` with no query string, fragment or user info: safe for a message."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    # the port as written: an out-of-range one must not turn a message into a crash
    port = parts.netloc.rpartition("@")[2].rpartition("]")[2].partition(":")[2]
    if port:
        host = f"{host}:{port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass(frozen=True)
class Proxy:
    """A proxy origin and its ``Proxy-Authorization`` value, if it has credentials."""

    host: str
    port: int
    authorization: str | None


def _parse_proxy(value: str) -> Proxy | None:
    value = value.strip()
    if not value:
        return None
    if "://" not in value:
        value = "http://" + value
    parts = urllib.parse.urlsplit(value)
    if not parts.hostname:
        raise StorageConfigError("the proxy setting names no host")
    auth = None
    if parts.username is not None:
        raw = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(raw.encode()).decode("ascii")
    return Proxy(parts.hostname, parts.port or 80, auth)


def bypasses_proxy(host: str, no_proxy: str) -> bool:
    """True when ``host`` matches an entry of NO_PROXY (names, ``.suffix``, ``*``,
    IP addresses and CIDR ranges)."""
    host = host.lower().strip("[]")
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            network = None
        if network is not None:
            try:
                if ipaddress.ip_address(host) in network:
                    return True
            except ValueError:
                pass
            continue
        entry = entry.split(":", 1)[0].lstrip(".")
        if host == entry or host.endswith("." + entry):
            return True
    return False


class _ThreadConnections(threading.local):
    def __init__(self) -> None:
        self.by_origin: dict[Origin, http.client.HTTPConnection] = {}


class RangeStream:
    """The body of one ranged GET (a :class:`~puller.storage.base.ByteStream`).

    Reading past the range is impossible (http.client stops at Content-Length). A
    connection that ends before the range does raises :class:`StorageUnavailable`. On
    close a fully read connection stays open for the next range; a half-read one is
    closed.
    """

    def __init__(
        self,
        owner: RangedHttp,
        origin: Origin,
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
        *,
        length: int,
        where: str,
    ) -> None:
        self._owner = owner
        self._origin = origin
        self._conn = conn
        self._resp = resp
        self._remaining = length
        self._where = where

    def readinto(self, buffer: memoryview) -> int:
        if self._remaining <= 0 or not len(buffer):
            return 0
        try:
            count = self._resp.readinto(buffer)
        except (OSError, http.client.HTTPException) as exc:
            self._owner.drop(self._origin, self._conn)
            raise StorageUnavailable(
                f"connection failed while reading {self._where} ({type(exc).__name__})"
            ) from None
        if not count:
            self._owner.drop(self._origin, self._conn)
            raise StorageUnavailable(
                f"the server closed the connection with {self._remaining} bytes of {self._where} unread"
            )
        self._remaining -= count
        return count

    def close(self) -> None:
        if self._remaining > 0 or not self._resp.isclosed():
            self._owner.drop(self._origin, self._conn)


class RangedHttp:
    """Ranged GETs over per-thread keep-alive connections. Thread-safe."""

    def __init__(
        self,
        settings: Settings,
        label: str,
        *,
        cadata: str | None = None,
        cafile: str | None = None,
        client_cert: tuple[str, str] | None = None,
    ) -> None:
        """``label`` names the store in messages (``"s3"``, ``"gcs"``...). ``cadata``
        (inline PEM) or ``cafile``, when given, are the only trust anchors;
        ``client_cert`` is ``(certfile, keyfile)`` for mutual TLS."""
        self.settings = settings
        self.label = label
        self._cadata = cadata
        self._cafile = cafile
        self._client_cert = client_cert
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self._local = _ThreadConnections()
        self._all: set[http.client.HTTPConnection] = set()
        self._http_proxy = _parse_proxy(settings.http_proxy)
        self._https_proxy = _parse_proxy(settings.https_proxy)

    # --- TLS and connections ------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context of this store (built once)."""
        with self._lock:
            if self._context is None:
                try:
                    if self._cadata or self._cafile:
                        context = ssl.create_default_context(cadata=self._cadata or None, cafile=self._cafile)
                    else:
                        context = ssl.create_default_context()
                except (ssl.SSLError, OSError, ValueError):
                    raise StorageConfigError(
                        f"{self.label} storage config: the CA certificate is not a valid PEM bundle"
                    ) from None
                if self._client_cert is not None:
                    try:
                        # an encrypted key must fail here, not prompt for a password
                        context.load_cert_chain(*self._client_cert, password=lambda: b"")
                    except (ssl.SSLError, OSError):
                        raise StorageConfigError(
                            f"{self.label} storage config: the client certificate or key is not valid PEM"
                        ) from None
                self._context = context
            return self._context

    def _proxy_for(self, scheme: str, host: str) -> Proxy | None:
        proxy = self._https_proxy if scheme == "https" else self._http_proxy
        if proxy is None or bypasses_proxy(host, self.settings.no_proxy):
            return None
        return proxy

    def _connection(self, origin: Origin) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection to ``origin`` and whether it served a request."""
        conn = self._local.by_origin.get(origin)
        if conn is not None:
            return conn, True
        scheme, host, port = origin
        timeout = self.settings.pull_timeout_seconds
        proxy = self._proxy_for(scheme, host)
        if scheme == "https":
            if proxy is not None:
                conn = http.client.HTTPSConnection(
                    proxy.host, proxy.port, timeout=timeout, context=self.ssl_context()
                )
                headers = {"Proxy-Authorization": proxy.authorization} if proxy.authorization else None
                conn.set_tunnel(host, port, headers=headers)
            else:
                conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=self.ssl_context())
        elif proxy is not None:
            conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=timeout)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self._local.by_origin[origin] = conn
        with self._lock:
            self._all.add(conn)
        return conn, False

    def drop(self, origin: Origin, conn: http.client.HTTPConnection) -> None:
        """Close ``conn`` and forget it (its state is unknown)."""
        conn.close()
        if self._local.by_origin.get(origin) is conn:
            del self._local.by_origin[origin]
        with self._lock:
            self._all.discard(conn)

    def close(self) -> None:
        with self._lock:
            connections = list(self._all)
            self._all.clear()
        for conn in connections:
            conn.close()

    # --- requests -----------------------------------------------------------------------

    def _target(self, parts: urllib.parse.SplitResult, origin: Origin) -> str:
        """The request target: the path, or the absolute URL through a plain-HTTP proxy."""
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        scheme, host, _ = origin
        if scheme == "http" and self._proxy_for(scheme, host) is not None:
            return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/", parts.query, ""))
        return path

    def request(
        self, method: str, url: str, *, headers: Mapping[str, str] | None = None, where: str
    ) -> tuple[Origin, http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request on this thread's connection (replacing a stale keep-alive
        connection once). The caller reads or closes the response; on any error the
        connection is dropped."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StorageConfigError(f"{self.label}: not an http(s) URL: {without_query(url)}")
        origin: Origin = (
            parts.scheme,
            parts.hostname,
            parts.port or (443 if parts.scheme == "https" else 80),
        )
        target = self._target(parts, origin)
        sent_headers = dict(headers or {})
        conn, reused = self._connection(origin)
        try:
            return origin, conn, self._send(conn, method, target, sent_headers)
        except (OSError, http.client.HTTPException) as exc:
            self.drop(origin, conn)
            # a timeout is a store that stopped answering, not a stale connection: it
            # is the caller's to retry (with backoff, counted against its attempts)
            if not reused or isinstance(exc, ssl.SSLError | TimeoutError):
                raise self._connection_error(exc, where) from None
        # the server may have closed an idle keep-alive connection: one fresh try
        conn, _ = self._connection(origin)
        try:
            return origin, conn, self._send(conn, method, target, sent_headers)
        except (OSError, http.client.HTTPException) as exc:
            self.drop(origin, conn)
            raise self._connection_error(exc, where) from None

    @staticmethod
    def _send(
        conn: http.client.HTTPConnection, method: str, target: str, headers: Mapping[str, str]
    ) -> http.client.HTTPResponse:
        """Connect when needed, put the socket under the current pull's cancel (see
        :mod:`puller.cancel`: a cancel then ends the wait at once), send the request
        and wait for the answer's headers."""
        if conn.sock is None:
            conn.connect()
        watch(conn)
        conn.request(method, target, headers=headers)
        return conn.getresponse()

    def _connection_error(self, exc: BaseException, where: str) -> SidecarError:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return StorageError(
                f"TLS failure talking to {self.label} for {where} "
                f"({type(exc).__name__}; check the certificate)"
            )
        return StorageUnavailable(f"cannot reach {self.label} for {where} ({type(exc).__name__})")

    def get_range(
        self,
        url: str,
        blob: Blob,
        start: int,
        end: int,
        *,
        headers: Mapping[str, str] | None = None,
        where: str,
        error_for_status: ErrorForStatus,
    ) -> RangeStream:
        """GET bytes ``[start, end)`` of ``blob`` at ``url``. ``where`` names the object
        in messages (no secrets); ``error_for_status(status, body_head)`` maps a non-2xx
        answer to our error type."""
        sent = dict(headers or {})
        whole = start == 0 and end == blob.size
        if not (whole and blob.size == 0):
            sent["Range"] = f"bytes={start}-{end - 1}"
        origin, conn, resp = self.request("GET", url, headers=sent, where=where)
        try:
            self._check(resp, blob, (start, end), where=where, error_for_status=error_for_status)
        except BaseException:
            self.drop(origin, conn)
            raise
        return RangeStream(self, origin, conn, resp, length=end - start, where=where)

    def _check(
        self,
        resp: http.client.HTTPResponse,
        blob: Blob,
        span: tuple[int, int],
        *,
        where: str,
        error_for_status: ErrorForStatus,
    ) -> None:
        start, end = span
        status = resp.status
        if status not in (200, 206):
            try:
                body = resp.read(ERROR_BODY_LIMIT)
            except (OSError, http.client.HTTPException):
                body = b""
            raise error_for_status(status, body)
        content_range = resp.getheader("Content-Range")
        if content_range:
            found = _CONTENT_RANGE.match(content_range)
            if found is None:
                raise StorageUnavailable(f"{self.label} sent an unreadable Content-Range for {where}")
            first, last, total = int(found.group(1)), int(found.group(2)), found.group(3)
            if total != "*" and int(total) != blob.size:
                raise IntegrityError(
                    f"{where} has {total} bytes now, {blob.size} when it was listed (it changed)"
                )
            if first != start or last != end - 1:
                raise StorageUnavailable(
                    f"{self.label} sent bytes {first}-{last} of {where}, bytes {start}-{end - 1} were asked"
                )
        elif status == 206:
            raise StorageUnavailable(f"{self.label} sent a partial answer without Content-Range for {where}")
        elif start != 0 or end != blob.size:
            raise StorageError(f"{self.label} ignored the byte range asked for {where}")
        length = resp.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) != end - start:
            raise StorageUnavailable(
                f"{self.label} announced {length} bytes for bytes {start}-{end - 1} of {where} "
                f"({end - start} asked)"
            )
