"""A client of OCI registries (the distribution v2 API): image references, credentials,
the token flow, manifests with their digests checked, and the platform choice in an
index.

Authentication
    ``GET /v2/`` tells how the registry wants to be called: 200 (anonymous), or 401 with
    a ``WWW-Authenticate`` challenge. ``Basic``: the credentials go with every request.
    ``Bearer realm=...,service=...``: a token for ``repository:<name>:pull`` is asked
    from the realm (``GET realm?service=&scope=``, with Basic credentials when there
    are any; with a docker ``identitytoken``, an OAuth2 ``POST`` with
    ``grant_type=refresh_token``) and kept per scope until shortly before its
    ``expires_in`` (60 s when not given) runs out. A 401 to a request that carried a
    token drops that token and the request is sent once more with a fresh one (the
    401's own challenge is learnt first, so a registry that answered ``/v2/`` with 200
    but protects a repository is handled too).

Credentials (:func:`credentials_for`), first found wins
    ``username`` + ``password`` fields; an inline docker config (``docker_config``:
    the JSON text, or the object); a docker config file (``docker_config_path``). In a
    docker config the entry of ``auths`` whose key names the registry (``host[:port]``,
    with or without ``https://`` and a path; Docker Hub's ``https://index.docker.io/v1/``
    for ``docker.io``) gives ``auth`` (base64 ``user:password``) or ``username`` and
    ``password``, and optionally ``identitytoken``. Credential helpers (``credsStore``,
    ``credHelpers``) run programs and are not supported: a registry named only there
    is a configuration error saying so.

Transport
    Every request goes through :class:`~puller.storage.ranged_http.RangedHttp` (TLS
    with the storage config's CA, proxies, keep-alive connections per thread), over
    HTTPS unless the registry is named insecure. Redirects are followed up to
    :data:`MAX_REDIRECTS` times; ``Authorization`` goes only to the registry's own
    origin (a blob redirected to object storage is fetched without it), and a redirect
    from https to http is refused. The one exception is the identity-token ``POST``,
    which needs a request body: it goes over its own connection (no proxy).

Integrity
    A manifest's sha256 must equal the digest it was asked by, the registry's
    ``Docker-Content-Digest`` when it sends one, and the size its index entry
    announces; otherwise :class:`~adapter.errors.IntegrityError`.

Every HTTP status is translated in :func:`registry_error`; messages name the
registry, repository and reference, never a credential, token or authorization value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import json
import platform as host_platform
import re
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapter.errors import (
    IntegrityError,
    InvalidRequest,
    SidecarError,
    StorageConfigError,
    StorageError,
    StorageNotFound,
    StoragePermissionDenied,
    StorageUnauthenticated,
    StorageUnavailable,
    UnsafePath,
)
from puller.storage.ranged_http import ERROR_BODY_LIMIT, Origin, without_query

if TYPE_CHECKING:
    from puller.storage.ranged_http import RangedHttp

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
#: the Accept header of a manifest request: what we can read, images first
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST))

#: manifests larger than this are refused (the OCI distribution spec's recommended cap)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
#: redirects followed for one request
MAX_REDIRECTS = 10
#: index levels resolved above an image manifest (an index of indexes is one more)
MAX_INDEX_DEPTH = 2
#: a docker config file larger than this is refused
MAX_DOCKER_CONFIG_BYTES = 1024 * 1024
#: token lifetime when the token service does not say (distribution's token spec)
DEFAULT_TOKEN_SECONDS = 60
_TOKEN_MARGIN_SECONDS = 30.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NOT_FOUND_CODES = frozenset({"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"})
_DOCKER_HUB = "registry-1.docker.io"
_DOCKER_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_ANY_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[A-Za-z0-9=_-]+$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_REGISTRY = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?$")
#: one item of a WWW-Authenticate value: a scheme (a word), or name=value
_CHALLENGE_ITEM = re.compile(r'[\s,]*([A-Za-z0-9_.~+/-]+)(?:\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*))?')


class BlobMoved(StorageUnavailable):
    """A blob URL answered a redirect where bytes were expected: resolve it again."""


# --- errors -----------------------------------------------------------------------------


def error_codes(body: bytes) -> list[str]:
    """The ``errors[].code`` values of a distribution error body (empty if none)."""
    try:
        document = json.loads(body.decode("utf-8", "replace"))
    except ValueError:
        return []
    errors = document.get("errors") if isinstance(document, dict) else None
    if not isinstance(errors, list):
        return []
    codes = [e.get("code") for e in errors if isinstance(e, dict)]
    return [c for c in codes if isinstance(c, str) and re.fullmatch(r"[A-Z_]{1,64}", c)]


def registry_error(status: int, body: bytes, what: str) -> SidecarError:
    """Our error for a registry's non-2xx answer about ``what`` (a manifest or blob
    with its registry and repository). Only the registry's error codes are quoted,
    never its messages (they may echo a request)."""
    codes = error_codes(body)
    shown = f"HTTP {status}" + (f", {', '.join(codes)}" if codes else "")
    if status == 404 or _NOT_FOUND_CODES.intersection(codes):
        return StorageNotFound(f"{what} was not found ({shown})")
    if status == 401:
        return StorageUnauthenticated(f"{what}: the registry asks for authentication ({shown})")
    if status == 403 or "DENIED" in codes:
        return StoragePermissionDenied(f"{what}: access denied ({shown})")
    if status in _REDIRECTS:
        return BlobMoved(f"{what} now redirects elsewhere ({shown})")
    if status in (408, 429) or status >= 500 or "TOOMANYREQUESTS" in codes:
        return StorageUnavailable(f"{what}: the registry is unavailable ({shown})")
    if status == 416:
        return IntegrityError(f"{what} is shorter than its descriptor says ({shown})")
    return StorageError(f"{what}: the registry answered {shown}")


# --- references -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """An image reference: registry, repository, and a tag or a digest (a digest wins
    when both are given, as docker does)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def check_registry(registry: str) -> str:
    """``registry`` (``host[:port]``) lower-cased, Docker Hub's names mapped to its API
    host; ``StorageConfigError`` when it is not a host name."""
    value = registry.strip().lower()
    for prefix in ("https://", "http://"):
        value = value.removeprefix(prefix)
    value = value.rstrip("/")
    if not _REGISTRY.match(value):
        raise StorageConfigError(
            f"oci storage config: registry {_without_user_info(registry)[:100]!r} is not host[:port]"
        )
    return _DOCKER_HUB if value in _DOCKER_HUB_NAMES else value


def _without_user_info(registry: str) -> str:
    """``registry`` for a message: a ``user:password@`` part (a secret) replaced."""
    scheme, separator, rest = registry.strip().rpartition("://")
    if "@" in rest:
        rest = "<user-info>@" + rest.rpartition("@")[2]
    return f"{scheme}{separator}{rest}"


def parse_reference(path: str, registry: str | None) -> Reference:
    """The image reference of a model path: ``repo``, ``repo:tag``, ``repo@sha256:...``
    or ``repo:tag@sha256:...`` on ``registry``. Without a configured registry the path
    must start with one (``host[:port]/repo...``, the first part holding a ``.`` or a
    ``:``, or being ``localhost``). Raises ``UnsafePath`` for ``.``/``..`` parts,
    ``InvalidRequest`` for anything else malformed, naming the path."""
    text = path.strip()
    if any(part in (".", "..") for part in text.split("/")):
        raise UnsafePath(f"oci model path {text[:300]!r} has a '.' or '..' part")
    remainder, _, digest = text.partition("@")
    if registry is None:
        first, _, rest = remainder.partition("/")
        if not rest or not ("." in first or ":" in first or first == "localhost"):
            raise StorageConfigError(
                f"oci model path {text[:300]!r} names no registry and the storage config has none "
                "(set 'registry', or write the path as host[:port]/repository[:tag])"
            )
        registry, remainder = check_registry(first), rest
    name, tag = remainder, None
    last = remainder.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = remainder.rpartition(":")
    if registry == _DOCKER_HUB and "/" not in name:
        name = f"library/{name}"

    def bad(why: str) -> InvalidRequest:
        return InvalidRequest(f"oci model path {text[:300]!r} is not an image reference: {why}")

    if not name or len(name) > 255 or not _REPOSITORY.match(name):
        raise bad("the repository must be lower-case parts of [a-z0-9._-] separated by '/'")
    if tag is not None and not _TAG.match(tag):
        raise bad("a tag is up to 128 characters of [A-Za-z0-9_.-], not starting with '.' or '-'")
    if "@" in text:
        if not _DIGEST.match(digest):
            raise bad("a digest must be sha256: followed by 64 lower-case hex digits")
        return Reference(registry, name, tag, digest)
    return Reference(registry, name, tag or "latest", None)


# --- platforms --------------------------------------------------------------------------

_MACHINE_ARCH: Mapping[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv8l": ("arm", "v7"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
    "mips64": ("mips64", None),
    "loongarch64": ("loong64", None),
}


@dataclass(frozen=True)
class Platform:
    """An ``os/architecture[/variant]`` in Go's names (``linux/arm64/v8``)."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = [p.strip().lower() for p in str(text).split("/")]
        if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9_.-]+", p) for p in parts):
            raise StorageConfigError(
                f"oci storage config: platform {str(text)[:60]!r} is not os/architecture[/variant]"
            )
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None).normalized()

    @classmethod
    def of_machine(cls) -> Platform:
        """This machine's platform (``platform.machine()`` in Go's names)."""
        machine = host_platform.machine().lower()
        arch, variant = _MACHINE_ARCH.get(machine, (machine, None))
        return cls(host_platform.system().lower() or "linux", arch, variant)

    def normalized(self) -> Platform:
        arch, variant = self.architecture, self.variant or None
        if arch in ("x86_64", "x86-64"):
            arch = "amd64"
        elif arch == "aarch64":
            arch = "arm64"
        if arch == "arm64" and variant in (None, "8", "v8"):
            variant = "v8"
        elif arch == "arm" and variant in ("5", "6", "7", "8"):
            variant = f"v{variant}"
        elif arch == "arm" and variant is None:
            variant = "v7"
        elif arch == "amd64" and variant == "v1":
            variant = None
        return Platform(self.os, arch, variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def _level(variant: str | None) -> int | None:
    found = re.fullmatch(r"v([0-9]{1,2})", variant or "v1")
    return int(found.group(1)) if found else None


def _variant_rank(want: Platform, offered: Platform) -> int | None:
    """How well ``offered`` fits ``want`` (0 best), or None when it cannot run."""
    if want.variant == offered.variant:
        return 0
    if want.architecture in ("arm", "amd64"):
        # a newer CPU runs code built for an older variant (armv7 runs v6 and v5 code)
        have, needs = _level(want.variant), _level(offered.variant)
        if have is None or needs is None or needs > have:
            return None
        return have - needs
    return 1 if offered.variant is None else None


def _is_attestation(entry: Mapping[str, Any]) -> bool:
    annotations = entry.get("annotations")
    if (
        isinstance(annotations, dict)
        and annotations.get("vnd.docker.reference.type") == "attestation-manifest"
    ):
        return True
    platform = entry.get("platform")
    return isinstance(platform, dict) and "unknown" in (platform.get("os"), platform.get("architecture"))


def _entry_platform(entry: Mapping[str, Any]) -> Platform | None:
    found = entry.get("platform")
    if not isinstance(found, dict) or not found.get("os") or not found.get("architecture"):
        return None
    return Platform(
        str(found["os"]).lower(), str(found["architecture"]).lower(), str(found.get("variant") or "") or None
    ).normalized()


def choose_manifest(entries: Sequence[Mapping[str, Any]], want: Platform, what: str) -> Mapping[str, Any]:
    """The index entry for ``want``: attestations and entries that are not manifests
    or indexes are skipped; the best variant wins, the first entry among equals. An
    index whose only candidate declares no platform gives that one. Raises
    ``StorageNotFound`` listing the platforms offered."""
    candidates = [
        e
        for e in entries
        if isinstance(e, dict)
        and e.get("mediaType") in INDEX_TYPES | MANIFEST_TYPES
        and not _is_attestation(e)
    ]
    best: tuple[int, int] | None = None
    chosen: Mapping[str, Any] | None = None
    offered: list[str] = []
    for position, entry in enumerate(candidates):
        platform = _entry_platform(entry)
        offered.append(str(platform) if platform else "(no platform)")
        if platform is None or platform.os != want.os or platform.architecture != want.architecture:
            continue
        rank = _variant_rank(want, platform)
        if rank is not None and (best is None or (rank, position) < best):
            best, chosen = (rank, position), entry
    if chosen is not None:
        return chosen
    if len(candidates) == 1 and _entry_platform(candidates[0]) is None:
        return candidates[0]
    listed = ", ".join(dict.fromkeys(offered)) or "none"
    raise StorageNotFound(
        f"{what} is an index with no image for {want} (it offers: {listed}); "
        "name one with 'platform' in the storage config (e.g. linux/arm64/v8)"
    )


# --- credentials ------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """Registry credentials; ``source`` names where they came from (for messages).
    The repr hides every value."""

    username: str = field(repr=False)
    password: str = field(repr=False)
    source: str
    identity_token: str | None = field(default=None, repr=False)

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def _auth_key_host(key: str) -> str:
    """The registry a docker config ``auths`` key names."""
    value = key.strip().lower()
    for prefix in ("https://", "http://"):
        value = value.removeprefix(prefix)
    host = value.split("/", 1)[0]
    return _DOCKER_HUB if host in _DOCKER_HUB_NAMES else host


def _docker_config(value: Any, where: str) -> Mapping[str, Any]:
    if isinstance(value, (bytes, str)):
        try:
            value = json.loads(value)
        except ValueError:
            raise StorageConfigError(f"oci storage config: {where} is not JSON") from None
    if not isinstance(value, dict):
        raise StorageConfigError(f"oci storage config: {where} is not a JSON object")
    return value


def _read_docker_config(path: Any) -> Mapping[str, Any]:
    where = f"docker_config_path {str(path)[:200]!r}"
    try:
        with Path(str(path)).open("rb") as handle:
            data = handle.read(MAX_DOCKER_CONFIG_BYTES + 1)
    except OSError as exc:
        raise StorageConfigError(
            f"oci storage config: cannot read {where} ({exc.strerror or type(exc).__name__})"
        ) from None
    if len(data) > MAX_DOCKER_CONFIG_BYTES:
        raise StorageConfigError(f"oci storage config: {where} is larger than 1 MiB")
    return _docker_config(data, where)


def _from_docker_config(config: Mapping[str, Any], registry: str, source: str) -> Credentials | None:
    auths = config.get("auths")
    if auths is None and "credsStore" not in config and "credHelpers" not in config:
        auths = config  # the old ~/.dockercfg layout: hosts at the top level
    entry: Any = None
    if isinstance(auths, dict):
        entry = next((v for k, v in auths.items() if _auth_key_host(str(k)) == registry), None)
    if not isinstance(entry, dict):
        helpers = config.get("credHelpers")
        if config.get("credsStore") or (
            isinstance(helpers, dict) and any(_auth_key_host(str(k)) == registry for k in helpers)
        ):
            raise StorageConfigError(
                f"oci storage config: {source} names a credential helper for {registry}; helpers run "
                "programs and are not supported: give the credentials in 'auths' instead"
            )
        return None
    username = str(entry.get("username") or "")
    password = str(entry.get("password") or "")
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=False).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        if ":" not in decoded:
            raise StorageConfigError(
                f"oci storage config: the 'auth' of {registry} in {source} is not base64 of user:password"
            )
        username, _, password = decoded.partition(":")
    token = str(entry.get("identitytoken") or "") or None
    if not username and not password and token is None:
        return None
    return Credentials(username, password, f"{source}, entry {registry}", token)


def credentials_for(fields: Mapping[str, Any], registry: str) -> Credentials | None:
    """The credentials the storage config gives for ``registry`` (see the module
    docstring), or None."""
    username = fields.get("username")
    password = fields.get("password")
    if username or password:
        if not username or password is None:
            raise StorageConfigError("oci storage config: 'username' and 'password' go together")
        return Credentials(str(username), str(password), "the username/password fields")
    inline = fields.get("docker_config")
    if inline:
        found = _from_docker_config(_docker_config(inline, "docker_config"), registry, "docker_config")
        if found is not None:
            return found
    path = fields.get("docker_config_path")
    if path:
        return _from_docker_config(_read_docker_config(path), registry, "docker_config_path")
    return None


# --- challenges and tokens --------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """A ``WWW-Authenticate`` challenge: its scheme (lower case) and parameters."""

    scheme: str
    params: Mapping[str, str]


def parse_challenge(header: str | None) -> Challenge | None:
    """The Bearer challenge of a ``WWW-Authenticate`` value, else its Basic one, else
    the first; None when there is none. A scheme is a word not followed by ``=``; the
    ``name=value`` pairs after it (values quoted or not) are its parameters."""
    found: list[tuple[str, dict[str, str]]] = []
    for match in _CHALLENGE_ITEM.finditer(header or ""):
        name, value = match.group(1), match.group(2)
        if value is None:
            found.append((name.lower(), {}))
        elif found:
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            found[-1][1].setdefault(name.lower(), value)
    for wanted in ("bearer", "basic"):
        for scheme, params in found:
            if scheme == wanted:
                return Challenge(scheme, params)
    return Challenge(found[0][0], found[0][1]) if found else None


@dataclass(frozen=True)
class _Token:
    value: str = field(repr=False)
    fresh_until: float


# --- manifests --------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """A manifest or index as the registry sent it: its digest (checked), media type
    and parsed document."""

    digest: str
    media_type: str
    document: Mapping[str, Any]
    size: int

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES


def _media_type(document: Mapping[str, Any], content_type: str | None) -> str:
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    header = (content_type or "").split(";", 1)[0].strip().lower()
    if header in INDEX_TYPES | MANIFEST_TYPES:
        return header
    # OCI allows mediaType to be absent: tell by shape
    return OCI_INDEX if "manifests" in document else OCI_MANIFEST


# --- the client -------------------------------------------------------------------------


@dataclass
class Answer:
    """An open response at the end of a redirect chain: the caller reads it, then
    calls :meth:`release` (or :meth:`abandon` when the body is not wanted)."""

    transport: RangedHttp
    origin: Origin
    conn: http.client.HTTPConnection
    resp: http.client.HTTPResponse
    url: str
    redirected: bool

    @property
    def status(self) -> int:
        return self.resp.status

    def read(self, limit: int) -> bytes:
        try:
            return self.resp.read(limit)
        except (OSError, http.client.HTTPException) as exc:
            self.abandon()
            raise StorageUnavailable(
                f"the connection to {without_query(self.url)} failed while reading ({type(exc).__name__})"
            ) from None

    def release(self) -> None:
        """Done with the body: keep the connection only if the body was read through."""
        if not self.resp.isclosed():
            self.transport.drop(self.origin, self.conn)

    def abandon(self) -> None:
        self.transport.drop(self.origin, self.conn)

    def error_body(self) -> bytes:
        """The head of an error body (then released)."""
        try:
            body = self.resp.read(ERROR_BODY_LIMIT)
        except (OSError, http.client.HTTPException):
            body = b""
        self.release()
        return body


def _origin_of(url: str) -> Origin:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return (scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80))


class RegistryClient:
    """One registry: its authentication state (challenge, tokens per scope) and the
    requests made to it. Thread-safe; blocking."""

    def __init__(
        self,
        registry: str,
        http: RangedHttp,
        *,
        insecure: bool,
        credentials: Credentials | None,
        timeout: float,
    ) -> None:
        self.registry = registry
        self.insecure = insecure
        self.base_url = f"{'http' if insecure else 'https'}://{registry}"
        self._http = http
        self._credentials = credentials
        self._timeout = timeout
        self._origin = _origin_of(self.base_url)
        self._lock = threading.Lock()
        self._token_lock = threading.Lock()
        self._pinged = False
        self._challenge: Challenge | None = None
        self._tokens: dict[str, _Token] = {}

    # --- addresses --------------------------------------------------------------------

    def blob_url(self, repository: str, digest: str) -> str:
        return f"{self.base_url}/v2/{repository}/blobs/{digest}"

    def manifest_url(self, repository: str, reference: str) -> str:
        return f"{self.base_url}/v2/{repository}/manifests/{reference}"

    def on_registry(self, url: str) -> bool:
        """Whether ``url`` is on the registry's own origin (credentials may go there)."""
        return _origin_of(url) == self._origin

    # --- authentication ---------------------------------------------------------------

    def _ping(self) -> None:
        """``GET /v2/``: learn whether and how the registry wants to be called."""
        with self._lock:
            if self._pinged:
                return
        answer = self._follow("GET", f"{self.base_url}/v2/", {}, f"{self.registry} (GET /v2/)")
        status = answer.status
        challenge = parse_challenge(answer.resp.getheader("WWW-Authenticate")) if status == 401 else None
        body = answer.error_body()
        if status == 404:
            raise StorageError(f"{self.base_url} does not answer the registry API (GET /v2/ gave HTTP 404)")
        if status == 400 and self.insecure:
            raise StorageError(
                f"{self.registry} answered HTTP 400 to plain HTTP (GET /v2/): if it serves HTTPS, "
                "remove 'insecure' from the storage config"
            )
        if status != 401 and not 200 <= status < 300:
            raise registry_error(status, body, f"registry {self.registry}")
        with self._lock:
            self._pinged = True
            self._challenge = challenge

    def auth_headers(self, repository: str) -> dict[str, str]:
        """The ``Authorization`` header for pulling from ``repository`` (none when the
        registry lets anyone pull)."""
        self._ping()
        with self._lock:
            challenge = self._challenge
        if challenge is None:
            return {}
        if challenge.scheme == "basic":
            return {"Authorization": self._credentials.basic()} if self._credentials else {}
        if challenge.scheme == "bearer":
            return {"Authorization": f"Bearer {self._token(challenge, repository)}"}
        return {}

    def invalidate(self, repository: str) -> None:
        """Forget the token for ``repository`` (the registry refused it)."""
        with self._lock:
            self._tokens.pop(self._scope(repository), None)

    @staticmethod
    def _scope(repository: str) -> str:
        return f"repository:{repository}:pull"

    def _token(self, challenge: Challenge, repository: str) -> str:
        scope = self._scope(repository)
        with self._lock:
            cached = self._tokens.get(scope)
        if cached is not None and time.monotonic() < cached.fresh_until:
            return cached.value
        with self._token_lock:  # one fetch at a time; who waited finds it cached
            with self._lock:
                cached = self._tokens.get(scope)
            if cached is not None and time.monotonic() < cached.fresh_until:
                return cached.value
            token = self._fetch_token(challenge, scope, repository)
            with self._lock:
                self._tokens[scope] = token
            return token.value

    def _fetch_token(self, challenge: Challenge, scope: str, repository: str) -> _Token:
        realm = challenge.params.get("realm", "")
        parts = urllib.parse.urlsplit(realm)
        what = f"the token service of {self.registry}"
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StorageError(f"{self.registry} names a token service that is not an http(s) URL")
        if parts.scheme == "http" and not self.insecure and self._credentials is not None:
            raise StorageError(
                f"the token service of {self.registry} is plain http ({without_query(realm)}): "
                "credentials are not sent there unless the registry is marked insecure"
            )
        query = {"scope": scope}
        if challenge.params.get("service"):
            query["service"] = challenge.params["service"]
        started = time.monotonic()
        credentials = self._credentials
        if credentials is not None and credentials.identity_token:
            form = {**query, "grant_type": "refresh_token", "client_id": "modelmesh-sidecar"}
            form["refresh_token"] = credentials.identity_token
            status, body = self._post_form(realm, form, what)
        else:
            separator = "&" if parts.query else "?"
            url = f"{realm}{separator}{urllib.parse.urlencode(query)}"
            headers = {"Authorization": credentials.basic()} if credentials else {}
            answer = self._follow("GET", url, headers, what, auth_everywhere=True)
            status = answer.status
            body = answer.read(ERROR_BODY_LIMIT) if status == 200 else answer.error_body()
            if status == 200:
                answer.release()
        if status in (401, 403):
            raise self._refused(repository, f"{what} answered HTTP {status}")
        if status != 200:
            raise registry_error(status, body, f"{what}, for {repository}")
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        value = document.get("token") or document.get("access_token") if isinstance(document, dict) else None
        if not isinstance(value, str) or not value:
            raise StorageError(f"{what} answered without a token")
        lifetime = document.get("expires_in") if isinstance(document, dict) else None
        seconds = (
            float(lifetime) if isinstance(lifetime, int | float) and lifetime > 0 else DEFAULT_TOKEN_SECONDS
        )
        margin = min(_TOKEN_MARGIN_SECONDS, seconds / 10)
        return _Token(value, started + seconds - margin)

    def _post_form(self, url: str, form: Mapping[str, str], what: str) -> tuple[int, bytes]:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            context = self._http.ssl_context()
            conn = http.client.HTTPSConnection(
                host, parts.port or 443, timeout=self._timeout, context=context
            )
        else:
            conn = http.client.HTTPConnection(host, parts.port or 80, timeout=self._timeout)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(
                "POST",
                target,
                body=urllib.parse.urlencode(form).encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            resp = conn.getresponse()
            return resp.status, resp.read(ERROR_BODY_LIMIT)
        except (OSError, http.client.HTTPException) as exc:
            raise StorageUnavailable(f"cannot reach {what} ({type(exc).__name__})") from None
        finally:
            conn.close()

    def _refused(self, repository: str, detail: str, *, hint: str = "") -> StorageUnauthenticated:
        if self._credentials is None:
            return StorageUnauthenticated(
                f"{self.registry} asks for credentials to pull {repository} and none are configured "
                f"(set username/password, docker_config or docker_config_path): {detail}{hint}"
            )
        return StorageUnauthenticated(
            f"{self.registry} refused the credentials from {self._credentials.source} for pulling "
            f"{repository}: {detail}{hint}"
        )

    # --- requests ---------------------------------------------------------------------

    def _follow(
        self, method: str, url: str, headers: Mapping[str, str], where: str, *, auth_everywhere: bool = False
    ) -> Answer:
        """Send ``method`` to ``url`` following redirects. ``Authorization`` in
        ``headers`` goes to the registry's origin only (with ``auth_everywhere``, to
        the origin of ``url``)."""
        current = url
        home = _origin_of(url) if auth_everywhere else self._origin
        for _ in range(MAX_REDIRECTS + 1):
            sent = dict(headers)
            if _origin_of(current) != home:
                sent.pop("Authorization", None)
            origin, conn, resp = self._http.request(method, current, headers=sent, where=where)
            answer = Answer(self._http, origin, conn, resp, current, current != url)
            if resp.status not in _REDIRECTS:
                return answer
            location = resp.getheader("Location")
            answer.error_body()
            if not location:
                raise StorageError(f"{where}: a redirect (HTTP {resp.status}) without a Location")
            following = urllib.parse.urljoin(current, location.strip())
            scheme = urllib.parse.urlsplit(following).scheme.lower()
            if scheme not in ("http", "https"):
                raise StorageError(f"{where}: a redirect to a URL that is not http(s)")
            if current.startswith("https:") and scheme == "http":
                raise StorageError(
                    f"{where}: a redirect from https to http ({without_query(following)}): refused"
                )
            current = following
        raise StorageError(f"{where}: more than {MAX_REDIRECTS} redirects")

    def send(
        self, method: str, url: str, repository: str, *, headers: Mapping[str, str], where: str
    ) -> Answer:
        """Send an authenticated request about ``repository``, following redirects. A
        401 from the registry: its challenge is learnt, the token dropped, and the
        request sent once more; a second 401 raises ``StorageUnauthenticated``."""
        for attempt in range(2):
            answer = self._follow(method, url, {**headers, **self.auth_headers(repository)}, where)
            if answer.status != 401 or not self.on_registry(answer.url):
                return answer
            challenge = parse_challenge(answer.resp.getheader("WWW-Authenticate"))
            body = answer.error_body()
            with self._lock:
                if challenge is not None:
                    self._challenge = challenge
                self._tokens.pop(self._scope(repository), None)
            hopeless = (
                challenge is None
                or challenge.scheme not in ("basic", "bearer")
                or (challenge.scheme == "basic" and self._credentials is None)
            )
            if attempt == 1 or hopeless:
                codes = ", ".join(error_codes(body))
                detail = f"{where} answered HTTP 401" + (f", {codes}" if codes else "")
                bearer = challenge is not None and challenge.scheme == "bearer"
                hint = " (some registries answer so for a repository that does not exist)" if bearer else ""
                raise self._refused(repository, detail, hint=hint)
        raise AssertionError("unreachable")  # pragma: no cover

    # --- manifests --------------------------------------------------------------------

    def manifest(self, repository: str, reference: str, *, expected_size: int | None = None) -> Manifest:
        """The manifest or index at ``reference`` (a tag or a digest), its sha256
        checked against a digest reference, ``Docker-Content-Digest`` and
        ``expected_size``."""
        what = f"manifest {self.registry}/{repository}{'@' if ':' in reference else ':'}{reference}"
        answer = self.send(
            "GET",
            self.manifest_url(repository, reference),
            repository,
            headers={"Accept": MANIFEST_ACCEPT},
            where=what,
        )
        if answer.status != 200:
            raise registry_error(answer.status, answer.error_body(), what)
        body = answer.read(MAX_MANIFEST_BYTES + 1)
        answer.release()
        if len(body) > MAX_MANIFEST_BYTES:
            raise StorageError(f"{what} is larger than {MAX_MANIFEST_BYTES} bytes")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise IntegrityError(f"{what}: the registry sent a manifest whose digest is {digest}")
        announced = (answer.resp.getheader("Docker-Content-Digest") or "").strip()
        if announced.startswith("sha256:") and announced != digest:
            raise IntegrityError(f"{what}: its bytes hash to {digest}, the registry announces {announced}")
        if expected_size is not None and expected_size != len(body):
            raise IntegrityError(f"{what} has {len(body)} bytes, its index entry says {expected_size}")
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise StorageError(f"{what} is not a JSON object")
        if document.get("schemaVersion") == 1:
            raise StorageError(f"{what} is a Docker schema 1 manifest, which is not supported")
        media_type = _media_type(document, answer.resp.getheader("Content-Type"))
        if media_type not in INDEX_TYPES | MANIFEST_TYPES:
            raise StorageError(f"{what} has media type {media_type[:100]!r}, not an image manifest or index")
        return Manifest(digest, media_type, document, len(body))

    def resolve(self, reference: Reference, platform: Platform) -> Manifest:
        """The image manifest ``reference`` names: through an index, the entry for
        ``platform`` (an index of indexes is followed one level deeper)."""
        manifest = self.manifest(reference.repository, reference.reference)
        for _ in range(MAX_INDEX_DEPTH):
            if not manifest.is_index:
                return manifest
            entries = manifest.document.get("manifests")
            what = f"{reference} ({manifest.digest})" if reference.tag else str(reference)
            entry = choose_manifest(entries if isinstance(entries, list) else [], platform, what)
            digest, size = entry.get("digest"), entry.get("size")
            if not isinstance(digest, str) or not _DIGEST.match(digest):
                shown = digest if isinstance(digest, str) and _ANY_DIGEST.match(digest) else "malformed"
                raise StorageError(
                    f"{what}: the entry for {platform} has an unsupported digest ({shown[:80]})"
                )
            manifest = self.manifest(
                reference.repository, digest, expected_size=size if isinstance(size, int) else None
            )
        if manifest.is_index:
            raise StorageError(f"{reference}: indexes nested more than {MAX_INDEX_DEPTH} deep")
        return manifest

    def close(self) -> None:
        with self._lock:
            self._tokens.clear()
