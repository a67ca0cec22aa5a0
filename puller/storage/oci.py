"""Models in OCI registries: storage type ``oci``.

``oci://registry[:port]/repository[:tag|@sha256:...]`` becomes the storage params
``{"type": "oci", "registry": "registry[:port]"}`` and the path ``repository:tag`` (or
``repository@sha256:...``; a bare ``repository`` means ``:latest``). The plan is the
image's layers, lowest first (kind ``layers``); :mod:`puller.layers` applies them.

Storage config fields:

``registry``
    ``host[:port]``. Without it the model path must start with the registry
    (``host[:port]/repository:tag``), and one storage entry can serve several.
``insecure``
    true: talk plain HTTP to this registry (default: HTTPS).
``certificate``
    A PEM CA bundle, inline: when given, the only trust anchors (for the registry, its
    token service and wherever blobs are redirected).
``username``, ``password``; ``docker_config`` (a docker ``config.json``, inline, as
text or object); ``docker_config_path`` (a path to one)
    Credentials, in that order; see :mod:`puller.oci_registry`.
``platform``
    ``os/architecture[/variant]`` to pick from an image index (default: this machine,
    e.g. ``linux/amd64`` or ``linux/arm64/v8``).
``include``
    For ModelKits and ModelPacks: the optional parts to place besides the model, a
    comma-separated list (or JSON list) of ``code``, ``datasets``, ``docs``.
    Default: the model only.

What the manifest is decides what is placed:

- **KitOps ModelKit** (config media type ``application/vnd.kitops.modelkit.config.v1+json``
  or artifactType ``application/vnd.kitops.modelkit.manifest.v1+json``): the
  ``model`` and ``modelpart`` layers (plus ``code``, ``dataset``, ``docs`` when
  included), ``.v1.tar``, ``.v1.tar+gzip``, ``.v1.tar+zstd`` or ``.v1.raw``. Tar
  entries are paths relative to the Kitfile's folder, so the model directory mirrors
  it (``models/model.onnx``). Layers of other kinds are not placed.
- **CNCF ModelPack** (artifactType ``application/vnd.cncf.model.manifest.v1+json`` or
  config ``application/vnd.cncf.model.config.v1+json``): ``weight`` and
  ``weight.config`` layers (plus ``code``, ``dataset``, ``doc`` when included), in the
  same four forms.
- Anything else is a **ModelCar** (KServe) or ordinary image: every layer, in order,
  and only ``models/`` becomes the model (``subtree``). Layer types: OCI ``tar``,
  ``tar+gzip``, ``tar+zstd`` and their ``nondistributable`` forms, Docker's
  ``rootfs.diff.tar.gzip`` (and its ``foreign`` form, read from the registry). Any
  other layer type is refused, naming it.

A raw layer is one file: it lands at its ``org.cncf.model.filepath`` annotation, else
its ``org.opencontainers.image.title`` (what oras writes), else at ``sha256-<hex>``;
the path must be relative and stay inside the model (``UnsafePath`` otherwise).

Bytes: each layer is read from ``/v2/<repository>/blobs/<digest>`` with the pull
token. Where the registry redirects a blob (to object storage), the first read
resolves the redirect with a one-byte ``GET`` and later reads of that blob go straight
to the final URL (without the registry's credentials); a read that meets a redirect,
an expired signature or a refused token there resolves it again, once. ``plan`` makes
that first read for the largest layer, which also tells whether ranges are honoured
(``Blob.ranged``); without ranges a layer is read as one stream, and a retry starting
mid-layer reads and drops the bytes before it. Every layer's sha256 is its digest;
the engine verifies it while the bytes stream.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from adapter.errors import (
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
from puller.oci_registry import (
    BlobMoved,
    Credentials,
    Manifest,
    Platform,
    Reference,
    RegistryClient,
    check_registry,
    credentials_for,
    parse_reference,
    registry_error,
)
from puller.storage.base import Blob, ByteStream, Plan, Storage
from puller.storage.ranged_http import RangedHttp

if TYPE_CHECKING:
    from adapter.settings import Settings
    from puller.config import StorageConfig

log = structlog.get_logger(__name__)

KITOPS_CONFIG = "application/vnd.kitops.modelkit.config.v1+json"
KITOPS_MANIFEST = "application/vnd.kitops.modelkit.manifest.v1+json"
MODELPACK_MANIFEST = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
FILEPATH_ANNOTATION = "org.cncf.model.filepath"
TITLE_ANNOTATION = "org.opencontainers.image.title"
MODELCAR_SUBTREE = "models"

#: layer media types of an ordinary image
IMAGE_LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
_KITOPS_LAYER = re.compile(
    r"^application/vnd\.kitops\.modelkit\.([a-z]+)\.v1\.(tar|tar\+gzip|tar\+zstd|raw)$"
)
_MODELPACK_LAYER = re.compile(
    r"^application/vnd\.cncf\.model\.(weight\.config|weight|doc|code|dataset)\.v1\.(tar|tar\+gzip|tar\+zstd|raw)$"
)
_KITOPS_PREFIX = "application/vnd.kitops.modelkit."
_MODELPACK_PREFIX = "application/vnd.cncf.model."
#: the optional parts ``include`` may name, and the layer kinds each one selects
_INCLUDE = {"code": "code", "datasets": "dataset", "dataset": "dataset", "docs": "docs", "doc": "docs"}
_KITOPS_KINDS = {"model": None, "modelpart": None, "code": "code", "dataset": "dataset", "docs": "docs"}
_MODELPACK_KINDS = {
    "weight": None,
    "weight.config": None,
    "code": "code",
    "dataset": "dataset",
    "doc": "docs",
}
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
#: planned layers and resolved locations remembered for open_range
_MAX_REMEMBERED = 4096
_BACKOFF_BASE_SECONDS = 0.1
_BACKOFF_CAP_SECONDS = 2.0


@dataclass(frozen=True)
class _Source:
    """Where a planned layer is read: its registry client and repository."""

    client: RegistryClient
    repository: str


@dataclass(frozen=True)
class _Location:
    """Where a layer's bytes are: the URL (the registry's, or where it redirects),
    whether the registry's credentials go there, and whether ranges are honoured."""

    url: str
    on_registry: bool
    ranged: bool
    redirected: bool


# --- configuration ----------------------------------------------------------------------


def _include(raw: Any) -> frozenset[str]:
    if raw is None or raw == "":
        return frozenset()
    if isinstance(raw, str):
        text = raw.strip()
        items: list[Any] = json.loads(text) if text.startswith("[") else text.split(",")
    elif isinstance(raw, list | tuple):
        items = list(raw)
    else:
        raise StorageConfigError("oci storage config: 'include' must be a comma-separated list")
    chosen: set[str] = set()
    for item in items:
        word = str(item).strip().lower()
        if not word:
            continue
        if word not in _INCLUDE:
            raise StorageConfigError(
                f"oci storage config: 'include' names {word[:40]!r}; known: code, datasets, docs"
            )
        chosen.add(_INCLUDE[word])
    return frozenset(chosen)


def _safe_relpath(value: str, digest: str, annotation: str) -> str:
    """A raw layer's file path, normalised; ``UnsafePath`` when it is absolute, has a
    ``..`` part, or names no file."""
    path = PurePosixPath(value)
    parts = [p for p in path.parts if p not in ("", ".")]
    if path.is_absolute() or ".." in parts or not parts or "\\" in value or "\x00" in value:
        raise UnsafePath(
            f"layer {digest}: its {annotation} annotation {value[:200]!r} is not a relative path "
            "inside the model"
        )
    return "/".join(parts)


# --- artifact kinds ---------------------------------------------------------------------


def artifact_kind(manifest: Manifest) -> str:
    """``modelkit``, ``modelpack`` or ``image``."""
    config = manifest.document.get("config")
    config_type = config.get("mediaType") if isinstance(config, dict) else None
    artifact_type = manifest.document.get("artifactType")
    if config_type == KITOPS_CONFIG or artifact_type == KITOPS_MANIFEST:
        return "modelkit"
    if config_type == MODELPACK_CONFIG or artifact_type == MODELPACK_MANIFEST:
        return "modelpack"
    return "image"


@dataclass(frozen=True)
class _Layer:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str]


def _layers(manifest: Manifest, what: str) -> list[_Layer]:
    raw = manifest.document.get("layers")
    if not isinstance(raw, list):
        raise StorageError(f"{what}: the manifest has no layer list")
    layers: list[_Layer] = []
    for number, item in enumerate(raw, 1):
        if not isinstance(item, dict):
            raise StorageError(f"{what}: layer {number} is not a descriptor")
        media_type, digest, size = item.get("mediaType"), item.get("digest"), item.get("size")
        if not isinstance(media_type, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise StorageError(f"{what}: layer {number} has no valid media type or size")
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise StorageError(f"{what}: layer {number} has no sha256 digest (only sha256 is supported)")
        annotations = item.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise StorageError(f"{what}: layer {digest} has annotations that are not a map")
        layers.append(_Layer(media_type, digest, size, {str(k): str(v) for k, v in annotations.items()}))
    return layers


def _raw_relpath(layer: _Layer) -> str:
    for annotation in (FILEPATH_ANNOTATION, TITLE_ANNOTATION):
        value = layer.annotations.get(annotation)
        if value:
            return _safe_relpath(value, layer.digest, annotation)
    return layer.digest.replace(":", "-")


def select_layers(
    manifest: Manifest, include: frozenset[str], what: str
) -> tuple[list[tuple[_Layer, str]], str | None]:
    """The layers to place with their relpaths (``""`` for a tar layer), and the
    subtree that becomes the model (see the module docstring)."""
    kind = artifact_kind(manifest)
    layers = _layers(manifest, what)
    if kind == "image":
        for layer in layers:
            if layer.media_type not in IMAGE_LAYER_TYPES:
                raise InvalidRequest(
                    f"{what}: layer {layer.digest} has media type {layer.media_type[:120]!r}, which is not "
                    "an image layer (tar, tar+gzip, tar+zstd), a KitOps ModelKit or a CNCF ModelPack"
                )
        if not layers:
            raise StorageNotFound(f"{what} is an image without layers")
        return [(layer, "") for layer in layers], MODELCAR_SUBTREE
    pattern, kinds, prefix, label = (
        (_KITOPS_LAYER, _KITOPS_KINDS, _KITOPS_PREFIX, "KitOps ModelKit")
        if kind == "modelkit"
        else (_MODELPACK_LAYER, _MODELPACK_KINDS, _MODELPACK_PREFIX, "CNCF ModelPack")
    )
    chosen: list[tuple[_Layer, str]] = []
    has_model = False
    for layer in layers:
        found = pattern.match(layer.media_type)
        if found is None:
            if layer.media_type.startswith(prefix):
                raise InvalidRequest(
                    f"{what}: {label} layer {layer.digest} has media type {layer.media_type[:120]!r}, "
                    "whose format is not supported (tar, tar+gzip, tar+zstd, raw)"
                )
            continue  # a layer of another family (e.g. a signature): not part of the model
        part = kinds.get(found.group(1), "unknown")  # kinds we do not know are not placed
        if part is None or part in include:
            has_model = has_model or part is None
            chosen.append((layer, _raw_relpath(layer) if found.group(2) == "raw" else ""))
    if not has_model:
        raise StorageNotFound(f"{what} is a {label} without model layers")
    raw_paths = [relpath for _, relpath in chosen if relpath]
    if len(raw_paths) != len(set(raw_paths)):
        raise StorageError(f"{what}: two raw layers land on the same file")
    return chosen, None


# --- reading layers ---------------------------------------------------------------------


class _Window:
    """Bytes ``[skip, skip + length)`` of a stream of a whole layer: the bytes before
    are read into the caller's buffer and dropped (for registries without ranges)."""

    def __init__(self, stream: ByteStream, skip: int, length: int) -> None:
        self._stream = stream
        self._skip = skip
        self._remaining = length

    def readinto(self, buffer: memoryview) -> int:
        if self._remaining <= 0 or not len(buffer):
            return 0
        while self._skip > 0:
            count = self._stream.readinto(buffer[: min(len(buffer), self._skip)])
            if not count:
                return 0
            self._skip -= count
        count = self._stream.readinto(buffer[: min(len(buffer), self._remaining)])
        self._remaining -= count
        return count

    def close(self) -> None:
        self._stream.close()


# --- the backend ------------------------------------------------------------------------


class OCIStorage(Storage):
    """Images and model artifacts in OCI registries. Thread-safe."""

    types: ClassVar[tuple[str, ...]] = ("oci",)

    def __init__(self, config: StorageConfig, settings: Settings) -> None:
        """Raises ``StorageConfigError`` for a malformed registry, platform, include
        list or flag, or half a username/password pair."""
        super().__init__(config, settings)
        raw_registry = str(config.get("registry") or "").strip()
        self._registry = check_registry(raw_registry) if raw_registry else None
        insecure = config.flag("insecure")
        if insecure is None and config.get("insecure") not in (None, ""):
            raise StorageConfigError("oci storage config: 'insecure' must be true or false")
        self._insecure = bool(insecure)
        platform = str(config.get("platform") or "").strip()
        self._platform = Platform.parse(platform) if platform else Platform.of_machine().normalized()
        try:
            self._include = _include(config.get("include"))
        except ValueError:
            raise StorageConfigError("oci storage config: 'include' is not a list") from None
        if self._registry is not None:
            credentials_for(config.fields, self._registry)  # a malformed entry fails here, early
        ca = str(config.get("certificate") or "").strip()
        self._http = RangedHttp(settings, "oci registry", cadata=ca or None)
        self._lock = threading.Lock()
        self._clients: dict[str, RegistryClient] = {}
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self._locations: OrderedDict[tuple[str, str], _Location] = OrderedDict()

    # --- contract ---------------------------------------------------------------------

    def identity(self) -> str:
        """``oci:<registry>`` (layers are content-addressed: the digest is the rest of
        the cache key)."""
        return f"oci:{self._registry}" if self._registry else "oci"

    def plan(self, path: str) -> Plan:
        """The layers of the image at ``path`` (see the module docstring). Raises
        ``InvalidRequest``/``UnsafePath`` for a malformed reference or unusable layer,
        ``StorageNotFound`` for a missing repository, tag or platform,
        ``StorageUnauthenticated``/``StoragePermissionDenied`` when refused,
        ``IntegrityError`` when a manifest does not match its digest,
        ``StorageUnavailable`` when the registry cannot be reached (after
        ``pull_retries`` attempts with backoff)."""
        reference = parse_reference(path, self._registry)
        client = self._client(reference.registry)
        attempts = max(1, self.settings.pull_retries)
        for attempt in range(attempts):
            try:
                return self._plan(client, reference)
            except StorageUnavailable:
                if attempt + 1 >= attempts:
                    raise
                time.sleep(min(_BACKOFF_CAP_SECONDS, _BACKOFF_BASE_SECONDS * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _plan(self, client: RegistryClient, reference: Reference) -> Plan:
        manifest = client.resolve(reference, self._platform)
        what = f"{reference.registry}/{reference.repository}@{manifest.digest}"
        chosen, subtree = select_layers(manifest, self._include, what)
        source = _Source(client, reference.repository)
        with self._lock:
            for layer, _ in chosen:
                self._remember(self._sources, layer.digest, source)
        ranged = True
        largest = max((layer for layer, _ in chosen), key=lambda layer: layer.size)
        if largest.size > 0:
            probe = Blob(name=largest.digest, relpath="", size=largest.size, version=largest.digest)
            ranged = self._resolve(source, probe).ranged
        blobs = tuple(
            Blob(
                name=layer.digest,
                relpath=relpath,
                size=layer.size,
                version=layer.digest,
                checksums={"sha256": layer.digest.removeprefix("sha256:")},
                ranged=ranged,
                media_type=layer.media_type,
                annotations=layer.annotations,
            )
            for layer, relpath in chosen
        )
        log.debug(
            "oci artifact resolved",
            source=what,
            kind=artifact_kind(manifest),
            layers=len(blobs),
            bytes=sum(b.size for b in blobs),
            platform=str(self._platform),
        )
        return Plan(blobs=blobs, single_object=False, kind="layers", subtree=subtree, source=what)

    def open_range(self, blob: Blob, start: int, end: int) -> ByteStream:
        """Bytes ``[start, end)`` of a planned layer (see the module docstring)."""
        with self._lock:
            source = self._sources.get(blob.name)
            location = self._locations.get((source.client.registry, blob.name)) if source else None
        if source is None:
            raise StorageError(f"layer {blob.name} was not planned by this storage (or planned too long ago)")
        if location is None:
            location = self._resolve(source, blob)
        try:
            return self._read(source, location, blob, start, end)
        except (BlobMoved, StorageUnauthenticated, StoragePermissionDenied, StorageNotFound) as exc:
            if isinstance(exc, StorageUnauthenticated) and location.on_registry:
                source.client.invalidate(source.repository)
            elif not (location.redirected or isinstance(exc, BlobMoved)):
                raise
        return self._read(source, self._resolve(source, blob), blob, start, end)

    def close(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()
        self._http.close()

    # --- helpers ----------------------------------------------------------------------

    @staticmethod
    def _remember(table: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > _MAX_REMEMBERED:
            table.popitem(last=False)

    def _client(self, registry: str) -> RegistryClient:
        with self._lock:
            client = self._clients.get(registry)
        if client is not None:
            return client
        credentials: Credentials | None = credentials_for(self.config.fields, registry)
        client = RegistryClient(
            registry,
            self._http,
            insecure=self._insecure,
            credentials=credentials,
            timeout=self.settings.pull_timeout_seconds,
        )
        with self._lock:
            return self._clients.setdefault(registry, client)

    @staticmethod
    def _what(source: _Source, blob: Blob) -> str:
        return f"layer {blob.name} of {source.client.registry}/{source.repository}"

    def _resolve(self, source: _Source, blob: Blob) -> _Location:
        """Where ``blob``'s bytes are, by a one-byte GET following redirects."""
        client, what = source.client, self._what(source, blob)
        url = client.blob_url(source.repository, blob.name)
        if blob.size == 0:
            location = _Location(url, on_registry=True, ranged=False, redirected=False)
        else:
            answer = client.send("GET", url, source.repository, headers={"Range": "bytes=0-0"}, where=what)
            if answer.status == 206:
                answer.read(2)
                answer.release()
            elif answer.status == 200:
                answer.abandon()  # the whole layer follows: not read
            else:
                raise registry_error(answer.status, answer.error_body(), what)
            location = _Location(
                answer.url,
                on_registry=client.on_registry(answer.url),
                ranged=answer.status == 206,
                redirected=answer.redirected,
            )
        with self._lock:
            self._remember(self._locations, (client.registry, blob.name), location)
        return location

    def _read(self, source: _Source, location: _Location, blob: Blob, start: int, end: int) -> ByteStream:
        headers = source.client.auth_headers(source.repository) if location.on_registry else {}
        what = self._what(source, blob)

        def error_for_status(status: int, body: bytes) -> SidecarError:
            return registry_error(status, body, what)

        if location.ranged or (start == 0 and end == blob.size):
            return self._http.get_range(
                location.url, blob, start, end, headers=headers, where=what, error_for_status=error_for_status
            )
        whole = self._http.get_range(
            location.url, blob, 0, blob.size, headers=headers, where=what, error_for_status=error_for_status
        )
        return _Window(whole, start, end - start)
