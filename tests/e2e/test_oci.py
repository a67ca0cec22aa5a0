"""Models from a real OCI registry (Debian's docker-registry) through the whole sidecar:
`mesh-adapter --runtime mlserver` with the embedded puller, into real MLServer; plus
the registry's faults and hostile images as a caller of loadModel sees them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.e2e.test_mlserver_s3 import _loaded_ids, infer, leftover_files, model_entries
from tests.servers.adapter import MeshClient, SidecarProcess
from tests.servers.mlserver import MLServerProcess
from tests.servers.models import IRIS_EXPECTED
from tests.servers.oci_images import (
    Image,
    ImagePusher,
    directory,
    file,
    hostile_images,
    image_config,
    layer,
    multiarch_index,
    opaque,
    whiteout,
)
from tests.servers.process import running
from tests.servers.registry import DistributionRegistry

pytestmark = pytest.mark.integration

USER, PASSWORD = "puller", "registry-password-never-logged-5f2c"
BIN = Path(sys.executable).parent


def modelcar_of(model_dir: Path) -> Image:
    """A ModelCar image of an MLServer sklearn model: a base layer with the model and a
    decoy, then a layer that deletes the decoy (whiteout) and empties a folder
    (opaque whiteout)."""
    joblib = (model_dir / "model.joblib").read_bytes()
    base = layer(
        [
            directory("bin"),
            file("bin/sh", b"#!/bin/false\n", 0o755),
            directory("models"),
            file("models/model.joblib", joblib),
            file("models/decoy.txt", b"deleted by the next layer"),
            directory("models/scratch"),
            file("models/scratch/tmp.bin", b"emptied by the opaque whiteout"),
        ],
        "gzip",
    )
    top = layer([whiteout("models/decoy.txt"), directory("models/scratch"), opaque("models/scratch")], "zstd")
    return Image(image_config(), (base, top))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    server = DistributionRegistry(
        tmp_path_factory.mktemp("registry"), auth="htpasswd", users={USER: PASSWORD}
    )
    with running(server):
        yield server


@pytest.fixture(scope="module")
def pushed(registry: DistributionRegistry, trained_sklearn_model: Path) -> dict[str, str]:
    pusher = ImagePusher(registry.url, credentials=(USER, PASSWORD))
    digests = {"iris": pusher.push("models/iris", modelcar_of(trained_sklearn_model), tag="v1")}
    arch = multiarch_index()
    digests["multiarch"] = pusher.push("models/multiarch", arch.index, tag="v1")
    for name, image in hostile_images().items():
        digests[name] = pusher.push(f"hostile/{name}", image, tag="v1")
    # its own layer: blobs are content-addressed, so a shared one would corrupt "iris" too
    corrupt = Image(
        image_config(), (layer([directory("models"), file("models/model.joblib", b"c" * 50_000)]),)
    )
    digests["corrupt"] = pusher.push("models/corrupt", corrupt, tag="v1")
    registry.corrupt_blob(corrupt.layers[0].digest, offset=100)
    return digests


@pytest.fixture(scope="module")
def sidecar(
    mlserver: MLServerProcess,
    mlserver_root: Path,
    registry: DistributionRegistry,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MeshClient, SidecarProcess]]:
    config_dir = tmp_path_factory.mktemp("oci-storage-config")
    entry = {
        "type": "oci",
        "registry": registry.host,
        "insecure": True,
        "username": USER,
        "password": PASSWORD,
    }
    (config_dir / "registry").write_text(json.dumps(entry))
    adapter = SidecarProcess.adapter(
        "mlserver",
        {
            "RUNTIME_PORT": str(mlserver.grpc_port),
            "ROOT_MODEL_DIR": str(mlserver_root),
            "STORAGE_CONFIG_DIR": str(config_dir),
            "USE_EMBEDDED_PULLER": "true",
            "CONTAINER_MEM_REQ_BYTES": str(1 << 30),
            "LOADTIME_TIMEOUT": "120000",
            "PULL_RETRIES": "2",
        },
        tmp_path_factory.mktemp("oci-logs") / "adapter.log",
    )
    adapter.start()
    client = MeshClient(adapter.port)
    client.wait_ready(timeout=60)
    try:
        yield client, adapter
    finally:
        for model_id in _loaded_ids(mlserver):
            client.unload(model_id)
        client.close()
        adapter.stop()


KEY = {"storage_key": "registry", "model_type": {"name": "sklearn"}}


def test_modelcar_by_tag_loads_into_mlserver_and_serves(
    sidecar, pushed, mlserver: MLServerProcess, mlserver_root: Path
):
    client, adapter = sidecar
    model_id = "oci__isvc-tag0000001"
    response = client.load(model_id, "models/iris:v1", KEY)
    assert response.sizeInBytes > 0
    model_dir = mlserver_root / model_id / "iris"
    assert (model_dir / "model.joblib").is_file()
    assert not (model_dir / "decoy.txt").exists()  # whiteout applied
    assert list((model_dir / "scratch").iterdir()) == []  # opaque whiteout applied
    assert not (model_dir / "bin").exists()  # only models/ is the model
    assert infer(mlserver, model_id) == list(IRIS_EXPECTED)
    client.unload(model_id)
    assert model_id not in model_entries(mlserver_root)
    assert PASSWORD not in adapter.process.log_path.read_text(errors="replace")


def test_modelcar_by_digest(sidecar, pushed, mlserver: MLServerProcess):
    client, _ = sidecar
    model_id = "oci__isvc-digest00001"
    client.load(model_id, f"models/iris@{pushed['iris']}", KEY)
    assert infer(mlserver, model_id) == list(IRIS_EXPECTED)
    client.unload(model_id)


@pytest.mark.parametrize("platform", ["linux/amd64", "linux/arm64/v8"])
def test_multiarch_index_picks_the_platform_asked(
    pushed, registry: DistributionRegistry, tmp_path: Path, platform: str
):
    """`mesh-puller pull oci://...` with a platform: the image of that platform's bytes."""
    arch = multiarch_index()
    expected = (arch.amd64 if platform == "linux/amd64" else arch.arm64).tree.files["model.bin"]
    config_dir = tmp_path / "storage-config"
    config_dir.mkdir()
    entry = {"type": "oci", "insecure": True, "username": USER, "password": PASSWORD}
    (config_dir / "default_oci").write_text(json.dumps(entry))
    dest = tmp_path / "pulled"
    done = subprocess.run(
        [str(BIN / "mesh-puller"), "pull", f"oci://{registry.host}/models/multiarch:v1", str(dest),
         "--param", f"platform={platform}"],
        env={"STORAGE_CONFIG_DIR": str(config_dir), "PATH": "/usr/bin:/bin", "LOG_FORMAT": "json"},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (dest / "multiarch" / "model.bin").read_bytes() == expected
    assert PASSWORD not in done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(hostile_images()))
def test_hostile_images_are_refused_and_nothing_escapes(sidecar, pushed, mlserver_root: Path, name: str):
    client, _ = sidecar
    with pytest.raises(grpc.RpcError) as info:
        client.load(f"oci__hostile-{name}", f"hostile/{name}:v1", KEY)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert pushed[name].split(":")[0] == "sha256"
    assert leftover_files(mlserver_root) == []
    for outside in (
        mlserver_root.parent / "escape.txt",
        Path("/tmp/absolute-escape.txt"),
        Path("/etc/escape.conf"),
    ):
        assert not outside.exists()


def test_a_corrupted_blob_fails_with_data_loss(sidecar, pushed, mlserver_root: Path):
    client, _ = sidecar
    with pytest.raises(grpc.RpcError) as info:
        client.load("oci__corrupt0001", "models/corrupt:v1", KEY)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS, info.value.details()
    assert "sha256:" in info.value.details()
    assert leftover_files(mlserver_root) == []


def test_a_missing_tag_is_not_found(sidecar, pushed, mlserver_root: Path):
    client, _ = sidecar
    with pytest.raises(grpc.RpcError) as info:
        client.load("oci__missing0001", "models/iris:no-such-tag", KEY)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-tag" in info.value.details()
    assert leftover_files(mlserver_root) == []


def test_a_wrong_password_is_unauthenticated_without_the_secret(sidecar, pushed, mlserver_root: Path):
    client, _ = sidecar
    key = {"storage_key": "registry", "storage_params": {"password": "wrong-password-xyz"}}
    with pytest.raises(grpc.RpcError) as info:
        client.load("oci__badpass0001", "models/iris:v1", key)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "wrong-password-xyz" not in info.value.details()
    assert PASSWORD not in info.value.details()
