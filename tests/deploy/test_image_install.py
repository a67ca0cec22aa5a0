"""What the image would hold, built and started without a Docker engine.

The Dockerfile's build stage is replayed once per session into a temporary folder (the
wheel, the venv with the image's extras, the ``/opt/app`` commands; see
``dockerfile_steps.replay_build_stage``). Each ``/opt/app`` command is then started
from there with the final stage's environment and what the controller sets, on
127.0.0.1, and must answer runtimeStatus: the adapters with no runtime listening
(STARTING), the puller by forwarding to one of them. The size of the venv and each
command's start-up time (process start to the first runtimeStatus answer) are printed
(run with ``-s``); docs/deploy.md cites them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from protos.mmesh import model_runtime_pb2 as pb
from tests.deploy.dockerfile_steps import (
    Replay,
    build_stage,
    final_stage_env,
    parse_stages,
    replay_build_stage,
)
from tests.servers.adapter import MeshClient, SidecarProcess
from tests.servers.process import free_port, port_open

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RUNTIMES = ("mlserver", "triton", "torchserve", "ovms")

#: run by the installed interpreter: what the venv holds, as JSON
PROBE = Path(__file__).with_name("image_probe.py")

#: command name -> (seconds from process start to the first runtimeStatus answer,
#: resident memory in MiB right after it)
STARTUP: dict[str, tuple[float, float]] = {}


@dataclass(frozen=True)
class ImageInstall:
    replay: Replay
    venv: Path
    app: Path
    install_seconds: float
    disk_bytes: int
    apparent_bytes: int
    files: int


def usage(folder: Path) -> tuple[int, int, int]:
    """(bytes on disk as ``du -s`` counts them, apparent bytes, files), each inode once."""
    seen: set[tuple[int, int]] = set()
    disk = apparent = files = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in [*dirnames, *filenames]:
            info = os.lstat(os.path.join(dirpath, name))
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            disk += info.st_blocks * 512
            apparent += info.st_size
            files += name in filenames
    return disk, apparent, files


@pytest.fixture(scope="session")
def image_install(tmp_path_factory: pytest.TempPathFactory) -> ImageInstall:
    root = tmp_path_factory.mktemp("image-root")
    started = time.monotonic()
    replay = replay_build_stage(root)
    seconds = time.monotonic() - started
    venv = replay.path("/opt/venv")
    disk, apparent, files = usage(venv)
    print(
        f"\nimage install: /opt/venv {disk / 2**20:.1f} MiB on disk (du), {apparent / 2**20:.1f} MiB "
        f"apparent, {files} files; build stage replayed in {seconds:.1f} s"
    )
    return ImageInstall(replay, venv, replay.path("/opt/app"), seconds, disk, apparent, files)


@pytest.fixture(scope="module", autouse=True)
def startup_summary() -> Iterator[None]:
    yield
    if STARTUP:
        print("\nstart-up, process start to the first runtimeStatus answer (resident memory then):")
        for name, (seconds, rss) in sorted(STARTUP.items()):
            print(f"  /opt/app/{name:20} {seconds:.2f} s  {rss:.0f} MiB")


def image_env(install: ImageInstall, home: Path) -> dict[str, str]:
    """The final stage's ENV with the image's folders mapped, and nothing else from this
    machine (no PYTHONPATH, no venv): the process sees what the container would."""
    env = {name: install.replay.rewrite(value) for name, value in final_stage_env().items()}
    env["PATH"] = env["PATH"].rstrip(":") + ":/usr/bin:/bin"
    env["HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    return env


def controller_env(root: Path) -> dict[str, str]:
    """What modelmesh-serving gives the built-in adapter container (no runtime listens
    on its ports), plus loopback and JSON logs for the test."""
    storage_config = root.parent / "storage-config"
    storage_config.mkdir(parents=True, exist_ok=True)
    return {
        "RUNTIME_PORT": str(free_port()),
        "RUNTIME_DATA_ENDPOINT": f"port:{free_port()}",
        "CONTAINER_MEM_REQ_BYTES": str(1 << 30),
        "MEM_BUFFER_BYTES": "134217728",
        "LOADTIME_TIMEOUT": "90000",
        "USE_EMBEDDED_PULLER": "true",
        "ROOT_MODEL_DIR": str(root),
        "STORAGE_CONFIG_DIR": str(storage_config),
        "ADAPTER_HOST": "127.0.0.1",
        "LOG_FORMAT": "json",
    }


def start_and_time(sidecar: SidecarProcess, timeout: float = 60) -> tuple[float, pb.RuntimeStatusResponse]:
    """Start the process and poll until runtimeStatus answers; the seconds it took."""
    started = time.monotonic()
    sidecar.process.start()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if not sidecar.process.alive():
            raise RuntimeError(f"{sidecar.process.argv[0]} exited:\n{sidecar.process.log_tail()}")
        if port_open(sidecar.port):
            client = MeshClient(sidecar.port)
            try:
                status = client.stub.runtimeStatus(pb.RuntimeStatusRequest(), timeout=5)
                return time.monotonic() - started, status
            except grpc.RpcError:
                pass
            finally:
                client.close()
        time.sleep(0.01)
    sidecar.stop()
    raise TimeoutError(f"{sidecar.process.argv[0]} did not answer runtimeStatus in {timeout:.0f}s")


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for {pid}")


def test_install_holds_the_project_every_storage_sdk_and_nothing_for_development(
    image_install: ImageInstall, tmp_path: Path
):
    extras = build_stage(parse_stages()).args()["EXTRAS"].split(",")
    result = subprocess.run(
        [str(image_install.venv / "bin" / "python"), str(PROBE), *extras],
        env=image_env(image_install, tmp_path / "home"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert Path(found["adapter"]).is_relative_to(image_install.venv), (
        "the project was not imported from the venv"
    )
    assert found["missing"] == [], "requirements of the image's extras are not installed"
    assert {"s3", "gcs", "azure", "http", "https", "oci", "pvc", "file"} <= set(found["storage"])
    assert set(RUNTIMES) <= set(found["runtimes"])
    assert found["development"] == [], "the image's venv holds tools it does not run"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_adapter_command_answers_runtime_status(runtime: str, image_install: ImageInstall, tmp_path: Path):
    command = image_install.app / f"{runtime}-adapter"
    port = free_port()
    env = {
        **image_env(image_install, tmp_path / "home"),
        **controller_env(tmp_path / "models"),
        "ADAPTER_PORT": str(port),
    }
    sidecar = SidecarProcess([str(command)], env, tmp_path / "adapter.log", port)
    try:
        seconds, status = start_and_time(sidecar)
        argv = cmdline(sidecar.process.pid)
        rss = resident_mib(sidecar.process.pid)
        assert argv[:2] == [str(image_install.venv / "bin" / "python"), str(command)]
        assert status.status == pb.RuntimeStatusResponse.STARTING
        started = [line for line in sidecar.log_lines() if line.get("event") == "starting adapter"]
        assert [line.get("runtime") for line in started] == [runtime]
    finally:
        sidecar.stop()
    STARTUP[command.name] = (seconds, rss)
    print(f"\n/opt/app/{command.name}: runtimeStatus answered {seconds:.2f} s after start, {rss:.0f} MiB")


def test_puller_command_forwards_runtime_status(image_install: ImageInstall, tmp_path: Path):
    models = tmp_path / "models"
    adapter_port = free_port()
    adapter = SidecarProcess(
        [str(image_install.app / "mlserver-adapter")],
        {
            **image_env(image_install, tmp_path / "adapter-home"),
            **controller_env(models),
            "USE_EMBEDDED_PULLER": "false",
            "ADAPTER_PORT": str(adapter_port),
        },
        tmp_path / "adapter.log",
        adapter_port,
    )
    adapter.start()
    port = free_port()
    puller = SidecarProcess(
        [str(image_install.app / "puller")],
        {
            **image_env(image_install, tmp_path / "puller-home"),
            "ROOT_MODEL_DIR": str(models),
            "STORAGE_CONFIG_DIR": str(tmp_path / "storage-config"),
            "PORT": str(port),
            "MODEL_SERVER_ENDPOINT": f"port:{adapter_port}",
            "ADAPTER_HOST": "127.0.0.1",
            "LOG_FORMAT": "json",
        },
        tmp_path / "puller.log",
        port,
    )
    try:
        seconds, status = start_and_time(puller)
        argv = cmdline(puller.process.pid)
        rss = resident_mib(puller.process.pid)
        # the wrapper execs: the process is the puller itself, not a shell
        assert argv == [
            str(image_install.venv / "bin" / "python"),
            str(image_install.venv / "bin" / "mesh-puller"),
            "serve",
        ]
        assert status.status == pb.RuntimeStatusResponse.STARTING
    finally:
        puller.stop()
        adapter.stop()
    STARTUP["puller"] = (seconds, rss)
    print(f"\n/opt/app/puller: runtimeStatus answered {seconds:.2f} s after start (forwarded), {rss:.0f} MiB")
