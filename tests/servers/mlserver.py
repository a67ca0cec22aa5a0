"""A real MLServer for the test suite and the demo.

MLServer runs from its own cached venv (see :mod:`tests.servers.venvs`), listens on
127.0.0.1 on free ports, never loads models at start-up, and is stopped by PID. It is
configured through its ``MLSERVER_*`` environment variables (MLServer's settings are
read from the environment), so nothing is ever written into the model repository;
its working directory receives what MLServer writes there (``.metrics``, ``.envs``).
"""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

from tests.servers.process import ManagedProcess, free_port
from tests.servers.venvs import ensure_venv

#: environment prefixes MLServer reads settings from: inherited values are dropped so
#: that the caller's environment cannot change the server under test
_MLSERVER_ENV_PREFIXES = ("MLSERVER_",)

#: talks to 127.0.0.1 directly, whatever proxy the environment names
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class MLServerProcess:
    """One MLServer serving the model repository ``models_dir``."""

    def __init__(self, models_dir: Path, workdir: Path) -> None:
        self.models_dir = Path(models_dir).resolve()
        self.workdir = Path(workdir).resolve()
        self._http_port: int | None = None
        self._grpc_port: int | None = None
        self._metrics_port: int | None = None
        self._process: ManagedProcess | None = None

    @property
    def http_port(self) -> int:
        """The REST port; only valid after :meth:`start`."""
        if self._http_port is None:
            raise RuntimeError("MLServer has not been started")
        return self._http_port

    @property
    def grpc_port(self) -> int:
        """The gRPC port (inference and model repository); only valid after :meth:`start`."""
        if self._grpc_port is None:
            raise RuntimeError("MLServer has not been started")
        return self._grpc_port

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("MLServer has not been started")
        return self._process.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "mlserver.log"

    def environment(self) -> dict[str, str]:
        """The environment MLServer runs with (ports must already be chosen)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_MLSERVER_ENV_PREFIXES)}
        env.update(
            {
                "MLSERVER_HOST": "127.0.0.1",
                "MLSERVER_HTTP_PORT": str(self.http_port),
                "MLSERVER_GRPC_PORT": str(self.grpc_port),
                "MLSERVER_METRICS_PORT": str(self._metrics_port),
                "MLSERVER_LOAD_MODELS_AT_STARTUP": "false",
                "MLSERVER_MODELS_DIR": str(self.models_dir),
                "MLSERVER_GRPC_MAX_MESSAGE_LENGTH": "-1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def reserve_ports(self) -> int:
        """Choose the ports now (kept across restarts) and return the gRPC one, so a
        client can be pointed at MLServer before it starts."""
        if self._grpc_port is None:
            self._http_port, self._grpc_port, self._metrics_port = _distinct_free_ports(3)
        return self._grpc_port

    def start(self, timeout: float = 120) -> None:
        """Start MLServer and return once GET /v2/health/ready answers 200.

        Raises ``RuntimeError`` (with the tail of its log) when the process exits
        early, ``TimeoutError`` when it is not ready within ``timeout`` seconds; in
        both cases the process is stopped first.
        """
        if self._process is not None and self._process.alive():
            raise RuntimeError(f"MLServer already running (pid {self._process.pid})")
        venv = ensure_venv("mlserver")
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.reserve_ports()
        self._process = ManagedProcess(
            [str(venv / "bin" / "mlserver"), "start", str(self.models_dir)],
            log_path=self.log_path,
            env={**self.environment(), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"},
            cwd=self.workdir,
        )
        self._process.start()
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self._process.alive():
                tail = self._process.log_tail()
                self.stop()
                raise RuntimeError(f"MLServer exited during start-up:\n{tail}")
            if time.monotonic() > deadline:
                tail = self._process.log_tail()
                self.stop()
                raise TimeoutError(f"MLServer not ready after {timeout:.0f}s:\n{tail}")
            time.sleep(0.2)

    def ready(self) -> bool:
        """True when GET /v2/health/ready answers 200."""
        if self._http_port is None:
            return False
        url = f"http://127.0.0.1:{self._http_port}/v2/health/ready"
        try:
            with _DIRECT.open(url, timeout=1) as response:
                return int(response.status) == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self._process is not None and self._process.alive()

    def log_tail(self, limit: int = 4000) -> str:
        return self._process.log_tail(limit) if self._process is not None else ""

    def stop(self) -> None:
        """SIGTERM to its process group (SIGKILL after a grace period)."""
        if self._process is not None:
            self._process.stop(timeout=15)

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
