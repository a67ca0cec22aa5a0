"""The two-container mode: `mesh-puller serve` (upstream's /opt/app/puller) pulls and
forwards the rewritten request to `mesh-adapter` (USE_EMBEDDED_PULLER=false), which
loads into real MLServer. And `mesh-puller pull URI DEST` as a command."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protos.mmesh import model_runtime_pb2 as pb
from tests.e2e.test_mlserver_s3 import _loaded_ids, infer
from tests.servers.adapter import MeshClient, SidecarProcess
from tests.servers.mlserver import MLServerProcess
from tests.servers.models import IRIS_EXPECTED
from tests.servers.s3 import MotoS3Server

pytestmark = pytest.mark.integration

SECRET = "standalone-secret-never-logged-987654321"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def bucket(moto_s3: MotoS3Server, trained_sklearn_model: Path) -> str:
    name = f"sa-{uuid.uuid4().hex[:8]}"
    moto_s3.create_bucket(name)
    moto_s3.put_tree(name, "models/iris", trained_sklearn_model)
    return name


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory, moto_s3: MotoS3Server, bucket: str) -> Path:
    directory = tmp_path_factory.mktemp("sa-storage-config")
    (directory / "default").write_text(
        json.dumps(
            {
                "type": "s3",
                "access_key_id": "AKIASTANDALONE000001",
                "secret_access_key": SECRET,
                "endpoint_url": moto_s3.endpoint_url,
                "bucket": bucket,
            }
        )
    )
    return directory


@pytest.fixture(scope="module")
def two_containers(
    mlserver: MLServerProcess, mlserver_root: Path, config_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[MeshClient, SidecarProcess, SidecarProcess]]:
    logs = tmp_path_factory.mktemp("sa-logs")
    common = {"ROOT_MODEL_DIR": str(mlserver_root), "STORAGE_CONFIG_DIR": str(config_dir)}
    adapter = SidecarProcess.adapter(
        "mlserver",
        {
            **common,
            "RUNTIME_PORT": str(mlserver.grpc_port),
            "CONTAINER_MEM_REQ_BYTES": str(1 << 30),
            "USE_EMBEDDED_PULLER": "false",
            "LOADTIME_TIMEOUT": "120000",
        },
        logs / "adapter.log",
    )
    adapter.start()
    (mlserver_root / "leftover-from-last-run").mkdir(exist_ok=True)
    puller = SidecarProcess.puller(
        {**common, "MODEL_SERVER_ENDPOINT": f"port:{adapter.port}"}, logs / "puller.log"
    )
    puller.start()
    client = MeshClient(puller.port)
    try:
        yield client, puller, adapter
    finally:
        client.close()
        puller.stop()
        adapter.stop()


def test_status_is_forwarded_and_leftovers_purged(two_containers, mlserver_root: Path):
    client, _, _ = two_containers
    status = client.wait_ready(timeout=60)
    assert status.runtimeVersion not in ("", "v1")
    assert "inference.GRPCInferenceService/ModelInfer" in status.methodInfos
    assert not (mlserver_root / "leftover-from-last-run").exists()


def test_pull_forward_load_infer_unload(two_containers, mlserver: MLServerProcess, mlserver_root: Path):
    client, puller, adapter = two_containers
    client.wait_ready()
    model_id = "sa__isvc-0000000001"
    response = client.load(model_id, "models/iris", {"model_type": {"name": "sklearn"}})
    assert response.sizeInBytes > 0
    assert (mlserver_root / model_id / "iris" / "model.joblib").is_file()
    assert infer(mlserver, model_id) == list(IRIS_EXPECTED)
    # the adapter saw the rewritten request: a local path and the disk size
    forwarded = [line for line in adapter.log_lines() if line.get("event") == "loadModel"]
    assert forwarded
    assert forwarded[-1]["model_path"] == str(mlserver_root / model_id / "iris")

    predicted = client.stub.predictModelSize(
        pb.PredictModelSizeRequest(modelId="sa-predict", modelPath="models/iris", modelKey="{}")
    )
    assert predicted.sizeInBytes == response.sizeInBytes

    client.unload(model_id)
    assert model_id not in _loaded_ids(mlserver)
    assert not (mlserver_root / model_id).exists()
    client.unload("sa__never-loaded")  # unknown: success

    for process in (puller, adapter):
        assert SECRET not in process.process.log_path.read_text(errors="replace")


def test_errors_from_the_pull_keep_their_code(two_containers, mlserver_root: Path):
    client, _, _ = two_containers
    with pytest.raises(grpc.RpcError) as info:
        client.load("sa__missing0001", "models/does-not-exist", {})
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert not (mlserver_root / "sa__missing0001").exists()


def test_mesh_puller_pull_command(
    moto_s3: MotoS3Server, bucket: str, config_dir: Path, tmp_path: Path, trained_sklearn_model: Path
):
    dest = tmp_path / "out" / "iris"
    env = {"STORAGE_CONFIG_DIR": str(config_dir), "PATH": "/usr/bin:/bin", "LOG_FORMAT": "json"}
    done = subprocess.run(
        [
            str(BIN / "mesh-puller"),
            "pull",
            f"s3://{bucket}/models/iris",
            str(dest),
            "--storage-key",
            "default",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # laid out as the sidecar lays out ROOT_MODEL_DIR/<modelId>/: DEST/<basename of the path>
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["path"] == str(dest / "iris")
    assert report["files"] == 1
    assert (dest / "iris" / "model.joblib").read_bytes() == (
        trained_sklearn_model / "model.joblib"
    ).read_bytes()
    assert SECRET not in done.stdout + done.stderr

    failed = subprocess.run(
        [
            str(BIN / "mesh-puller"),
            "pull",
            f"s3://{bucket}/models/nothing-here",
            str(tmp_path / "none"),
            "--storage-key",
            "default",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert failed.returncode != 0
    assert "nothing-here" in failed.stderr
    assert not (tmp_path / "none").exists()

    bad_scheme = subprocess.run(
        [str(BIN / "mesh-puller"), "pull", "ftp://host/model", str(tmp_path / "ftp")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad_scheme.returncode != 0
    assert "unsupported storage URI scheme" in bad_scheme.stderr
