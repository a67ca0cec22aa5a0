"""The whole sidecar end to end: `mesh-adapter --runtime mlserver` as a real process,
real MLServer, real S3 (moto), driven over the mmesh.ModelRuntime protocol the way
ModelMesh drives it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from protos.mmesh import model_runtime_pb2 as pb
from tests.servers.adapter import MeshClient, SidecarProcess
from tests.servers.mlserver import MLServerProcess
from tests.servers.models import IRIS_EXPECTED, IRIS_SAMPLE
from tests.servers.process import free_port
from tests.servers.s3 import MotoS3Server

pytestmark = pytest.mark.integration

METRICS_PORT = free_port()
ACCESS_KEY = "AKIAE2ETESTKEY000001"
SECRET_KEY = "e2e-secret-key-must-never-be-logged-0123"


def model_entries(root: Path) -> list[str]:
    """What a user sees under ROOT_MODEL_DIR, the sidecar's own `_` folders aside."""
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("_"))


def leftover_files(root: Path) -> list[str]:
    """Everything under ROOT_MODEL_DIR except runtime folders and the empty `_tmp`."""
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0] in ("_tmp", "_mlserver_models") and path.is_dir():
            continue
        found.append(str(rel))
    return sorted(found)


def infer(mlserver: MLServerProcess, model_id: str) -> list[int]:
    request = v2.ModelInferRequest(model_name=model_id)
    tensor = request.inputs.add(name="input-0", datatype="FP64", shape=[len(IRIS_SAMPLE), 4])
    tensor.contents.fp64_contents.extend(v for row in IRIS_SAMPLE for v in row)
    with grpc.insecure_channel(f"127.0.0.1:{mlserver.grpc_port}") as channel:
        response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=[("mm-model-id", model_id)], timeout=30
        )
    return list(response.outputs[0].contents.int64_contents)


@pytest.fixture(scope="module")
def s3_models(moto_s3: MotoS3Server, trained_sklearn_model: Path) -> str:
    """A bucket holding the iris model as a prefix, as one object, and a hostile key."""
    bucket = f"e2e-{uuid.uuid4().hex[:8]}"
    moto_s3.create_bucket(bucket)
    moto_s3.put_tree(bucket, "sklearn/iris", trained_sklearn_model)
    moto_s3.put_object(bucket, "single/model.joblib", (trained_sklearn_model / "model.joblib").read_bytes())
    moto_s3.put_object(bucket, "evil/../../escape.txt", b"must never be written")
    moto_s3.put_object(bucket, "evil/ok.txt", b"fine")
    return bucket


@pytest.fixture(scope="module")
def storage_config(tmp_path_factory: pytest.TempPathFactory, moto_s3: MotoS3Server, s3_models: str) -> Path:
    directory = tmp_path_factory.mktemp("storage-config")
    base = {
        "type": "s3",
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        "endpoint_url": moto_s3.endpoint_url,
        "region": "us-east-1",
    }
    (directory / "localS3").write_text(json.dumps({**base, "bucket": s3_models}))
    (directory / "nobucket").write_text(json.dumps(base))
    (directory / "default").write_text(json.dumps({**base, "bucket": s3_models}))
    return directory


def adapter_env(root: Path, mlserver_port: int, config_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "RUNTIME_PORT": str(mlserver_port),
        "ROOT_MODEL_DIR": str(root),
        "STORAGE_CONFIG_DIR": str(config_dir),
        "USE_EMBEDDED_PULLER": "true",
        "CONTAINER_MEM_REQ_BYTES": str(2 << 30),
        "LOADTIME_TIMEOUT": "120000",
        "PULL_RETRIES": "2",
        "LOG_LEVEL": "debug",
        **extra,
    }


@pytest.fixture(scope="module")
def sidecar(
    mlserver: MLServerProcess,
    mlserver_root: Path,
    storage_config: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MeshClient, SidecarProcess]]:
    # leftovers from "before a restart": a model dir, a view, a staging dir
    (mlserver_root / "stale-model" / "model").mkdir(parents=True, exist_ok=True)
    (mlserver_root / "_mlserver_models" / "stale-model").mkdir(parents=True, exist_ok=True)
    adapter = SidecarProcess.adapter(
        "mlserver",
        adapter_env(mlserver_root, mlserver.grpc_port, storage_config, METRICS_PORT=str(METRICS_PORT)),
        tmp_path_factory.mktemp("logs") / "adapter.log",
    )
    adapter.start()
    client = MeshClient(adapter.port)
    try:
        yield client, adapter
    finally:
        for model_id in list(_loaded_ids(mlserver)):
            client.unload(model_id)
        client.close()
        adapter.stop()


def _loaded_ids(mlserver: MLServerProcess) -> list[str]:
    with grpc.insecure_channel(f"127.0.0.1:{mlserver.grpc_port}") as channel:
        index = v2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
            v2.RepositoryIndexRequest(ready=True), timeout=10
        )
    return [m.name for m in index.models]


def test_status_ready_purges_leftovers(sidecar, mlserver_root: Path):
    client, _ = sidecar
    status = client.wait_ready(timeout=60)
    assert status.status == pb.RuntimeStatusResponse.READY
    assert status.capacityInBytes == (2 << 30) - 268435456
    assert status.runtimeVersion  # MLServer's own version
    assert status.runtimeVersion != "v1"
    infos = status.methodInfos
    assert list(infos["inference.GRPCInferenceService/ModelInfer"].idInjectionPath) == [1]
    assert "stale-model" not in model_entries(mlserver_root)
    assert not (mlserver_root / "_mlserver_models" / "stale-model").exists()


def test_load_infer_unload_reload(sidecar, mlserver: MLServerProcess, mlserver_root: Path):
    client, _ = sidecar
    client.wait_ready()
    key = {"storage_key": "localS3", "model_type": {"name": "sklearn"}}
    model_id = "iris__isvc-0000000001"
    response = client.load(model_id, "sklearn/iris", key)
    disk = sum(p.stat().st_size for p in (mlserver_root / model_id).rglob("*") if p.is_file())
    assert response.sizeInBytes == int(-(-disk * 1.25 // 1))
    assert (mlserver_root / model_id / "iris" / "model.joblib").is_file()
    assert infer(mlserver, model_id) == list(IRIS_EXPECTED)
    assert client.stub.modelSize(pb.ModelSizeRequest(modelId=model_id)).sizeInBytes == response.sizeInBytes

    client.unload(model_id)
    assert model_id not in _loaded_ids(mlserver)
    assert model_id not in model_entries(mlserver_root)
    assert not (mlserver_root / "_mlserver_models" / model_id).exists()

    client.load(model_id, "sklearn/iris", key)  # reload of the same model
    assert infer(mlserver, model_id) == list(IRIS_EXPECTED)
    client.unload(model_id)


def test_two_models_at_once_single_object_and_prefix(sidecar, mlserver: MLServerProcess, mlserver_root: Path):
    client, _ = sidecar
    client.wait_ready()
    prefix_id, object_id = "two__isvc-prefix0001", "two__isvc-object0001"
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.load, prefix_id, "sklearn/iris", {"model_type": {"name": "sklearn"}})
        second = pool.submit(
            client.load,
            object_id,
            "single/model.joblib",
            {"storage_key": "localS3", "model_type": {"name": "sklearn"}},
        )
        first.result(), second.result()
    assert (mlserver_root / object_id / "model.joblib").is_file()  # one object lands as a file
    assert (mlserver_root / prefix_id / "iris").is_dir()  # a prefix lands as a directory
    assert infer(mlserver, prefix_id) == list(IRIS_EXPECTED)
    assert infer(mlserver, object_id) == list(IRIS_EXPECTED)
    assert {prefix_id, object_id} <= set(_loaded_ids(mlserver))
    client.unload(prefix_id)
    client.unload(object_id)
    assert model_entries(mlserver_root) == []


def test_unload_of_unknown_model_succeeds(sidecar):
    client, _ = sidecar
    client.unload("never__isvc-loaded0001")


def test_predict_model_size_from_listing_and_key(sidecar, trained_sklearn_model: Path):
    client, _ = sidecar
    disk = (trained_sklearn_model / "model.joblib").stat().st_size
    listed = client.stub.predictModelSize(
        pb.PredictModelSizeRequest(
            modelId="p1", modelPath="single/model.joblib", modelKey='{"storage_key":"localS3"}'
        )
    )
    assert listed.sizeInBytes == int(-(-disk * 1.25 // 1))
    keyed = client.stub.predictModelSize(
        pb.PredictModelSizeRequest(modelId="p2", modelPath="x", modelKey='{"disk_size_bytes": 1000}')
    )
    assert keyed.sizeInBytes == 1250


BAD_INPUTS = [
    # (model id, path, key, expected code, fragment of the message)
    ("bad__json0001", "sklearn/iris", "{not json", grpc.StatusCode.INVALID_ARGUMENT, "not valid JSON"),
    ("bad__key0001", "sklearn/iris", '{"storage_key": "nope"}', grpc.StatusCode.FAILED_PRECONDITION, "nope"),
    (
        "bad__bucket0001",
        "sklearn/iris",
        '{"storage_key": "nobucket"}',
        grpc.StatusCode.FAILED_PRECONDITION,
        "bucket",
    ),
    ("a/b", "sklearn/iris", "{}", grpc.StatusCode.INVALID_ARGUMENT, "modelId"),
    ("..", "sklearn/iris", "{}", grpc.StatusCode.INVALID_ARGUMENT, "modelId"),
    ("nul\x00id", "sklearn/iris", "{}", grpc.StatusCode.INVALID_ARGUMENT, "modelId"),
    (
        "bad__path0001",
        "no/such/model",
        '{"storage_key": "localS3"}',
        grpc.StatusCode.NOT_FOUND,
        "no/such/model",
    ),
    ("bad__escape0001", "evil", '{"storage_key": "localS3"}', grpc.StatusCode.INVALID_ARGUMENT, ".."),
    (
        "bad__nosuchbucket0001",
        "sklearn/iris",
        '{"storage_key": "localS3", "storage_params": {"bucket": "no-such-bucket-here"}}',
        grpc.StatusCode.NOT_FOUND,
        "no-such-bucket-here",
    ),
]


@pytest.mark.parametrize(("model_id", "path", "key", "code", "fragment"), BAD_INPUTS)
def test_bad_input_gets_a_clear_error_and_leaves_nothing(
    sidecar, mlserver_root: Path, model_id, path, key, code, fragment
):
    client, _ = sidecar
    client.wait_ready()
    with pytest.raises(grpc.RpcError) as info:
        client.load(model_id, path, key)
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()
    assert SECRET_KEY not in info.value.details()
    assert leftover_files(mlserver_root) == []
    assert not (mlserver_root.parent / "escape.txt").exists()
    assert not (mlserver_root / "escape.txt").exists()


def test_wrong_credentials(sidecar, moto_s3: MotoS3Server, mlserver_root: Path):
    client, _ = sidecar
    client.wait_ready()
    moto_s3.require_auth()
    try:
        with pytest.raises(grpc.RpcError) as info:
            client.load("bad__creds0001", "sklearn/iris", {"storage_key": "localS3"})
    finally:
        moto_s3.allow_any_auth()
    assert info.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
    assert SECRET_KEY not in info.value.details()
    assert ACCESS_KEY not in info.value.details()
    assert leftover_files(mlserver_root) == []


def test_no_secret_in_any_log_line(sidecar):
    _, adapter = sidecar
    text = adapter.process.log_path.read_text(errors="replace")
    assert text  # the adapter logged
    assert SECRET_KEY not in text
    lines = adapter.log_lines()
    loads = [line for line in lines if line.get("rpc") == "loadModel"]
    assert loads and all("model_id" in line for line in loads)


def test_status_before_and_after_the_runtime_is_up(
    tmp_path: Path, storage_config: Path, trained_sklearn_model: Path
):
    """The adapter comes up first and reports STARTING; MLServer starts later; then
    READY, and a load works."""
    root = tmp_path / "models"
    (root / "_mlserver_models").mkdir(parents=True)
    runtime = MLServerProcess(models_dir=root / "_mlserver_models", workdir=tmp_path / "mlserver")
    adapter = SidecarProcess.adapter(
        "mlserver", adapter_env(root, runtime.reserve_ports(), storage_config), tmp_path / "adapter.log"
    )
    adapter.start()
    client = MeshClient(adapter.port)
    try:
        status = client.stub.runtimeStatus(pb.RuntimeStatusRequest(), timeout=10)
        assert status.status == pb.RuntimeStatusResponse.STARTING
        runtime.start()
        assert client.wait_ready(timeout=60).status == pb.RuntimeStatusResponse.READY
        client.load(
            "late__isvc-0001", "sklearn/iris", {"storage_key": "localS3", "model_type": {"name": "sklearn"}}
        )
        assert infer(runtime, "late__isvc-0001") == list(IRIS_EXPECTED)
    finally:
        client.close()
        adapter.stop()
        runtime.stop()


def test_pull_metrics_are_served(sidecar):
    """After the loads above, the Prometheus endpoint shows S3 pulls and failures."""
    import urllib.request

    client, _ = sidecar
    client.wait_ready()
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as response:
        text = response.read().decode()
    pulled = [
        line
        for line in text.splitlines()
        if line.startswith('modelmesh_puller_pulled_bytes_total{backend="s3"}')
    ]
    assert pulled and float(pulled[0].split()[-1]) > 0
    assert "modelmesh_puller_pull_failures_total" in text
    assert "modelmesh_puller_pull_duration_seconds_bucket" in text
