"""`make demo`: the sidecar's main job end to end, on this machine.

It starts a local S3 server (moto) and uploads a small scikit-learn model to it, starts
MLServer with an empty model repository, starts `mesh-adapter --runtime mlserver` with
the embedded puller, then plays ModelMesh: runtimeStatus until READY, loadModel, one
inference sent straight to MLServer under the model id, unloadModel. Every process runs
on 127.0.0.1 and is stopped when the demo ends.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import grpc

from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from protos.mmesh import model_runtime_pb2 as pb
from tests.servers.adapter import MeshClient, SidecarProcess
from tests.servers.mlserver import MLServerProcess
from tests.servers.models import IRIS_EXPECTED, IRIS_SAMPLE, make_sklearn_model
from tests.servers.s3 import MotoS3Server

MODEL_ID = "iris__isvc-demo0001"


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def infer(grpc_port: int, model_id: str) -> list[int]:
    """One KServe v2 ModelInfer straight to MLServer, as the mesh forwards it."""
    rows = [list(map(float, row)) for row in IRIS_SAMPLE]
    request = v2.ModelInferRequest(model_name=model_id)
    tensor = request.inputs.add(name="input-0", datatype="FP64", shape=[len(rows), len(rows[0])])
    tensor.contents.fp64_contents.extend(v for row in rows for v in row)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=[("mm-model-id", model_id)], timeout=30
        )
    output = response.outputs[0]
    if output.contents.int64_contents:
        return list(output.contents.int64_contents)
    import numpy as np

    return [int(v) for v in np.frombuffer(response.raw_output_contents[0], dtype=np.int64)]


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="modelmesh-sidecar-demo-"))
    root = work / "models"
    (root / "_mlserver_models").mkdir(parents=True)
    config_dir = work / "storage-config"
    config_dir.mkdir()
    s3 = MotoS3Server(log_dir=work / "logs")
    mlserver = MLServerProcess(models_dir=root / "_mlserver_models", workdir=work / "mlserver")
    adapter: SidecarProcess | None = None
    client: MeshClient | None = None
    try:
        step("starting a local S3 server and uploading a scikit-learn model")
        s3.start()
        model_dir = make_sklearn_model(work / "trained" / "iris")
        s3.client().create_bucket(Bucket="models")
        s3.put_tree("models", "sklearn/iris", model_dir)
        print(f"    s3://models/sklearn/iris on {s3.endpoint_url}")
        (config_dir / "localS3").write_text(
            json.dumps(
                {
                    "type": "s3",
                    "access_key_id": "demo-access-key",
                    "secret_access_key": "demo-secret-key",
                    "endpoint_url": s3.endpoint_url,
                    "region": "us-east-1",
                    "bucket": "models",
                }
            )
        )

        step("starting MLServer 1.7.1 (empty repository)")
        mlserver.start()
        print(f"    gRPC 127.0.0.1:{mlserver.grpc_port}, REST 127.0.0.1:{mlserver.http_port}")

        step("starting the sidecar: mesh-adapter --runtime mlserver (embedded puller)")
        adapter = SidecarProcess.adapter(
            "mlserver",
            {
                "RUNTIME_PORT": str(mlserver.grpc_port),
                "ROOT_MODEL_DIR": str(root),
                "STORAGE_CONFIG_DIR": str(config_dir),
                "USE_EMBEDDED_PULLER": "true",
                "CONTAINER_MEM_REQ_BYTES": str(2 << 30),
                "LOADTIME_TIMEOUT": "120000",
            },
            work / "logs" / "adapter.log",
        )
        adapter.start()
        client = MeshClient(adapter.port)
        print(f"    mmesh.ModelRuntime on 127.0.0.1:{adapter.port}")

        step("runtimeStatus until READY")
        status = client.wait_ready(timeout=120)
        print(
            f"    {pb.RuntimeStatusResponse.Status.Name(status.status)}: runtime {status.runtimeVersion}, "
            f"capacity {status.capacityInBytes} bytes, methods {sorted(status.methodInfos)}"
        )

        step(f"loadModel {MODEL_ID} from s3://models/sklearn/iris")
        key = {"storage_key": "localS3", "model_type": {"name": "sklearn"}}
        started = time.monotonic()
        response = client.load(MODEL_ID, "sklearn/iris", key, model_type="mt:sklearn")
        print(f"    loaded in {time.monotonic() - started:.2f}s, sizeInBytes={response.sizeInBytes}")

        step("inference straight to MLServer under the model id")
        predictions = infer(mlserver.grpc_port, MODEL_ID)
        print(f"    predictions {predictions} (expected {list(IRIS_EXPECTED)})")
        if predictions != list(IRIS_EXPECTED):
            print("demo: unexpected predictions", file=sys.stderr)
            return 1

        step(f"unloadModel {MODEL_ID}")
        client.unload(MODEL_ID)
        left = sorted(p.name for p in root.iterdir() if not p.name.startswith("_"))
        print(f"    unloaded; model directories left under ROOT_MODEL_DIR: {left or 'none'}")
        step("demo finished: every step succeeded")
        shutil.rmtree(work, ignore_errors=True)
        return 0
    except Exception as exc:
        print(f"\ndemo failed: {type(exc).__name__}: {exc} (files kept in {work})", file=sys.stderr)
        for name in ("adapter.log", "s3.log"):
            log = work / "logs" / name
            if log.exists():
                print(f"--- {name} (tail) ---\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()
        if adapter is not None:
            adapter.stop()
        mlserver.stop()
        s3.stop()


if __name__ == "__main__":
    sys.exit(main())
