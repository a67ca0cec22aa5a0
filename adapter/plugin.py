"""The runtime plugin contract and the entry-point registry.

A runtime plugin implements only what differs between model servers: readiness, the
layout of a model directory for the server, load, unload, listing and sizing. The load
flow around it (pull, locks, concurrency, cancellation, size fallback, purge) is
:mod:`adapter.flow`, written once.

Plugins are found through the entry-point group ``modelmesh_sidecar.runtimes``; ours are
declared in our own pyproject the same way a third-party package declares its own.
"""

from __future__ import annotations

import abc
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from adapter.errors import ConfigurationError

if TYPE_CHECKING:
    from adapter.settings import Settings
    from puller.request import LocalModel

ENTRY_POINT_GROUP = "modelmesh_sidecar.runtimes"


class RuntimePlugin(abc.ABC):
    """What the sidecar needs from one kind of model server.

    Instances are created once per process with the final settings, then
    :meth:`start` is awaited before any other call and :meth:`close` at shutdown.
    All ``async`` methods run on the server's event loop and must not block it;
    :meth:`layout` is blocking file-system work and is called in a worker thread.
    Errors are raised as :mod:`adapter.errors` types: ``RuntimeUnavailable`` when the
    server cannot be reached, ``ModelNotFound`` when it does not know a model,
    ``RuntimeRejected`` (with the server's gRPC code) for any other refusal.
    """

    #: the runtime's name: the entry-point name, ``--runtime`` value and the
    #: ``_<name>_models`` directory
    name: ClassVar[str]
    #: RUNTIME_PORT when the environment does not set it
    default_runtime_port: ClassVar[int] = 8001
    #: MODELSIZE_MULTIPLIER when the environment does not set it
    default_modelsize_multiplier: ClassVar[float] = 1.25

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def models_dir(self) -> Path:
        """``ROOT_MODEL_DIR/_<name>_models``: the runtime's own view of the models."""
        return self.settings.root_model_dir / f"_{self.name}_models"

    def view_dir(self, model_id: str) -> Path:
        return self.models_dir / model_id

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open channels and clients; must not wait for the runtime to be up."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Close channels and clients."""

    @abc.abstractmethod
    async def is_ready(self) -> bool:
        """True when the runtime answers and can load models. Never raises for an
        unreachable runtime: that is ``False``."""

    async def is_alive(self) -> bool:
        """True when the runtime's process answers at all, whatever the state of its
        models: what the flow's runtime watch checks once READY (``False`` there means
        the runtime went away, and its models are loaded again when it answers). Never
        raises. Override when readiness also depends on the models (a server "not
        ready" while one of them loads); the default is :meth:`is_ready`."""
        return await self.is_ready()

    @abc.abstractmethod
    async def runtime_version(self) -> str | None:
        """The runtime's version as it reports it, or ``None`` if it does not."""

    @abc.abstractmethod
    def method_infos(self) -> Mapping[str, Sequence[int]]:
        """The inference methods the mesh may route, ``package.Service/Method`` ->
        idInjectionPath (field numbers to the model-name field; empty for none)."""

    @abc.abstractmethod
    def layout(self, model: LocalModel) -> Path:
        """Build the runtime's view of ``model`` under :meth:`view_dir` (links to the
        pulled files, rewritten config files) and return the path to pass to
        :meth:`load`. Must replace any previous view of the same id. Blocking."""

    @abc.abstractmethod
    async def load(self, model_id: str, view: Path, model: LocalModel) -> int | None:
        """Load the model and return only when it is servable under ``model_id``.
        Returns its size in bytes when the runtime knows it, else ``None`` (the flow
        then uses disk size x MODELSIZE_MULTIPLIER)."""

    @abc.abstractmethod
    async def unload(self, model_id: str) -> None:
        """Unload the model and return when it is gone. Raises ``ModelNotFound``
        when the runtime does not know it."""

    @abc.abstractmethod
    async def list_models(self) -> list[str]:
        """The ids of every model the runtime currently has loaded (for the purge
        before the first READY)."""

    async def model_size(self, model_id: str) -> int | None:
        """The size of a loaded model as the runtime measures it, else ``None``."""
        return None

    def remove_view(self, model_id: str) -> None:
        """Delete the runtime's view of the model (links and rewritten files only;
        the pulled files are the puller's). Blocking."""
        remove_tree(self.view_dir(model_id))

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Called once before :meth:`start` to write what the runtime needs before it
        starts (TorchServe's config file). Blocking."""


def write_json_atomically(target: Path, content: Mapping[str, Any]) -> None:
    """Write ``content`` as JSON to a temporary file beside ``target`` and rename it
    into place: a reader (a runtime scanning its repository) sees the old file, none,
    or the whole new one. The file is world-readable: the runtime may run as another
    user."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    temp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(content, out, indent=2)
            out.write("\n")
        temp.chmod(0o644)  # mkstemp creates 0600
        temp.replace(target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def remove_tree(path: Path) -> None:
    """Remove a file, a link or a directory tree without following links out of it."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=False)


def link(source: Path, target: Path) -> None:
    """Make ``target`` a symbolic link to ``source`` (absolute), replacing nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source.absolute())


def available_runtimes() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_runtime_class(name: str) -> type[RuntimePlugin]:
    """The plugin class registered under ``name``; a clear error naming the known ones
    when there is none."""
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        known = ", ".join(available_runtimes()) or "none"
        raise ConfigurationError(f"unknown runtime {name!r} (installed: {known})")
    try:
        cls = matches[0].load()
    except ImportError as exc:
        raise ConfigurationError(
            f"runtime {name!r} is installed but cannot be imported ({type(exc).__name__}: {exc.name or exc})"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, RuntimePlugin)):
        raise ConfigurationError(f"entry point {name!r} does not name a RuntimePlugin subclass")
    return cls
