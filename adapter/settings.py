"""The typed settings of a sidecar process, read from the environment once.

Names and defaults are the upstream ones (see the ModelMesh contract, section 5), so the
controller's env vars work unchanged. ``Settings.from_env`` is the only place that reads
``os.environ``; everything else receives a ``Settings``.

Some defaults depend on the runtime (TorchServe listens on 7071 and sizes models at
2.75x): those fields are ``None`` when unset and :meth:`Settings.for_runtime` fills them
from the plugin's defaults.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.errors import ConfigurationError


class SettingsError(ConfigurationError):
    """An environment variable has a value that cannot be used."""


def _env(name: str, doc: str, parse: Callable[[str], Any] = str) -> dict[str, Any]:
    return {"env": name, "doc": doc, "parse": parse}


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _non_negative_int(raw: str) -> int:
    value = int(raw.strip())
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw.strip())
    if value <= 0:
        raise ValueError(f"must be positive, got {value}")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw.strip())
    if not value > 0:
        raise ValueError(f"must be positive, got {raw!r}")
    return value


def _port(raw: str) -> int:
    value = int(raw.strip())
    if not 0 <= value <= 65535:
        raise ValueError(f"not a port number: {value}")
    return value


def _endpoint(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


#: the longest path a Unix socket address holds (``sun_path`` is 108 bytes with its NUL)
UNIX_PATH_MAX = 107


def listen_endpoint(raw: str) -> str:
    """``port:N`` or ``unix:/absolute/path``, as a ServingRuntime's ``grpcEndpoint``."""
    value = raw.strip()
    kind, _, rest = value.partition(":")
    if kind == "port":
        return f"port:{_port(rest)}"
    if kind == "unix":
        path = rest.strip()
        if not path.startswith("/") or "\0" in path:
            raise ValueError(f"a unix socket needs an absolute path (unix:/path), got {raw!r}")
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise ValueError(f"a unix socket path holds at most {UNIX_PATH_MAX} bytes, got {raw!r}")
        return f"unix:{os.path.normpath(path)}"
    raise ValueError(f"expected port:N or unix:/absolute/path, got {raw!r}")


@dataclass(frozen=True)
class Settings:
    """Every setting of the adapter and the standalone puller."""

    adapter_port: int = field(
        default=8085, metadata=_env("ADAPTER_PORT", "port of the mmesh.ModelRuntime gRPC service", _port)
    )
    adapter_host: str = field(
        default="0.0.0.0",
        metadata=_env("ADAPTER_HOST", "address the gRPC services listen on"),
    )
    adapter_endpoint: str | None = field(
        default=None,
        metadata=_env(
            "ADAPTER_ENDPOINT",
            "where mmesh.ModelRuntime listens, in the form of a ServingRuntime's grpcEndpoint: "
            "`port:N` (on ADAPTER_HOST) or `unix:/path` (a Unix socket, mode 0600); "
            "wins over ADAPTER_PORT; default ADAPTER_HOST:ADAPTER_PORT",
            listen_endpoint,
        ),
    )
    runtime_port: int | None = field(
        default=None,
        metadata=_env(
            "RUNTIME_PORT",
            "runtime management port (gRPC); default 8001, TorchServe 7071",
            _port,
        ),
    )
    runtime_host: str = field(
        default="127.0.0.1",
        metadata=_env("RUNTIME_HOST", "host of the runtime's management API"),
    )
    runtime_data_endpoint: str | None = field(
        default=None,
        metadata=_env(
            "RUNTIME_DATA_ENDPOINT",
            "runtime inference endpoint, `port:N` or `unix:/path`; default the runtime port "
            "(TorchServe port:7070)",
            _endpoint,
        ),
    )
    container_mem_req_bytes: int = field(
        default=0,
        metadata=_env(
            "CONTAINER_MEM_REQ_BYTES",
            "memory request of the runtime container; required by the adapter",
            _non_negative_int,
        ),
    )
    mem_buffer_bytes: int = field(
        default=268435456,
        metadata=_env(
            "MEM_BUFFER_BYTES",
            "memory kept free: capacity = CONTAINER_MEM_REQ_BYTES - MEM_BUFFER_BYTES",
            _non_negative_int,
        ),
    )
    loading_concurrency: int = field(
        default=1,
        metadata=_env("LOADING_CONCURRENCY", "loads running at once (maxLoadingConcurrency)", _positive_int),
    )
    loadtime_timeout_ms: int = field(
        default=30000,
        metadata=_env(
            "LOADTIME_TIMEOUT", "model loading timeout in ms (modelLoadingTimeoutMs)", _positive_int
        ),
    )
    default_modelsize: int = field(
        default=1000000,
        metadata=_env("DEFAULT_MODELSIZE", "size reported when a model's size is unknown", _positive_int),
    )
    modelsize_multiplier: float | None = field(
        default=None,
        metadata=_env(
            "MODELSIZE_MULTIPLIER",
            "size = disk size x this; default 1.25, TorchServe 2.75",
            _positive_float,
        ),
    )
    runtime_version: str = field(
        default="v1",
        metadata=_env("RUNTIME_VERSION", "runtimeVersion when the runtime does not report one"),
    )
    limit_per_model_concurrency: int = field(
        default=0,
        metadata=_env(
            "LIMIT_PER_MODEL_CONCURRENCY",
            ">0 turns on limitModelConcurrency with this maxConcurrency",
            _non_negative_int,
        ),
    )
    root_model_dir: Path = field(
        default=Path("/models"),
        metadata=_env("ROOT_MODEL_DIR", "shared volume the models are pulled into", Path),
    )
    use_embedded_puller: bool = field(
        default=False,
        metadata=_env(
            "USE_EMBEDDED_PULLER",
            "true: the adapter pulls models itself; false: a standalone puller already did",
            _bool,
        ),
    )
    storage_config_dir: Path = field(
        default=Path("/storage-config"),
        metadata=_env("STORAGE_CONFIG_DIR", "mounted storage-config secret, one file per key", Path),
    )
    pvc_mounts_dir: Path = field(
        default=Path("/pvc_mounts"),
        metadata=_env(
            "PVC_MOUNTS_DIR", "where PVCs of type pvc storage are mounted, one folder per name", Path
        ),
    )
    puller_port: int = field(
        default=8084,
        metadata=_env("PORT", "port of the standalone puller's mmesh.ModelRuntime service", _port),
    )
    model_server_endpoint: str = field(
        default="port:8085",
        metadata=_env(
            "MODEL_SERVER_ENDPOINT",
            "where the standalone puller forwards requests: `port:N`, `host:port` or `unix:/path`",
            _endpoint,
        ),
    )
    pull_workers: int = field(
        default=8,
        metadata=_env("PULL_WORKERS", "parallel downloads (files and ranges) per pull", _positive_int),
    )
    pull_part_bytes: int = field(
        default=16 * 1024 * 1024,
        metadata=_env("PULL_PART_BYTES", "size of one ranged read of a large object", _positive_int),
    )
    pull_retries: int = field(
        default=4,
        metadata=_env("PULL_RETRIES", "attempts of one read on a transient error", _positive_int),
    )
    pull_timeout_seconds: float = field(
        default=60.0,
        metadata=_env(
            "PULL_TIMEOUT_SECONDS", "connect and read timeout of one storage request", _positive_float
        ),
    )
    cache_max_bytes: int = field(
        default=0,
        metadata=_env(
            "CACHE_MAX_BYTES",
            "byte cap of the content cache under ROOT_MODEL_DIR/_cache (0: cache off)",
            _non_negative_int,
        ),
    )
    archive_max_bytes: int = field(
        default=64 * 1024**3,
        metadata=_env(
            "ARCHIVE_MAX_BYTES",
            "most bytes a model archive may unpack to (zip bombs fail past it)",
            _positive_int,
        ),
    )
    metrics_port: int = field(
        default=0,
        metadata=_env("METRICS_PORT", "port of the Prometheus /metrics endpoint (0: off)", _port),
    )
    http_proxy: str = field(
        default="",
        metadata=_env("HTTP_PROXY", "proxy for plain-HTTP storage requests (standard variable)"),
    )
    https_proxy: str = field(
        default="",
        metadata=_env("HTTPS_PROXY", "proxy for HTTPS storage requests (standard variable)"),
    )
    no_proxy: str = field(
        default="",
        metadata=_env("NO_PROXY", "hosts reached without the proxy, comma-separated (standard variable)"),
    )
    log_level: str = field(
        default="info",
        metadata=_env("LOG_LEVEL", "debug, info, warning or error"),
    )
    log_format: str = field(
        default="auto",
        metadata=_env("LOG_FORMAT", "json, console, or auto (console on a terminal)"),
    )
    shutdown_grace_seconds: float = field(
        default=10.0,
        metadata=_env(
            "SHUTDOWN_GRACE_SECONDS",
            "on SIGTERM, how long running requests may finish",
            _positive_float,
        ),
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every setting from ``environ`` (default ``os.environ``); keyword
        overrides (from the command line) win over the environment."""
        source = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f.metadata["env"]
            raw = source.get(name)
            if raw is None or (raw.strip() == "" and f.default is None):
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                raise SettingsError(f"{name}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if settings.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise SettingsError(f"LOG_LEVEL: unknown level {settings.log_level!r}")
        if settings.adapter_endpoint is not None:  # a command-line override is checked too
            try:
                settings = dataclasses.replace(
                    settings, adapter_endpoint=listen_endpoint(settings.adapter_endpoint)
                )
            except ValueError as exc:
                raise SettingsError(f"ADAPTER_ENDPOINT: {exc}") from None
        if settings.log_format not in ("json", "console", "auto"):
            raise SettingsError(f"LOG_FORMAT: expected json, console or auto, got {settings.log_format!r}")
        return settings

    def for_runtime(self, runtime_port: int, modelsize_multiplier: float) -> Settings:
        """Fill the runtime-dependent defaults that the environment left unset."""
        return dataclasses.replace(
            self,
            runtime_port=self.runtime_port if self.runtime_port is not None else runtime_port,
            modelsize_multiplier=(
                self.modelsize_multiplier if self.modelsize_multiplier is not None else modelsize_multiplier
            ),
        )

    @property
    def adapter_socket_path(self) -> Path | None:
        """The Unix socket the adapter listens on (ADAPTER_ENDPOINT=unix:/path), else None."""
        if self.adapter_endpoint is not None and self.adapter_endpoint.startswith("unix:"):
            return Path(self.adapter_endpoint.removeprefix("unix:"))
        return None

    @property
    def adapter_listen_port(self) -> int:
        """The TCP port of the adapter: ADAPTER_ENDPOINT=port:N, else ADAPTER_PORT."""
        if self.adapter_endpoint is not None and self.adapter_endpoint.startswith("port:"):
            return int(self.adapter_endpoint.removeprefix("port:"))
        return self.adapter_port

    @property
    def capacity_bytes(self) -> int:
        return max(self.container_mem_req_bytes - self.mem_buffer_bytes, 0)

    @property
    def multiplier(self) -> float:
        return self.modelsize_multiplier if self.modelsize_multiplier is not None else 1.25

    @property
    def management_port(self) -> int:
        return self.runtime_port if self.runtime_port is not None else 8001


def settings_table() -> list[tuple[str, str, str]]:
    """(env var, default, meaning) for every setting, for the docs."""
    rows = []
    for f in dataclasses.fields(Settings):
        default = "" if f.default is None else str(f.default)
        rows.append((f.metadata["env"], default, f.metadata["doc"]))
    return rows
