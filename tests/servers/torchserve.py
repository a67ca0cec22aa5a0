"""A real TorchServe for the test suite.

TorchServe 0.12 runs from its own cached venv (see :mod:`tests.servers.venvs`; Java 17
must be on PATH) exactly as the stock ServingRuntime starts it, from the
configuration file the sidecar writes (:func:`runtimes.torchserve.write_config`):

    torchserve --start --foreground --ncs --disable-token-auth --enable-model-api
               --ts-config CONFIG --model-store STORE

Its four ports (gRPC management and inference, REST inference, management and
metrics) are free ports on 127.0.0.1. It gets a working directory of its own (logs,
``TMPDIR`` and ``TEMP`` with the pid file and the unpacked archives). It is ready when
the gRPC Ping reports Healthy, and is stopped by SIGTERM to the Java server (whose
pid the launcher writes to ``TMPDIR/.model_server.pid``), then to its process group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from protos.torchserve import inference_pb2_grpc
from runtimes.torchserve import CONFIG_FILE_NAME, TorchServeConfig, write_config
from tests.servers.process import ManagedProcess, free_port
from tests.servers.venvs import ensure_venv

#: variables the launcher or the server read settings from: dropped from the inherited
#: environment so that it cannot change the server under test
_TS_ENV = ("TS_", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "LOG_LOCATION", "METRICS_LOCATION")

#: seconds between worker memory measurements: short, so that tests see them
METRIC_INTERVAL_SECONDS = 2


class TorchServeProcess:
    """One TorchServe whose model store is ``models_dir``."""

    def __init__(self, models_dir: Path, workdir: Path) -> None:
        self.models_dir = Path(models_dir).absolute()
        self.workdir = Path(workdir).absolute()
        self._ports: dict[str, int] = {}
        self._process: ManagedProcess | None = None

    # --- ports and configuration ------------------------------------------------------

    def reserve_ports(self) -> None:
        """Choose the five ports now (kept across restarts)."""
        if not self._ports:
            names = ("grpc_management", "grpc_inference", "rest_inference", "rest_management", "metrics")
            ports: list[int] = []
            for _ in range(100):
                port = free_port()
                if port not in ports:
                    ports.append(port)
                if len(ports) == len(names):
                    break
            else:
                raise RuntimeError("could not find five distinct free ports")
            self._ports = dict(zip(names, ports, strict=True))

    def _port(self, name: str) -> int:
        if not self._ports:
            raise RuntimeError("TorchServe's ports are not chosen yet: call reserve_ports or start")
        return self._ports[name]

    @property
    def management_port(self) -> int:
        """The gRPC management port (RUNTIME_PORT for the plugin)."""
        return self._port("grpc_management")

    @property
    def inference_port(self) -> int:
        """The gRPC inference port (RUNTIME_DATA_ENDPOINT ``port:N``)."""
        return self._port("grpc_inference")

    @property
    def config_path(self) -> Path:
        return self.models_dir / CONFIG_FILE_NAME

    def adjust(self, config: TorchServeConfig) -> TorchServeConfig:
        """``config`` (the plugin's) with what only the tests add: the REST ports
        moved to free ones, frequent worker memory measurements."""
        return dataclasses.replace(
            config,
            inference_address=f"http://127.0.0.1:{self._port('rest_inference')}",
            management_address=f"http://127.0.0.1:{self._port('rest_management')}",
            metrics_address=f"http://127.0.0.1:{self._port('metrics')}",
            extra={**config.extra, "metric_time_interval": str(METRIC_INTERVAL_SECONDS)},
        )

    def write_default_config(self) -> None:
        """Write the configuration the sidecar would, for this server's ports."""
        self.reserve_ports()
        config = TorchServeConfig(
            model_store=self.models_dir,
            grpc_address="127.0.0.1",
            grpc_management_port=self.management_port,
            grpc_inference_port=self.inference_port,
        )
        write_config(self.config_path, self.adjust(config))

    # --- process ---------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.workdir / "torchserve.log"

    @property
    def tmpdir(self) -> Path:
        return self.workdir / "tmp"

    def environment(self, venv: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_TS_ENV)}
        env.update(
            {
                "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                "TMPDIR": str(self.tmpdir),
                "TEMP": str(self.tmpdir),
                "LOG_LOCATION": str(self.workdir / "logs"),
                "METRICS_LOCATION": str(self.workdir / "logs"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def start(self, timeout: float = 180) -> None:
        """Start TorchServe from the configuration file in the model store (written
        by the caller, e.g. the plugin's ``prepare``; :meth:`write_default_config`
        otherwise) and return once Ping reports Healthy.

        Raises ``RuntimeError`` (with the tail of its log) when it exits early,
        ``TimeoutError`` when it is not ready within ``timeout`` seconds; in both
        cases it is stopped first.
        """
        if self.alive():
            raise RuntimeError(f"TorchServe already running (pid {self.pid})")
        venv = ensure_venv("torchserve")
        self.reserve_ports()
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        if not self.config_path.is_file():
            self.write_default_config()
        argv = [
            str(venv / "bin" / "torchserve"),
            "--start",
            "--foreground",
            "--ncs",
            "--disable-token-auth",
            "--enable-model-api",
            "--ts-config",
            str(self.config_path),
            "--model-store",
            str(self.models_dir),
        ]
        self._process = ManagedProcess(argv, self.log_path, env=self.environment(venv), cwd=self.workdir)
        self._process.start()
        deadline = time.monotonic() + timeout
        while self.health() != "Healthy":
            if not self._process.alive():
                tail = self._process.log_tail()
                self.stop()
                raise RuntimeError(f"TorchServe exited during start-up:\n{tail}")
            if time.monotonic() > deadline:
                tail = self._process.log_tail()
                self.stop()
                raise TimeoutError(f"TorchServe not healthy after {timeout:.0f}s:\n{tail}")
            time.sleep(0.25)

    def health(self) -> str | None:
        """The status Ping reports (``Healthy``...), ``None`` when it does not answer."""
        if not self._ports:
            return None
        with (
            contextlib.suppress(grpc.RpcError, ValueError),
            grpc.insecure_channel(
                f"127.0.0.1:{self.inference_port}", options=[("grpc.enable_http_proxy", 0)]
            ) as channel,
        ):
            stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
            answer = stub.Ping(empty_pb2.Empty(), timeout=2)
            parsed = json.loads(answer.health)
            return str(parsed.get("status")) if isinstance(parsed, Mapping) else None
        return None

    @property
    def pid(self) -> int:
        """The launcher's pid (the leader of TorchServe's process group)."""
        if self._process is None:
            raise RuntimeError("TorchServe has not been started")
        return self._process.pid

    def java_pid(self) -> int | None:
        """The Java server's pid, from the launcher's pid file, when that process
        belongs to this server's process group."""
        try:
            pid = int((self.tmpdir / ".model_server.pid").read_text().strip())
            return pid if self._process is not None and os.getpgid(pid) == self._process.pid else None
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        return self._process is not None and self._process.alive()

    def log_tail(self, limit: int = 4000) -> str:
        return self._process.log_tail(limit) if self._process is not None else ""

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the Java server and a bounded wait for it to exit, then the
        process group (SIGTERM, SIGKILL after a grace period)."""
        if self._process is None:
            return
        java = self.java_pid()
        if java is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(java, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self._process.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        self._process.stop(timeout=timeout)
