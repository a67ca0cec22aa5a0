"""Models served over plain HTTP(S): storage types ``http`` and ``https``.

HTTP has no listing: a model is the one file at ``url`` + path. The controller maps any
non-Azure ``http(s)://`` storage URI to ``type=http``, ``url`` = scheme + host and path =
the URL's path (with its query string, if any).

Storage config fields:

``url``
    ``http(s)://host[:port][/base/path][?query]``. A model path is appended to the base
    path; its query string is appended to the url's. ``user:password@`` in the url
    becomes a Basic ``Authorization`` header (unless ``headers`` has one).
``headers``
    A map of header name to a string or a list of strings (or that map as a JSON
    string). Upstream builds a Go ``http.Header`` from it, which sends a list as
    repeated header lines; we send it as one line with the values joined by ``", "``,
    which HTTP defines as the same field (RFC 9110, section 5.3), or by ``"; "`` for
    ``Cookie`` (RFC 6265, section 5.4). ``Host`` and ``Range`` are ignored, as Go
    ignores ``Host``: the URL and the engine set them.
``certificate``
    A PEM CA bundle, inline: when given, the only trust anchors for this store.
``client_certificate``, ``client_key``
    PEM, inline, both or neither: the client certificate for mutual TLS. ``ssl`` loads
    a key only from a file, so both are written to one file under
    ``ROOT_MODEL_DIR/_certs/`` (folder 0700, file 0600, its name starting with their
    sha256), loaded once into the TLS context, and the file removed at once. An
    encrypted key is refused (``ssl`` would prompt for its password).

The model path is percent-encoded where it has to be (spaces, non-ASCII), keeping any
``%XX`` escapes it already has, so a decoded path (what Go's ``url.URL.Path`` gives) and
an encoded one reach the same URL; a literal ``?`` or ``#`` in a name must be written
``%3F``/``%23``. ``.`` and ``..`` segments are refused (``UnsafePath``).

``plan`` asks ``HEAD`` for the size (``Content-Length``), the version (``ETag``, else
``Last-Modified``) and whether ranges are honoured (``Accept-Ranges``). When ``HEAD``
is refused (403, 405, 501, any 4xx but 401/404/410), says nothing about ranges, or gives
no size, a ``GET`` with ``Range: bytes=0-0`` decides: a 206 gives the size (from
``Content-Range``) and ranges; a 200 means no ranges, and its ``Content-Length`` the
size. A server that gives no size at all (a chunked answer) is read once through while
``plan`` counts and hashes the bytes: the size and a sha256 are then known (the sha256
is the version when the server gives none), the bytes are fetched again by the engine
and checked against both. This costs one extra transfer, only for such servers, and
keeps the contract (a plan's sizes are known) without spooling anything to disk.

A server that honours ranges is read in parallel ranges (the engine splits large
blobs). One that does not is read with plain ``GET``s of the whole object: a part that
starts past 0 (or a retry resuming mid-object) reads and drops the bytes before it.

Redirects (301, 302, 303, 307, 308) are followed up to :data:`MAX_REDIRECTS` times;
one from ``https`` to ``http`` is refused; the configured headers go only to the host
of the original url (all of them: any may carry a credential). ``plan`` resolves the
chain once; a range that later meets a redirect or an auth error at a redirected-to
URL (e.g. an expired signed URL) resolves it again, once.

Every HTTP status and connection failure is translated here (:func:`status_error`;
connection failures through :mod:`puller.storage.ranged_http`). Header values and
query strings are secrets: messages name the URL without its query string, and a
``Blob.name`` carries a short hash of the query, never the query itself.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import tempfile
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
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
    UnsafePath,
)
from puller.storage.base import Blob, ByteStream, Plan, Storage
from puller.storage.ranged_http import ERROR_BODY_LIMIT, Origin, RangedHttp, without_query

if TYPE_CHECKING:
    from adapter.settings import Settings
    from puller.config import StorageConfig

#: redirects followed for one request (Go's http.Client stops after 10 as well)
MAX_REDIRECTS = 10
#: planned objects remembered for open_range (oldest forgotten first)
_MAX_TARGETS = 4096
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: HEAD answers after which a GET may still succeed (HEAD refused or not signed for)
_HEAD_REFUSED = frozenset({400, 403, 405, 406, 409, 412, 501})
_BUFFER_BYTES = 128 * 1024
_BACKOFF_BASE_SECONDS = 0.1
_BACKOFF_CAP_SECONDS = 2.0
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_BAD_VALUE_CHARS = re.compile(r"[\r\n\x00]")
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: characters a URL path may carry as they are (RFC 3986 pchar, '/' and '%')
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
#: headers the URL and the engine own
_IGNORED_HEADERS = frozenset({"host", "range"})


# --- errors -----------------------------------------------------------------------------


class _Redirected(StorageUnavailable):
    """A ranged read met a redirect: the URL planned no longer serves the object."""


def status_error(status: int, where: str) -> SidecarError:
    """Our error for a non-2xx answer. ``where`` names the URL without its query string;
    the answer's body is never quoted (it may echo a credential)."""
    if status in (404, 410):
        return StorageNotFound(f"nothing found at {where} (HTTP {status})")
    if status == 401:
        return StorageUnauthenticated(
            f"{where} asks for authentication (HTTP 401): check the headers of the storage config"
        )
    if status == 407:
        return StorageUnauthenticated(f"the proxy asks for authentication for {where} (HTTP 407)")
    if status == 403:
        return StoragePermissionDenied(f"access to {where} is denied (HTTP 403)")
    if status in _REDIRECTS:
        return _Redirected(f"{where} now redirects elsewhere (HTTP {status})")
    if status == 416:
        return IntegrityError(f"{where} is shorter than when it was planned (HTTP 416)")
    if status in (408, 429) or status >= 500:
        return StorageUnavailable(f"{where} is unavailable (HTTP {status})")
    return StorageError(f"{where} answered HTTP {status}")


# --- configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Base:
    """The configured url, split: no user info, no query in ``public``."""

    scheme: str
    netloc: str
    hostname: str
    path: str
    query: str
    authorization: str | None

    @property
    def public(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.path.rstrip('/')}"


def _parse_url(raw: Any) -> _Base:
    url = str(raw or "").strip()
    if not url:
        raise StorageConfigError("http storage config has no url")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise StorageConfigError(
            f"http storage config: url must look like https://host[:port][/path], got "
            f"{without_query(url) if parts.hostname else 'a value without scheme or host'}"
        )
    try:
        port = parts.port
    except ValueError:
        raise StorageConfigError("http storage config: the url has an invalid port") from None
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    authorization = None
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return _Base(scheme, netloc, host.lower(), _encode_path(parts.path), parts.query, authorization)


def parse_headers(raw: Any) -> dict[str, str]:
    """The configured headers as one value per name (see the module docstring).
    Raises ``StorageConfigError`` naming the header, never its value."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise StorageConfigError(
                "http storage config: 'headers' is a string but not a JSON map"
            ) from None
    if not isinstance(raw, Mapping):
        raise StorageConfigError(
            "http storage config: 'headers' must be a map of strings or lists of strings"
        )
    values: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not _TOKEN.match(name):
            shown = name[:64] if isinstance(name, str) else type(name).__name__
            raise StorageConfigError(f"http storage config: {shown!r} is not a valid header name")
        if isinstance(value, str):
            items = [value]
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            items = list(value)
        else:
            raise StorageConfigError(
                f"http storage config: header {name!r} must be a string or a list of strings"
            )
        if any(_BAD_VALUE_CHARS.search(v) for v in items):
            raise StorageConfigError(
                f"http storage config: header {name!r} has a line break or NUL in its value"
            )
        key = name.lower()
        if key in _IGNORED_HEADERS:
            continue
        names.setdefault(key, name)
        values.setdefault(key, []).extend(v.strip() for v in items)
    return {
        names[key]: ("; " if key == "cookie" else ", ").join(items) for key, items in values.items() if items
    }


def _encode_path(path: str) -> str:
    """``path`` with what a URL cannot carry percent-encoded; ``%XX`` escapes kept."""
    return urllib.parse.quote(_LONE_PERCENT.sub("%25", path), safe=_PATH_SAFE)


def _join(base: str, path: str) -> str:
    """The base path and a model path, with exactly one ``/`` between them."""
    if not path:
        return base or "/"
    return f"{base.rstrip('/')}/{path.lstrip('/')}"


def _check_segments(path: str) -> None:
    for segment in path.split("/"):
        if urllib.parse.unquote(segment) in (".", ".."):
            raise UnsafePath(f"http model path '{path}' has a '{urllib.parse.unquote(segment)}' segment")


# --- planned objects --------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """Where a planned object's bytes are read: the url asked for, the url the redirects
    led to (with the headers that may go there), and whether ranges are honoured."""

    url: str
    final_url: str
    headers: Mapping[str, str]
    ranges: bool
    redirected: bool


@dataclass(frozen=True)
class _Probe:
    size: int
    ranges: bool
    version: str | None
    sha256: str | None
    final_url: str
    headers: Mapping[str, str]
    redirected: bool


@dataclass(frozen=True)
class _Answer:
    """An open response at the end of a redirect chain."""

    origin: Origin
    conn: http.client.HTTPConnection
    resp: http.client.HTTPResponse
    url: str
    headers: Mapping[str, str]
    redirected: bool


def _version(resp: http.client.HTTPResponse) -> str | None:
    return resp.getheader("ETag") or resp.getheader("Last-Modified") or None


def _length(resp: http.client.HTTPResponse) -> int | None:
    value = (resp.getheader("Content-Length") or "").strip()
    return int(value) if value.isdigit() else None


# --- the backend ------------------------------------------------------------------------


class HTTPStorage(Storage):
    """Files behind an HTTP(S) url. Thread-safe; one keep-alive connection per worker
    thread and origin (through :class:`~puller.storage.ranged_http.RangedHttp`)."""

    types: ClassVar[tuple[str, ...]] = ("http", "https")

    def __init__(self, config: StorageConfig, settings: Settings) -> None:
        """Raises ``StorageConfigError`` for a missing or malformed url, bad headers,
        half a client key pair, or a client certificate or key that does not load."""
        super().__init__(config, settings)
        self._base = _parse_url(config.get("url"))
        headers = parse_headers(config.get("headers"))
        if self._base.authorization and not any(k.lower() == "authorization" for k in headers):
            headers["Authorization"] = self._base.authorization
        self._headers: Mapping[str, str] = headers
        ca = str(config.get("certificate") or "").strip()
        cert = str(config.get("client_certificate") or "").strip()
        key = str(config.get("client_key") or "").strip()
        if bool(cert) != bool(key):
            missing = "client_key" if cert else "client_certificate"
            raise StorageConfigError(
                f"http storage config: {missing} is missing "
                "(mutual TLS needs both client_certificate and client_key)"
            )
        if "ENCRYPTED" in key:
            raise StorageConfigError("http storage config: client_key is encrypted; give it unencrypted")
        self._lock = threading.Lock()
        self._targets: OrderedDict[str, _Target] = OrderedDict()
        if cert:
            self._ranged = self._with_client_certificate(ca, cert, key)
        else:
            self._ranged = RangedHttp(settings, "http", cadata=ca or None)

    def _with_client_certificate(self, ca: str, cert: str, key: str) -> RangedHttp:
        """A RangedHttp whose TLS context holds the client key pair. The pair is written
        under ``ROOT_MODEL_DIR/_certs`` (0600, named by its hash) only while the context
        loads it."""
        pem = f"{cert}\n{key}\n"
        folder = Path(self.settings.root_model_dir) / "_certs"
        digest = hashlib.sha256(pem.encode()).hexdigest()
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"{digest}.", suffix=".pem", dir=folder)
        except OSError as exc:
            raise StorageError(
                f"cannot write the client certificate under {folder}: {exc.strerror}"
            ) from None
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(pem)
            ranged = RangedHttp(self.settings, "http", cadata=ca or None, client_cert=(name, name))
            ranged.ssl_context()  # loads the pair now, so the file can go
            return ranged
        finally:
            Path(name).unlink(missing_ok=True)

    # --- contract ---------------------------------------------------------------------

    def identity(self) -> str:
        return f"http:{self._base.public}"

    def plan(self, path: str) -> Plan:
        """One blob: the file at url + ``path``, with its size, version (ETag or
        Last-Modified) and, when the server gave no size, its sha256. Raises
        ``StorageNotFound`` (404, 410), ``StorageUnauthenticated`` (401),
        ``StoragePermissionDenied`` (403), ``StorageUnavailable`` (5xx, 408, 429, no
        connection: after ``pull_retries`` attempts), ``UnsafePath`` for a ``..``
        segment, ``StorageError`` otherwise."""
        url, name = self._url_for(path)
        attempts = self.settings.pull_retries
        for attempt in range(attempts):
            try:
                probe = self._probe(url, name)
                break
            except StorageUnavailable:
                if attempt + 1 >= attempts:
                    raise
                time.sleep(min(_BACKOFF_CAP_SECONDS, _BACKOFF_BASE_SECONDS * 2**attempt))
        target = _Target(url, probe.final_url, probe.headers, probe.ranges, probe.redirected)
        with self._lock:
            self._targets[name] = target
            self._targets.move_to_end(name)
            while len(self._targets) > _MAX_TARGETS:
                self._targets.popitem(last=False)
        relpath = self.object_path(path).rstrip("/").rsplit("/", 1)[-1] or "_model"
        blob = Blob(
            name=name,
            relpath=relpath,
            size=probe.size,
            version=probe.version or (f"sha256:{probe.sha256}" if probe.sha256 else None),
            checksums={"sha256": probe.sha256} if probe.sha256 else {},
            ranged=probe.ranges,
        )
        return Plan(blobs=(blob,), single_object=True)

    def open_range(self, blob: Blob, start: int, end: int) -> ByteStream:
        """Bytes ``[start, end)`` of a planned blob: a ranged GET when the server honours
        ranges, else a whole GET that drops the bytes before ``start``. A redirect met
        here (or an auth error at a redirected-to URL) resolves the url again, once."""
        with self._lock:
            target = self._targets.get(blob.name)
        if target is None:
            raise StorageError(f"{blob.name} was not planned by this storage (or planned too long ago)")
        try:
            return self._open(target, blob, start, end)
        except (_Redirected, StorageNotFound, StoragePermissionDenied, StorageUnauthenticated) as exc:
            if not (target.redirected or isinstance(exc, _Redirected)):
                raise
        target = self._refresh(target, blob)
        return self._open(target, blob, start, end)

    def close(self) -> None:
        self._ranged.close()

    def object_path(self, path: str) -> str:
        """``path`` as the name of the object, for naming its local copy: without the
        query string and fragment, ``%XX`` escapes decoded (``dir/a%20b.bin?sig=...``
        gives ``dir/a b.bin``)."""
        return urllib.parse.unquote(path.partition("?")[0].partition("#")[0])

    # --- urls -------------------------------------------------------------------------

    def _url_for(self, path: str) -> tuple[str, str]:
        """The full url of a model path (secret: it has the query) and the blob name
        (public: the query replaced by a short hash of it)."""
        raw, _, query = path.partition("?")
        query = query.partition("#")[0]
        raw = _encode_path(raw.partition("#")[0])
        _check_segments(raw)
        full_path = _join(self._base.path, raw)
        query = "&".join(q for q in (self._base.query, query) if q)
        url = f"{self._base.scheme}://{self._base.netloc}{full_path}"
        name = url
        if query:
            url = f"{url}?{query}"
            name = f"{name} (query {hashlib.sha256(query.encode()).hexdigest()[:8]})"
        return url, name

    def _headers_for(self, url: str) -> Mapping[str, str]:
        """The configured headers when ``url`` is on the configured host, else none."""
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
        return self._headers if host == self._base.hostname else {}

    # --- requests ---------------------------------------------------------------------

    def _request(self, method: str, url: str, extra: Mapping[str, str] | None = None) -> _Answer:
        """Send ``method`` to ``url``, following redirects; the answer is not a 3xx."""
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            headers = self._headers_for(current)
            origin, conn, resp = self._ranged.request(
                method, current, headers={**headers, **(extra or {})}, where=without_query(current)
            )
            if resp.status not in _REDIRECTS:
                return _Answer(origin, conn, resp, current, headers, current != url)
            location = resp.getheader("Location")
            self._discard(origin, conn, resp)
            if not location:
                raise StorageError(
                    f"{without_query(current)} redirects (HTTP {resp.status}) without a Location"
                )
            following = urllib.parse.urljoin(current, location.strip())
            scheme = urllib.parse.urlsplit(following).scheme.lower()
            if scheme not in ("http", "https"):
                raise StorageError(f"{without_query(current)} redirects to a URL that is not http(s)")
            if current.startswith("https:") and scheme == "http":
                raise StorageError(
                    f"{without_query(current)} redirects from https to http "
                    f"({without_query(following)}): refused"
                )
            current = following
        raise StorageError(f"{without_query(url)} redirects more than {MAX_REDIRECTS} times")

    def _discard(
        self, origin: Origin, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse
    ) -> None:
        """Finish with a response whose body is not wanted: read a small body so the
        connection can serve again, else close it."""
        with contextlib.suppress(OSError, http.client.HTTPException):
            resp.read(ERROR_BODY_LIMIT)
        if not resp.isclosed():
            self._ranged.drop(origin, conn)

    # --- plan -------------------------------------------------------------------------

    def _probe(self, url: str, name: str) -> _Probe:
        """Size, ranges and version of the object at ``url`` (see the module docstring)."""
        where = name
        answer = self._request("HEAD", url)
        resp = answer.resp
        self._discard(answer.origin, answer.conn, resp)
        size: int | None = None
        ranges: bool | None = None
        version: str | None = None
        if 200 <= resp.status < 300:
            size = _length(resp)
            accept = (resp.getheader("Accept-Ranges") or "").strip().lower()
            ranges = True if accept == "bytes" else False if accept == "none" else None
            version = _version(resp)
            if size is not None and (ranges is not None or size == 0):
                return _Probe(
                    size, bool(ranges), version, None, answer.url, answer.headers, answer.redirected
                )
        elif resp.status not in _HEAD_REFUSED:
            raise status_error(resp.status, where)
        return self._probe_get(answer, name, version)

    def _probe_get(self, head: _Answer, name: str, version: str | None) -> _Probe:
        """A ``GET`` of byte 0 decides what ``HEAD`` left open."""
        answer = self._request("GET", head.url, {"Range": "bytes=0-0"})
        resp = answer.resp
        redirected = head.redirected or answer.redirected
        version = version or _version(resp)
        if resp.status == 206:
            found = _CONTENT_RANGE.match(resp.getheader("Content-Range") or "")
            self._discard(answer.origin, answer.conn, resp)
            if found is None or found.group(1) != "0" or found.group(3) == "*":
                raise StorageError(f"{name} answered a range with an unusable Content-Range")
            return _Probe(int(found.group(3)), True, version, None, answer.url, answer.headers, redirected)
        if resp.status == 416:
            found = _CONTENT_RANGE.match(resp.getheader("Content-Range") or "")
            self._discard(answer.origin, answer.conn, resp)
            if found is None or found.group(3) != "0":
                raise StorageError(f"{name} refused the first byte (HTTP 416) without saying it is empty")
            return _Probe(0, True, version, None, answer.url, answer.headers, redirected)
        if resp.status != 200:
            self._discard(answer.origin, answer.conn, resp)
            raise status_error(resp.status, name)
        size = _length(resp)
        if size is not None:
            self._ranged.drop(answer.origin, answer.conn)  # the whole body follows: not read
            return _Probe(size, False, version, None, answer.url, answer.headers, redirected)
        size, sha256 = self._count(answer, name)
        return _Probe(size, False, version, sha256, answer.url, answer.headers, redirected)

    def _count(self, answer: _Answer, name: str) -> tuple[int, str]:
        """Read a body of unknown length through: its size and sha256."""
        digest = hashlib.sha256()
        view = memoryview(bytearray(_BUFFER_BYTES))
        size = 0
        try:
            while count := answer.resp.readinto(view):
                digest.update(view[:count])
                size += count
        except (OSError, http.client.HTTPException) as exc:
            self._ranged.drop(answer.origin, answer.conn)
            raise StorageUnavailable(
                f"the connection failed while reading {name} to learn its size ({type(exc).__name__})"
            ) from None
        if not answer.resp.isclosed():
            self._ranged.drop(answer.origin, answer.conn)
        return size, digest.hexdigest()

    def _refresh(self, target: _Target, blob: Blob) -> _Target:
        """Resolve ``target.url`` again; the object must be the one planned."""
        probe = self._probe(target.url, blob.name)
        if probe.size != blob.size or (blob.version and probe.version and probe.version != blob.version):
            raise IntegrityError(f"{blob.name} changed since it was planned")
        fresh = replace(
            target,
            final_url=probe.final_url,
            headers=probe.headers,
            ranges=probe.ranges,
            redirected=probe.redirected,
        )
        with self._lock:
            if blob.name in self._targets:
                self._targets[blob.name] = fresh
        return fresh

    # --- bytes ------------------------------------------------------------------------

    def _open(self, target: _Target, blob: Blob, start: int, end: int) -> ByteStream:
        if target.ranges:
            return self._ranged.get_range(
                target.final_url,
                blob,
                start,
                end,
                headers=target.headers,
                where=blob.name,
                error_for_status=lambda status, _body: status_error(status, blob.name),
            )
        origin, conn, resp = self._ranged.request(
            "GET", target.final_url, headers=target.headers, where=blob.name
        )
        if resp.status != 200:
            self._discard(origin, conn, resp)
            raise status_error(resp.status, blob.name)
        length = _length(resp)
        if length is not None and length != blob.size:
            self._ranged.drop(origin, conn)
            raise IntegrityError(f"{blob.name} has {length} bytes now, {blob.size} when it was planned")
        return _WholeBodyStream(
            self._ranged, origin, conn, resp, blob=blob, start=start, end=end, checked=length is not None
        )


class _WholeBodyStream:
    """Bytes ``[start, end)`` out of a whole-object body: the bytes before ``start`` are
    read into the caller's buffer and dropped. When the body has no Content-Length and
    ``end`` is its planned size, the body must end there."""

    def __init__(
        self,
        ranged: RangedHttp,
        origin: Origin,
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
        *,
        blob: Blob,
        start: int,
        end: int,
        checked: bool,
    ) -> None:
        self._ranged = ranged
        self._origin = origin
        self._conn = conn
        self._resp = resp
        self._name = blob.name
        self._skip = start
        self._remaining = end - start
        self._must_end = end == blob.size and not checked

    def _read(self, buffer: memoryview) -> int:
        try:
            count = self._resp.readinto(buffer)
        except (OSError, http.client.HTTPException) as exc:
            self._ranged.drop(self._origin, self._conn)
            raise StorageUnavailable(
                f"connection failed while reading {self._name} ({type(exc).__name__})"
            ) from None
        if not count:
            self._ranged.drop(self._origin, self._conn)
            raise StorageUnavailable(f"the server closed the connection before the end of {self._name}")
        return count

    def readinto(self, buffer: memoryview) -> int:
        if self._remaining <= 0 or not len(buffer):
            return 0
        while self._skip > 0:
            self._skip -= self._read(buffer[: min(len(buffer), self._skip)])
        count = self._read(buffer[: min(len(buffer), self._remaining)])
        self._remaining -= count
        if self._remaining == 0 and self._must_end:
            try:
                extra = self._resp.read(1)
            except (OSError, http.client.HTTPException):
                self._ranged.drop(self._origin, self._conn)
                raise StorageUnavailable(f"connection failed at the end of {self._name}") from None
            if extra:
                self._ranged.drop(self._origin, self._conn)
                raise IntegrityError(f"{self._name} is longer than when it was planned")
        return count

    def close(self) -> None:
        if self._remaining > 0 or not self._resp.isclosed():
            self._ranged.drop(self._origin, self._conn)
