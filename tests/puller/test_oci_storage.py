"""The ``oci`` storage backend (``puller/storage/oci.py``) against a real registry:
what ``plan`` gives for each kind of artifact (ModelCar and Docker images, zstd
layers, KitOps ModelKits, CNCF ModelPacks), the layer bytes ``open_range`` reads, and
blobs redirected to another server (credentials dropped, the redirect resolved once
per blob and again when the URL stops working, servers without ranges)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from adapter.errors import InvalidRequest, StorageConfigError, StorageError, StorageNotFound, UnsafePath
from adapter.settings import Settings
from puller.config import StorageConfig
from puller.model_key import ModelKey
from puller.pull import Puller
from puller.request import PullRequest
from puller.storage.base import Blob, Plan
from puller.storage.oci import OCIStorage
from tests.puller.conftest import make_settings
from tests.servers.https import FileServer
from tests.servers.oci_images import (
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    FILEPATH_ANNOTATION,
    KITOPS_CONFIG,
    LAYER_ZSTD,
    BlobData,
    Image,
    ImagePusher,
    ModelKit,
    Sample,
    canonical,
    directory,
    docker_image,
    file,
    image_config,
    kitops_modelkit,
    layer,
    modelcar_image,
    modelpack,
    zstd_image,
)
from tests.servers.process import running
from tests.servers.registry import BlobRedirector, DistributionRegistry

pytestmark = pytest.mark.integration

PASSWORD = "redirect-Secret-77"
KIT = "application/vnd.kitops.modelkit"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    server = DistributionRegistry(tmp_path_factory.mktemp("oci-storage"))
    with running(server):
        yield server


@pytest.fixture(scope="module")
def pusher(registry: DistributionRegistry) -> ImagePusher:
    return ImagePusher(registry.url)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


def _store(settings: Settings, registry: str, **fields: Any) -> OCIStorage:
    return OCIStorage(StorageConfig("oci", {"registry": registry, "insecure": "true", **fields}), settings)


def read(store: OCIStorage, blob: Blob, start: int = 0, end: int | None = None) -> bytes:
    """Bytes ``[start, end)`` of ``blob`` through ``open_range``, in small reads."""
    stop = blob.size if end is None else end
    stream = store.open_range(blob, start, stop)
    out = bytearray()
    buffer = memoryview(bytearray(4096))
    try:
        while len(out) < stop - start:
            count = stream.readinto(buffer)
            assert count, "the stream ended early"
            out += buffer[:count]
    finally:
        stream.close()
    return bytes(out)


def _check_blobs(plan: Plan, layers: list[BlobData]) -> None:
    assert [b.name for b in plan.blobs] == [x.digest for x in layers]
    for blob, expected in zip(plan.blobs, layers, strict=True):
        assert blob.version == expected.digest
        assert blob.size == expected.size
        assert blob.checksums == {"sha256": expected.digest.removeprefix("sha256:")}
        assert blob.media_type == expected.media_type
        assert dict(blob.annotations) == dict(expected.annotations)


# --- ModelCar and ordinary images -------------------------------------------------------


def test_a_modelcar_image_is_its_layers_in_order_keeping_models(
    settings: Settings, registry: DistributionRegistry, pusher: ImagePusher
) -> None:
    sample = modelcar_image()
    assert isinstance(sample.artifact, Image)
    digest = pusher.push("store/modelcar", sample.artifact, "v1")
    store = _store(settings, registry.host)
    plan = store.plan("store/modelcar:v1")
    assert (plan.kind, plan.single_object, plan.subtree) == ("layers", False, "models")
    assert plan.source == f"{registry.host}/store/modelcar@{digest}"
    _check_blobs(plan, list(sample.artifact.layers))
    assert all(b.relpath == "" and b.ranged for b in plan.blobs)
    assert plan.total_bytes == sum(x.size for x in sample.artifact.layers)
    assert store.identity() == f"oci:{registry.host}"
    for blob, expected in zip(plan.blobs, sample.artifact.layers, strict=True):
        assert read(store, blob) == expected.data
        assert read(store, blob, 7, 300) == expected.data[7:300]
        assert read(store, blob, blob.size - 5) == expected.data[-5:]
    # a digest reference and a bare repository (":latest") plan the same layers
    assert store.plan(f"store/modelcar@{digest}").blobs == plan.blobs
    pusher.push("store/modelcar", sample.artifact, "latest")
    assert store.plan("store/modelcar").blobs == plan.blobs


def test_zstd_and_docker_layers(
    settings: Settings, registry: DistributionRegistry, pusher: ImagePusher
) -> None:
    store = _store(settings, registry.host)
    for name, sample, media_type in (
        ("store/zstd", zstd_image(), LAYER_ZSTD),
        ("store/docker", docker_image(), DOCKER_LAYER),
    ):
        assert isinstance(sample.artifact, Image)
        pusher.push(name, sample.artifact, "v1")
        plan = store.plan(f"{name}:v1")
        assert plan.subtree == "models"
        assert [b.media_type for b in plan.blobs] == [media_type]
        assert read(store, plan.blobs[0]) == sample.artifact.layers[0].data
    assert docker_image().artifact.media_type == DOCKER_MANIFEST


def test_an_image_with_a_foreign_layer_type_is_refused_naming_it(
    settings: Settings, registry: DistributionRegistry, pusher: ImagePusher
) -> None:
    chart = Image(
        BlobData("application/vnd.cncf.helm.config.v1+json", b"{}"),
        (BlobData("application/vnd.cncf.helm.chart.content.v1.tar+gzip", b"not a model"),),
    )
    pusher.push("store/chart", chart, "v1")
    with pytest.raises(InvalidRequest, match=r"application/vnd\.cncf\.helm\.chart\.content\.v1\.tar\+gzip"):
        _store(settings, registry.host).plan("store/chart:v1")


def test_the_registry_may_be_named_in_the_path(
    settings: Settings, registry: DistributionRegistry, pusher: ImagePusher
) -> None:
    sample = zstd_image()
    digest = pusher.push("store/anywhere", sample.artifact, "v1")
    store = OCIStorage(StorageConfig("oci", {"insecure": True}), settings)
    plan = store.plan(f"{registry.host}/store/anywhere:v1")
    assert plan.source == f"{registry.host}/store/anywhere@{digest}"
    assert store.identity() == "oci"
    assert read(store, plan.blobs[0]) == plan_layer_data(sample)


def plan_layer_data(sample: Sample) -> bytes:
    assert isinstance(sample.artifact, Image)
    return sample.artifact.layers[0].data


# --- KitOps ModelKits -------------------------------------------------------------------


@pytest.fixture(scope="module")
def modelkit() -> ModelKit:
    return kitops_modelkit()


def test_a_modelkit_places_its_model_layers(
    settings: Settings, registry: DistributionRegistry, pusher: ImagePusher, modelkit: ModelKit
) -> None:
    pusher.push("store/kit", modelkit.image, "v1")
    store = _store(settings, registry.host)
    plan = store.plan("store/kit:v1")
    assert (plan.kind, plan.subtree) == ("layers", None)
    _check_blobs(plan, list(modelkit.image.layers[:3]))
    assert [b.relpath for b in plan.blobs] == ["", "", "models/extra.bin"]
    for blob, expected in zip(plan.blobs, modelkit.image.layers, strict=False):
        assert read(store, blob) == expected.data


@pytest.mark.parametrize(
    "include", ["code,datasets,docs", " Docs , dataset,CODE", '["code", "datasets", "docs"]']
)
def test_a_modelkit_includes_code_datasets_and_docs_when_asked(
    settings: Settings, registry: DistributionRegistry, pusher: ImagePusher, modelkit: ModelKit, include: str
) -> None:
    pusher.push("store/kit-all", modelkit.image, "v1")
    plan = _store(settings, registry.host, include=include).plan("store/kit-all:v1")
    _check_blobs(plan, list(modelkit.image.layers))
    only_code = _store(settings, registry.host, include=["code"]).plan("store/kit-all:v1")
    assert [b.media_type for b in only_code.blobs][-1] == f"{KIT}.code.v1.tar+zstd"
    assert len(only_code.blobs) == 4


def test_a_modelkit_is_recognised_by_its_artifact_type_too(
    settings: Settings, registry: DistributionRegistry, pusher: ImagePusher
) -> None:
    kit = kitops_modelkit(with_artifact_type=True)
    empty_config = BlobData("application/vnd.oci.empty.v1+json", b"{}")
    image = Image(empty_config, kit.image.layers, artifact_type=kit.image.artifact_type)
    pusher.push("store/kit-typed", image, "v1")
    plan = _store(settings, registry.host).plan("store/kit-typed:v1")
    assert [b.name for b in plan.blobs] == [x.digest for x in kit.image.layers[:3]]


def test_modelkit_mistakes(settings: Settings, registry: DistributionRegistry, pusher: ImagePusher) -> None:
    config = BlobData(KITOPS_CONFIG, canonical({"manifestVersion": "1.0.0"}))
    docs_only = Image(config, (layer([file("README.md", b"x")], media_type=f"{KIT}.docs.v1.tar"),))
    pusher.push("store/kit-docs", docs_only, "v1")
    store = _store(settings, registry.host)
    with pytest.raises(StorageNotFound, match="without model layers"):
        store.plan("store/kit-docs:v1")
    lz4 = Image(config, (BlobData(f"{KIT}.model.v1.tar+lz4", b"x"),))
    pusher.push("store/kit-lz4", lz4, "v1")
    with pytest.raises(InvalidRequest, match=r"tar\+lz4"):
        store.plan("store/kit-lz4:v1")
    unnamed = Image(config, (BlobData(f"{KIT}.model.v1.raw", b"weights"),))
    pusher.push("store/kit-unnamed", unnamed, "v1")
    plan = store.plan("store/kit-unnamed:v1")
    assert plan.blobs[0].relpath == unnamed.layers[0].digest.replace(":", "-")
    with pytest.raises(StorageConfigError, match="include"):
        _store(settings, registry.host, include="weights")


# --- CNCF ModelPacks --------------------------------------------------------------------


def test_a_modelpack_places_weights_and_their_config(
    settings: Settings, registry: DistributionRegistry, pusher: ImagePusher
) -> None:
    sample = modelpack("tokenizer/./config.json")
    assert isinstance(sample.artifact, Image)
    pusher.push("store/pack", sample.artifact, "v1")
    store = _store(settings, registry.host)
    plan = store.plan("store/pack:v1")
    assert plan.subtree is None
    _check_blobs(plan, list(sample.artifact.layers[:2]))
    assert [b.relpath for b in plan.blobs] == ["", "tokenizer/config.json"]
    assert read(store, plan.blobs[1]) == b'{"architectures": ["Test"]}\n'
    with_docs = _store(settings, registry.host, include="docs").plan("store/pack:v1")
    assert [b.media_type for b in with_docs.blobs][-1] == "application/vnd.cncf.model.doc.v1.tar"


@pytest.mark.parametrize("filepath", ["../escape.json", "/etc/passwd", "a/../../b", "", ".", "a\\..\\b"])
def test_a_modelpack_raw_layer_path_must_stay_inside(
    settings: Settings, registry: DistributionRegistry, pusher: ImagePusher, filepath: str
) -> None:
    sample = modelpack("config.json")
    assert isinstance(sample.artifact, Image)
    weights, raw, _ = sample.artifact.layers
    hostile = BlobData(raw.media_type, raw.data, {FILEPATH_ANNOTATION: filepath})
    image = Image(sample.artifact.config, (weights, hostile), artifact_type=sample.artifact.artifact_type)
    tag = hashlib.sha256(filepath.encode()).hexdigest()[:12]
    pusher.push("store/pack-hostile", image, tag)
    if filepath == "":
        # an empty annotation is no annotation: the layer is named by its digest
        plan = _store(settings, registry.host).plan(f"store/pack-hostile:{tag}")
        assert plan.blobs[1].relpath == hostile.digest.replace(":", "-")
        return
    with pytest.raises(UnsafePath, match=hostile.digest):
        _store(settings, registry.host).plan(f"store/pack-hostile:{tag}")


def test_two_raw_layers_on_one_path_are_refused(
    settings: Settings, registry: DistributionRegistry, pusher: ImagePusher
) -> None:
    sample = modelpack("config.json")
    assert isinstance(sample.artifact, Image)
    weights, raw, _ = sample.artifact.layers
    twin = BlobData(raw.media_type, raw.data + b" ", {FILEPATH_ANNOTATION: "./config.json"})
    image = Image(sample.artifact.config, (weights, raw, twin), artifact_type=sample.artifact.artifact_type)
    pusher.push("store/pack-twins", image, "v1")
    with pytest.raises(StorageError, match="same file"):
        _store(settings, registry.host).plan("store/pack-twins:v1")


# --- bytes ------------------------------------------------------------------------------


def test_a_corrupted_blob_is_served_as_it_is_and_fails_its_digest(
    settings: Settings, registry: DistributionRegistry, pusher: ImagePusher
) -> None:
    image = Image(image_config(), (layer([directory("models"), file("models/m.bin", b"w" * 5000)], "gzip"),))
    pusher.push("store/corrupt", image, "v1")
    store = _store(settings, registry.host)
    plan = store.plan("store/corrupt:v1")
    registry.corrupt_blob(plan.blobs[0].name, offset=100)
    data = read(store, plan.blobs[0])
    assert len(data) == plan.blobs[0].size
    assert hashlib.sha256(data).hexdigest() != plan.blobs[0].checksums["sha256"]


def test_an_unplanned_blob_is_refused(settings: Settings, registry: DistributionRegistry) -> None:
    blob = Blob(name="sha256:" + "e" * 64, relpath="", size=10)
    with pytest.raises(StorageError, match="not planned"):
        _store(settings, registry.host).open_range(blob, 0, 10)


# --- redirected blobs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def blob_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    """Object storage stand-in: serves blob files and logs every request's headers."""
    server = FileServer(tmp_path_factory.mktemp("blob-host"), tmp_path_factory.mktemp("blob-host-logs"))
    with running(server):
        yield server


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    server = DistributionRegistry(
        tmp_path_factory.mktemp("oci-storage-basic"), auth="htpasswd", users={"alice": PASSWORD}
    )
    with running(server):
        yield server


def _redirected(
    basic_registry: DistributionRegistry, blob_host: FileServer, repository: str, prefix: str = ""
) -> tuple[BlobRedirector, Image]:
    image = Image(
        image_config(),
        (
            layer([directory("models"), file("models/a.bin", b"a" * 300_000)], "gzip"),
            layer([file("models/b.bin", bytes(range(256)) * 1000)]),
        ),
    )
    ImagePusher(basic_registry.url, credentials=basic_registry.credentials()).push(repository, image, "v1")
    for blob in image.layers:
        blob_host.put(f"{prefix}blobs/{blob.digest.removeprefix('sha256:')}", blob.data)
    front = BlobRedirector(basic_registry.url, f"{blob_host.base_url}/{prefix}".rstrip("/"))
    front.start()
    return front, image


def test_redirected_blobs_resolve_once_and_go_without_credentials(
    settings: Settings, basic_registry: DistributionRegistry, blob_host: FileServer
) -> None:
    front, image = _redirected(basic_registry, blob_host, "redirect/car")
    try:
        store = _store(settings, front.host, username="alice", password=PASSWORD)
        plan = store.plan("redirect/car:v1")
        assert all(b.ranged for b in plan.blobs)
        for blob, expected in zip(plan.blobs, image.layers, strict=True):
            for start in range(0, blob.size, 50_000):
                assert (
                    read(store, blob, start, min(blob.size, start + 50_000))
                    == expected.data[start : start + 50_000]
                )
            assert front.blob_requests[blob.name] == 1
        served = blob_host.requests("/blobs/")
        assert served
        assert not any(name.lower() == "authorization" for entry in served for name, _ in entry["headers"])
    finally:
        front.stop()


def test_a_redirect_target_that_stops_working_is_resolved_again(
    settings: Settings, basic_registry: DistributionRegistry, blob_host: FileServer
) -> None:
    front, image = _redirected(basic_registry, blob_host, "redirect/moving", prefix="moving/")
    try:
        store = _store(settings, front.host, username="alice", password=PASSWORD)
        plan = store.plan("redirect/moving:v1")
        blob = plan.blobs[1]
        assert read(store, blob, 0, 1000) == image.layers[1].data[:1000]
        old = blob_host.root / "moving/blobs" / blob.name.removeprefix("sha256:")
        new = blob_host.root / "moving/blobs/renamed.bin"
        old.rename(new)
        front.blob_paths[blob.name] = "blobs/renamed.bin"
        assert read(store, blob, 1000, 2000) == image.layers[1].data[1000:2000]
        assert front.blob_requests[blob.name] == 2
        new.unlink()
        with pytest.raises(StorageNotFound, match=blob.name):
            read(store, blob, 2000, 3000)
    finally:
        front.stop()


def test_a_blob_host_without_ranges_is_read_whole(
    settings: Settings, basic_registry: DistributionRegistry, blob_host: FileServer
) -> None:
    front, image = _redirected(basic_registry, blob_host, "redirect/norange", prefix="_norange/")
    try:
        store = _store(settings, front.host, username="alice", password=PASSWORD)
        plan = store.plan("redirect/norange:v1")
        assert not any(b.ranged for b in plan.blobs)
        data = image.layers[1].data
        assert read(store, plan.blobs[1], 70_000, 90_000) == data[70_000:90_000]
        assert read(store, plan.blobs[1]) == data
    finally:
        front.stop()


def test_plan_reports_what_it_resolved(
    settings: Settings, registry: DistributionRegistry, pusher: ImagePusher
) -> None:
    sample = modelcar_image()
    digest = pusher.push("store/logged", sample.artifact, "v1")
    with capture_logs() as logs:
        _store(settings, registry.host).plan("store/logged:v1")
    entry = next(e for e in logs if e["event"] == "oci artifact resolved")
    assert entry["source"].endswith(digest)
    assert entry["kind"] == "image"
    assert json.dumps(entry)  # plain values only


# --- through the Puller -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["modelcar", "modelkit", "modelpack"])
async def test_puller_pulls_an_artifact_into_the_model_directory(
    tmp_path: Path, registry: DistributionRegistry, pusher: ImagePusher, kind: str
) -> None:
    if kind == "modelcar":
        sample = modelcar_image()
        artifact, tree = sample.artifact, sample.tree
    elif kind == "modelkit":
        kit = kitops_modelkit()
        artifact, tree = kit.image, kit.model
    else:
        pack = modelpack()
        artifact, tree = pack.artifact, pack.tree
    pusher.push(f"puller/{kind}", artifact, "v1")
    settings = make_settings(tmp_path)
    settings.storage_config_dir.mkdir(parents=True)
    entry = {"type": "oci", "registry": registry.host, "insecure": True}
    (settings.storage_config_dir / "registry").write_text(json.dumps(entry))
    puller = Puller(settings)
    await asyncio.to_thread(puller.start)
    try:
        local = await puller.pull(
            PullRequest(
                model_id=f"oci-{kind}",
                model_path=f"puller/{kind}:v1",
                model_key=ModelKey.from_mapping({"storage_key": "registry"}),
            )
        )
    finally:
        puller.close()
    assert local.path.is_dir()
    assert local.path.is_relative_to(settings.root_model_dir / f"oci-{kind}")
    assert tree.problems(local.path) == []
