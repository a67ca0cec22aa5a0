"""A real Triton Inference Server (2.51, CPU) for the test suite.

Triton comes from the ``nvidia-pytriton`` wheel in its own cached venv (see
:mod:`tests.servers.venvs`): the wheel holds the ``tritonserver`` binary and the python
backend, but the backend's stub for each Python version sits apart, so the one for
the venv's Python is copied into the backend once (idempotent). Only python-backend
models can run (no ONNX Runtime or other framework backends in the wheel).

Triton serves ``models_dir`` the way the ModelMesh controller runs it
(``--model-control-mode=explicit --strict-model-config=false
--strict-readiness=false``), listens on 127.0.0.1
on free ports, and is stopped by PID. Ready when gRPC ServerReady says so.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import grpc

from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from tests.servers.process import ManagedProcess, free_port
from tests.servers.venvs import ensure_venv

#: the python backend's stub program, one build per Python version in the wheel
STUB_NAME = "triton_python_backend_stub"

#: seconds Triton may take to unload its models when asked to stop
EXIT_TIMEOUT_SECONDS = 10


def triton_home(venv: Path) -> Path:
    """``<site-packages>/pytriton/tritonserver`` of the venv."""
    homes = sorted(venv.glob("lib/python3*/site-packages/pytriton/tritonserver"))
    if len(homes) != 1:
        raise RuntimeError(f"expected one pytriton/tritonserver in {venv}, found {len(homes)}")
    return homes[0]


def install_python_backend_stub(home: Path) -> Path:
    """Copy the stub built for the venv's Python into ``backends/python/`` unless it
    is there already; the copy is renamed into place, so a half-copied stub is never
    used. Returns the stub's path."""
    python_version = home.parents[2].name.removeprefix("python")  # lib/python3.11/site-packages/pytriton
    source = home / "python_backend_stubs" / python_version / STUB_NAME
    target = home / "backends" / "python" / STUB_NAME
    if not source.is_file():
        raise RuntimeError(f"pytriton ships no python backend stub for Python {python_version}: {source}")
    if target.is_file() and target.stat().st_size == source.stat().st_size:
        return target
    partial = target.with_name(f".{STUB_NAME}.{os.getpid()}.partial")
    shutil.copyfile(source, partial)
    partial.chmod(0o755)
    partial.replace(target)
    return target


def ensure_triton() -> tuple[Path, Path]:
    """The Triton venv (built when missing) and its ``tritonserver`` home, with the
    python backend stub in place."""
    venv = ensure_venv("triton")
    home = triton_home(venv)
    install_python_backend_stub(home)
    return venv, home


class TritonProcess:
    """One Triton serving the model repository ``models_dir``."""

    def __init__(self, models_dir: Path, workdir: Path) -> None:
        self.models_dir = Path(models_dir).resolve()
        self.workdir = Path(workdir).resolve()
        self._http_port: int | None = None
        self._grpc_port: int | None = None
        self._metrics_port: int | None = None
        self._process: ManagedProcess | None = None

    @property
    def http_port(self) -> int:
        """The REST port; only valid after :meth:`start` or :meth:`reserve_ports`."""
        if self._http_port is None:
            raise RuntimeError("Triton has not been started")
        return self._http_port

    @property
    def grpc_port(self) -> int:
        """The gRPC port (inference and model repository); only valid after
        :meth:`start` or :meth:`reserve_ports`."""
        if self._grpc_port is None:
            raise RuntimeError("Triton has not been started")
        return self._grpc_port

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("Triton has not been started")
        return self._process.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "triton.log"

    def reserve_ports(self) -> int:
        """Choose the ports now (kept across restarts) and return the gRPC one, so a
        client can be pointed at Triton before it starts."""
        if self._grpc_port is None:
            self._http_port, self._grpc_port, self._metrics_port = _distinct_free_ports(3)
        return self._grpc_port

    def command(self, home: Path) -> list[str]:
        """The tritonserver command line (ports must already be chosen)."""
        return [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={self.models_dir}",
            "--model-control-mode=explicit",
            "--strict-model-config=false",
            # as the controller runs it: with strict readiness, one model that failed
            # to load makes ServerReady false for the whole server
            "--strict-readiness=false",
            f"--backend-directory={home / 'backends'}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self._metrics_port}",
            "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={EXIT_TIMEOUT_SECONDS}",
        ]

    def start(self, timeout: float = 120) -> None:
        """Start Triton and return once gRPC ServerReady says it is ready.

        Raises ``RuntimeError`` (with the tail of its log) when the process exits
        early, ``TimeoutError`` when it is not ready within ``timeout`` seconds; in
        both cases the process is stopped first.
        """
        if self._process is not None and self._process.alive():
            raise RuntimeError(f"Triton already running (pid {self._process.pid})")
        venv, home = ensure_triton()
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.reserve_ports()
        self._process = ManagedProcess(
            self.command(home),
            log_path=self.log_path,
            # the python backend stub finds numpy and its utilities through the venv
            env={**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"},
            cwd=self.workdir,
        )
        self._process.start()
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self._process.alive():
                tail = self._process.log_tail()
                self.stop()
                raise RuntimeError(f"Triton exited during start-up:\n{tail}")
            if time.monotonic() > deadline:
                tail = self._process.log_tail()
                self.stop()
                raise TimeoutError(f"Triton not ready after {timeout:.0f}s:\n{tail}")
            time.sleep(0.2)

    def ready(self) -> bool:
        """True when gRPC ServerReady answers ready."""
        if self._grpc_port is None:
            return False
        with grpc.insecure_channel(
            f"127.0.0.1:{self._grpc_port}", options=[("grpc.enable_http_proxy", 0)]
        ) as channel:
            try:
                response = v2_grpc.GRPCInferenceServiceStub(channel).ServerReady(
                    v2.ServerReadyRequest(), timeout=1
                )
            except grpc.RpcError:
                return False
        return bool(response.ready)

    def alive(self) -> bool:
        return self._process is not None and self._process.alive()

    def log_tail(self, limit: int = 4000) -> str:
        return self._process.log_tail(limit) if self._process is not None else ""

    def stop(self) -> None:
        """SIGTERM to its process group (Triton and its python stubs; SIGKILL after a
        grace period longer than Triton's own exit timeout)."""
        if self._process is not None:
            self._process.stop(timeout=EXIT_TIMEOUT_SECONDS + 10)

    def kill(self) -> None:
        """SIGKILL its whole process group at once (fault tests)."""
        if self._process is not None:
            self._process.kill()


def _distinct_free_ports(count: int) -> tuple[int, ...]:
    ports: list[int] = []
    for _ in range(count * 20):
        port = free_port()
        if port not in ports:
            ports.append(port)
        if len(ports) == count:
            return tuple(ports)
    raise RuntimeError(f"could not find {count} distinct free ports")
