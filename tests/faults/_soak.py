"""The real stack the cancellation-race and soak tests drive, and what they read of it.

:class:`MeshStack` is one MLServer of its own (its own ROOT_MODEL_DIR), a bucket on the
session's moto S3 server holding the iris model, and ``mesh-adapter --runtime mlserver``
with the embedded puller in front of both, reached by a :class:`MeshClient` the way
ModelMesh reaches it. The tests then look at three things only through public faces:

* the runtime: MLServer's repository index (``POST /v2/repository/index``, which
  lists what MLServer finds on disk) and ``ModelReady`` over gRPC, which answers from
  MLServer's registry in memory, so a model still loaded after its view was deleted is
  seen too;
* the disk: every entry under ROOT_MODEL_DIR (:meth:`MeshStack.disk_entries`);
* the sidecar: its JSON log lines (:class:`LogCursor`) and ``/proc/<pid>``
  (:func:`footprint`).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from protos.mmesh import model_runtime_pb2 as pb
from tests.servers.adapter import MeshClient, SidecarProcess
from tests.servers.mlserver import MLServerProcess
from tests.servers.s3 import MotoS3Server

#: credentials of the storage config (moto accepts any); long enough for the secrets guard
ACCESS_KEY = "AKIAFAULTSSOAK000001"
SECRET_KEY = "faults-soak-secret-key-never-in-a-log-0001"

#: where the model lies in the bucket, and its name once pulled (ROOT/<id>/iris)
MODEL_PATH = "iris"
MODEL_KEY = json.dumps({"model_type": {"name": "sklearn"}})

#: folders the contract lets the sidecar keep under ROOT_MODEL_DIR once every model is
#: unloaded (empty): pull staging, certificates, the runtime's views
SIDECAR_FOLDERS = frozenset({"_tmp", "_certs", "_mlserver_models"})

#: talks to 127.0.0.1 directly, whatever proxy the environment names
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LogCursor:
    """Reads the lines a process appends to its log file (the sidecar's are JSON)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def skip(self) -> None:
        """Forget everything written so far."""
        self.offset = self.path.stat().st_size

    def read_text(self) -> list[str]:
        """The complete lines written since the last read (a partial last line is left
        for the next read)."""
        with self.path.open("rb") as log:
            log.seek(self.offset)
            data = log.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        return data[:end].decode(errors="replace").splitlines()

    def read(self) -> list[dict[str, Any]]:
        """:meth:`read_text`, the JSON objects only."""
        lines: list[dict[str, Any]] = []
        for raw in self.read_text():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict):
                lines.append(line)
        return lines


@dataclass(frozen=True)
class Footprint:
    """What /proc says about a process."""

    rss_kib: int
    fds: int
    threads: int

    def __str__(self) -> str:
        return f"rss={self.rss_kib / 1024:.1f} MiB fds={self.fds} threads={self.threads}"


def footprint(pid: int) -> Footprint:
    """RSS (VmRSS), open file descriptors and threads of ``pid``, from /proc."""
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return Footprint(
        rss_kib=int(fields["VmRSS"].split()[0]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(fields["Threads"]),
    )


class MeshStack:
    """MLServer + a moto bucket + the sidecar, all on 127.0.0.1, stopped by PID.

    ``padding_bytes`` of random data are stored beside ``model.joblib``, so that the
    pull takes a measurable share of a load. ``env`` adds to (or overrides) the
    sidecar's environment.
    """

    def __init__(
        self,
        workdir: Path,
        moto: MotoS3Server,
        trained_model: Path,
        *,
        padding_bytes: int = 0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.root = workdir / "models"
        self.moto = moto
        self.trained_model = trained_model
        self.padding_bytes = padding_bytes
        self.extra_env = dict(env or {})
        self.mlserver = MLServerProcess(
            models_dir=self.root / "_mlserver_models", workdir=workdir / "mlserver"
        )
        self.bucket = f"faults-{uuid.uuid4().hex[:10]}"
        self.sidecar: SidecarProcess | None = None
        self.client: MeshClient | None = None
        self._v2_channel: grpc.Channel | None = None

    # --- life cycle -----------------------------------------------------------------

    def start(self) -> None:
        bucket = self.bucket
        model = self.workdir / "model"
        shutil.copytree(self.trained_model, model)
        if self.padding_bytes:
            (model / "padding.bin").write_bytes(os.urandom(self.padding_bytes))
        self.moto.create_bucket(bucket)
        self.moto.put_tree(bucket, MODEL_PATH, model)
        config_dir = self.workdir / "storage-config"
        config_dir.mkdir()
        (config_dir / "default").write_text(
            json.dumps(
                {
                    "type": "s3",
                    "access_key_id": ACCESS_KEY,
                    "secret_access_key": SECRET_KEY,
                    "endpoint_url": self.moto.endpoint_url,
                    "region": "us-east-1",
                    "bucket": bucket,
                }
            )
        )
        self.mlserver.start()
        env = {
            "RUNTIME_PORT": str(self.mlserver.grpc_port),
            "ROOT_MODEL_DIR": str(self.root),
            "STORAGE_CONFIG_DIR": str(config_dir),
            "USE_EMBEDDED_PULLER": "true",
            "CONTAINER_MEM_REQ_BYTES": str(4 << 30),
            "LOADTIME_TIMEOUT": "60000",
            "LOG_LEVEL": "info",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        self.sidecar = SidecarProcess.adapter("mlserver", env, self.workdir / "adapter.log")
        self.sidecar.start()
        self.client = MeshClient(self.sidecar.port)
        self.client.wait_ready(timeout=60)
        self._v2_channel = grpc.insecure_channel(f"127.0.0.1:{self.mlserver.grpc_port}")

    def upload(self, prefix: str, directory: Path) -> None:
        """Put every file under ``directory`` into the bucket under ``prefix``."""
        self.moto.put_tree(self.bucket, prefix, directory)

    def stop(self) -> None:
        if self._v2_channel is not None:
            self._v2_channel.close()
        if self.client is not None:
            self.client.close()
        if self.sidecar is not None:
            self.sidecar.stop()
        self.mlserver.stop()

    @property
    def mesh(self) -> MeshClient:
        assert self.client is not None, "stack not started"
        return self.client

    @property
    def adapter(self) -> SidecarProcess:
        assert self.sidecar is not None, "stack not started"
        return self.sidecar

    @property
    def adapter_target(self) -> str:
        return f"127.0.0.1:{self.adapter.port}"

    def log_cursor(self) -> LogCursor:
        """A cursor on the sidecar's log, at its end."""
        return LogCursor(self.adapter.process.log_path)

    def runtime_log_cursor(self) -> LogCursor:
        """A cursor on MLServer's log (plain text), at its end."""
        return LogCursor(self.mlserver.log_path)

    @staticmethod
    def load_request(model_id: str, model_path: str = MODEL_PATH) -> pb.LoadModelRequest:
        """A loadModel of the iris model (or of another one uploaded)."""
        return pb.LoadModelRequest(modelId=model_id, modelPath=model_path, modelKey=MODEL_KEY)

    # --- the runtime's view ---------------------------------------------------------

    def repository_index(self) -> dict[str, str]:
        """MLServer's repository index: model name -> state (``READY``,
        ``UNAVAILABLE``...), over REST."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.mlserver.http_port}/v2/repository/index",
            data=b"{}",
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with _DIRECT.open(request, timeout=10) as response:
            entries = json.loads(response.read())
        return {str(e["name"]): str(e.get("state", "")).rsplit(".", 1)[-1] for e in entries}

    def model_ready(self, model_id: str) -> bool:
        """MLServer's ModelReady: True when its registry holds the model ready. MLServer
        1.7 answers an unknown model with UNKNOWN (``ModelNotFound``), NOT_FOUND elsewhere."""
        assert self._v2_channel is not None, "stack not started"
        stub = v2_grpc.GRPCInferenceServiceStub(self._v2_channel)
        try:
            return bool(stub.ModelReady(v2.ModelReadyRequest(name=model_id), timeout=10).ready)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND or "not found" in (exc.details() or ""):
                return False
            raise

    # --- the disk -------------------------------------------------------------------

    def disk_entries(self) -> list[str]:
        """Every path under ROOT_MODEL_DIR (relative), except the sidecar's own
        folders themselves when they are empty."""
        found: list[str] = []
        # os.walk, not rglob: a folder the sidecar removes while we look is skipped,
        # not an error (the state is judged by the entries that are there)
        paths: list[Path] = []
        for folder, dirs, files in os.walk(self.root):
            paths.extend(Path(folder) / name for name in (*dirs, *files))
        for path in sorted(paths):
            rel = path.relative_to(self.root)
            if (
                len(rel.parts) == 1
                and rel.name in SIDECAR_FOLDERS
                and path.is_dir()
                and not path.is_symlink()
            ):
                continue
            found.append(rel.as_posix())
        return found

    def model_disk_entries(self, model_id: str) -> list[str]:
        """The entries of ``model_id`` on disk: its model directory, its view, and any
        staging folder a pull left (``_tmp/...``)."""
        view = f"_mlserver_models/{model_id}"
        return [
            e
            for e in self.disk_entries()
            if e.split("/")[0] in (model_id, "_tmp") or e == view or e.startswith(view + "/")
        ]

    def loaded_entries(self, model_id: str) -> list[str]:
        """What :meth:`model_disk_entries` holds while ``model_id`` is loaded: the pulled
        model and the view MLServer reads."""
        model = [
            p.relative_to(self.workdir / "model").as_posix() for p in (self.workdir / "model").rglob("*")
        ]
        pulled = [model_id, f"{model_id}/{MODEL_PATH}"] + [f"{model_id}/{MODEL_PATH}/{m}" for m in model]
        view = f"_mlserver_models/{model_id}"
        return sorted([*pulled, view, f"{view}/model-settings.json"])
