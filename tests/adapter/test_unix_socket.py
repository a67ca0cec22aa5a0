"""The adapter on a Unix domain socket (``ADAPTER_ENDPOINT=unix:/path``), as ModelMesh
reaches a runtime whose ServingRuntime ``grpcEndpoint`` is ``unix:/path``: the setting,
the socket's mode and life cycle in process, and a real ``mesh-adapter`` answering the
mesh over it."""

from __future__ import annotations

import os
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapter import errors
from adapter.cli import main
from adapter.flow import ModelFlow
from adapter.server import AdapterServer
from adapter.settings import Settings, SettingsError
from protos.mmesh import model_runtime_pb2 as pb
from protos.mmesh import model_runtime_pb2_grpc as pb_grpc
from tests.adapter.conftest import make_settings
from tests.adapter.recording_runtime import RecordingRuntime
from tests.servers.adapter import MeshClient, SidecarProcess
from tests.servers.mlserver import MLServerProcess
from tests.servers.process import free_port


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def stale_socket(path: Path) -> int:
    """A socket file nobody listens on (a killed adapter's); returns its inode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    return path.lstat().st_ino


# --- the setting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "endpoint", "socket_path", "port"),
    [
        ("unix:/tmp/mmesh/grpc.sock", "unix:/tmp/mmesh/grpc.sock", Path("/tmp/mmesh/grpc.sock"), 8085),
        ("unix:///run/mm//a.sock", "unix:/run/mm/a.sock", Path("/run/mm/a.sock"), 8085),
        (" port:9000 ", "port:9000", None, 9000),
    ],
)
def test_adapter_endpoint_takes_the_grpc_endpoint_forms(
    raw: str, endpoint: str, socket_path: Path | None, port: int
) -> None:
    settings = Settings.from_env({"ADAPTER_ENDPOINT": raw, "ADAPTER_PORT": "8085"})
    assert settings.adapter_endpoint == endpoint
    assert settings.adapter_socket_path == socket_path
    assert settings.adapter_listen_port == port


def test_without_adapter_endpoint_adapter_port_decides() -> None:
    settings = Settings.from_env({"ADAPTER_PORT": "8123", "ADAPTER_ENDPOINT": ""})
    assert settings.adapter_endpoint is None
    assert settings.adapter_socket_path is None
    assert settings.adapter_listen_port == 8123


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("unix:relative/grpc.sock", "absolute path"),
        ("unix:", "absolute path"),
        ("tcp:8085", "expected port:N or unix:/absolute/path"),
        ("port:70000", "not a port number"),
        ("unix:/" + "d" * 120, "at most 107 bytes"),
    ],
)
def test_a_bad_adapter_endpoint_is_a_clear_settings_error(raw: str, fragment: str) -> None:
    with pytest.raises(SettingsError, match="ADAPTER_ENDPOINT") as info:
        Settings.from_env({"ADAPTER_ENDPOINT": raw})
    assert fragment in str(info.value)


def test_the_command_line_checks_endpoint_too(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--runtime", "mlserver", "--endpoint", "unix:nope"]) == 2
    assert "ADAPTER_ENDPOINT" in capsys.readouterr().err


# --- the socket, in process -------------------------------------------------------------


def serve_on(root: Path, path: Path) -> tuple[AdapterServer, RecordingRuntime]:
    settings = make_settings(root, adapter_endpoint=f"unix:{path}")
    runtime = RecordingRuntime(settings)
    return AdapterServer(settings, ModelFlow(settings, runtime, None)), runtime


async def status_over(target: str) -> pb.RuntimeStatusResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        response: pb.RuntimeStatusResponse = await pb_grpc.ModelRuntimeStub(channel).runtimeStatus(
            pb.RuntimeStatusRequest(), timeout=10
        )
        return response


async def test_the_socket_is_owner_only_whatever_the_umask(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "run" / "adapter.sock"
    server, _ = serve_on(root, path)
    previous = os.umask(0)  # a socket bound now would be 0777 if nothing set its mode
    try:
        assert await server.start() == 0
    finally:
        os.umask(previous)
    try:
        assert server.address == f"unix:{path}"
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert mode_of(path) == 0o600
        assert sorted(p.name for p in path.parent.iterdir()) == ["adapter.sock"]  # no staging left
        assert (await status_over(server.address)).status == pb.RuntimeStatusResponse.READY
    finally:
        await server.stop(grace=0)
    assert not path.exists()


async def test_a_stale_socket_is_replaced(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "adapter.sock"
    stale = stale_socket(path)
    server, _ = serve_on(root, path)
    await server.start()
    try:
        assert path.lstat().st_ino != stale
        assert mode_of(path) == 0o600
        assert (await status_over(f"unix:{path}")).status == pb.RuntimeStatusResponse.READY
    finally:
        await server.stop(grace=0)
    assert not path.exists()


async def test_a_live_socket_or_another_file_is_left_alone(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "adapter.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        server, _ = serve_on(root, path)
        with pytest.raises(errors.ConfigurationError, match="another process listens"):
            await server.start()
        assert path.exists()
    path.unlink()
    path.write_text("not a socket")
    server, _ = serve_on(root, path)
    with pytest.raises(errors.ConfigurationError, match="is not a socket"):
        await server.start()
    assert path.read_text() == "not a socket"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.sock", "models"]


async def test_shutdown_keeps_a_socket_that_is_no_longer_ours(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "adapter.sock"
    server, _ = serve_on(root, path)
    await server.start()
    successor = tmp_path / "successor.sock"
    stale_socket(successor)
    successor.replace(path)  # another adapter took the path over
    await server.stop(grace=0)
    assert path.exists()


# --- a real mesh-adapter ----------------------------------------------------------------


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mmesh" / "grpc.sock"
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


def no_runtime_env(root: Path) -> dict[str, str]:
    return {
        "RUNTIME_PORT": str(free_port()),  # nothing listens there: STARTING
        "ROOT_MODEL_DIR": str(root),
        "CONTAINER_MEM_REQ_BYTES": str(1 << 30),
    }


def stop_cleanly(sidecar: SidecarProcess) -> None:
    """SIGTERM, then: exit status 0 and no socket left."""
    sidecar.stop()
    assert sidecar.process.proc is not None
    assert sidecar.process.proc.returncode == 0, sidecar.process.log_tail()
    assert sidecar.socket_path is not None
    assert not sidecar.socket_path.exists()


@pytest.mark.integration
def test_mesh_adapter_serves_the_mesh_on_a_unix_socket(
    mlserver: MLServerProcess,
    mlserver_root: Path,
    trained_sklearn_model: Path,
    socket_path: Path,
    tmp_path: Path,
) -> None:
    """runtimeStatus and a load of a real model into MLServer, over ``unix:``; the
    socket is 0600 and goes away on SIGTERM."""
    model_id = "uds-iris__isvc-0123456789"
    shutil.copytree(trained_sklearn_model, mlserver_root / model_id / "iris")
    env = {
        "RUNTIME_PORT": str(mlserver.grpc_port),
        "ROOT_MODEL_DIR": str(mlserver_root),
        "CONTAINER_MEM_REQ_BYTES": str(1 << 30),
        "LOADTIME_TIMEOUT": "120000",
    }
    sidecar = SidecarProcess.adapter("mlserver", env, tmp_path / "adapter.log", socket_path=socket_path)
    sidecar.start()
    client = MeshClient(sidecar.target)
    try:
        assert mode_of(socket_path) == 0o600
        assert client.wait_ready(timeout=60).status == pb.RuntimeStatusResponse.READY
        response = client.load(
            model_id,
            str(mlserver_root / model_id / "iris"),
            {"model_type": {"name": "sklearn"}},
            model_type="mt:sklearn",
        )
        assert response.sizeInBytes > 0
        client.unload(model_id)
        listening = [line for line in sidecar.log_lines() if line.get("event") == "adapter listening"]
        assert [line.get("address") for line in listening] == [f"unix:{socket_path}"]
    finally:
        client.close()
        shutil.rmtree(mlserver_root / model_id, ignore_errors=True)
    stop_cleanly(sidecar)


def test_mesh_adapter_replaces_a_stale_socket(socket_path: Path, tmp_path: Path) -> None:
    stale = stale_socket(socket_path)
    sidecar = SidecarProcess.adapter(
        "mlserver", no_runtime_env(tmp_path / "models"), tmp_path / "adapter.log", socket_path=socket_path
    )
    sidecar.start()
    client = MeshClient(sidecar.target)
    try:
        status = client.stub.runtimeStatus(pb.RuntimeStatusRequest(), timeout=10)
        assert status.status == pb.RuntimeStatusResponse.STARTING
        assert socket_path.lstat().st_ino != stale
        assert mode_of(socket_path) == 0o600
    finally:
        client.close()
    stop_cleanly(sidecar)
