"""The Dockerfile, checked without a Docker engine: parsed with dockerfile-parse, its
COPY sources looked up in the build context, its final stage read for the user, the
folders, the ports and what it installs, and the ``/opt/app`` commands made by replaying
the steps that write them (no pip: the install itself is replayed in
test_image_install.py)."""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import stat
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from adapter.cli import runtime_from_program_name
from adapter.plugin import ENTRY_POINT_GROUP
from adapter.settings import Settings
from puller.cli import build_parser as puller_parser
from puller.storage.registry import STORAGE_EXTRAS
from tests.deploy.dockerfile_steps import (
    IMAGE_FOLDERS,
    REPO,
    DockerIgnore,
    Replay,
    Stage,
    build_stage,
    final_stage_env,
    final_stage_labels,
    parse_stages,
    replay_build_stage,
    shell_commands,
)

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
BASE_IMAGE = "python:3.11-slim-bookworm"

#: packages and commands that build or compile; none may be installed in the final stage
BUILD_TOOLS = {
    "gcc",
    "g++",
    "cc",
    "c++",
    "clang",
    "make",
    "cmake",
    "build-essential",
    "python3-dev",
    "libc6-dev",
    "libffi-dev",
    "libssl-dev",
    "pkg-config",
    "git",
    "rustc",
    "cargo",
}
#: installers: the final stage runs none (everything it holds comes from the build stage)
INSTALLERS = {"apt-get", "apt", "aptitude", "dpkg", "apk", "dnf", "yum", "microdnf", "pip", "pip3", "uv"}


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_stages()


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def our_scripts() -> dict[str, str]:
    scripts: dict[str, str] = PYPROJECT["project"]["scripts"]
    return scripts


def our_runtimes() -> list[str]:
    return sorted(PYPROJECT["project"]["entry-points"][ENTRY_POINT_GROUP])


def final_user(final: Stage) -> tuple[str, str]:
    users = final.all("USER")
    assert users, "the final stage sets no USER: it would run as root"
    user, _, group = users[-1].value.strip().partition(":")
    return user, group


def test_stages_are_a_build_stage_and_a_final_stage_on_the_slim_python_311_base(stages: list[Stage]):
    assert len(stages) >= 2, "the Dockerfile should be multi-stage (build, then a final stage)"
    assert [stage.base for stage in stages] == [BASE_IMAGE] * len(stages)
    # the venv's python links to the base image's interpreter: both stages must share it
    assert build_stage(stages).base == stages[-1].base


def test_every_copy_source_is_in_the_build_context(stages: list[Stage]):
    ignore = DockerIgnore.from_file()
    copies = [copy for stage in stages for copy in stage.copies() if "from" not in copy.flags]
    assert copies, "no COPY from the build context at all"
    for copy in copies:
        for source in copy.sources:
            where = f"Dockerfile:{copy.line}: COPY {source}"
            path = (REPO / source).resolve()
            assert path.is_relative_to(REPO), f"{where} leaves the build context"
            assert path.exists(), f"{where} does not exist in the repository"
            relative = path.relative_to(REPO).as_posix()
            assert not ignore.excluded(relative), f"{where} is excluded by .dockerignore"
            if path.is_dir():
                kept = [
                    p
                    for p in path.rglob("*")
                    if p.is_file() and not ignore.excluded(p.relative_to(REPO).as_posix())
                ]
                assert kept, f"{where}: .dockerignore leaves no file of it in the context"


def test_copy_from_names_an_earlier_stage(stages: list[Stage]):
    for index, stage in enumerate(stages):
        earlier = {s.name for s in stages[:index]}
        for copy in stage.copies():
            if "from" in copy.flags:
                assert copy.flags["from"] in earlier, (
                    f"Dockerfile:{copy.line}: COPY --from={copy.flags['from']} names no earlier stage"
                )


def test_build_stage_copies_every_package_the_wheel_holds(stages: list[Stage]):
    """A package folder left out of the COPYs would silently be left out of the wheel."""
    sources = {source.rstrip("/") for copy in build_stage(stages).copies() for source in copy.sources}
    patterns = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        path.name
        for path in REPO.iterdir()
        if (path / "__init__.py").is_file() and any(fnmatch.fnmatch(path.name, p) for p in patterns)
    }
    assert packages, "pyproject's package patterns match no folder"
    assert packages <= sources, (
        f"packages the wheel needs but the build stage does not copy: {packages - sources}"
    )
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= sources


def test_build_installs_the_sdk_of_every_storage_type_we_ship(stages: list[Stage]):
    extras = set(build_stage(stages).args()["EXTRAS"].split(","))
    declared = set(PYPROJECT["project"]["optional-dependencies"])
    assert extras <= declared, f"EXTRAS names extras pyproject does not declare: {extras - declared}"
    assert set(STORAGE_EXTRAS.values()) <= extras, "the default image should serve every storage type"


def test_dockerignore_keeps_out_what_the_image_does_not_need():
    ignore = DockerIgnore.from_file()
    left_out = [
        ".git/HEAD",
        ".venv/bin/python",
        ".ci/run",
        "adapter/__pycache__/cli.cpython-311.pyc",
        ".mypy_cache/3.11/x.json",
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "modelmesh_sidecar.egg-info/PKG-INFO",
        "build/lib/adapter/cli.py",
        "dist/modelmesh_sidecar-0.1.0-py3-none-any.whl",
        "tests/servers/requirements/mlserver.txt",
        "benchmarks/results/pull_throughput-2026-11-22.json",
        "docs/img/pull_throughput.png",
        "demo-work/models/x",
    ]
    assert [path for path in left_out if not ignore.excluded(path)] == []
    kept = [
        "pyproject.toml",
        "README.md",
        "adapter/cli.py",
        "puller/storage/s3.py",
        "protos/mmesh/model_runtime.proto",
    ]
    assert [path for path in kept if ignore.excluded(path)] == []


def test_dockerignore_matcher_follows_the_docker_rules():
    """Our reading of .dockerignore, on patterns the real file does not use."""
    ignore = DockerIgnore(["*.md", "!README.md", "data/**/*.bin", "/logs", "# a comment", ""])
    assert ignore.excluded("CHANGES.md")
    assert not ignore.excluded("README.md")
    assert not ignore.excluded("docs/CHANGES.md"), "a pattern without ** matches at the top only"
    assert ignore.excluded("data/a/b/c.bin")
    assert ignore.excluded("data/c.bin")
    assert not ignore.excluded("data/c.txt")
    assert ignore.excluded("logs/today/x.log"), "a folder excluded excludes what it holds"


def test_final_stage_runs_as_a_non_root_numeric_user(final: Stage):
    user, group = final_user(final)
    assert user.isdigit(), f"USER {user!r}: Kubernetes' runAsNonRoot needs a numeric uid"
    assert int(user) != 0, "the final stage runs as root"
    assert group == "" or group.isdigit(), f"USER group {group!r} should be numeric"
    last_user = max(ins.line for ins in final.all("USER"))
    assert all(ins.line < last_user for ins in final.all("RUN")), "a RUN after USER would run as that user"


def test_final_stage_installs_no_build_tools(final: Stage):
    for run in final.all("RUN"):
        for command in shell_commands(run.value):
            words = {Path(word).name for word in command}
            assert not words & INSTALLERS, f"Dockerfile:{run.line}: the final stage installs: {command}"
            assert not words & BUILD_TOOLS, (
                f"Dockerfile:{run.line}: the final stage uses build tools: {command}"
            )


def test_final_stage_copies_only_the_venv_and_the_commands(final: Stage):
    copied = {}
    for copy in final.copies():
        assert "from" in copy.flags, f"Dockerfile:{copy.line}: the final stage copies from the context"
        for source in copy.sources:
            copied[source.rstrip("/")] = copy.dest.rstrip("/")
    assert copied == {"/opt/venv": "/opt/venv", "/opt/app": "/opt/app"}, (
        "the final stage should take only the venv and the commands, at the paths they were "
        "built for (the console scripts name /opt/venv/bin/python)"
    )


def test_final_stage_sets_the_contract_folders_writable_by_its_user(final: Stage):
    env = final_stage_env()
    defaults = Settings()
    assert env["ROOT_MODEL_DIR"] == str(defaults.root_model_dir) == "/models"
    assert env["STORAGE_CONFIG_DIR"] == str(defaults.storage_config_dir) == "/storage-config"
    assert env["PATH"].split(":")[0] == "/opt/venv/bin"
    user, group = final_user(final)
    created: set[str] = set()
    owner: dict[str, str] = {}
    mode: dict[str, int] = {}
    for run in final.all("RUN"):
        for command in shell_commands(run.value):
            args = [word for word in command[1:] if not word.startswith("-")]
            if command[0] == "mkdir":
                created.update(args)
            elif command[0] == "useradd" and "--create-home" in command:
                created.add(command[command.index("--home-dir") + 1])
            elif command[0] == "chown":
                owner.update(dict.fromkeys(args[1:], args[0]))
            elif command[0] == "chmod":
                mode.update(dict.fromkeys(args[1:], int(args[0], 8)))
    for folder in (env["ROOT_MODEL_DIR"], env["STORAGE_CONFIG_DIR"], env["HOME"]):
        assert folder in created, f"{folder} is not created in the final stage"
        assert owner.get(folder) == f"{user}:0", f"{folder} should belong to {user}:0 (group 0 for OpenShift)"
        assert mode.get(folder, 0) & stat.S_IWGRP, f"{folder} should be writable by group 0"
    assert group == "0", "the user's group should be 0, as OpenShift's arbitrary uids are"
    assert all(
        any(value == f or value.startswith(f + "/") for f in IMAGE_FOLDERS)
        for name, value in env.items()
        if value.startswith("/") and name != "PATH"
    ), "a folder the image uses is missing from IMAGE_FOLDERS (the replay would not map it)"


def test_ports_of_the_adapter_and_the_puller_are_exposed(final: Stage):
    exposed = {int(port.split("/")[0]) for ins in final.all("EXPOSE") for port in ins.value.split()}
    defaults = Settings()
    assert {defaults.adapter_port, defaults.puller_port, 8086} <= exposed


def test_default_command_and_labels(final: Stage):
    (cmd,) = final.all("CMD")
    argv = json.loads(cmd.value)  # exec form: no shell between the signal and the process
    assert argv[0] in our_scripts() or argv[0].startswith("/opt/app/")
    labels = final_stage_labels()
    assert labels["org.opencontainers.image.version"] == PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]
    assert labels["org.opencontainers.image.title"] == PYPROJECT["project"]["name"]


def test_build_stage_writes_only_the_image_folders(stages: list[Stage]):
    """The replay maps these folders; a path outside them would be written on the
    machine running the tests."""
    replay = Replay(Path("/nowhere"))
    for ins in build_stage(stages).instructions:
        if ins.name in ("RUN", "WORKDIR"):
            replay.rewrite(ins.value)  # raises ValueError naming the path


@pytest.fixture(scope="module")
def commands(tmp_path_factory: pytest.TempPathFactory) -> tuple[Replay, Path]:
    """The build stage replayed without its installs: what /opt/app holds."""
    replay = replay_build_stage(
        tmp_path_factory.mktemp("image"),
        runs=lambda ins: not any("pip" in word for command in shell_commands(ins.value) for word in command),
    )
    return replay, replay.path("/opt/app")


def test_opt_app_holds_the_controller_commands(commands: tuple[Replay, Path]):
    _, app = commands
    expected = {f"{runtime}-adapter" for runtime in our_runtimes()} | {"puller"}
    assert {"mlserver-adapter", "triton-adapter", "torchserve-adapter", "ovms-adapter"} <= expected
    assert {path.name for path in app.iterdir()} == expected


@pytest.mark.parametrize("runtime", our_runtimes())
def test_adapter_command_is_a_link_to_mesh_adapter_naming_its_runtime(
    runtime: str, commands: tuple[Replay, Path]
):
    replay, app = commands
    command = app / f"{runtime}-adapter"
    assert command.is_symlink(), f"/opt/app/{command.name} should be a link to the console script"
    target = Path(os.readlink(command))
    assert target.parent == replay.path("/opt/venv/bin")
    assert our_scripts().get(target.name) == "adapter.cli:main"
    assert runtime_from_program_name(f"/opt/app/{command.name}") == runtime
    assert runtime in {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}


def test_puller_command_runs_mesh_puller_serve(commands: tuple[Replay, Path]):
    replay, app = commands
    wrapper = app / "puller"
    assert wrapper.is_file()
    assert not wrapper.is_symlink()
    assert wrapper.stat().st_mode & stat.S_IXOTH, "/opt/app/puller is not executable by every user"
    lines = wrapper.read_text().splitlines()
    assert lines[0] == "#!/bin/sh"
    words = shlex.split(lines[-1])
    assert words[0] == "exec", "the wrapper should exec, so signals reach the puller"
    program, args = Path(words[1]), words[2:]
    assert program.parent == replay.path("/opt/venv/bin")
    assert our_scripts().get(program.name) == "puller.cli:main"
    assert args == ["serve", "$@"]
    assert puller_parser().parse_args(args[:-1]).command == "serve"
