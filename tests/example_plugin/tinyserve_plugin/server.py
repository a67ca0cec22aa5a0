"""TinyServe: the made-up model server of the plugin walk-through.

It exists so that the example plugin can be proved against a real process. A model is
a directory holding ``model.json``: ``{"outputs": {<input>: <output>, ...}}``, and an
inference looks its input up. The management API is plain JSON over HTTP:

=====================================  =====================================================
``GET  /v1/health``                    200 ``{"status": "ready"}``
``GET  /v1/version``                   ``{"version": ...}``
``GET  /v1/models``                    ``{"models": [{"name", "size_bytes"}, ...]}``
``POST /v1/models/{name}/load``        body ``{"path": <model dir>}``: reads the model
                                       and serves it under ``name``; 200 ``{"name",
                                       "size_bytes"}``, 400 for a model it cannot read
``POST /v1/models/{name}/unload``      200, or 404 for a model it does not serve
``GET  /v1/models/{name}``             ``{"name", "size_bytes"}``, or 404
``POST /v1/models/{name}/infer``       body ``{"input": ...}``: 200 ``{"output": ...}``,
                                       404 for an unknown model, 400 for an unknown input
=====================================  =====================================================

Errors are ``{"error": <message>, "code": <gRPC status name>}``. Names in paths are
percent-encoded. Run it with ``python -m tinyserve_plugin.server --port N``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

VERSION = "1.0.0"
MODEL_FILE = "model.json"
#: what one table entry costs in memory, by TinyServe's own (made-up) measure
ENTRY_BYTES = 256


class TinyServeError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class ModelTable:
    """The models TinyServe serves: name -> (input -> output)."""

    def __init__(self) -> None:
        self._models: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def load(self, name: str, path: str) -> dict[str, Any]:
        model_file = Path(path) / MODEL_FILE
        try:
            document = json.loads(model_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TinyServeError(400, "INVALID_ARGUMENT", f"no {MODEL_FILE} in {path}") from None
        except (OSError, ValueError) as exc:
            raise TinyServeError(400, "INVALID_ARGUMENT", f"cannot read {model_file}: {exc}") from None
        outputs = document.get("outputs") if isinstance(document, dict) else None
        if not isinstance(outputs, dict):
            raise TinyServeError(400, "INVALID_ARGUMENT", f"{model_file}: 'outputs' must be an object")
        with self._lock:
            self._models[name] = dict(outputs)
        return self.describe(name)

    def unload(self, name: str) -> None:
        with self._lock:
            if self._models.pop(name, None) is None:
                raise TinyServeError(404, "NOT_FOUND", f"model {name!r} is not loaded")

    def describe(self, name: str) -> dict[str, Any]:
        with self._lock:
            outputs = self._models.get(name)
        if outputs is None:
            raise TinyServeError(404, "NOT_FOUND", f"model {name!r} is not loaded")
        return {"name": name, "size_bytes": ENTRY_BYTES * max(len(outputs), 1)}

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def infer(self, name: str, value: Any) -> Any:
        with self._lock:
            outputs = self._models.get(name)
        if outputs is None:
            raise TinyServeError(404, "NOT_FOUND", f"model {name!r} is not loaded")
        key = value if isinstance(value, str) else json.dumps(value)
        if key not in outputs:
            raise TinyServeError(400, "INVALID_ARGUMENT", f"model {name!r} has no output for {key!r}")
        return outputs[key]


class _Handler(BaseHTTPRequestHandler):
    server: TinyServeHTTPServer

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def _answer(self, method: str) -> None:
        try:
            body = self._body() if method == "POST" else {}
            status, answer = self._route(method, self.path.split("?", 1)[0], body)
        except TinyServeError as exc:
            status, answer = exc.status, {"error": exc.message, "code": exc.code}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            raise TinyServeError(400, "INVALID_ARGUMENT", "the body is not JSON") from None
        if not isinstance(body, dict):
            raise TinyServeError(400, "INVALID_ARGUMENT", "the body must be a JSON object")
        return body

    def _route(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        models = self.server.models
        parts = path.strip("/").split("/")
        if method == "GET" and parts == ["v1", "health"]:
            return 200, {"status": "ready"}
        if method == "GET" and parts == ["v1", "version"]:
            return 200, {"version": VERSION}
        if method == "GET" and parts == ["v1", "models"]:
            return 200, {"models": [models.describe(name) for name in models.names()]}
        if len(parts) >= 3 and parts[:2] == ["v1", "models"]:
            name = urllib.parse.unquote(parts[2])
            action = parts[3:]
            if method == "GET" and not action:
                return 200, models.describe(name)
            if method == "POST" and action == ["load"]:
                path_value = body.get("path")
                if not isinstance(path_value, str):
                    raise TinyServeError(400, "INVALID_ARGUMENT", "'path' must be a string")
                return 200, models.load(name, path_value)
            if method == "POST" and action == ["unload"]:
                models.unload(name)
                return 200, {}
            if method == "POST" and action == ["infer"]:
                return 200, {"output": models.infer(name, body.get("input"))}
        raise TinyServeError(404, "NOT_FOUND", f"no such endpoint: {method} {path}")

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"tinyserve: {format % args}\n")


class TinyServeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int) -> None:
        super().__init__((host, port), _Handler)
        self.models = ModelTable()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyserve", description="the made-up TinyServe model server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    server = TinyServeHTTPServer(args.host, args.port)
    sys.stderr.write(f"tinyserve {VERSION} listening on {args.host}:{args.port}\n")
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
