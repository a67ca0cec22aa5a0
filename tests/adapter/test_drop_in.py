"""The drop-in commands: every runtime the project ships starts from the controller's
command and environment alone.

The controller starts the adapter container with ``/opt/app/<runtime>-adapter`` and the
upstream environment variables. For each runtime declared in our own entry points, a
link named ``<runtime>-adapter`` to the installed ``mesh-adapter`` script (and, the
same, ``mesh-adapter --runtime <runtime>``) must start with no runtime listening,
report STARTING, and have written what the runtime container waits for.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest

from adapter.plugin import ENTRY_POINT_GROUP
from protos.mmesh import model_runtime_pb2 as pb
from tests.servers.adapter import BIN, MeshClient, SidecarProcess
from tests.servers.process import free_port

#: the runtimes the project ships, as the controller names them (``serverType``)
SHIPPED = ("mlserver", "triton", "torchserve", "ovms")

#: files the adapter writes before the runtime starts, which the stock ServingRuntimes
#: wait for or start from (relative to ROOT_MODEL_DIR)
WRITTEN_AT_START = {
    "torchserve": "_torchserve_models/mmconfig.properties",
    "ovms": "model_config_list.json",
}


def our_runtimes() -> dict[str, EntryPoint]:
    """The runtime entry points declared by this project (not by other packages)."""
    return {
        ep.name: ep
        for ep in entry_points(group=ENTRY_POINT_GROUP)
        if ep.dist is not None and ep.dist.name == "modelmesh-sidecar"
    }


def test_every_shipped_runtime_is_declared_in_our_entry_points():
    declared = our_runtimes()
    missing = sorted(set(SHIPPED) - set(declared))
    assert not missing, f"runtimes without an entry point in pyproject.toml: {missing}"
    for name in SHIPPED:
        assert declared[name].module == f"runtimes.{name}"


def upstream_env(root: Path, adapter_port: int) -> dict[str, str]:
    """What the controller gives the adapter container (no runtime listens on the
    ports). ADAPTER_HOST and LOG_FORMAT are ours: the test binds to loopback only
    and reads JSON logs."""
    storage_config = root.parent / "storage-config"
    storage_config.mkdir(exist_ok=True)
    return {
        "ADAPTER_PORT": str(adapter_port),
        "RUNTIME_PORT": str(free_port()),
        "RUNTIME_DATA_ENDPOINT": f"port:{free_port()}",
        "CONTAINER_MEM_REQ_BYTES": str(1 << 30),
        "MEM_BUFFER_BYTES": "134217728",
        "LOADTIME_TIMEOUT": "90000",
        "ROOT_MODEL_DIR": str(root),
        "USE_EMBEDDED_PULLER": "true",
        "STORAGE_CONFIG_DIR": str(storage_config),
        "ADAPTER_HOST": "127.0.0.1",
        "LOG_FORMAT": "json",
    }


@pytest.mark.parametrize("form", ["link", "flag"])
@pytest.mark.parametrize("runtime", sorted(our_runtimes()))
def test_drop_in_command_starts_and_reports_starting(runtime: str, form: str, tmp_path: Path):
    module = our_runtimes()[runtime].module
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is declared but not written yet")
    root = tmp_path / "models"
    port = free_port()
    if form == "link":
        command = tmp_path / "opt-app" / f"{runtime}-adapter"
        command.parent.mkdir()
        command.symlink_to(BIN / "mesh-adapter")
        argv = [str(command)]
    else:
        argv = [str(BIN / "mesh-adapter"), "--runtime", runtime]
    sidecar = SidecarProcess(argv, upstream_env(root, port), tmp_path / "adapter.log", port)
    sidecar.start()
    client = MeshClient(port)
    try:
        status = client.stub.runtimeStatus(pb.RuntimeStatusRequest(), timeout=10)
        assert status.status == pb.RuntimeStatusResponse.STARTING
        started = [line for line in sidecar.log_lines() if line.get("event") == "starting adapter"]
        assert [line.get("runtime") for line in started] == [runtime]
        if runtime in WRITTEN_AT_START:
            assert (root / WRITTEN_AT_START[runtime]).is_file()
    finally:
        client.close()
        sidecar.stop()
