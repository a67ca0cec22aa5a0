"""`mesh-adapter` as a process: drop-in program names, settings from the upstream env
vars, clear start-up errors, graceful shutdown on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from adapter.cli import runtime_from_program_name
from adapter.settings import Settings, SettingsError, settings_table
from protos.mmesh import model_runtime_pb2 as pb
from tests.servers.adapter import MeshClient, SidecarProcess
from tests.servers.process import free_port

BIN = Path(sys.executable).parent


def test_runtime_from_program_name():
    assert runtime_from_program_name("/opt/app/mlserver-adapter") == "mlserver"
    assert runtime_from_program_name("/opt/app/triton-adapter") == "triton"
    assert runtime_from_program_name("/usr/bin/mesh-adapter") is None
    assert runtime_from_program_name("python") is None


def test_settings_from_upstream_env_names(tmp_path: Path):
    env = {
        "ADAPTER_PORT": "9000",
        "RUNTIME_PORT": "9001",
        "CONTAINER_MEM_REQ_BYTES": "1073741824",
        "MEM_BUFFER_BYTES": "1000",
        "LOADING_CONCURRENCY": "4",
        "LOADTIME_TIMEOUT": "90000",
        "DEFAULT_MODELSIZE": "5",
        "MODELSIZE_MULTIPLIER": "2.5",
        "RUNTIME_VERSION": "x1",
        "LIMIT_PER_MODEL_CONCURRENCY": "2",
        "ROOT_MODEL_DIR": str(tmp_path),
        "USE_EMBEDDED_PULLER": "true",
        "STORAGE_CONFIG_DIR": str(tmp_path / "sc"),
        "PORT": "8086",
        "MODEL_SERVER_ENDPOINT": "port:9000",
    }
    s = Settings.from_env(env)
    assert (s.adapter_port, s.runtime_port, s.loading_concurrency, s.loadtime_timeout_ms) == (
        9000,
        9001,
        4,
        90000,
    )
    assert s.capacity_bytes == 1073741824 - 1000
    assert s.multiplier == 2.5
    assert s.use_embedded_puller is True
    assert s.puller_port == 8086
    assert s.root_model_dir == tmp_path
    # runtime defaults fill only what the environment left unset
    assert Settings.from_env({}).for_runtime(7071, 2.75).management_port == 7071
    assert Settings.from_env({"RUNTIME_PORT": "1"}).for_runtime(7071, 2.75).management_port == 1
    assert Settings.from_env({}).for_runtime(7071, 2.75).multiplier == 2.75


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("ADAPTER_PORT", "70000", "not a port"),
        ("LOADING_CONCURRENCY", "0", "must be positive"),
        ("USE_EMBEDDED_PULLER", "maybe", "true or false"),
        ("MEM_BUFFER_BYTES", "lots", "invalid literal"),
        ("LOG_LEVEL", "loud", "unknown level"),
    ],
)
def test_bad_settings_name_the_variable(name: str, value: str, fragment: str):
    with pytest.raises(SettingsError, match=name) as info:
        Settings.from_env({name: value})
    assert fragment in str(info.value)


def test_settings_table_covers_every_field():
    names = [row[0] for row in settings_table()]
    assert "ADAPTER_PORT" in names and "MODEL_SERVER_ENDPOINT" in names
    assert len(names) == len(set(names))


def test_missing_memory_request_is_a_clear_start_up_error(tmp_path: Path):
    done = subprocess.run(
        [str(BIN / "mesh-adapter"), "--runtime", "mlserver"],
        env={"ROOT_MODEL_DIR": str(tmp_path), "ADAPTER_PORT": str(free_port()), "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "CONTAINER_MEM_REQ_BYTES" in done.stderr


def test_unknown_runtime_lists_the_installed_ones(tmp_path: Path):
    done = subprocess.run(
        [str(BIN / "mesh-adapter"), "--runtime", "nosuch"],
        env={"ROOT_MODEL_DIR": str(tmp_path), "CONTAINER_MEM_REQ_BYTES": "1", "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "nosuch" in done.stderr
    assert "mlserver" in done.stderr


def test_drop_in_command_name_and_graceful_sigterm(tmp_path: Path):
    """`/opt/app/mlserver-adapter` (a link to our entry point) picks the runtime from its
    name; with no runtime listening it reports STARTING; SIGTERM stops it cleanly."""
    drop_in = tmp_path / "mlserver-adapter"
    drop_in.symlink_to(BIN / "mesh-adapter")
    port = free_port()
    env = {
        "ADAPTER_HOST": "127.0.0.1",
        "ADAPTER_PORT": str(port),
        "RUNTIME_PORT": str(free_port()),  # nothing listens there
        "ROOT_MODEL_DIR": str(tmp_path / "models"),
        "CONTAINER_MEM_REQ_BYTES": str(1 << 30),
        "LOG_FORMAT": "json",
    }
    sidecar = SidecarProcess([str(drop_in)], env, tmp_path / "adapter.log", port)
    sidecar.start()
    client = MeshClient(port)
    try:
        status = client.stub.runtimeStatus(pb.RuntimeStatusRequest(), timeout=10)
        assert status.status == pb.RuntimeStatusResponse.STARTING
        os.kill(sidecar.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while sidecar.process.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not sidecar.process.alive()
        assert sidecar.process.proc is not None
        assert sidecar.process.proc.returncode == 0
        assert any(line.get("event") == "shutting down" for line in sidecar.log_lines())
        with pytest.raises(grpc.RpcError):
            client.stub.runtimeStatus(pb.RuntimeStatusRequest(), timeout=2)
    finally:
        client.close()
        sidecar.stop()
