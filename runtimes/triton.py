"""The Triton Inference Server runtime plugin.

Triton is driven through the KServe v2 gRPC API with its model repository extension
on RUNTIME_PORT: readiness, version, and the repository calls load, unload and index.
It runs with ``--model-repository=ROOT_MODEL_DIR/_triton_models
--model-control-mode=explicit --strict-model-config=false --strict-readiness=false``,
so it reads a model's directory only when asked to load it, fills in what a config
leaves out, and stays ready when a model fails to load (with strict readiness one
broken model turns ServerReady false, and the sidecar would report STARTING).

The view of a model, ``_triton_models/<modelId>/``, is built from the pulled files
(:func:`plan_view` has the rules):

* the pulled directory has a ``config.pbtxt``: a copy without its top-level ``name``
  (Triton then names the model after its directory, the modelId) and a link to every
  other entry; a schema is ignored, the config says everything;
* otherwise ``<version>/model.<ext>`` links to the model file or directory, named as
  Triton's backend for the model type expects it (``model.onnx``, ``model.pt``,
  ``model.plan``, ``model.savedmodel`` or ``model.graphdef``, ``model.py``), beside
  links to its sibling files; the version is the largest numeric subdirectory of the
  pulled directory, else ``1``. With a schema, a ``config.pbtxt`` naming the backend
  and the schema's inputs and outputs is generated.

A view is built under a temporary name beside its final place and renamed into it, so
Triton sees the old view, no view, or the whole new one. Temporary names start with
``_``, which no modelId may, so a crash leaves nothing the purge before READY does not
remove.

Triton's unload is asynchronous (the model goes UNLOADING, then UNAVAILABLE) and it
answers OK to unloading a model it does not have: :meth:`TritonPlugin.unload` reads
the repository index first and waits for the model to leave it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, ClassVar

from adapter.errors import InvalidRequest, LoadTimeout, ModelNotFound
from adapter.plugin import link, remove_tree
from puller.model_key import validate_model_id
from runtimes.kserve_v2 import READY_STATE, KServeV2Plugin
from runtimes.triton_config import CONFIG_FILE, generated_config, without_top_level_name

if TYPE_CHECKING:
    from puller.request import LocalModel

#: states in which a model holds (or is about to hold, or still holds) a place in Triton
ACTIVE_STATES = frozenset({READY_STATE, "LOADING", "UNLOADING"})


@dataclass(frozen=True)
class ModelFormat:
    """How one kind of model file is named and served in a Triton version directory."""

    #: the name Triton's backend looks for (``model.onnx``)
    file_name: str
    #: the ``backend`` of a generated config
    backend: str
    #: the ``platform`` of a generated config, where the backend serves several formats
    platform: str = ""
    #: suffixes of a bare model file of this format
    suffixes: tuple[str, ...] = ()
    #: a directory holding ``saved_model.pb`` (TensorFlow SavedModel)
    savedmodel: bool = False

    def accepts(self, entry: Path) -> bool:
        if entry.name == self.file_name:
            return True
        if self.savedmodel:
            return entry.is_dir() and is_savedmodel(entry)
        return entry.is_file() and entry.suffix.lower() in self.suffixes


#: model type (``model_type.name`` of the key) -> the formats Triton serves it in
MODEL_FORMATS: Mapping[str, tuple[ModelFormat, ...]] = {
    "onnx": (ModelFormat("model.onnx", "onnxruntime", suffixes=(".onnx",)),),
    "pytorch": (ModelFormat("model.pt", "pytorch", suffixes=(".pt", ".pth", ".torchscript")),),
    "tensorrt": (ModelFormat("model.plan", "tensorrt", suffixes=(".plan", ".engine", ".trt")),),
    "tensorflow": (
        ModelFormat("model.savedmodel", "tensorflow", "tensorflow_savedmodel", savedmodel=True),
        ModelFormat("model.graphdef", "tensorflow", "tensorflow_graphdef", suffixes=(".graphdef", ".pb")),
    ),
    "python": (ModelFormat("model.py", "python", suffixes=(".py",)),),
}


class TritonPlugin(KServeV2Plugin):
    """NVIDIA Triton Inference Server 2.x behind the KServe v2 gRPC API."""

    name: ClassVar[str] = "triton"

    #: first and longest pause between two looks at an unloading model
    unload_poll: ClassVar[tuple[float, float]] = (0.05, 0.5)

    async def load(self, model_id: str, view: Path, model: LocalModel) -> int | None:
        """RepositoryModelLoad of ``model_id``, which returns once the model is READY
        (or failed: Triton's code passes through, INVALID_ARGUMENT for a model that
        fails to initialize, INTERNAL for a missing view). Returns ``None``: Triton
        does not report sizes. The gRPC deadline is LOADTIME_TIMEOUT."""
        await self.client.load(model_id, timeout=self.settings.loadtime_timeout_ms / 1000)
        return None

    async def unload(self, model_id: str) -> None:
        """RepositoryModelUnload of ``model_id``, then wait until no version of it is
        READY, LOADING or UNLOADING. ``ModelNotFound`` when Triton holds no version
        of it (Triton itself answers OK); ``LoadTimeout`` when it is still there after
        LOADTIME_TIMEOUT."""
        states = await self._states(model_id)
        if not states & ACTIVE_STATES:
            raise ModelNotFound(f"Triton has no loaded version of model {model_id!r}")
        await self.client.unload(model_id, timeout=self.call_timeout)
        budget = self.settings.loadtime_timeout_ms / 1000
        deadline = time.monotonic() + budget
        pause, longest = self.unload_poll
        while states & ACTIVE_STATES:
            if time.monotonic() >= deadline:
                shown = ", ".join(sorted(states & ACTIVE_STATES))
                raise LoadTimeout(
                    f"Triton still reports model {model_id!r} {shown} {budget:g}s after "
                    "the unload (LOADTIME_TIMEOUT)"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, longest)
            states = await self._states(model_id)

    async def list_models(self) -> list[str]:
        """The models Triton's repository index reports READY."""
        return await self.client.repository_index(ready_only=True, timeout=self.call_timeout)

    async def _states(self, model_id: str) -> frozenset[str]:
        states = await self.client.repository_states(timeout=self.call_timeout)
        return states.get(model_id, frozenset())

    # --- layout --------------------------------------------------------------------

    def layout(self, model: LocalModel) -> Path:
        """Build ``_triton_models/<modelId>/`` for ``model`` and return it.

        Everything is checked before anything is written (a bad request leaves an
        existing view as it was); the new view is built under a temporary name and
        renamed into place. The pulled files are only read. Raises
        ``InvalidRequest`` for a missing model path, a model type Triton cannot serve
        without a ``config.pbtxt`` (keras needs converting first), no or several
        candidate model files, a ``config.pbtxt`` or schema that is not valid.
        """
        model_id = validate_model_id(model.model_id)
        plan = plan_view(model)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        staging = self.models_dir / f"_{secrets.token_hex(8)}.partial"
        staging.mkdir()
        try:
            plan.write(staging)
            _swap_into_place(staging, self.view_dir(model_id))
        except BaseException:
            remove_tree(staging)
            raise
        return self.view_dir(model_id)


# --- the rules of a view ---------------------------------------------------------------


@dataclass
class ViewPlan:
    """What a view holds: links (relative path -> the pulled entry) and written
    files (relative path -> text)."""

    links: dict[PurePosixPath, Path] = field(default_factory=dict)
    files: dict[PurePosixPath, str] = field(default_factory=dict)

    def write(self, root: Path) -> None:
        for relative, source in self.links.items():
            link(source, root.joinpath(relative))
        for relative, text in self.files.items():
            target = root.joinpath(relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(text.encode("utf-8"))
            target.chmod(0o644)


def plan_view(model: LocalModel) -> ViewPlan:
    """The view of ``model`` (see the module docstring); reads, never writes."""
    source = model.path.absolute()
    if not source.exists():
        raise InvalidRequest(f"model path {source} does not exist")
    plan = ViewPlan()
    config = source / CONFIG_FILE
    if source.is_dir() and config.is_file():
        plan.files[PurePosixPath(CONFIG_FILE)] = without_top_level_name(_read_text(config), config)
        for entry in _entries(source):
            if entry.name != CONFIG_FILE:
                plan.links[PurePosixPath(entry.name)] = entry
        return plan

    kind = model.model_type.split(":", 1)[0].strip().lower()
    if kind == "keras":
        raise InvalidRequest(
            "Triton cannot serve a keras model as it is: convert it to a TensorFlow SavedModel "
            "and load it with model type 'tensorflow'"
        )
    formats = MODEL_FORMATS.get(kind)
    versions = _version_dirs(source)
    if formats is None:
        if not versions:
            supported = ", ".join(sorted(MODEL_FORMATS))
            shown = repr(model.model_type) if model.model_type else "no model type"
            raise InvalidRequest(
                f"Triton cannot lay out a model with {shown} and no {CONFIG_FILE}: "
                f"give one of the types {supported}, a {CONFIG_FILE}, or Triton's own "
                "<version>/ directories"
            )
        # Triton's own layout: served as it is, Triton's auto-complete picks the backend
        for entry in _entries(source):
            plan.links[PurePosixPath(entry.name)] = entry
        backend, platform = "", ""
    else:
        base = versions[-1] if versions else source
        entry, fmt = _model_entry(base, formats, kind)
        folder = PurePosixPath(base.name if versions else "1")
        plan.links[folder / fmt.file_name] = entry
        if base.is_dir() and entry != base:
            for sibling in _entries(base):
                if sibling != entry:
                    plan.links[folder / sibling.name] = sibling
        if versions:
            for other in _entries(source):
                if not _is_version_dir(other):
                    plan.links[PurePosixPath(other.name)] = other
        backend, platform = fmt.backend, fmt.platform
    if model.schema_path is not None:
        plan.files[PurePosixPath(CONFIG_FILE)] = generated_config(Path(model.schema_path), backend, platform)
    return plan


def _model_entry(base: Path, formats: tuple[ModelFormat, ...], kind: str) -> tuple[Path, ModelFormat]:
    """The file or directory in ``base`` that is the model, and its format: the
    entry already named as Triton expects, else ``base`` itself when it is a
    SavedModel or a file, else the one entry of a matching suffix (or the only file)."""
    if base.is_file():
        return base, next((f for f in formats if not f.savedmodel), formats[0])
    savedmodel = next((f for f in formats if f.savedmodel), None)
    if savedmodel is not None and is_savedmodel(base):
        return base, savedmodel
    entries = _entries(base)
    named = [(e, f) for e in entries for f in formats if e.name == f.file_name]
    if len(named) == 1:
        return named[0]
    candidates = named or [(e, f) for e in entries for f in formats if f.accepts(e)]
    if not candidates:
        files = [e for e in entries if e.is_file()]
        if len(files) == 1:
            return files[0], next((f for f in formats if not f.savedmodel), formats[0])
        expected = " or ".join(f.file_name for f in formats)
        raise InvalidRequest(f"no {kind} model found in {base}: expected {expected} or one model file")
    if len(candidates) > 1:
        names = ", ".join(sorted(e.name for e, _ in candidates))
        raise InvalidRequest(f"several {kind} model candidates in {base}: {names}; add a {CONFIG_FILE}")
    return candidates[0]


def is_savedmodel(path: Path) -> bool:
    return (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()


def _entries(directory: Path) -> list[Path]:
    """The entries of ``directory`` in name order, hidden ones (``.name``) left out."""
    return sorted(e for e in directory.iterdir() if not e.name.startswith("."))


def _is_version_dir(entry: Path) -> bool:
    return entry.name.isdigit() and entry.name.isascii() and entry.is_dir()


def _version_dirs(source: Path) -> list[Path]:
    """The numeric subdirectories of ``source`` by ascending version (none for a
    file)."""
    if not source.is_dir():
        return []
    return sorted((e for e in _entries(source) if _is_version_dir(e)), key=lambda e: int(e.name))


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise InvalidRequest(f"{path} cannot be read: {exc.strerror}") from None


def _swap_into_place(staging: Path, view: Path) -> None:
    """Rename the complete ``staging`` directory to ``view``; an old view is first
    renamed out of the way (to a ``_`` name) and then deleted."""
    if view.exists() or view.is_symlink():
        old = view.with_name(f"_{secrets.token_hex(8)}.old")
        view.rename(old)
        staging.rename(view)
        remove_tree(old)
    else:
        staging.rename(view)
