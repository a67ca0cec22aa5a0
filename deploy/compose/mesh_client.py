"""Play ModelMesh against one serving "pod" of the compose stack, printing each step.

What the mesh container does to a runtime, in order:

1. ``runtimeStatus`` every second until the adapter reports READY (it says STARTING
   while the model server comes up, and purges leftovers before its first READY);
2. ``loadModel`` with a model key naming the storage-config entry, as the controller
   writes it;
3. one inference sent straight to the model server under the model id (KServe v2
   ``ModelInfer``, header ``mm-model-id``), checked against the expected answer;
4. ``unloadModel``.

It exits 0 when every step succeeded, 1 otherwise. It needs grpcio and the project's
generated protos, both in the modelmesh-sidecar image:

    python mesh_client.py --adapter 127.0.0.1:8085 --runtime 127.0.0.1:8001 \\
        --model-id iris__isvc-compose01 --path sklearn/iris --storage-key localS3 \\
        --model-type sklearn --sample iris
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from protos.mmesh import model_runtime_pb2 as pb
from protos.mmesh import model_runtime_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Sample:
    """One inference request and the answer a correctly loaded model gives."""

    build: Callable[[str], v2.ModelInferRequest]
    read: Callable[[v2.ModelInferResponse], list[float]]
    expected: tuple[float, ...]


def _output_values(response: v2.ModelInferResponse) -> list[float]:
    """The first output tensor's values, whether typed or raw (little-endian)."""
    output = response.outputs[0]
    formats = {"INT64": "q", "INT32": "i", "FP32": "f", "FP64": "d"}
    if output.datatype not in formats:
        raise RuntimeError(f"unexpected output datatype {output.datatype}")
    if response.raw_output_contents:
        raw = response.raw_output_contents[0]
        code = formats[output.datatype]
        count = len(raw) // struct.calcsize(code)
        return [float(v) for v in struct.unpack(f"<{count}{code}", raw)]
    contents = output.contents
    typed: Sequence[float] = (
        contents.int64_contents or contents.int_contents or contents.fp32_contents or contents.fp64_contents
    )
    return [float(v) for v in typed]


def _iris_request(model_id: str) -> v2.ModelInferRequest:
    rows = ((5.1, 3.5, 1.4, 0.2), (5.9, 2.8, 4.3, 1.3), (7.2, 3.2, 6.0, 1.8))
    request = v2.ModelInferRequest(model_name=model_id)
    tensor = request.inputs.add(name="input-0", datatype="FP64", shape=[len(rows), len(rows[0])])
    tensor.contents.fp64_contents.extend(value for row in rows for value in row)
    return request


def _squarer_request(model_id: str) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name=model_id)
    tensor = request.inputs.add(name="VALUES", datatype="FP32", shape=[3])
    tensor.contents.fp32_contents.extend([1.0, 2.5, -3.0])
    return request


SAMPLES = {
    # the scikit-learn iris classifier: one row of each class
    "iris": Sample(_iris_request, _output_values, (0.0, 1.0, 2.0)),
    # the Triton python-backend model that squares its input
    "squarer": Sample(_squarer_request, _output_values, (1.0, 6.25, 9.0)),
}


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def wait_ready(stub: pb_grpc.ModelRuntimeStub, timeout: float) -> pb.RuntimeStatusResponse:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            status: pb.RuntimeStatusResponse = stub.runtimeStatus(pb.RuntimeStatusRequest(), timeout=5)
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
        else:
            last = pb.RuntimeStatusResponse.Status.Name(status.status)
            if status.status == pb.RuntimeStatusResponse.READY:
                return status
        print(f"    runtimeStatus: {last}", flush=True)
        time.sleep(1)
    raise TimeoutError(f"the adapter never reported READY within {timeout:.0f}s (last: {last})")


def run(args: argparse.Namespace) -> None:
    sample = SAMPLES[args.sample]
    with grpc.insecure_channel(args.adapter) as adapter, grpc.insecure_channel(args.runtime) as runtime:
        mesh = pb_grpc.ModelRuntimeStub(adapter)

        step(f"runtimeStatus on {args.adapter} until READY")
        status = wait_ready(mesh, args.ready_timeout)
        print(
            f"    READY: runtime version {status.runtimeVersion or '?'}, capacity "
            f"{status.capacityInBytes} bytes, loading timeout {status.modelLoadingTimeoutMs} ms, "
            f"inference methods {sorted(status.methodInfos)}",
            flush=True,
        )

        key = {"storage_key": args.storage_key, "model_type": {"name": args.model_type}}
        step(f"loadModel {args.model_id} from {args.path} (storage entry {args.storage_key})")
        started = time.monotonic()
        loaded = mesh.loadModel(
            pb.LoadModelRequest(
                modelId=args.model_id,
                modelType=f"mt:{args.model_type}",
                modelPath=args.path,
                modelKey=json.dumps(key),
            ),
            timeout=args.load_timeout,
        )
        print(
            f"    loaded in {time.monotonic() - started:.2f}s, sizeInBytes={loaded.sizeInBytes}",
            flush=True,
        )

        step(f"inference on {args.runtime} under the model id (header mm-model-id)")
        response = v2_grpc.GRPCInferenceServiceStub(runtime).ModelInfer(
            sample.build(args.model_id), metadata=[("mm-model-id", args.model_id)], timeout=60
        )
        answer = tuple(sample.read(response))
        print(f"    answer {list(answer)}, expected {list(sample.expected)}", flush=True)
        if answer != sample.expected:
            raise RuntimeError(f"the model answered {list(answer)}, expected {list(sample.expected)}")

        step(f"unloadModel {args.model_id}")
        mesh.unloadModel(pb.UnloadModelRequest(modelId=args.model_id), timeout=args.load_timeout)
        print("    unloaded", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Play ModelMesh against one adapter and its model server.")
    parser.add_argument("--adapter", required=True, help="host:port of mmesh.ModelRuntime (the sidecar)")
    parser.add_argument("--runtime", required=True, help="host:port of the model server's KServe v2 gRPC")
    parser.add_argument("--model-id", required=True, help="the model id, as the controller makes them")
    parser.add_argument("--path", required=True, help="the model's path in its store")
    parser.add_argument("--storage-key", required=True, help="the storage-config entry to use")
    parser.add_argument("--model-type", required=True, help="the model format (sklearn, python ...)")
    parser.add_argument("--sample", required=True, choices=sorted(SAMPLES), help="which request to send")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for READY")
    parser.add_argument("--load-timeout", type=float, default=180.0, help="seconds for load and unload")
    args = parser.parse_args(argv)
    try:
        run(args)
    except (grpc.RpcError, RuntimeError, TimeoutError) as exc:
        message = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
        print(f"mesh client: FAILED: {message}", file=sys.stderr, flush=True)
        return 1
    step("every step succeeded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
