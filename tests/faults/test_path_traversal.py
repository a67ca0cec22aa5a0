"""Path traversal at every place a name arrives, end to end through the Puller (and the
adapter's flow where the name enters there): the modelId, the storage path
(``modelPath``) on the file and pvc backends, the ``schema_path``, a pvc name, object
keys a storage listing returns (a real S3 on moto, and a backend that lists whatever
keys it is given), archive entries, image layers (entries, raw layer paths, the
schema of an image), and the standalone modelPath.

Every test lays out one temp folder: ``models/`` is ROOT_MODEL_DIR, beside it the file
store, the pvc mounts, the storage-config directory and an ``outside/`` folder that the
attacks aim at. Properties: whatever the name, the rest of the temp folder is exactly
as it was (entry by entry, link counts included), nothing under ROOT_MODEL_DIR holds
the outside file's bytes or a link that leads outside ROOT_MODEL_DIR (pvc models are
links to their claim, by design), and a refusal is one of our own errors with a clear
message and leaves nothing behind but the (empty) staging folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import tarfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from adapter.errors import (
    InvalidModelId,
    InvalidRequest,
    SidecarError,
    StorageConfigError,
    StorageError,
    StorageNotFound,
    UnsafePath,
)
from adapter.flow import LoadRequest, ModelFlow
from adapter.settings import Settings
from puller.config import StorageConfig, StorageConfigDirectory
from puller.model_key import ModelKey
from puller.pull import Puller
from puller.request import LocalModel, PullRequest
from puller.storage.base import Blob, ByteStream, Plan, Storage
from puller.storage.pvc import PVCStorage
from puller.storage.registry import StorageRegistry
from tests.adapter.conftest import make_settings as make_adapter_settings
from tests.adapter.recording_runtime import RecordingRuntime
from tests.faults.test_hostile_archives import FUZZ, fingerprint
from tests.puller.conftest import make_settings
from tests.puller.test_archive import file_entry, special_entry, write_tar, write_zip, zip_entry
from tests.puller.test_layers import MODELPACK_RAW, ImageStore, blob_for, file, layer, symlink
from tests.servers.s3 import MotoS3Server

#: the content of the file every attack aims at: it must never be read into the models
PRECIOUS = b"precious-" + uuid.uuid4().hex.encode()

#: model ids that must be refused wherever a modelId arrives
HOSTILE_IDS = [
    "..",
    ".",
    "../outside",
    "../../etc/passwd",
    "a/../../outside",
    "/abs",
    "a/b",
    "..\\outside",
    "x\x00y",
    "x\ny",
    "_tmp",
    "_cache",
    "_recording_models",
    "",
    "\ud800",
    "m" * 256,
]


# --- a backend that lists whatever keys it is given ---------------------------------------------


class _Bytes:
    """Bytes ``[start, end)`` of one object, read in small chunks."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def readinto(self, buffer: memoryview) -> int:
        count = min(len(buffer), 4096, len(self.data))
        buffer[:count] = self.data[:count]
        self.data = self.data[count:]
        return count

    def close(self) -> None:
        self.data = b""


class ListingStore(Storage):
    """An object store that lists keys as S3, GCS and Azure list them: every object
    below ``<path>/``, its relpath the key with the prefix cut off (so a key
    ``m/a/../../x`` gives ``a/../../x``), and serves their bytes."""

    types = ("listing",)

    def __init__(self, config: StorageConfig, settings: Settings) -> None:
        super().__init__(config, settings)
        self.objects: dict[str, bytes] = {}

    def plan(self, path: str) -> Plan:
        key = path.lstrip("/")
        if key in self.objects:
            data = self.objects[key]
            return Plan(blobs=(Blob(key, key.rsplit("/", 1)[-1], len(data)),), single_object=True)
        prefix = key + "/" if key and not key.endswith("/") else key
        blobs = tuple(
            Blob(name, name[len(prefix) :], len(data))
            for name, data in sorted(self.objects.items())
            if name.startswith(prefix) and not name.endswith("/")
        )
        if not blobs:
            raise StorageNotFound(f"nothing at '{key}'")
        return Plan(blobs=blobs, single_object=False)

    def open_range(self, blob: Blob, start: int, end: int) -> ByteStream:
        return _Bytes(self.objects[blob.name][start:end])

    def identity(self) -> str:
        return "listing:test"


class WorldRegistry(StorageRegistry):
    """The real registry, except that the entries ``listing`` and ``image`` are served
    by the in-memory stores."""

    def __init__(self, listing: ListingStore, image: ImageStore) -> None:
        super().__init__()
        self.listing = listing
        self.image = image

    def get(self, config: StorageConfig, settings: Settings) -> Storage:
        if config.name == "listing":
            return self.listing
        if config.name == "image":
            return self.image
        return super().get(config, settings)


# --- the world --------------------------------------------------------------------------------


@dataclass
class World:
    """One temp folder: ROOT_MODEL_DIR (``models``), the file store, the pvc mounts,
    the storage config and ``outside``; a started Puller over them."""

    top: Path
    settings: Settings
    puller: Puller
    registry: WorldRegistry

    @property
    def root(self) -> Path:
        return self.settings.root_model_dir

    @property
    def store(self) -> Path:
        return self.top / "store"

    @property
    def outside(self) -> Path:
        return self.top / "outside"

    @property
    def listing(self) -> ListingStore:
        return self.registry.listing

    @property
    def image(self) -> ImageStore:
        return self.registry.image

    def freeze(self) -> dict[str, tuple[object, ...]]:
        return fingerprint(self.top, self.root)

    def pull(self, model_id: str, model_path: str, **key: Any) -> LocalModel | SidecarError:
        """Pull, and check what any pull must leave (whatever its outcome)."""
        before = self.freeze()
        request = PullRequest(model_id=model_id, model_path=model_path, model_key=ModelKey.from_mapping(key))
        outcome: LocalModel | SidecarError
        try:
            outcome = asyncio.run(self.puller.pull(request))
        except SidecarError as exc:
            outcome = exc
            message = str(exc)
            assert message.strip()
            message.encode("utf-8")
        assert self.freeze() == before, "nothing outside ROOT_MODEL_DIR changed"
        self.assert_contained()
        if isinstance(outcome, SidecarError):
            leftovers = sorted(p.name for p in self.root.iterdir() if p.name not in ("_tmp", "_cache"))
            assert leftovers == [], f"a refused pull left {leftovers}"
            staging = self.root / "_tmp"
            assert not staging.exists() or not any(staging.iterdir())
        return outcome

    def assert_contained(self) -> None:
        """Nothing under ROOT_MODEL_DIR is the outside file or a copy of it, and every
        link resolves inside ROOT_MODEL_DIR (or, for a pvc model, inside its claim)."""
        real_root = os.path.realpath(self.root)
        claim = os.path.realpath(self.top / "pvc" / "claim")
        outside = os.stat(self.outside / "precious.txt")
        for folder, dirs, files in os.walk(self.root):
            for name in (*dirs, *files):
                path = Path(folder) / name
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    real = os.path.realpath(path)
                    assert any(real == top or real.startswith(top + os.sep) for top in (real_root, claim)), (
                        f"{path} -> {real}"
                    )
                elif stat.S_ISREG(st.st_mode):
                    assert (st.st_dev, st.st_ino) != (outside.st_dev, outside.st_ino)
                    assert path.read_bytes() != PRECIOUS, f"{path} holds the outside file's bytes"

    def clear(self) -> None:
        """Remove every model (between examples)."""
        for entry in self.root.iterdir():
            if entry.name not in ("_tmp", "_cache"):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


def build_world(top: Path, **overrides: Any) -> World:
    settings = make_settings(top, **overrides)
    outside = top / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "precious.txt").write_bytes(PRECIOUS)
    (outside / "folder" / "precious.txt").write_bytes(PRECIOUS)
    store = top / "store"
    (store / "models" / "m").mkdir(parents=True)
    (store / "models" / "m" / "weights.bin").write_bytes(b"weights")
    (store / "models" / "m" / "cfg.json").write_bytes(b"{}")
    (store / "models" / "single.bin").write_bytes(b"single")
    (store / "schemas").mkdir()
    (store / "schemas" / "s.json").write_bytes(b'{"inputs": []}')
    (store / "models" / "out").symlink_to("../../outside")  # a link in the store leading out
    (store / "models" / "m" / "up").symlink_to("../../../outside/precious.txt")
    claim = top / "pvc" / "claim"
    (claim / "models" / "m").mkdir(parents=True)
    (claim / "models" / "m" / "weights.bin").write_bytes(b"weights")
    (claim / "out").symlink_to("../../outside")
    configs = settings.storage_config_dir
    configs.mkdir(parents=True)
    entries = {
        "default": {"type": "file", "root": str(store)},
        "pvc": {"type": "pvc", "name": "claim"},
        "listing": {"type": "http", "url": "http://listing.invalid"},
        "image": {"type": "oci", "registry": "registry.test"},
    }
    for name, entry in entries.items():
        (configs / name).write_text(json.dumps(entry))
    registry = WorldRegistry(
        ListingStore(StorageConfig("http", {}, "listing"), settings),
        ImageStore(StorageConfig("oci", {"registry": "registry.test"}, "image"), settings),
    )
    puller = Puller(settings, StorageConfigDirectory(configs), registry=registry)
    puller.start()
    return World(top, settings, puller, registry)


@contextmanager
def opened_world(top: Path, **overrides: Any) -> Iterator[World]:
    made = build_world(top, **overrides)
    try:
        yield made
    finally:
        made.puller.close()
        made.registry.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with opened_world(tmp_path) as made:
        yield made


# --- modelId ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", HOSTILE_IDS, ids=repr)
def test_a_hostile_model_id_is_refused_wherever_it_arrives(world: World, model_id: str) -> None:
    # loadModel: the servicer parses the request with LoadRequest.parse
    with pytest.raises(InvalidModelId):
        LoadRequest.parse(model_id, "models/single.bin", "", "")
    # the puller (embedded, or the standalone puller's pullModel)
    outcome = world.pull(model_id, "models/single.bin")
    assert isinstance(outcome, InvalidModelId), outcome
    # unloadModel and the puller's removal
    before = world.freeze()
    with pytest.raises(InvalidModelId):
        asyncio.run(world.puller.remove(model_id))
    flow_settings = make_adapter_settings(world.root)
    flow = ModelFlow(flow_settings, RecordingRuntime(flow_settings), world.puller)
    with pytest.raises(InvalidModelId):
        asyncio.run(flow.unload(model_id))
    assert world.freeze() == before
    assert {p.name for p in world.root.iterdir()} <= {"_tmp"}


@FUZZ
@given(model_id=st.text(max_size=40) | st.sampled_from(HOSTILE_IDS))
@example(model_id="a\udcffb")
def test_any_model_id_is_refused_or_one_folder_of_the_root(world: World, model_id: str) -> None:
    outcome = world.pull(model_id, "models/single.bin")
    if isinstance(outcome, SidecarError):
        assert isinstance(outcome, InvalidModelId), outcome
    else:
        assert outcome.path == world.root / model_id / "single.bin"
        assert (world.root / model_id).parent == world.root
        assert {p.name for p in world.root.iterdir()} - {"_tmp"} == {model_id}
    world.clear()


# --- the storage path (modelPath) ------------------------------------------------------------------

#: model paths leading out of the store, on either backend (a pvc model is a link to
#: a folder of its claim, used in place: links *inside* that folder are the claim
#: owner's business and are not followed here, so the store-wide cases below are for
#: the file backend, which copies)
HOSTILE_PATHS = [
    "../outside/precious.txt",
    "../outside",
    "../../",
    "..",
    "models/../../outside/precious.txt",
    "/../outside/precious.txt",
    "//../outside",
    "models/out/precious.txt",  # through a link in the store that leads out
    "models/out",
    "out",  # on the claim: a link leading out
    "models/m/up",
    "%2e%2e/outside/precious.txt",
    "models/m\x00",
    "models\\..\\..\\outside",
]

path_segments = st.sampled_from(
    ["models", "m", "single.bin", "out", "outside", "precious.txt", "..", ".", ""]
)
model_paths = st.sampled_from(HOSTILE_PATHS) | st.lists(path_segments, max_size=5).map("/".join)


@pytest.mark.parametrize("backend", ["default", "pvc"])
@pytest.mark.parametrize("model_path", HOSTILE_PATHS, ids=repr)
def test_a_storage_path_leading_out_is_refused(world: World, backend: str, model_path: str) -> None:
    outcome = world.pull("m", model_path, storage_key=backend)
    assert isinstance(outcome, (UnsafePath, StorageNotFound)), outcome


@pytest.mark.parametrize("model_path", ["models/m", "", "models", "/"])
def test_a_copied_tree_holding_a_link_leading_out_is_refused(world: World, model_path: str) -> None:
    outcome = world.pull("m", model_path)
    assert isinstance(outcome, UnsafePath), outcome


@FUZZ
@given(model_path=model_paths, backend=st.sampled_from(["default", "pvc"]))
def test_any_storage_path_stays_in_its_store(world: World, model_path: str, backend: str) -> None:
    outcome = world.pull("m", model_path, storage_key=backend)
    if isinstance(outcome, SidecarError):
        assert isinstance(outcome, (UnsafePath, StorageNotFound)), outcome
    world.clear()


@pytest.mark.parametrize(
    "schema_path",
    ["../outside/precious.txt", "models/out/precious.txt", "/../outside/precious.txt", "models/m/up"],
)
def test_a_schema_path_leading_out_is_refused(world: World, schema_path: str) -> None:
    outcome = world.pull("m", "models/m", schema_path=schema_path)
    assert isinstance(outcome, (UnsafePath, StorageNotFound)), outcome


@pytest.mark.parametrize("name", ["..", "../outside", "claim/../../outside", ".", "a/b", "claim\x00"])
def test_a_pvc_name_leading_out_is_refused(world: World, name: str) -> None:
    outcome = world.pull("m", "models/m", storage_key="pvc", storage_params={"name": name})
    assert isinstance(outcome, (UnsafePath, StorageConfigError)), outcome


@FUZZ
@given(name=st.text(max_size=12) | st.sampled_from(["..", "...", ".", "a/..", "\\..", "claim"]))
def test_a_pvc_root_is_one_folder_of_the_mounts(tmp_path: Path, name: str) -> None:
    settings = make_settings(tmp_path)
    try:
        storage = PVCStorage(StorageConfig("pvc", {"name": name}), settings)
    except (UnsafePath, StorageConfigError):
        return
    mounts = Path(os.path.normpath(settings.pvc_mounts_dir.absolute()))
    assert storage.root.parent == mounts
    assert storage.root.name == name


# --- the standalone modelPath --------------------------------------------------------------------


def standalone_load(world: World, model_path: str) -> Exception | None:
    settings = make_adapter_settings(world.root)
    flow = ModelFlow(settings, RecordingRuntime(settings), None)
    try:
        asyncio.run(flow.load(LoadRequest.parse("m", model_path, "", "")))
    except SidecarError as exc:
        return exc
    return None


def test_a_standalone_model_path_outside_the_root_is_refused(world: World) -> None:
    for model_path in (str(world.outside / "precious.txt"), str(world.outside)):
        assert isinstance(standalone_load(world, model_path), InvalidRequest), model_path


@pytest.mark.parametrize("spelled", ["relative", "absolute"])
def test_a_standalone_model_path_with_dotdot_is_refused(world: World, spelled: str) -> None:
    model_path = (
        "../outside/precious.txt" if spelled == "relative" else f"{world.root}/../outside/precious.txt"
    )
    assert isinstance(standalone_load(world, model_path), InvalidRequest)


# --- object keys from a listing ------------------------------------------------------------------

#: keys below the model prefix ``m/`` that a listing may return, each with why it is bad
HOSTILE_KEYS = [
    "m/a/../../escaped.bin",
    "m/../escaped.bin",
    "m/..",
    "m/a/..",
    "m/./.",
    "m/..\\..\\escaped.bin",
    "m//" + "escaped.bin",  # a relpath that starts with '/'
    "m/a\x00b",
    "m/" + "x" * 300,
]


@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=repr)
def test_a_listed_key_leading_out_is_refused(tmp_path: Path, key: str, cached: bool) -> None:
    with opened_world(tmp_path, cache_max_bytes=1024 * 1024 if cached else 0) as here:
        here.listing.objects = {"m/ok.bin": b"ok", key: PRECIOUS}
        outcome = here.pull("m", "m", storage_key="listing")
        assert isinstance(outcome, UnsafePath), outcome
        assert not list(here.top.rglob("escaped.bin"))


listed_keys = st.lists(
    st.builds(
        lambda parts: "m/" + "/".join(parts),
        st.lists(
            st.sampled_from(["a", "b", "..", ".", "", "a\\b", "\x00", "x" * 256]), min_size=1, max_size=4
        ),
    ),
    min_size=1,
    max_size=5,
)


@FUZZ
@given(keys=listed_keys)
@example(keys=["m/a", "m/a/b"])  # a file and a folder of one name
@example(keys=["m/a/b", "m/a//b", "m/./a/b"])  # three keys, one file
def test_any_listing_lands_inside_the_model(world: World, keys: list[str]) -> None:
    world.listing.objects = {key: PRECIOUS if ".." in key else key.encode() for key in keys}
    outcome = world.pull("m", "m", storage_key="listing")
    if isinstance(outcome, SidecarError):
        assert isinstance(outcome, (UnsafePath, StorageError)), outcome
    else:
        for path in outcome.path.rglob("*"):
            assert path.is_dir() or path.read_bytes().startswith(b"m/"), path
    world.clear()


@pytest.mark.integration
def test_s3_keys_leading_out_are_refused(world: World, moto_s3: MotoS3Server) -> None:
    """The same keys in a real S3 (moto), each below a model prefix of its own (S3
    cannot hold a NUL)."""
    bucket = f"trav-{uuid.uuid4().hex[:12]}"
    moto_s3.create_bucket(bucket)
    entry = {
        "type": "s3",
        "endpoint_url": moto_s3.endpoint_url,
        "access_key_id": "key-id",
        "secret_access_key": "secret-" + uuid.uuid4().hex,
        "bucket": bucket,
    }
    (world.settings.storage_config_dir / "s3").write_text(json.dumps(entry))
    for number, key in enumerate(k for k in HOSTILE_KEYS if "\x00" not in k):
        prefix = f"p{number}"
        moto_s3.put_object(bucket, f"{prefix}/m/ok.bin", b"ok")
        moto_s3.put_object(bucket, f"{prefix}/{key}", PRECIOUS)
        outcome = world.pull("m", f"{prefix}/m", storage_key="s3")
        assert isinstance(outcome, UnsafePath), (key, outcome)
    assert not list(world.top.rglob("escaped.bin"))


# --- archive entries -------------------------------------------------------------------------------


def tar_with(*entries: tuple[tarfile.TarInfo, bytes | None]) -> Any:
    return lambda path: write_tar(path, list(entries))


HOSTILE_ARCHIVES: Mapping[str, tuple[str, Any]] = {
    "dotdot entry": ("m.tar", tar_with(file_entry("../../../outside/pwned.txt", b"x"))),
    "absolute entry": ("m.tar", tar_with(file_entry("/tmp/pwned.txt", b"x"))),
    "link out": ("m.tar", tar_with(special_entry("up", tarfile.SYMTYPE, "../../../outside"))),
    "write through a link": (
        "m.tar",
        tar_with(
            special_entry("here", tarfile.SYMTYPE, "."), special_entry("esc", tarfile.SYMTYPE, "here/../..")
        ),
    ),
    "hard link out": (
        "m.tar",
        tar_with(special_entry("h", tarfile.LNKTYPE, "../../../outside/precious.txt")),
    ),
    # inside the folder it unpacks to, but one level up once the lone top folder
    # 'm/' becomes the model folder
    "link out after the top folder is lifted": (
        "m.tar",
        tar_with(
            special_entry("m/", tarfile.DIRTYPE),
            file_entry("m/ok.bin", b"ok"),
            special_entry("m/up", tarfile.SYMTYPE, "../sibling"),
        ),
    ),
    "device": ("m.tar", tar_with(special_entry("tty", tarfile.CHRTYPE))),
    "zip dotdot": ("m.zip", lambda path: write_zip(path, [("../../../outside/pwned.txt", b"x")])),
    "zip link out": (
        "m.zip",
        lambda path: write_zip(path, [(zip_entry("up", stat.S_IFLNK | 0o777), b"../../../outside")]),
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_ARCHIVES))
def test_an_archive_entry_leading_out_is_refused(world: World, case: str) -> None:
    name, build = HOSTILE_ARCHIVES[case]
    (world.store / "archives").mkdir(exist_ok=True)
    build(world.store / "archives" / name)
    outcome = world.pull("m", f"archives/{name}")
    assert isinstance(outcome, UnsafePath), outcome
    assert not list(world.top.rglob("pwned.txt"))


# --- image layers ----------------------------------------------------------------------------------


def test_an_image_entry_leading_out_is_refused(world: World) -> None:
    world.image.add(
        "registry.test/org/model:v1",
        [layer([file("models/ok.bin", b"ok")]), layer([symlink("models/up", "../..")], "gzip")],
        subtree="models",
    )
    outcome = world.pull("m", "registry.test/org/model:v1", storage_key="image")
    assert isinstance(outcome, UnsafePath), outcome


@pytest.mark.parametrize(
    "schema_path", ["../../outside/precious.txt", "up/precious.txt", "/etc/passwd", ".."]
)
def test_an_image_schema_path_leading_out_is_refused(world: World, schema_path: str) -> None:
    world.image.add(
        "registry.test/org/model:v1",
        [layer([file("models/ok.bin", b"ok"), symlink("models/up", ".")])],
        subtree="models",
    )
    outcome = world.pull("m", "registry.test/org/model:v1", storage_key="image", schema_path=schema_path)
    assert isinstance(outcome, (UnsafePath, StorageNotFound)), outcome


@pytest.mark.parametrize("relpath", ["../../outside/pwned.bin", "/abs.bin", "a/../../x.bin", "w\udcff.bin"])
def test_a_raw_layer_path_leading_out_is_refused(world: World, relpath: str) -> None:
    data = b"weights"
    blob = blob_for(data, MODELPACK_RAW, relpath=relpath)
    world.image.blobs[blob.name] = data
    world.image.add_blobs("registry.test/org/pack:v1", [blob])
    outcome = world.pull("m", "registry.test/org/pack:v1", storage_key="image")
    assert isinstance(outcome, UnsafePath), outcome
    assert not list(world.top.rglob("pwned.bin"))
