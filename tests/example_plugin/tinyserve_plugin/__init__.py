"""A modelmesh-sidecar runtime plugin for TinyServe.

The worked example of ``docs/writing-a-runtime-plugin.md``: a third-party package that
teaches the sidecar to drive a model server it does not ship. TinyServe (made up, see
:mod:`tinyserve_plugin.server`) serves models from directories holding ``model.json``
and is driven through a small JSON-over-HTTP management API on RUNTIME_PORT.

The package declares the plugin under the entry-point group
``modelmesh_sidecar.runtimes`` (see its ``pyproject.toml``); once it is installed,
``mesh-adapter --runtime tinyserve`` (or a link named ``tinyserve-adapter``) serves
ModelMesh in front of TinyServe.

The view of a model, ``ROOT_MODEL_DIR/_tinyserve_models/<modelId>/``:

* ``model.json``: a copy of the pulled one (or of the pulled ``.json`` file) with
  ``name`` set to the modelId, written last and by an atomic rename;
* a link to every other entry of the pulled directory.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import tempfile
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from adapter.errors import InvalidRequest, ModelNotFound, RuntimeRejected, RuntimeUnavailable, SidecarError
from adapter.plugin import RuntimePlugin, link, remove_tree
from puller.model_key import validate_model_id

if TYPE_CHECKING:
    from adapter.settings import Settings
    from puller.request import LocalModel

__all__ = ["TinyServeClient", "TinyServePlugin"]

#: the file TinyServe reads a model from
MODEL_FILE = "model.json"


class TinyServeClient:
    """TinyServe's management API at ``host:port``; blocking, run it in a thread.

    This is the runtime's edge: every failure leaves it as one of our errors. A
    connection that fails is ``RuntimeUnavailable``; TinyServe's ``NOT_FOUND`` is
    ``ModelNotFound``; any other refusal is ``RuntimeRejected`` with TinyServe's code.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def call(self, method: str, path: str, body: Mapping[str, Any] | None, timeout: float) -> Any:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = json.dumps(body or {}).encode() if method == "POST" else None
            connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise RuntimeUnavailable(
                f"TinyServe at {self.host}:{self.port} cannot be reached ({type(exc).__name__})"
            ) from None
        finally:
            connection.close()
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            raise RuntimeRejected(
                f"TinyServe answered {method} {path} with no JSON", code="INTERNAL"
            ) from None
        if response.status == 200:
            return answer
        error = answer if isinstance(answer, dict) else {}
        message = str(error.get("error") or f"HTTP {response.status}")
        code = str(error.get("code") or "UNKNOWN")
        if code == "NOT_FOUND":
            raise ModelNotFound(f"TinyServe: {message}")
        raise RuntimeRejected(f"TinyServe: {message}", code=code)


class TinyServePlugin(RuntimePlugin):
    """The made-up TinyServe model server."""

    name: ClassVar[str] = "tinyserve"

    #: seconds for the readiness probe (the mesh polls runtimeStatus every few seconds)
    status_timeout: ClassVar[float] = 2.0
    #: seconds for the other management calls but load
    call_timeout: ClassVar[float] = 10.0

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.client = TinyServeClient(settings.runtime_host, settings.management_port)

    async def _call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, *, timeout: float
    ) -> Any:
        return await asyncio.to_thread(self.client.call, method, path, body, timeout)

    # --- status -------------------------------------------------------------------------

    async def is_ready(self) -> bool:
        try:
            answer = await self._call("GET", "/v1/health", timeout=self.status_timeout)
        except SidecarError:
            return False  # not up yet: runtimeStatus stays STARTING
        return isinstance(answer, dict) and answer.get("status") == "ready"

    async def runtime_version(self) -> str | None:
        answer = await self._call("GET", "/v1/version", timeout=self.call_timeout)
        version = answer.get("version") if isinstance(answer, dict) else None
        return version if isinstance(version, str) and version else None

    def method_infos(self) -> Mapping[str, Sequence[int]]:
        # TinyServe's (made-up) gRPC inference API carries the model name in field 1
        return {"tinyserve.v1.InferenceService/Infer": (1,)}

    # --- load / unload ------------------------------------------------------------------

    async def load(self, model_id: str, view: Path, model: LocalModel) -> int | None:
        answer = await self._call(
            "POST",
            f"/v1/models/{_quoted(model_id)}/load",
            {"path": str(view)},
            timeout=self.settings.loadtime_timeout_ms / 1000,
        )
        size = answer.get("size_bytes") if isinstance(answer, dict) else None
        return size if isinstance(size, int) and size > 0 else None

    async def unload(self, model_id: str) -> None:
        # TinyServe answers NOT_FOUND for a model it does not serve: ModelNotFound
        await self._call("POST", f"/v1/models/{_quoted(model_id)}/unload", timeout=self.call_timeout)

    async def list_models(self) -> list[str]:
        answer = await self._call("GET", "/v1/models", timeout=self.call_timeout)
        models = answer.get("models") if isinstance(answer, dict) else None
        return [m["name"] for m in models or [] if isinstance(m, dict) and isinstance(m.get("name"), str)]

    async def model_size(self, model_id: str) -> int | None:
        try:
            answer = await self._call("GET", f"/v1/models/{_quoted(model_id)}", timeout=self.call_timeout)
        except ModelNotFound:
            return None  # the flow then answers from what it loaded, or NOT_FOUND
        size = answer.get("size_bytes") if isinstance(answer, dict) else None
        return size if isinstance(size, int) and size > 0 else None

    # --- layout -------------------------------------------------------------------------

    def layout(self, model: LocalModel) -> Path:
        """Build ``_tinyserve_models/<modelId>/``. Everything is checked before the old
        view is touched; ``InvalidRequest`` for a model without a readable
        ``model.json`` (or ``.json`` file)."""
        model_id = validate_model_id(model.model_id)
        source = model.path.absolute()
        if source.is_file() and source.suffix == ".json":
            model_file, others = source, []
        elif (source / MODEL_FILE).is_file():
            model_file = source / MODEL_FILE
            others = [entry for entry in sorted(source.iterdir()) if entry.name != MODEL_FILE]
        else:
            raise InvalidRequest(f"{source} is neither a .json model nor a directory holding {MODEL_FILE}")
        document = _read_model(model_file)
        document["name"] = model_id

        view = self.view_dir(model_id)
        _empty_view(view)
        for entry in others:
            link(entry, view / entry.name)
        _write_json_atomically(view / MODEL_FILE, document)
        return view

    def remove_view(self, model_id: str) -> None:
        view = self.view_dir(model_id)
        if view.is_dir() and not view.is_symlink():
            (view / MODEL_FILE).unlink(missing_ok=True)  # TinyServe stops seeing it first
        remove_tree(view)


def _quoted(model_id: str) -> str:
    return urllib.parse.quote(model_id, safe="")


def _read_model(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{path} is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(document, dict):
        raise InvalidRequest(f"{path} must hold a JSON object")
    return document


def _empty_view(view: Path) -> None:
    """Leave ``view`` an empty directory, its ``model.json`` removed first."""
    view.parent.mkdir(parents=True, exist_ok=True)
    if view.is_symlink() or (view.exists() and not view.is_dir()):
        view.unlink()
    if view.is_dir():
        (view / MODEL_FILE).unlink(missing_ok=True)
        for entry in view.iterdir():
            remove_tree(entry)
    else:
        view.mkdir()


def _write_json_atomically(target: Path, content: Mapping[str, Any]) -> None:
    """Write beside ``target``, then rename: readers see no file or the whole file."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    temp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(content, out, indent=2)
        temp.chmod(0o644)
        temp.replace(target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
