"""Test images built in Python and pushed over the distribution API.

Layers are tar archives written with :mod:`tarfile` (optionally gzip or zstd
compressed), configs and manifests are JSON, and :class:`ImagePusher` uploads them the
way any client does: ``POST /v2/<name>/blobs/uploads/`` then ``PUT <location>&digest=``
for each blob, ``PUT /v2/<name>/manifests/<tag or digest>`` for manifests and indexes,
with Basic or bearer-token authentication as the registry asks.

The builders return an :class:`Image` or :class:`Index` together with a
:class:`ModelTree`: the files (and symlinks) the model directory must hold once the
artifact is pulled, and the paths it must not hold (removed by whiteouts, or outside
the selected layers).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import ssl
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tests import secrets_guard

# --- media types ------------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
KITOPS_CONFIG = "application/vnd.kitops.modelkit.config.v1+json"
KITOPS_MANIFEST = "application/vnd.kitops.modelkit.manifest.v1+json"
MODELPACK_MANIFEST = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
FILEPATH_ANNOTATION = "org.cncf.model.filepath"
TITLE_ANNOTATION = "org.opencontainers.image.title"

Compression = Literal["gzip", "zstd"] | None


# --- tar layers -------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One tar entry: a file, a folder, a symlink or a hard link (``target``), or a
    special file (``fifo``, ``chardev``) for the hostile layers."""

    name: str
    kind: Literal["file", "dir", "symlink", "hardlink", "fifo", "chardev"] = "file"
    data: bytes = b""
    target: str = ""
    mode: int = 0o644


def file(name: str, data: bytes, mode: int = 0o644) -> Entry:
    return Entry(name, "file", data, mode=mode)


def directory(name: str) -> Entry:
    return Entry(name, "dir", mode=0o755)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, "symlink", target=target, mode=0o777)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name, "hardlink", target=target)


def whiteout(path: str) -> Entry:
    """The entry that deletes ``path`` of the lower layers."""
    folder, _, base = path.rstrip("/").rpartition("/")
    return file(f"{folder}/.wh.{base}" if folder else f".wh.{base}", b"")


def opaque(folder: str) -> Entry:
    """The entry that empties ``folder`` of the lower layers' content."""
    return file(f"{folder.rstrip('/')}/.wh..wh..opq", b"")


def tar_bytes(entries: Sequence[Entry]) -> bytes:
    """A tar archive (PAX) of ``entries``, in order, with a fixed mtime."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.mtime = 1_700_000_000
            info.mode = entry.mode
            if entry.kind == "file":
                info.size = len(entry.data)
                archive.addfile(info, io.BytesIO(entry.data))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "fifo": tarfile.FIFOTYPE,
                "chardev": tarfile.CHRTYPE,
            }[entry.kind]
            info.linkname = entry.target
            archive.addfile(info)
    return out.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    return data


# --- blobs, images, indexes -------------------------------------------------------------


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class BlobData:
    """A blob to push, with the media type and annotations of its descriptor."""

    media_type: str
    data: bytes
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self) -> dict[str, Any]:
        found: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            found["annotations"] = dict(self.annotations)
        return found


def layer(
    entries: Sequence[Entry],
    compression: Compression = None,
    media_type: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> BlobData:
    """A tar layer of ``entries``; the media type defaults to the OCI layer type of the
    compression."""
    default = {None: LAYER_TAR, "gzip": LAYER_GZIP, "zstd": LAYER_ZSTD}[compression]
    return BlobData(media_type or default, compress(tar_bytes(entries), compression), annotations or {})


def image_config(architecture: str = "amd64", os_name: str = "linux", variant: str | None = None) -> BlobData:
    config: dict[str, Any] = {
        "architecture": architecture,
        "os": os_name,
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    if variant:
        config["variant"] = variant
    return BlobData(OCI_CONFIG, canonical(config))


@dataclass(frozen=True)
class Image:
    """An image manifest with its config and layers."""

    config: BlobData
    layers: tuple[BlobData, ...]
    media_type: str = OCI_MANIFEST
    artifact_type: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def manifest(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "config": self.config.descriptor(),
            "layers": [b.descriptor() for b in self.layers],
        }
        if self.artifact_type:
            found["artifactType"] = self.artifact_type
        if self.annotations:
            found["annotations"] = dict(self.annotations)
        return found

    @property
    def manifest_bytes(self) -> bytes:
        return canonical(self.manifest)

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest_bytes)

    def blobs(self) -> list[BlobData]:
        return [self.config, *self.layers]

    def descriptor(
        self, platform: Mapping[str, str] | None = None, annotations: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        found: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.manifest_bytes),
        }
        if platform is not None:
            found["platform"] = dict(platform)
        if annotations:
            found["annotations"] = dict(annotations)
        return found


@dataclass(frozen=True)
class IndexEntry:
    manifest: Image | Index
    platform: Mapping[str, str] | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Index:
    """An OCI image index (or a Docker manifest list)."""

    entries: tuple[IndexEntry, ...]
    media_type: str = OCI_INDEX

    @property
    def manifest(self) -> dict[str, Any]:
        manifests = []
        for entry in self.entries:
            child = entry.manifest
            found: dict[str, Any] = {
                "mediaType": child.media_type,
                "digest": child.digest,
                "size": len(child.manifest_bytes),
            }
            if entry.platform is not None:
                found["platform"] = dict(entry.platform)
            if entry.annotations:
                found["annotations"] = dict(entry.annotations)
            manifests.append(found)
        return {"schemaVersion": 2, "mediaType": self.media_type, "manifests": manifests}

    @property
    def manifest_bytes(self) -> bytes:
        return canonical(self.manifest)

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest_bytes)


# --- what the model directory must hold -------------------------------------------------


@dataclass(frozen=True)
class ModelTree:
    """The pulled model: ``files`` (relative path -> bytes) and ``symlinks`` (relative
    path -> target) it must hold, and ``absent`` paths it must not."""

    files: Mapping[str, bytes]
    symlinks: Mapping[str, str] = field(default_factory=dict)
    absent: tuple[str, ...] = ()

    def problems(self, root: Path) -> list[str]:
        """What differs between ``root`` and this tree (empty when it matches, and
        nothing else is in ``root``)."""
        found: list[str] = []
        for rel, data in self.files.items():
            path = root / rel
            if path.is_symlink() or not path.is_file():
                found.append(f"{rel}: missing")
            elif path.read_bytes() != data:
                found.append(f"{rel}: wrong bytes")
        for rel, target in self.symlinks.items():
            path = root / rel
            if not path.is_symlink():
                found.append(f"{rel}: not a symlink")
            elif str(path.readlink()) != target:
                found.append(f"{rel}: links to {path.readlink()}, not {target}")
        found += [f"{rel}: should be absent" for rel in self.absent if (root / rel).exists()]
        expected = set(self.files) | set(self.symlinks)
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if (path.is_file() or path.is_symlink()) and rel not in expected:
                found.append(f"{rel}: unexpected")
        return found


@dataclass(frozen=True)
class Sample:
    """A test artifact and what pulling it must give."""

    artifact: Image | Index
    tree: ModelTree


# --- the samples ------------------------------------------------------------------------


def _weights(label: str, size: int) -> bytes:
    seed = hashlib.sha256(label.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def modelcar_image(weights_bytes: int = 200_000) -> Sample:
    """A ModelCar image: a base layer (``bin/sh``, ``models/`` with four files) and a
    model layer that deletes one file (whiteout), empties ``models/sub`` (opaque
    whiteout) before adding its own file there, and adds weights with a hard link and
    a relative symlink."""
    model = _weights("modelcar model", weights_bytes)
    extra = _weights("modelcar extra", 70_000)
    base = layer(
        [
            directory("bin"),
            file("bin/sh", b"#!/bin/false\n", 0o755),
            directory("models"),
            file("models/model.bin", model),
            file("models/config.json", b'{"name": "modelcar"}\n'),
            file("models/old.bin", b"removed by the next layer"),
            directory("models/sub"),
            file("models/sub/keep.txt", b"hidden by the opaque whiteout"),
        ],
        "gzip",
    )
    top = layer(
        [
            whiteout("models/old.bin"),
            directory("models/sub"),
            opaque("models/sub"),
            file("models/sub/new.txt", b"after the opaque whiteout\n"),
            directory("models/extra"),
            file("models/extra/weights.bin", extra),
            hardlink("models/extra/weights-link.bin", "models/extra/weights.bin"),
            symlink("models/latest.bin", "model.bin"),
        ]
    )
    image = Image(image_config(), (base, top))
    tree = ModelTree(
        files={
            "model.bin": model,
            "config.json": b'{"name": "modelcar"}\n',
            "sub/new.txt": b"after the opaque whiteout\n",
            "extra/weights.bin": extra,
            "extra/weights-link.bin": extra,
        },
        symlinks={"latest.bin": "model.bin"},
        absent=("old.bin", "sub/keep.txt", "bin", "sh"),
    )
    return Sample(image, tree)


def zstd_image() -> Sample:
    """A ModelCar image with one zstd layer."""
    weights = _weights("zstd model", 150_000)
    image = Image(
        image_config(),
        (layer([directory("models"), file("models/model.bin", weights), file("etc/hosts", b"x")], "zstd"),),
    )
    return Sample(image, ModelTree(files={"model.bin": weights}, absent=("etc",)))


def docker_image() -> Sample:
    """A Docker (schema 2) ModelCar image with a ``rootfs.diff.tar.gzip`` layer."""
    weights = _weights("docker model", 50_000)
    config = BlobData(DOCKER_CONFIG, image_config().data)
    image = Image(
        config,
        (layer([file("models/model.bin", weights)], "gzip", media_type=DOCKER_LAYER),),
        media_type=DOCKER_MANIFEST,
    )
    return Sample(image, ModelTree(files={"model.bin": weights}))


@dataclass(frozen=True)
class MultiArch:
    index: Index
    amd64: Sample
    arm64: Sample
    attestation: Image


def multiarch_index(media_type: str = OCI_INDEX) -> MultiArch:
    """An index of an amd64 and an arm64/v8 ModelCar image (different model bytes),
    plus a buildkit-style attestation manifest (platform unknown/unknown)."""
    samples = {}
    for arch in ("amd64", "arm64"):
        weights = _weights(f"{arch} model", 30_000)
        variant = "v8" if arch == "arm64" else None
        image = Image(
            image_config(arch, variant=variant),
            (layer([directory("models"), file("models/model.bin", weights)], "gzip"),),
        )
        samples[arch] = Sample(image, ModelTree(files={"model.bin": weights}))
    attestation = Image(
        BlobData(OCI_CONFIG, canonical({"architecture": "unknown", "os": "unknown"})),
        (BlobData("application/vnd.in-toto+json", b'{"_type": "https://in-toto.io/Statement/v0.1"}'),),
    )
    amd64, arm64 = samples["amd64"], samples["arm64"]
    assert isinstance(amd64.artifact, Image)
    assert isinstance(arm64.artifact, Image)
    index = Index(
        (
            IndexEntry(amd64.artifact, {"os": "linux", "architecture": "amd64"}),
            IndexEntry(arm64.artifact, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
            IndexEntry(
                attestation,
                {"os": "unknown", "architecture": "unknown"},
                {
                    "vnd.docker.reference.type": "attestation-manifest",
                    "vnd.docker.reference.digest": amd64.artifact.digest,
                },
            ),
        ),
        media_type=media_type,
    )
    return MultiArch(index, amd64, arm64, attestation)


@dataclass(frozen=True)
class ModelKit:
    image: Image
    model: ModelTree
    everything: ModelTree


def kitops_modelkit(*, with_artifact_type: bool = False) -> ModelKit:
    """A KitOps ModelKit: the Kitfile as config; a model layer (tar), a modelpart
    (tar+gzip), a raw modelpart named by its title annotation, a code layer
    (tar+zstd), a dataset layer and a docs layer. ``model`` is what the default
    selection gives, ``everything`` what ``include: code,datasets,docs`` gives."""
    onnx = _weights("kit model", 120_000)
    vocab = b"hello\nworld\n"
    extra = _weights("kit raw part", 10_000)
    kitfile = {
        "manifestVersion": "1.0.0",
        "package": {"name": "test-kit", "version": "1.0.0"},
        "model": {
            "name": "test-model",
            "path": "models/model.onnx",
            "parts": [{"path": "models/tokenizer"}, {"path": "models/extra.bin"}],
        },
        "code": [{"path": "src"}],
        "datasets": [{"name": "train", "path": "data/train.csv"}],
        "docs": [{"path": "README.md"}],
    }
    kit = "application/vnd.kitops.modelkit"
    layers = (
        layer([directory("models"), file("models/model.onnx", onnx)], media_type=f"{kit}.model.v1.tar"),
        layer(
            [directory("models/tokenizer"), file("models/tokenizer/vocab.txt", vocab)],
            "gzip",
            media_type=f"{kit}.modelpart.v1.tar+gzip",
        ),
        BlobData(f"{kit}.modelpart.v1.raw", extra, {TITLE_ANNOTATION: "models/extra.bin"}),
        layer([file("src/serve.py", b"print('serve')\n")], "zstd", media_type=f"{kit}.code.v1.tar+zstd"),
        layer([file("data/train.csv", b"a,b\n1,2\n")], media_type=f"{kit}.dataset.v1.tar"),
        layer([file("README.md", b"# test kit\n")], media_type=f"{kit}.docs.v1.tar"),
    )
    image = Image(
        BlobData(KITOPS_CONFIG, canonical(kitfile)),
        layers,
        artifact_type=KITOPS_MANIFEST if with_artifact_type else None,
    )
    model_files = {"models/model.onnx": onnx, "models/tokenizer/vocab.txt": vocab, "models/extra.bin": extra}
    rest = {
        "src/serve.py": b"print('serve')\n",
        "data/train.csv": b"a,b\n1,2\n",
        "README.md": b"# test kit\n",
    }
    return ModelKit(
        image,
        ModelTree(files=model_files, absent=tuple(rest)),
        ModelTree(files={**model_files, **rest}),
    )


def modelpack(filepath: str = "config.json") -> Sample:
    """A CNCF ModelPack: a weight tar layer, a raw weight.config layer placed at its
    ``org.cncf.model.filepath`` annotation, and a doc layer (not selected)."""
    weights = _weights("modelpack weights", 90_000)
    weight_config = b'{"architectures": ["Test"]}\n'
    config = {
        "descriptor": {"name": "test-pack", "version": "1"},
        "config": {"format": "safetensors"},
        "modelfs": {"type": "layers", "diffIds": []},
    }
    image = Image(
        BlobData(MODELPACK_CONFIG, canonical(config)),
        (
            layer(
                [file("model.safetensors", weights)], media_type="application/vnd.cncf.model.weight.v1.tar"
            ),
            BlobData(
                "application/vnd.cncf.model.weight.config.v1.raw",
                weight_config,
                {FILEPATH_ANNOTATION: filepath},
            ),
            layer([file("README.md", b"# pack\n")], media_type="application/vnd.cncf.model.doc.v1.tar"),
        ),
        artifact_type=MODELPACK_MANIFEST,
    )
    tree = ModelTree(files={"model.safetensors": weights, filepath: weight_config}, absent=("README.md",))
    return Sample(image, tree)


def hostile_images() -> dict[str, Image]:
    """ModelCar images whose model layer holds one entry that must be refused: a
    ``..`` escape, an absolute name, a symlink to ``/etc`` followed by a write through
    it, a hard link to a file outside the image, a device file."""
    base = layer([directory("models"), file("models/model.bin", b"fine")])

    def one(*entries: Entry) -> Image:
        return Image(image_config(), (base, layer(list(entries))))

    return {
        "dotdot": one(file("models/../../escape.txt", b"escaped")),
        "absolute": one(file("/tmp/absolute-escape.txt", b"escaped")),
        "symlink-etc": one(symlink("models/etc", "/etc"), file("models/etc/escape.conf", b"escaped")),
        "hardlink-outside": one(hardlink("models/passwd", "../../../../etc/passwd")),
        "device": one(Entry("models/null", "chardev")),
    }


# --- pushing ----------------------------------------------------------------------------


class ImagePusher:
    """Pushes blobs and manifests to a registry, authenticating as it asks (Basic, or a
    bearer token for ``repository:<name>:pull,push`` from its realm)."""

    def __init__(
        self,
        base_url: str,
        *,
        credentials: tuple[str, str] | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.credentials = credentials
        if credentials is not None:
            secrets_guard.register_secret(credentials[1], "the password of an ImagePusher")
        self.context = context
        self._tokens: dict[str, str] = {}

    def _basic(self) -> str | None:
        if self.credentials is None:
            return None
        raw = f"{self.credentials[0]}:{self.credentials[1]}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _token(self, challenge: str, repository: str) -> str:
        params = dict(
            part.strip().split("=", 1) for part in challenge.removeprefix("Bearer ").split(",") if "=" in part
        )
        params = {k: v.strip('"') for k, v in params.items()}
        query = urllib.parse.urlencode(
            {"service": params.get("service", ""), "scope": f"repository:{repository}:pull,push"}
        )
        request = urllib.request.Request(f"{params['realm']}?{query}")
        basic = self._basic()
        if basic:
            request.add_header("Authorization", basic)
        with urllib.request.urlopen(request, timeout=30) as resp:
            body = json.loads(resp.read())
        return str(body.get("token") or body["access_token"])

    def _send(
        self,
        method: str,
        url: str,
        repository: str,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        if not url.startswith("http"):
            url = self.base_url + url
        for _ in range(2):
            request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
            auth = self._tokens.get(repository)
            auth = f"Bearer {auth}" if auth else self._basic()
            if auth:
                request.add_header("Authorization", auth)
            try:
                with urllib.request.urlopen(request, timeout=60, context=self.context) as resp:
                    return resp.status, dict(resp.headers.items()), resp.read()
            except urllib.error.HTTPError as exc:
                challenge = exc.headers.get("WWW-Authenticate", "")
                body = exc.read()
                if exc.code == 401 and challenge.startswith("Bearer ") and repository not in self._tokens:
                    self._tokens[repository] = self._token(challenge, repository)
                    continue
                raise RuntimeError(f"{method} {url} answered {exc.code}: {body[:300]!r}") from None
        raise RuntimeError(f"{method} {url}: the registry kept asking for authentication")

    def push_blob(self, repository: str, blob: BlobData | bytes) -> str:
        data = blob if isinstance(blob, bytes) else blob.data
        digest = sha256_digest(data)
        _, headers, _ = self._send("POST", f"/v2/{repository}/blobs/uploads/", repository, data=b"")
        location = headers.get("Location") or headers.get("location") or ""
        location = urllib.parse.urljoin(self.base_url + "/", location)
        joiner = "&" if "?" in location else "?"
        self._send(
            "PUT",
            f"{location}{joiner}digest={urllib.parse.quote(digest)}",
            repository,
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        return digest

    def push_manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> str:
        self._send(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            repository,
            data=body,
            headers={"Content-Type": media_type},
        )
        return sha256_digest(body)

    def push(self, repository: str, artifact: Image | Index, tag: str | None = None) -> str:
        """Push ``artifact`` (its blobs and child manifests first), by digest and, when
        given, by ``tag``; returns its digest."""
        if isinstance(artifact, Index):
            for entry in artifact.entries:
                self.push(repository, entry.manifest)
        else:
            for blob in artifact.blobs():
                self.push_blob(repository, blob)
        body = artifact.manifest_bytes
        digest = self.push_manifest(repository, sha256_digest(body), body, artifact.media_type)
        if tag:
            self.push_manifest(repository, tag, body, artifact.media_type)
        return digest

    def delete_manifest(self, repository: str, digest: str) -> None:
        self._send("DELETE", f"/v2/{repository}/manifests/{digest}", repository)
