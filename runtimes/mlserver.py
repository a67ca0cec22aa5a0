"""The MLServer runtime plugin.

MLServer is driven through the KServe v2 gRPC API on its gRPC port (RUNTIME_PORT):
readiness, version, and the repository calls load, unload and index. It serves the
repository ``ROOT_MODEL_DIR/_mlserver_models`` with ``load_models_at_startup`` off,
so a model exists for it only once its view holds a ``model-settings.json``.

The view of a model, ``_mlserver_models/<modelId>/``, is built from the pulled files:

* the pulled directory has a ``model-settings.json``: a rewritten copy (``name`` =
  modelId, ``parameters.uri`` absolute, schema tensors injected) and a link to every
  other entry;
* otherwise a generated ``model-settings.json`` whose ``implementation`` follows the
  model type and whose ``parameters.uri`` is the pulled path.

MLServer rescans the whole repository on every load and index call, so
``model-settings.json`` is always the last thing written (by an atomic rename) and the
first thing removed: MLServer sees a complete view or none.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from adapter.errors import InvalidRequest, ModelNotFound, RuntimeRejected, UnsafePath
from adapter.plugin import link, remove_tree, write_json_atomically
from puller.model_key import validate_model_id
from runtimes.kserve_v2 import KServeV2Plugin

if TYPE_CHECKING:
    from puller.request import LocalModel

#: the file MLServer discovers models by
MODEL_SETTINGS_FILE = "model-settings.json"

#: model type (``model_type.name`` of the key) -> MLServer inference runtime
IMPLEMENTATIONS: Mapping[str, str] = {
    "sklearn": "mlserver_sklearn.SKLearnModel",
    "xgboost": "mlserver_xgboost.XGBoostModel",
    "lightgbm": "mlserver_lightgbm.LightGBMModel",
    "mllib": "mlserver_mllib.MLlibModel",
    "mlflow": "mlserver_mlflow.MLflowRuntime",
}

#: tensor datatypes of the KServe v2 protocol, the only ones MLServer accepts
V2_DATATYPES = frozenset(
    {
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BYTES",
    }
)


class MLServerPlugin(KServeV2Plugin):
    """Seldon MLServer 1.x behind the KServe v2 gRPC API."""

    name: ClassVar[str] = "mlserver"

    #: seconds for an unload (the mesh retries failed unloads)
    unload_timeout: ClassVar[float] = 60.0

    async def is_ready(self) -> bool:
        """MLServer's ServerLive; ``False`` when it cannot be reached.

        Not ServerReady: MLServer answers that with "every model in my registry is
        ready" (``DataPlane.ready``), which is False while any model is being loaded,
        and stays False for a model whose load returned False. That says nothing about
        whether MLServer takes repository calls, and read as "the runtime is down" it
        made the sidecar report STARTING and load every model again whenever loads
        overlapped a readiness check."""
        return await self.client.server_live(timeout=self.status_timeout)

    async def load(self, model_id: str, view: Path, model: LocalModel) -> int | None:
        """RepositoryModelLoad of ``model_id`` (its view must be in place); returns
        ``None``: MLServer does not report sizes. The gRPC deadline is
        LOADTIME_TIMEOUT."""
        await self.client.load(model_id, timeout=self.settings.loadtime_timeout_ms / 1000)
        return None

    async def unload(self, model_id: str) -> None:
        """RepositoryModelUnload of ``model_id``. MLServer answers NOT_FOUND or
        INVALID_ARGUMENT for a model it does not have: both raise ``ModelNotFound``."""
        try:
            await self.client.unload(model_id, timeout=self.unload_timeout)
        except RuntimeRejected as exc:
            if exc.code == "INVALID_ARGUMENT":
                raise ModelNotFound(f"runtime does not know model {model_id!r}: {exc.message}") from None
            raise

    async def list_models(self) -> list[str]:
        """The models MLServer's repository index reports READY. (MLServer indexes
        the repository on disk: a loaded model whose view was deleted is not listed.)"""
        return await self.client.repository_index(ready_only=True, timeout=self.call_timeout)

    # --- layout --------------------------------------------------------------------

    def layout(self, model: LocalModel) -> Path:
        """Build ``_mlserver_models/<modelId>/`` for ``model`` and return it.

        Everything is checked before the view is touched, so a bad request leaves an
        existing view as it was. Writes only inside the view (links and one rewritten
        ``model-settings.json``); the pulled files are only read. Raises
        ``InvalidRequest`` for a missing model path, an unknown model type without a
        ``model-settings.json``, a ``model-settings.json`` or schema that is not valid,
        and ``UnsafePath`` for a relative ``uri`` leading out of the model directory.
        """
        model_id = validate_model_id(model.model_id)
        source = model.path.absolute()
        if not source.exists():
            raise InvalidRequest(f"model path {source} does not exist")
        settings_path = source / MODEL_SETTINGS_FILE
        if source.is_dir() and settings_path.is_file():
            settings = _rewritten_settings(settings_path, source, model_id, model.model_type)
            links = [entry for entry in sorted(source.iterdir()) if entry.name != MODEL_SETTINGS_FILE]
        else:
            settings = _generated_settings(source, model_id, model.model_type)
            links = []
        if model.schema_path is not None:
            settings.update(schema_tensors(Path(model.schema_path)))

        view = self.view_dir(model_id)
        _empty_view(view)
        for entry in links:
            link(entry, view / entry.name)
        write_json_atomically(view / MODEL_SETTINGS_FILE, settings)
        return view

    def remove_view(self, model_id: str) -> None:
        """Delete the view, its ``model-settings.json`` first so that MLServer never
        sees a view with its links half gone."""
        view = self.view_dir(model_id)
        if view.is_dir() and not view.is_symlink():
            (view / MODEL_SETTINGS_FILE).unlink(missing_ok=True)
        remove_tree(view)


def implementation_for(model_type: str) -> str:
    """The MLServer runtime class for ``model_type`` (``sklearn``, ``xgboost``... any
    case, a ``:version`` suffix ignored); ``InvalidRequest`` naming the supported types
    otherwise."""
    kind = model_type.split(":", 1)[0].strip().lower()
    implementation = IMPLEMENTATIONS.get(kind)
    if implementation is None:
        supported = ", ".join(sorted(IMPLEMENTATIONS))
        shown = repr(model_type) if model_type else "an empty model type"
        raise InvalidRequest(
            f"MLServer has no runtime for {shown} and the model has no {MODEL_SETTINGS_FILE}; "
            f"supported types: {supported}"
        )
    return implementation


def schema_tensors(schema_path: Path) -> dict[str, list[dict[str, Any]]]:
    """MLServer's ``inputs`` / ``outputs`` entries from a ModelMesh schema file
    (``{"inputs": [{"name", "datatype", "shape"}], "outputs": [...]}``). Only the
    keys the schema has are returned. ``InvalidRequest`` naming the file and entry
    when it is not valid."""
    data = _read_json(schema_path, "schema file")
    if not isinstance(data, dict):
        raise InvalidRequest(f"schema file {schema_path} must hold a JSON object")
    tensors: dict[str, list[dict[str, Any]]] = {}
    for key in ("inputs", "outputs"):
        entries = data.get(key)
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise InvalidRequest(f"schema file {schema_path}: {key!r} must be a list")
        tensors[key] = [_tensor(entry, f"{schema_path}: {key}[{i}]") for i, entry in enumerate(entries)]
    return tensors


def _tensor(entry: object, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise InvalidRequest(f"schema file {where} must be an object")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"schema file {where}: 'name' must be a non-empty string")
    datatype = entry.get("datatype")
    if not isinstance(datatype, str) or datatype.upper() not in V2_DATATYPES:
        raise InvalidRequest(
            f"schema file {where}: 'datatype' must be one of {', '.join(sorted(V2_DATATYPES))}"
        )
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape
    ):
        raise InvalidRequest(f"schema file {where}: 'shape' must be a list of integers >= -1")
    return {"name": name, "datatype": datatype.upper(), "shape": list(shape)}


def _generated_settings(source: Path, model_id: str, model_type: str) -> dict[str, Any]:
    return {
        "name": model_id,
        "implementation": implementation_for(model_type),
        "parameters": {"uri": str(source)},
    }


def _rewritten_settings(
    settings_path: Path, model_dir: Path, model_id: str, model_type: str
) -> dict[str, Any]:
    settings = _read_json(settings_path, MODEL_SETTINGS_FILE)
    if not isinstance(settings, dict):
        raise InvalidRequest(f"{settings_path} must hold a JSON object")
    parameters = settings.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise InvalidRequest(f"{settings_path}: 'parameters' must be an object")
    parameters = dict(parameters)
    parameters["uri"] = _absolute_uri(parameters.get("uri"), model_dir, settings_path)
    settings["name"] = model_id
    settings["parameters"] = parameters
    if not settings.get("implementation"):
        # fill it in when the type says which runtime; otherwise leave it to MLServer
        # (which may take it from its own environment)
        with contextlib.suppress(InvalidRequest):
            settings["implementation"] = implementation_for(model_type)
    return settings


def _absolute_uri(uri: object, model_dir: Path, settings_path: Path) -> str:
    """``parameters.uri`` as MLServer must see it from the view: absent -> the model
    directory; a URL or absolute path unchanged; a relative path resolved against the
    model directory, which it must not leave."""
    if uri is None or uri == "":
        return str(model_dir)
    if not isinstance(uri, str):
        raise InvalidRequest(f"{settings_path}: 'parameters.uri' must be a string")
    if "://" in uri or Path(uri).is_absolute():
        return uri
    base = os.path.normpath(model_dir)
    joined = os.path.normpath(model_dir / uri)
    if joined != base and not joined.startswith(base + os.sep):
        raise UnsafePath(f"{settings_path}: 'parameters.uri' {uri!r} leads outside the model directory")
    return joined


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{what} {path} is not valid JSON: not UTF-8 text") from None
    except OSError as exc:
        raise InvalidRequest(f"{what} {path} cannot be read: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except RecursionError:
        raise InvalidRequest(f"{what} {path} is not valid JSON: too deeply nested") from None


def _empty_view(view: Path) -> None:
    """Leave ``view`` an empty directory: an old ``model-settings.json`` is removed
    first (MLServer stops seeing the old view at once), then everything else. Links
    are removed, never followed."""
    view.parent.mkdir(parents=True, exist_ok=True)
    if view.is_symlink() or (view.exists() and not view.is_dir()):
        view.unlink()
    if view.is_dir():
        (view / MODEL_SETTINGS_FILE).unlink(missing_ok=True)
        for entry in view.iterdir():
            remove_tree(entry)
    else:
        view.mkdir()
