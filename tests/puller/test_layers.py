"""Applying image layers (plans of kind ``layers``), served by an in-memory image store
(a real Storage subclass): whiteouts, hard links, compressions, raw layers, subtrees,
integrity, safety, cancellation, caps, parallelism, the content cache, and the Puller
end to end."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import zstandard
from structlog.testing import capture_logs

from adapter.errors import (
    ArchiveTooLarge,
    BadArchive,
    IntegrityError,
    InvalidRequest,
    StorageNotFound,
    StorageUnavailable,
    UnsafePath,
)
from adapter.settings import Settings
from puller.cache import CACHE_DIR_NAME, ContentCache
from puller.config import StorageConfig
from puller.engine import FetchCancelled, PullEngine
from puller.layers import LayerFormat, apply_layers, layer_format
from puller.metrics import PullMetrics
from puller.model_key import ModelKey
from puller.pull import Puller, image_model_name
from puller.request import PullRequest
from puller.storage.base import Blob, ByteStream, Plan, Storage
from puller.storage.registry import StorageRegistry
from tests.puller.conftest import make_settings

TAR = "application/vnd.oci.image.layer.v1.tar"
TAR_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_GZ = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MODELPACK_RAW = "application/vnd.cncf.model.weight.v1.raw"
MODELPACK_CONFIG_TAR = "application/vnd.cncf.model.weight.config.v1.tar"
KITOPS_MODEL_GZ = "application/vnd.kitops.modelkit.model.v1.tar+gzip"

MEDIA_BY_COMPRESSION = {"none": TAR, "gzip": TAR_GZ, "zstd": TAR_ZSTD}


# --- building layers ------------------------------------------------------------------------


@dataclass
class Entry:
    """One tar entry: a file (data), folder, symlink, hard link or special file."""

    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    linkname: str = ""
    mode: int = 0o644


def file(name: str, data: bytes, mode: int = 0o644) -> Entry:
    return Entry(name, data, mode=mode)


def folder(name: str, mode: int = 0o755) -> Entry:
    return Entry(name, kind=tarfile.DIRTYPE, mode=mode)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, kind=tarfile.SYMTYPE, linkname=target, mode=0o777)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name, kind=tarfile.LNKTYPE, linkname=target)


def whiteout(path: str) -> Entry:
    parent, _, name = path.rpartition("/")
    return file(f"{parent}/.wh.{name}" if parent else f".wh.{name}", b"")


def opaque(folder_path: str) -> Entry:
    return file(f"{folder_path}/.wh..wh..opq", b"")


def tar_bytes(entries: list[Entry]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = entry.kind
            info.mode = entry.mode
            info.linkname = entry.linkname
            if entry.kind == tarfile.REGTYPE:
                info.size = len(entry.data)
                archive.addfile(info, io.BytesIO(entry.data))
            else:
                archive.addfile(info)
    return buffer.getvalue()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)  # the same bytes, the same digest
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def layer(entries: list[Entry], compression: str = "none") -> tuple[bytes, str]:
    return compress(tar_bytes(entries), compression), MEDIA_BY_COMPRESSION[compression]


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_for(data: bytes, media_type: str, relpath: str = "") -> Blob:
    hexdigest = digest_of(data)
    return Blob(
        name=f"sha256:{hexdigest}",
        relpath=relpath,
        size=len(data),
        version=f"sha256:{hexdigest}",
        checksums={"sha256": hexdigest},
        media_type=media_type,
    )


# --- the image store --------------------------------------------------------------------------


class MemoryRange:
    """A byte range of one stored blob, read in small chunks (so that a layer takes
    several reads), reporting to its store."""

    def __init__(self, store: ImageStore, name: str, data: bytes, start: int) -> None:
        self.store = store
        self.name = name
        self.data = data
        self.pos = 0
        self.start = start
        self.first = True

    def readinto(self, buffer: memoryview) -> int:
        self.store.before_read(self.name, self.start + self.pos, first=self.first)
        self.first = False
        count = min(len(buffer), 16 * 1024, len(self.data) - self.pos)
        buffer[:count] = self.data[self.pos : self.pos + count]
        self.pos += count
        return count

    def close(self) -> None:
        self.store.closed(self.name)


@dataclass
class Image:
    layers: list[tuple[bytes, str, str]]  # (bytes, media type, relpath)
    subtree: str | None = None
    reference: str = "registry.test/org/model@sha256:" + "0" * 64


class ImageStore(Storage):
    """An image registry in memory: images by reference, blobs by digest. Records
    every range opened, how many are open at once, and can damage, fail or gate reads."""

    types = ("oci",)

    def __init__(self, config: StorageConfig, settings: Settings) -> None:
        super().__init__(config, settings)
        self.lock = threading.Lock()
        self.images: dict[str, Plan] = {}
        self.blobs: dict[str, bytes] = {}
        self.opens: list[tuple[str, int]] = []
        self.active = 0
        self.max_active = 0
        #: digests served with one byte flipped: for this many opens
        self.damaged: dict[str, int] = {}
        #: digests whose first stream fails (transiently) at this offset
        self.fail_at: dict[str, int] = {}
        #: called on the first read of every range
        self.on_first_read: Callable[[str], None] | None = None
        #: called before every read
        self.on_read: Callable[[str], None] | None = None
        #: called when a range is closed
        self.on_close: Callable[[str], None] | None = None

    def add(self, reference: str, layers: list[tuple[bytes, str]], *, subtree: str | None = None) -> Plan:
        blobs = []
        for data, media_type in layers:
            blob = blob_for(data, media_type)
            self.blobs[blob.name] = data
            blobs.append(blob)
        return self.add_blobs(reference, blobs, subtree=subtree)

    def add_blobs(self, reference: str, blobs: list[Blob], *, subtree: str | None = None) -> Plan:
        plan = Plan(
            blobs=tuple(blobs),
            single_object=False,
            kind="layers",
            subtree=subtree,
            source=f"{reference}@sha256:{'1' * 64}",
        )
        self.images[reference] = plan
        return plan

    def plan(self, path: str) -> Plan:
        try:
            return self.images[path]
        except KeyError:
            raise StorageNotFound(f"no image {path!r}") from None

    def open_range(self, blob: Blob, start: int, end: int) -> ByteStream:
        data = self.blobs[blob.name]
        with self.lock:
            self.opens.append((blob.name, start))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            damage = self.damaged.get(blob.name, 0)
            if damage:
                self.damaged[blob.name] = damage - 1
        if damage:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        return MemoryRange(self, blob.name, data[start:end], start)

    def before_read(self, name: str, offset: int, *, first: bool) -> None:
        if first and self.on_first_read is not None:
            self.on_first_read(name)
        if self.on_read is not None:
            self.on_read(name)
        with self.lock:
            fail = self.fail_at.get(name)
            if fail is not None and offset >= fail:
                del self.fail_at[name]
        if fail is not None and offset >= fail:
            raise StorageUnavailable(f"connection reset while reading {name}")

    def closed(self, name: str) -> None:
        with self.lock:
            self.active -= 1
        if self.on_close is not None:
            self.on_close(name)

    def opened(self, name: str) -> int:
        with self.lock:
            return sum(1 for n, _ in self.opens if n == name)

    def identity(self) -> str:
        return "oci:registry.test"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, pull_workers=4, archive_max_bytes=64 * 1024 * 1024)


@pytest.fixture
def store(settings: Settings) -> ImageStore:
    return ImageStore(StorageConfig(type="oci", fields={"registry": "registry.test"}), settings)


def apply(
    store: ImageStore,
    plan: Plan,
    dest: Path,
    settings: Settings,
    *,
    cancel: threading.Event | None = None,
    cache: ContentCache | None = None,
    engine: PullEngine | None = None,
) -> Any:
    return apply_layers(
        store, plan, dest, cancel or threading.Event(), settings=settings, cache=cache, engine=engine
    )


def tree(root: Path) -> dict[str, bytes | str]:
    """Files (bytes), links (``-> target``) and empty folders (``/``) below ``root``."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = f"-> {os.readlink(path)}"
        elif path.is_file():
            found[rel] = path.read_bytes()
        elif path.is_dir() and not any(path.iterdir()):
            found[rel] = "/"
    return found


def snapshot(top: Path, skip: Path) -> set[str]:
    """Every path below ``top`` except those below ``skip``."""
    return {
        p.relative_to(top).as_posix()
        for p in top.rglob("*")
        if p != skip and skip not in p.parents and ".layers." not in p.as_posix()
    }


# --- media types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("media_type", "expected"),
    [
        (TAR, LayerFormat(raw=False, compression="none")),
        (TAR_GZ, LayerFormat(raw=False, compression="gzip")),
        (TAR_ZSTD, LayerFormat(raw=False, compression="zstd")),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", LayerFormat(False, "gzip")),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar", LayerFormat(False, "none")),
        (DOCKER_GZ, LayerFormat(raw=False, compression="gzip")),
        ("application/vnd.kitops.modelkit.model.v1.tar", LayerFormat(False, "none")),
        ("application/vnd.kitops.modelkit.modelpart.v1.tar+zstd", LayerFormat(False, "zstd")),
        ("application/vnd.kitops.modelkit.docs.v1.tar+gzip", LayerFormat(False, "gzip")),
        ("application/vnd.kitops.modelkit.model.v1.raw", LayerFormat(True, "none")),
        (MODELPACK_RAW, LayerFormat(True, "none")),
        ("application/vnd.cncf.model.weight.config.v1.tar+zstd", LayerFormat(False, "zstd")),
        ("application/vnd.cncf.model.dataset.v1.tar+gzip", LayerFormat(False, "gzip")),
    ],
)
def test_layer_formats_by_media_type(media_type: str, expected: LayerFormat) -> None:
    assert layer_format(media_type) == expected


@pytest.mark.parametrize(
    "media_type", [None, "", "application/json", "application/vnd.oci.image.config.v1+json"]
)
def test_unknown_media_types_are_refused(media_type: str | None) -> None:
    with pytest.raises(InvalidRequest, match="media type"):
        layer_format(media_type)


def test_image_model_names() -> None:
    assert image_model_name("org/resnet:v1") == "resnet"
    assert image_model_name("registry:5000/org/resnet@sha256:" + "a" * 64) == "resnet"
    assert image_model_name("oci://ghcr.io/org/team/bert") == "bert"
    assert image_model_name("") == "_model"
    assert image_model_name("org/..:v1") == "_model"


# --- layers applied -------------------------------------------------------------------------------


def test_whiteouts_and_opaque_whiteouts(store: ImageStore, settings: Settings, tmp_path: Path) -> None:
    lower = layer(
        [
            folder("models"),
            file("models/a.bin", b"a" * 1000),
            file("models/old/x.bin", b"x"),
            file("models/old/y.bin", b"y"),
            file("models/keep/k.bin", b"k"),
            file("etc/conf", b"conf"),
            file("tmp/gone/deep.txt", b"deep"),
        ]
    )
    upper = layer(
        [
            whiteout("models/a.bin"),
            opaque("models/old"),
            file("models/old/new.bin", b"new"),
            file("models/b.bin", b"b" * 10),
            whiteout("tmp/gone"),
            file("etc/conf", b"conf v2"),
        ],
        "gzip",
    )
    plan = store.add("org/model:v1", [lower, upper])
    dest = tmp_path / "out"
    stats = apply(store, plan, dest, settings)
    assert tree(dest) == {
        "models/old/new.bin": b"new",
        "models/b.bin": b"b" * 10,
        "models/keep/k.bin": b"k",
        "etc/conf": b"conf v2",
        "tmp": "/",
    }
    assert stats.layers == 2
    assert stats.files == 4
    assert stats.model_bytes == 3 + 10 + 1 + 7
    assert stats.bytes == len(lower[0]) + len(upper[0])
    assert not list(dest.glob(".layers.*"))


def test_an_opaque_whiteout_at_the_top_empties_the_lower_image(
    store: ImageStore, settings: Settings, tmp_path: Path
) -> None:
    lower = layer([file("a", b"a"), file("d/b", b"b")])
    upper = layer([opaque("."), file("c", b"c")])
    plan = store.add("top", [lower, upper])
    dest = tmp_path / "out"
    apply(store, plan, dest, settings)
    assert tree(dest) == {"c": b"c"}


def test_an_upper_layer_replaces_files_folders_and_links(
    store: ImageStore, settings: Settings, tmp_path: Path
) -> None:
    lower = layer(
        [
            file("f-then-dir", b"file"),
            file("dir-then-f/inner", b"inner"),
            symlink("link-then-dir", "f-then-dir"),
            file("same", b"old"),
        ]
    )
    upper = layer(
        [
            file("f-then-dir/now", b"now a folder"),
            file("dir-then-f", b"now a file"),
            file("link-then-dir/x", b"written into a folder, not through the link"),
            symlink("same", "dir-then-f"),
        ]
    )
    plan = store.add("replace", [lower, upper])
    dest = tmp_path / "out"
    apply(store, plan, dest, settings)
    assert tree(dest) == {
        "f-then-dir/now": b"now a folder",
        "dir-then-f": b"now a file",
        "link-then-dir/x": b"written into a folder, not through the link",
        "same": "-> dir-then-f",
    }


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_plain_gzip_and_zstd_layers(
    store: ImageStore, settings: Settings, tmp_path: Path, compression: str
) -> None:
    weights = os.urandom(700_000)  # many reads, and a tar member over several chunks
    first = layer([file("models/weights.bin", weights), file("models/README", b"read me")], compression)
    second = layer([file("models/config.json", b"{}"), whiteout("models/README")], compression)
    plan = store.add(f"c-{compression}", [first, second], subtree="models")
    dest = tmp_path / "out"
    apply(store, plan, dest, settings)
    assert tree(dest) == {"weights.bin": weights, "config.json": b"{}"}


def test_multi_member_gzip_and_multi_frame_zstd(
    store: ImageStore, settings: Settings, tmp_path: Path
) -> None:
    raw = tar_bytes([file("a.bin", os.urandom(50_000)), file("b.bin", b"b" * 100_000)])
    cut = len(raw) // 3
    gz = gzip.compress(raw[:cut]) + gzip.compress(raw[cut:])
    zstd = zstandard.ZstdCompressor().compress(raw[:cut]) + zstandard.ZstdCompressor().compress(raw[cut:])
    for name, data, media_type in (("gz", gz, TAR_GZ), ("zst", zstd, TAR_ZSTD)):
        plan = store.add(name, [(data, media_type)])
        dest = tmp_path / name
        apply(store, plan, dest, settings)
        assert set(tree(dest)) == {"a.bin", "b.bin"}


def test_hard_links_within_a_layer_and_to_a_lower_layer(
    store: ImageStore, settings: Settings, tmp_path: Path
) -> None:
    lower = layer([file("models/w.bin", b"w" * 5000), file("models/replaced.bin", b"old")])
    upper = layer(
        [
            hardlink("models/w-link.bin", "models/w.bin"),  # a file of the lower layer
            file("models/v.bin", b"v" * 300),
            hardlink("models/v-link.bin", "models/v.bin"),  # a file of this layer
            hardlink("models/sub/again.bin", "models/w-link.bin"),  # a link waiting too
            file("models/replaced.bin", b"new"),
        ],
        "gzip",
    )
    plan = store.add("links", [lower, upper], subtree="models")
    dest = tmp_path / "out"
    stats = apply(store, plan, dest, settings)
    assert tree(dest) == {
        "w.bin": b"w" * 5000,
        "w-link.bin": b"w" * 5000,
        "sub/again.bin": b"w" * 5000,
        "v.bin": b"v" * 300,
        "v-link.bin": b"v" * 300,
        "replaced.bin": b"new",
    }
    assert (dest / "w.bin").samefile(dest / "w-link.bin")
    assert (dest / "w.bin").samefile(dest / "sub" / "again.bin")
    assert (dest / "v.bin").samefile(dest / "v-link.bin")
    assert stats.model_bytes == 5000 + 300 + 3  # each inode once


def test_a_hard_link_to_a_file_outside_the_model_folder_unpacks_the_whole_image(
    store: ImageStore, settings: Settings, tmp_path: Path
) -> None:
    base = layer([file("opt/shared.bin", b"shared" * 100), file("bin/sh", b"#!", mode=0o755)])
    model = layer(
        [
            file("data/blob.bin", b"blob"),
            hardlink("models/blob.bin", "data/blob.bin"),  # same layer, outside models/
            hardlink("models/shared.bin", "opt/shared.bin"),  # lower layer, outside models/
        ]
    )
    plan = store.add("whole", [base, model], subtree="models")
    dest = tmp_path / "out"
    with capture_logs() as logs:
        apply(store, plan, dest, settings)
    assert tree(dest) == {"blob.bin": b"blob", "shared.bin": b"shared" * 100}
    assert any(entry["event"].startswith("a hard link leads out") for entry in logs)


def test_a_hard_link_to_nothing_is_refused(store: ImageStore, settings: Settings, tmp_path: Path) -> None:
    bad = layer([hardlink("models/x", "models/absent")])
    plan = store.add("dangling", [bad])
    dest = tmp_path / "out"
    with pytest.raises(BadArchive, match=r"hard link 'models/x' -> 'models/absent' names no file"):
        apply(store, plan, dest, settings)
    assert list(dest.iterdir()) == []


def test_raw_layers_land_at_their_paths(store: ImageStore, settings: Settings, tmp_path: Path) -> None:
    weights = os.urandom(300_000)
    tokenizer = b'{"tokenizer": true}'
    config = layer([file("config.json", b'{"arch": "bert"}')])
    blobs = [
        blob_for(config[0], MODELPACK_CONFIG_TAR),
        blob_for(weights, MODELPACK_RAW, relpath="weights/model.safetensors"),
        blob_for(tokenizer, "application/vnd.kitops.modelkit.modelpart.v1.raw", relpath="tokenizer.json"),
    ]
    for blob, data in zip(blobs, (config[0], weights, tokenizer), strict=True):
        store.blobs[blob.name] = data
    plan = store.add_blobs("modelpack", blobs)
    expected = {
        "config.json": b'{"arch": "bert"}',
        "weights/model.safetensors": weights,
        "tokenizer.json": tokenizer,
    }
    dest = tmp_path / "streamed"
    apply(store, plan, dest, settings)
    assert tree(dest) == expected
    engine = PullEngine(settings)
    try:
        dest = tmp_path / "by-the-engine"
        stats = apply(store, plan, dest, settings, engine=engine)
    finally:
        engine.close()
    assert tree(dest) == expected
    assert stats.bytes == sum(b.size for b in blobs)
    assert stat.S_IMODE((dest / "weights" / "model.safetensors").stat().st_mode) == 0o644


def test_a_raw_layer_path_leading_outside_is_refused(
    store: ImageStore, settings: Settings, tmp_path: Path
) -> None:
    blob = blob_for(b"x", MODELPACK_RAW, relpath="../outside.bin")
    store.blobs[blob.name] = b"x"
    plan = store.add_blobs("raw-escape", [blob])
    with pytest.raises(UnsafePath, match=rf"{blob.name}.*'\.\./outside\.bin'"):
        apply(store, plan, tmp_path / "out", settings)
    assert not (tmp_path / "outside.bin").exists()
    assert store.opens == []


def test_a_kitops_modelkit_keeps_its_paths(store: ImageStore, settings: Settings, tmp_path: Path) -> None:
    model = layer([file("models/model.onnx", b"onnx")], "gzip")
    plan = store.add("kit", [(model[0], KITOPS_MODEL_GZ)])
    dest = tmp_path / "out"
    apply(store, plan, dest, settings)
    assert tree(dest) == {"models/model.onnx": b"onnx"}


# --- ModelCar images: the models/ subtree ----------------------------------------------------------


def modelcar_base() -> tuple[bytes, str]:
    return layer(
        [
            folder("bin"),
            file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 8, mode=0o755),
            symlink("bin/sh", "busybox"),
            file("etc/passwd", b"root:x:0:0"),
            folder("models"),
        ],
        "gzip",
    )


def test_only_the_models_folder_of_a_modelcar_image_is_kept(
    store: ImageStore, settings: Settings, tmp_path: Path
) -> None:
    onnx = os.urandom(200_000)
    weights = layer([file("models/model.onnx", onnx)])
    config = layer([file("models/config/settings.json", b'{"a": 1}'), symlink("models/latest", "model.onnx")])
    plan = store.add("modelcar", [modelcar_base(), weights, config], subtree="models")
    dest = tmp_path / "out"
    stats = apply(store, plan, dest, settings)
    assert tree(dest) == {"model.onnx": onnx, "config/settings.json": b'{"a": 1}', "latest": "-> model.onnx"}
    assert stats.files == 2
    assert stats.model_bytes == len(onnx) + 8


def test_a_modelcar_image_without_models_is_not_found(
    store: ImageStore, settings: Settings, tmp_path: Path
) -> None:
    plan = store.add("no-models", [layer([file("app/main.py", b"print()")])], subtree="models")
    dest = tmp_path / "out"
    with pytest.raises(StorageNotFound, match=r"no 'models/' folder"):
        apply(store, plan, dest, settings)
    assert list(dest.iterdir()) == []

    plan = store.add("models-file", [layer([file("models", b"not a folder")])], subtree="models")
    with pytest.raises(InvalidRequest, match="not a folder"):
        apply(store, plan, tmp_path / "out2", settings)


def test_a_link_out_of_the_models_folder_is_refused(
    store: ImageStore, settings: Settings, tmp_path: Path
) -> None:
    model = layer([file("data/w.bin", b"w"), symlink("models/w.bin", "../data/w.bin")])
    blob = blob_for(model[0], model[1])
    plan = store.add("link-out", [model], subtree="models")
    dest = tmp_path / "out"
    with pytest.raises(
        UnsafePath, match=rf"layer '{blob.name}': link 'models/w.bin'.*leads outside the model"
    ):
        apply(store, plan, dest, settings)
    assert list(dest.iterdir()) == []


def test_links_of_two_layers_that_escape_together_are_refused(
    store: ImageStore, settings: Settings, tmp_path: Path
) -> None:
    lower = layer([symlink("models/here", ".")])
    upper = layer([symlink("models/up", "here/..")])  # fine on its own, not with the lower link
    plan = store.add("escape-together", [lower, upper], subtree="models")
    upper_digest = blob_for(*upper).name
    with pytest.raises(UnsafePath, match=rf"layer '{upper_digest}': link 'models/up'"):
        apply(store, plan, tmp_path / "out", settings)


# --- integrity -------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_a_corrupted_layer_fails_and_places_nothing(
    store: ImageStore, settings: Settings, tmp_path: Path, compression: str
) -> None:
    good = layer([file("models/a.bin", os.urandom(40_000))], compression)
    bad = layer([file("models/b.bin", os.urandom(60_000))], compression)
    plan = store.add("corrupt", [good, bad])
    digest = plan.blobs[1].name
    store.damaged[digest] = 10  # every fetch
    dest = tmp_path / "out"
    with pytest.raises(IntegrityError, match=rf"layer '{digest}'.*fetched twice"):
        apply(store, plan, dest, settings)
    assert list(dest.iterdir()) == []
    assert store.opened(digest) == 2


def test_a_layer_damaged_once_is_fetched_again(store: ImageStore, settings: Settings, tmp_path: Path) -> None:
    data = os.urandom(60_000)
    plan = store.add("once", [layer([file("w.bin", data)], "gzip")])
    digest = plan.blobs[0].name
    store.damaged[digest] = 1
    dest = tmp_path / "out"
    with capture_logs() as logs:
        stats = apply(store, plan, dest, settings)
    assert tree(dest) == {"w.bin": data}
    assert store.opened(digest) == 2
    assert stats.bytes == 2 * plan.blobs[0].size
    assert any(entry["event"] == "layer digest mismatch, fetching it again" for entry in logs)


def test_a_wrong_size_is_an_integrity_error(store: ImageStore, settings: Settings, tmp_path: Path) -> None:
    data = layer([file("w.bin", b"w" * 3000)])[0]
    blob = replace(blob_for(data, TAR), size=len(data) - 100)
    store.blobs[blob.name] = data
    plan = store.add_blobs("short", [blob])
    with pytest.raises(IntegrityError, match=blob.name):
        apply(store, plan, tmp_path / "out", settings)


def test_a_layer_that_is_no_tar_is_a_bad_archive(
    store: ImageStore, settings: Settings, tmp_path: Path
) -> None:
    for name, data, media_type in (
        ("not-tar", os.urandom(5000), TAR),
        ("not-gzip", os.urandom(5000), TAR_GZ),
        ("not-zstd", os.urandom(5000), TAR_ZSTD),
    ):
        plan = store.add(name, [(data, media_type)])
        dest = tmp_path / name
        with pytest.raises(BadArchive, match=plan.blobs[0].name):
            apply(store, plan, dest, settings)
        assert store.opened(plan.blobs[0].name) == 1  # the digest was right: no second fetch
        assert list(dest.iterdir()) == []


def test_a_transient_failure_resumes_where_the_stream_stopped(
    store: ImageStore, settings: Settings, tmp_path: Path
) -> None:
    data = os.urandom(200_000)
    plan = store.add("flaky", [layer([file("w.bin", data)], "zstd")])
    digest = plan.blobs[0].name
    store.fail_at[digest] = 40_000
    dest = tmp_path / "out"
    apply(store, plan, dest, settings)
    assert tree(dest) == {"w.bin": data}
    starts = [start for name, start in store.opens if name == digest]
    assert starts[0] == 0
    assert len(starts) == 2
    assert starts[1] >= 40_000


def test_a_layer_without_a_digest_is_refused(store: ImageStore, settings: Settings, tmp_path: Path) -> None:
    data = layer([file("a", b"a")])[0]
    blob = Blob(name="layer-0", relpath="", size=len(data), media_type=TAR)
    store.blobs[blob.name] = data
    plan = store.add_blobs("undigested", [blob])
    with pytest.raises(Exception, match="names no sha256 digest"):
        apply(store, plan, tmp_path / "out", settings)


# --- safety --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (file("../escape.txt", b"x"), r"'\.\./escape\.txt'"),
        (file("models/../../escape.txt", b"x"), r"'models/\.\./\.\./escape\.txt'"),
        (file("/abs.txt", b"x"), r"'/abs\.txt' is absolute"),
        (symlink("models/etc", "/etc"), r"link 'models/etc' points to the absolute path '/etc'"),
        (symlink("models/up", "../../.."), r"link 'models/up' -> '\.\./\.\./\.\.' leads outside"),
        (hardlink("models/passwd", "../../../etc/passwd"), r"hard link 'models/passwd' .* leads outside"),
        (hardlink("models/shadow", "/etc/shadow"), r"hard link 'models/shadow' points to the absolute path"),
        (Entry("models/tty", kind=tarfile.CHRTYPE), r"entry 'models/tty' is a device file"),
        (Entry("models/disk", kind=tarfile.BLKTYPE), r"entry 'models/disk' is a device file"),
        (Entry("models/pipe", kind=tarfile.FIFOTYPE), r"entry 'models/pipe' is a FIFO"),
        (Entry("bin/outside-the-subtree", kind=tarfile.CHRTYPE), r"is a device file"),
        (whiteout("models/.."), r"whiteout"),
    ],
)
def test_hostile_entries_are_refused_naming_the_layer(
    store: ImageStore, settings: Settings, tmp_path: Path, entry: Entry, match: str
) -> None:
    lower = layer([file("models/fine.bin", b"fine")])
    hostile = layer([file("models/ok.bin", b"ok"), entry], "gzip")
    plan = store.add("hostile", [lower, hostile], subtree="models")
    digest = plan.blobs[1].name
    dest = tmp_path / "box" / "out"
    dest.parent.mkdir()
    before = snapshot(tmp_path, dest)
    with pytest.raises(UnsafePath, match=rf"layer '{digest}'.*{match}"):
        apply(store, plan, dest, settings)
    assert list(dest.iterdir()) == []
    assert snapshot(tmp_path, dest) == before  # nothing written outside dest
    assert not list(tmp_path.rglob("escape.txt"))


def test_special_mode_bits_are_stripped(store: ImageStore, settings: Settings, tmp_path: Path) -> None:
    plan = store.add(
        "modes",
        [
            layer(
                [
                    folder("models", mode=0o1777),
                    file("models/suid", b"#!", mode=0o4755),
                    file("models/sgid", b"x", mode=0o2644),
                    file("models/world", b"x", mode=0o666),
                ]
            )
        ],
    )
    dest = tmp_path / "out"
    apply(store, plan, dest, settings)
    assert stat.S_IMODE((dest / "models").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "models" / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "models" / "sgid").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "models" / "world").stat().st_mode) == 0o644


def test_the_unpacked_size_is_capped_across_layers(store: ImageStore, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, pull_workers=4, archive_max_bytes=100_000)
    capped = ImageStore(StorageConfig(type="oci"), settings)
    # each layer fits; together they do not. Zeros: a few hundred bytes compressed.
    first = layer([file("a.bin", bytes(60_000))], "gzip")
    second = layer([file("b.bin", bytes(60_000))], "zstd")
    plan = capped.add("big", [first, second])
    dest = tmp_path / "out"
    with pytest.raises(ArchiveTooLarge, match="ARCHIVE_MAX_BYTES"):
        apply(capped, plan, dest, settings)
    assert list(dest.iterdir()) == []


def test_a_destination_that_is_not_empty_is_refused(
    store: ImageStore, settings: Settings, tmp_path: Path
) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "there").write_bytes(b"x")
    plan = store.add("x", [layer([file("a", b"a")])])
    with pytest.raises(Exception, match="not empty"):
        apply(store, plan, dest, settings)
    assert (dest / "there").read_bytes() == b"x"


# --- parallelism and cancellation -------------------------------------------------------------


def test_layers_are_fetched_in_parallel(store: ImageStore, settings: Settings, tmp_path: Path) -> None:
    layers = [layer([file(f"models/{i}.bin", os.urandom(50_000))]) for i in range(3)]
    plan = store.add("parallel", layers)
    # no layer's first read goes on before all three streams are open at once: a
    # one-at-a-time fetch would break the barrier (and fail) instead of hanging
    barrier = threading.Barrier(3, timeout=30)

    def first_read(_name: str) -> None:
        barrier.wait()

    store.on_first_read = first_read
    apply(store, plan, tmp_path / "out", settings)
    assert store.max_active == 3


def test_one_worker_fetches_one_layer_at_a_time(store: ImageStore, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, pull_workers=1)
    plan = store.add("serial", [layer([file(f"{i}.bin", os.urandom(40_000))]) for i in range(3)])
    apply(store, plan, tmp_path / "out", settings)
    assert store.max_active == 1


def test_cancel_stops_every_layer_and_leaves_nothing(
    store: ImageStore, settings: Settings, tmp_path: Path
) -> None:
    plan = store.add("cancel", [layer([file(f"{i}.bin", os.urandom(300_000))]) for i in range(3)])
    cancel = threading.Event()
    reads = 0
    lock = threading.Lock()

    def on_read(_name: str) -> None:
        nonlocal reads
        with lock:
            reads += 1
            if reads == 5:
                cancel.set()

    store.on_read = on_read
    dest = tmp_path / "out"
    with pytest.raises(FetchCancelled):
        apply(store, plan, dest, settings, cancel=cancel)
    assert store.active == 0  # every stream closed before apply_layers returned
    assert list(dest.iterdir()) == []
    with lock:
        at_cancel = reads
    assert at_cancel < 3 * 300_000 // (16 * 1024)  # it stopped long before the end


def test_one_failing_layer_stops_the_others(store: ImageStore, settings: Settings, tmp_path: Path) -> None:
    good = [layer([file(f"{i}.bin", os.urandom(300_000))]) for i in range(2)]
    bad = layer([file("../x", b"x")])
    plan = store.add("one-bad", [bad, *good])
    bad_digest = plan.blobs[0].name
    bad_closed = threading.Event()
    lock = threading.Lock()
    reads: dict[str, int] = {}
    after_failure: dict[str, int] = {}

    def on_read(name: str) -> None:
        if name == bad_digest:
            return
        with lock:
            reads[name] = reads.get(name, 0) + 1
            second = reads[name] == 2
        if second:  # the good layers go on only once the bad one has failed
            assert bad_closed.wait(30), "the bad layer never failed"
        if bad_closed.is_set():
            with lock:
                after_failure[name] = after_failure.get(name, 0) + 1

    def on_close(name: str) -> None:
        if name == bad_digest:
            bad_closed.set()

    store.on_read = on_read
    store.on_close = on_close
    with pytest.raises(UnsafePath, match=bad_digest):
        apply(store, plan, tmp_path / "out", settings)
    assert store.active == 0
    # a read already under way when the bad layer failed ends; no other one starts
    assert set(after_failure) <= {b.name for b in plan.blobs[1:]}
    assert all(count <= 1 for count in after_failure.values()), after_failure


# --- the content cache --------------------------------------------------------------------------


@pytest.fixture
def cache(settings: Settings) -> ContentCache:
    settings.root_model_dir.mkdir(parents=True, exist_ok=True)
    content = ContentCache(settings.root_model_dir, 10 * 1024 * 1024, metrics=PullMetrics())
    content.open()
    return content


def test_a_cached_layer_is_not_fetched_again(
    store: ImageStore, settings: Settings, cache: ContentCache
) -> None:
    base_data = os.urandom(100_000)
    base = layer([file("models/base.bin", base_data), file("models/old.bin", b"old")], "gzip")
    first_top = layer([file("models/v1.txt", b"v1"), whiteout("models/old.bin")])
    second_top = layer([file("models/v2.txt", b"v2"), hardlink("models/base-again.bin", "models/base.bin")])
    one = store.add("one", [modelcar_base(), base, first_top], subtree="models")
    two = store.add("two", [modelcar_base(), base, second_top], subtree="models")
    base_digest = one.blobs[1].name

    out1 = settings.root_model_dir / "m1"
    stats1 = apply(store, one, out1, settings, cache=cache)
    assert tree(out1) == {"base.bin": base_data, "v1.txt": b"v1"}
    assert stats1.cache_hits == 0
    assert len(cache) == 3

    out2 = settings.root_model_dir / "m2"
    stats2 = apply(store, two, out2, settings, cache=cache)
    assert tree(out2) == {
        "base.bin": base_data,
        "old.bin": b"old",
        "v2.txt": b"v2",
        "base-again.bin": base_data,
    }
    assert store.opened(base_digest) == 1  # fetched once, for the first image
    assert store.opened(one.blobs[0].name) == 1
    assert stats2.cache_hits == 2
    assert stats2.cache_bytes == one.blobs[0].size + one.blobs[1].size
    assert stats2.bytes == two.blobs[2].size
    # both models share the cached file, read-only
    assert (out1 / "base.bin").samefile(out2 / "base.bin")
    assert (out2 / "base.bin").samefile(out2 / "base-again.bin")
    assert stat.S_IMODE((out2 / "base.bin").stat().st_mode) == 0o444
    # the merge made fresh folders: writing into the model does not touch the cache
    (out2 / "new-file").write_bytes(b"x")
    assert not list((settings.root_model_dir / CACHE_DIR_NAME).rglob("new-file"))

    # the same again: everything from the cache, nothing from the store
    out3 = settings.root_model_dir / "m3"
    opens = len(store.opens)
    stats3 = apply(store, two, out3, settings, cache=cache)
    assert len(store.opens) == opens
    assert stats3.bytes == 0
    assert stats3.cache_hits == 3
    expected = tree(out2)
    del expected["new-file"]
    assert tree(out3) == expected


def test_cached_layers_survive_a_restart_and_are_evicted_when_unused(
    store: ImageStore, settings: Settings, cache: ContentCache
) -> None:
    data = os.urandom(200_000)
    plan = store.add("evict", [layer([file("w.bin", data)], "zstd"), layer([file("x.txt", b"x")])])
    out = settings.root_model_dir / "m"
    apply(store, plan, out, settings, cache=cache)
    assert len(cache) == 2
    assert cache.total_bytes == 200_001

    reopened = ContentCache(settings.root_model_dir, 100_000)  # a smaller cap
    reopened.open()
    assert len(reopened) == 2  # the model links both: nothing evicted
    out2 = settings.root_model_dir / "m2"
    stats = apply(store, plan, out2, settings, cache=reopened)
    assert stats.cache_hits == 2
    assert tree(out2) == {"w.bin": data, "x.txt": b"x"}

    for model in (out, out2):
        for path in model.rglob("*"):
            path.unlink()
        model.rmdir()
    assert reopened.evict()  # no model links the big tree any more
    assert reopened.total_bytes <= 100_000


def test_a_damaged_layer_is_never_cached(store: ImageStore, settings: Settings, cache: ContentCache) -> None:
    plan = store.add("damaged", [layer([file("w.bin", os.urandom(10_000))])])
    store.damaged[plan.blobs[0].name] = 10
    with pytest.raises(IntegrityError):
        apply(store, plan, settings.root_model_dir / "m", settings, cache=cache)
    assert len(cache) == 0


# --- the Puller ------------------------------------------------------------------------------------


class OneStoreRegistry(StorageRegistry):
    """Hands out the image store for every storage config."""

    def __init__(self, store: Storage) -> None:
        super().__init__()
        self.store = store

    def get(self, config: StorageConfig, settings: Settings) -> Storage:
        return self.store


@dataclass
class PullerSetup:
    puller: Puller
    store: ImageStore
    settings: Settings
    metrics: PullMetrics = field(default_factory=PullMetrics)


async def start_puller(settings: Settings, store: ImageStore) -> PullerSetup:
    settings.storage_config_dir.mkdir(parents=True, exist_ok=True)
    (settings.storage_config_dir / "default").write_text(
        json.dumps({"type": "oci", "registry": "registry.test"})
    )
    metrics = PullMetrics()
    puller = Puller(settings, registry=OneStoreRegistry(store), metrics=metrics)
    await asyncio.to_thread(puller.start)
    return PullerSetup(puller, store, settings, metrics)


@pytest.fixture
async def setup(settings: Settings, store: ImageStore) -> AsyncIterator[PullerSetup]:
    started = await start_puller(settings, store)
    yield started
    await asyncio.to_thread(started.puller.close)


def request(model_id: str, path: str, **key: Any) -> PullRequest:
    return PullRequest(model_id=model_id, model_path=path, model_key=ModelKey.from_mapping(key))


def staging_leftovers(settings: Settings) -> list[str]:
    tmp = settings.root_model_dir / "_tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


async def test_the_puller_places_a_modelcar_image(setup: PullerSetup) -> None:
    onnx = os.urandom(100_000)
    plan = setup.store.add(
        "org/resnet:v1",
        [modelcar_base(), layer([file("models/model.onnx", onnx), file("models/schema.json", b"{}")])],
        subtree="models",
    )
    with capture_logs() as logs:
        local = await setup.puller.pull(request("resnet__isvc-1", "org/resnet:v1", schema_path="schema.json"))
    target = setup.settings.root_model_dir / "resnet__isvc-1"
    assert local.path == target / "resnet"
    assert tree(local.path) == {"model.onnx": onnx, "schema.json": b"{}"}
    assert local.disk_size_bytes == len(onnx) + 2
    assert local.schema_path == target / "_schema.json"
    assert local.schema_path.read_bytes() == b"{}"
    assert sorted(p.name for p in target.iterdir()) == ["_schema.json", "resnet"]
    pulled = [entry for entry in logs if entry["event"] == "model pulled"]
    assert len(pulled) == 1
    assert pulled[0]["source"] == plan.source
    assert pulled[0]["layers"] == 2
    assert pulled[0]["bytes"] == plan.total_bytes
    assert pulled[0]["files"] == 2
    assert setup.metrics.value("modelmesh_puller_pulled_bytes_total", {"backend": "oci"}) == plan.total_bytes
    assert staging_leftovers(setup.settings) == []


async def test_a_failed_image_pull_leaves_nothing(setup: PullerSetup) -> None:
    plan = setup.store.add("org/bad:v1", [layer([file("models/a", os.urandom(20_000))])], subtree="models")
    setup.store.damaged[plan.blobs[0].name] = 10
    with pytest.raises(IntegrityError, match=plan.blobs[0].name):
        await setup.puller.pull(request("bad__isvc-2", "org/bad:v1"))
    setup.store.add("org/evil:v1", [layer([file("models/ok", b"ok"), symlink("models/etc", "/etc")])])
    with pytest.raises(UnsafePath, match="/etc"):
        await setup.puller.pull(request("evil__isvc-3", "org/evil:v1"))
    setup.store.add("org/app:v1", [layer([file("app/main.py", b"")])], subtree="models")
    with pytest.raises(StorageNotFound, match="models"):
        await setup.puller.pull(request("app__isvc-4", "org/app:v1"))
    assert sorted(p.name for p in setup.settings.root_model_dir.iterdir()) == ["_tmp"]
    assert staging_leftovers(setup.settings) == []
    failures = setup.metrics.value(
        "modelmesh_puller_pull_failures_total", {"backend": "oci", "reason": "IntegrityError"}
    )
    assert failures == 1


async def test_cancelling_an_image_pull_leaves_nothing(setup: PullerSetup) -> None:
    setup.store.add("org/big:v1", [layer([file(f"models/{i}", os.urandom(400_000))]) for i in range(2)])
    started = threading.Event()
    release = threading.Event()

    def on_read(_name: str) -> None:
        started.set()
        release.wait(30)

    setup.store.on_read = on_read
    task = asyncio.create_task(setup.puller.pull(request("big__isvc-5", "org/big:v1")))
    assert await asyncio.to_thread(started.wait, 30)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert setup.store.active == 0
    assert not (setup.settings.root_model_dir / "big__isvc-5").exists()
    assert staging_leftovers(setup.settings) == []


async def test_the_puller_serves_shared_layers_from_the_cache(tmp_path: Path, store: ImageStore) -> None:
    settings = make_settings(tmp_path, cache_max_bytes=10 * 1024 * 1024)
    cached = ImageStore(StorageConfig(type="oci"), settings)
    weights = os.urandom(150_000)
    shared = layer([file("models/weights.bin", weights)], "gzip")
    cached.add("org/a:v1", [modelcar_base(), shared, layer([file("models/a.txt", b"a")])], subtree="models")
    cached.add("org/b:v1", [modelcar_base(), shared, layer([file("models/b.txt", b"b")])], subtree="models")
    setup = await start_puller(settings, cached)
    try:
        first = await setup.puller.pull(request("a__isvc-6", "org/a:v1"))
        opens = len(cached.opens)
        with capture_logs() as logs:
            second = await setup.puller.pull(request("b__isvc-7", "org/b:v1"))
        assert len(cached.opens) == opens + 1  # only the layer that differs
        assert tree(first.path) == {"weights.bin": weights, "a.txt": b"a"}
        assert tree(second.path) == {"weights.bin": weights, "b.txt": b"b"}
        assert (first.path / "weights.bin").samefile(second.path / "weights.bin")
        pulled = next(entry for entry in logs if entry["event"] == "model pulled")
        assert pulled["cache_hits"] == 2
        assert setup.metrics.value("modelmesh_puller_cache_hits_total") == 2
        await setup.puller.remove("a__isvc-6")
        await setup.puller.remove("b__isvc-7")
        assert staging_leftovers(settings) == []
    finally:
        await asyncio.to_thread(setup.puller.close)
