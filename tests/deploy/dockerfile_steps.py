"""The Dockerfile as data, for checks that run without a Docker engine.

``parse_stages`` reads the Dockerfile with dockerfile-parse into its stages;
``DockerIgnore`` answers which paths of the build context ``.dockerignore`` leaves out;
``replay_build_stage`` runs the build stage's WORKDIR, COPY and RUN steps on this
machine, with the image's absolute paths (``/opt/venv``, ``/opt/app`` ...) mapped under
a temporary folder, so that the tests start what the image would hold.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dockerfile_parse import DockerfileParser  # type: ignore[import-untyped]  # no py.typed

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

#: the image's own folders: the replay puts each one under its root folder, and every
#: absolute path the build stage writes must lie in one of them
IMAGE_FOLDERS = (
    "/opt/venv",
    "/opt/app",
    "/wheels",
    "/src",
    "/models",
    "/storage-config",
    "/pvc_mounts",
    "/home/sidecar",
)

#: absolute paths a build step may name without writing there
SYSTEM_PATHS = ("/bin/sh",)

#: the instructions the replay understands; any other one in the build stage is an error,
#: so that a step the replay would skip cannot go unnoticed
_REPLAYED = {"WORKDIR", "COPY", "RUN", "ARG"}
#: instructions of the build stage that change nothing on disk
_IGNORED = {"FROM", "ENV", "LABEL", "COMMENT"}

_ABSOLUTE_PATH = re.compile(r"(?<![\w.$/:-])/[\w.+-]+(?:/[\w.+*-]+)*")


@dataclass(frozen=True)
class Instruction:
    name: str
    value: str
    line: int


@dataclass(frozen=True)
class Copy:
    """One COPY: its flags (``--from=build``), sources and destination."""

    flags: dict[str, str]
    sources: list[str]
    dest: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, name: str) -> list[Instruction]:
        return [ins for ins in self.instructions if ins.name == name]

    def copies(self) -> list[Copy]:
        return [parse_copy(ins) for ins in self.all("COPY")]

    def args(self) -> dict[str, str]:
        """The defaults of the ARGs declared in this stage."""
        values = {}
        for ins in self.all("ARG"):
            name, _, default = ins.value.partition("=")
            values[name.strip()] = default.strip().strip('"')
        return values


def parse_stages(path: Path = DOCKERFILE) -> list[Stage]:
    """The stages of the Dockerfile in order, base images with ARGs substituted."""
    parser = DockerfileParser(path=str(path))
    bases = parser.parent_images
    stages: list[Stage] = []
    for item in parser.structure:
        name = item["instruction"].upper()
        if name == "FROM":
            words = item["value"].split()
            stage_name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=bases[len(stages)], name=stage_name))
        elif stages:
            stages[-1].instructions.append(Instruction(name, item["value"], item["startline"] + 1))
    return stages


def parse_copy(ins: Instruction) -> Copy:
    words = shlex.split(ins.value)
    flags = {}
    while words and words[0].startswith("--"):
        flag, _, value = words.pop(0)[2:].partition("=")
        flags[flag] = value
    if words and words[0].startswith("["):
        words = json.loads(" ".join(words))
    if len(words) < 2:
        raise ValueError(f"Dockerfile:{ins.line}: COPY needs a source and a destination")
    return Copy(flags=flags, sources=words[:-1], dest=words[-1], line=ins.line)


def shell_commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN, split at ``&&`` and ``;`` (enough for the plain
    command lists the Dockerfile uses)."""
    commands: list[list[str]] = []
    current: list[str] = []
    lexer = shlex.shlex(run, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    for word in lexer:
        if word in ("&&", ";", "||"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(word)
    if current:
        commands.append(current)
    return commands


class DockerIgnore:
    """The patterns of a ``.dockerignore``: the last pattern that matches a path or one
    of its parent folders decides, ``!`` patterns include again, ``**`` spans folders."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.patterns: list[tuple[bool, re.Pattern[str]]] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
            self.patterns.append((include, re.compile(_glob_to_regex(pattern))))

    @classmethod
    def from_file(cls, path: Path = DOCKERIGNORE) -> DockerIgnore:
        return cls(path.read_text().splitlines() if path.exists() else [])

    def excluded(self, relative: str) -> bool:
        parts = Path(os.path.normpath(relative)).parts
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = False
        for include, regex in self.patterns:
            if any(regex.fullmatch(candidate) for candidate in candidates):
                excluded = not include
        return excluded


def _glob_to_regex(pattern: str) -> str:
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(char))
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def build_stage(stages: list[Stage]) -> Stage:
    """The stage the final one copies its files from (``COPY --from=<it>``)."""
    names = {copy.flags["from"] for copy in stages[-1].copies() if "from" in copy.flags}
    if len(names) != 1:
        raise ValueError(f"the final stage should copy from exactly one stage, copies from {sorted(names)}")
    (name,) = names
    for stage in stages[:-1]:
        if stage.name == name:
            return stage
    raise ValueError(f"no stage named {name!r} before the final one")


@dataclass(frozen=True)
class Replay:
    """Where a replay put the image's folders."""

    root: Path

    def path(self, image_path: str) -> Path:
        """``/opt/venv/bin`` -> ``<root>/opt/venv/bin``."""
        if not any(image_path == f or image_path.startswith(f + "/") for f in IMAGE_FOLDERS):
            raise ValueError(f"{image_path} is not under one of the image folders {IMAGE_FOLDERS}")
        return self.root / image_path.lstrip("/")

    def rewrite(self, text: str) -> str:
        """Every image path in ``text`` moved under the root; other absolute paths must be
        system paths the step only names."""

        def mapped(match: re.Match[str]) -> str:
            found = match.group(0)
            if found in SYSTEM_PATHS:
                return found
            return str(self.path(found))

        return _ABSOLUTE_PATH.sub(mapped, text)


def base_python_bin(folder: Path) -> Path:
    """A folder holding ``python``: the interpreter this venv was made from, as the base
    image's ``python`` is the one its build stage runs."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "python"
    if not link.exists():
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        link.symlink_to(Path(sys.base_prefix) / "bin" / version)
    return folder


def replay_build_stage(
    root: Path,
    *,
    runs: Callable[[Instruction], bool] = lambda _ins: True,
    build_args: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 900,
) -> Replay:
    """Run the build stage's steps on this machine, the image's folders under ``root``.

    COPY copies from the repository (what ``.dockerignore`` leaves out is skipped, as
    the build context would not hold it); RUN goes to ``/bin/sh -c``, as Docker runs it,
    with the stage's ARGs in the environment (``build_args`` override their defaults, as
    ``docker build --build-arg`` does); only the RUNs ``runs`` accepts are run. The
    environment is this machine's (its pip configuration, proxy and cache) with
    ``python`` the base interpreter, less anything that would point into a venv. The
    steps' output goes to ``<root>/replay.log``; a failing step raises with its tail.
    """
    stage = build_stage(parse_stages())
    replay = Replay(root)
    ignore = DockerIgnore.from_file()
    shell_env = {
        key: value
        for key, value in (os.environ if env is None else env).items()
        if key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")
    }
    shell_env["PATH"] = f"{base_python_bin(root / '_python')}:/usr/local/bin:/usr/bin:/bin"
    log_path = root / "replay.log"
    workdir = root
    for ins in stage.instructions:
        if ins.name in _IGNORED:
            continue
        if ins.name not in _REPLAYED:
            raise NotImplementedError(f"Dockerfile:{ins.line}: the replay does not know {ins.name}")
        if ins.name == "ARG":
            name, _, default = ins.value.partition("=")
            name = name.strip()
            shell_env[name] = (build_args or {}).get(name, default.strip().strip('"'))
        elif ins.name == "WORKDIR":
            workdir = replay.path(ins.value)
            workdir.mkdir(parents=True, exist_ok=True)
        elif ins.name == "COPY":
            copy = parse_copy(ins)
            if copy.flags:
                raise NotImplementedError(f"Dockerfile:{ins.line}: COPY flags in the build stage")
            target = workdir / copy.dest if not copy.dest.startswith("/") else replay.path(copy.dest)
            into_folder = copy.dest.endswith("/") or len(copy.sources) > 1
            for source in copy.sources:
                _copy_from_context(source, target, ignore, into_folder=into_folder)
        elif runs(ins):
            with log_path.open("a") as log:
                log.write(f"\n# Dockerfile:{ins.line}: RUN {ins.value}\n")
                log.flush()
                result = subprocess.run(
                    ["/bin/sh", "-c", replay.rewrite(ins.value)],
                    cwd=workdir,
                    env=shell_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                )
            if result.returncode != 0:
                tail = log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"Dockerfile:{ins.line}: RUN failed ({result.returncode}):\n{tail}")
    return replay


def _copy_from_context(source: str, target: Path, ignore: DockerIgnore, *, into_folder: bool) -> None:
    """COPY of one source: a file into the target folder (``into_folder``) or to the
    target name, a folder's contents into the target folder."""
    origin = REPO / source
    if origin.is_dir():
        for path in sorted(origin.rglob("*")):
            relative = path.relative_to(REPO).as_posix()
            if path.is_dir() or ignore.excluded(relative):
                continue
            destination = target / path.relative_to(origin)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
    else:
        if ignore.excluded(source):
            raise FileNotFoundError(f"COPY {source}: excluded by .dockerignore")
        destination = target / origin.name if into_folder else target
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(origin, destination)


def final_stage_env(path: Path = DOCKERFILE) -> dict[str, str]:
    """The ENV of the final stage (a ``$VAR`` the file does not set reads as empty)."""
    return dict(DockerfileParser(path=str(path)).envs)


def final_stage_labels(path: Path = DOCKERFILE) -> dict[str, str]:
    return dict(DockerfileParser(path=str(path)).labels)
