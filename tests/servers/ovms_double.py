"""A test double of OpenVINO Model Server's config API.

OVMS cannot run on the machines this suite runs on: it ships as container images and
source only (no wheel, no Debian package), and there is no container engine. The OVMS
plugin is therefore tested against this small HTTP server, which implements the part of
OVMS's REST API the plugin uses, with OVMS's documented semantics, over the same config
file:

``POST /v1/config/reload``
    reads the config file (``{"model_config_list": [{"config": {"name", "base_path"}}]}``,
    a relative ``base_path`` taken from the file's folder). For every model, the largest
    positive numeric subdirectory of ``base_path`` is its version (OVMS's default
    "latest" policy): ``AVAILABLE`` (``OK``), or ``LOADING`` with error ``UNKNOWN`` when
    the version directory holds :data:`BROKEN_MARKER` (whose text becomes the error
    message) or no file at all. A model without a version directory has no versions.
    Versions of models that left the file, and replaced versions, become ``END``.
    Answers ``201`` and every model's state when something changed, ``200`` when
    nothing did, and ``412`` with ``{"error": ...}`` when the file is missing or not
    valid (the states stay as they were) or a model failed to load (the states are
    then read with ``GET /v1/config``, as with OVMS).
``GET /v1/config``
    every model's state.
``GET /v2/health/ready``, ``GET /v2``
    readiness and server metadata (version :data:`VERSION`).
``GET /double/stats``
    ``{"reloads": N, "config": <the last config applied>}``: a hook for the tests, not
    part of OVMS.

Run as ``python ovms_double.py --config_path FILE --rest_port N`` (the flag names are
OVMS's); :class:`OVMSDouble` starts it on 127.0.0.1 on a free port and stops it by PID.
The module uses only the standard library so that it runs as a plain script.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

#: a file that makes the version directory holding it fail to load
BROKEN_MARKER = "ovms-double-broken"
#: the version the double reports in its server metadata
VERSION = "ovms-double-1"

_FILE_MISSING = "Config file not found or cannot open."
_FILE_INVALID = "Reloading config file failed. Check server logs for more info."

Versions = dict[str, dict[str, str]]  # version -> {"state", "error_code", "error_message"}


class ModelStates:
    """The double's model manager: what OVMS would have loaded from the config file."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.models: dict[str, Versions] = {}
        self.applied_text: str | None = None
        self.applied_config: list[dict[str, str]] = []
        self.reloads = 0
        self.lock = threading.Lock()

    def answer(self) -> dict[str, Any]:
        return {
            name: {
                "model_version_status": [
                    {
                        "version": version,
                        "state": entry["state"],
                        "status": {
                            "error_code": entry["error_code"],
                            "error_message": entry["error_message"],
                        },
                    }
                    for version, entry in sorted(versions.items(), key=lambda item: int(item[0]))
                ]
            }
            for name, versions in sorted(self.models.items())
        }

    def reload(self) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.reloads += 1
            try:
                text = self.config_path.read_text(encoding="utf-8")
            except OSError:
                return 412, {"error": _FILE_MISSING}
            config = _parse_config(text)
            if config is None:
                return 412, {"error": _FILE_INVALID}
            before = json.dumps(self.models, sort_keys=True)
            wanted = {entry["name"]: self._resolve(entry["base_path"]) for entry in config}
            for name in list(self.models):
                if name not in wanted:
                    self.models[name] = {v: _state("END") for v in self.models[name]}
            failed = False
            for name, base_path in wanted.items():
                found = _scan(base_path)
                old = {v: _state("END") for v in self.models.get(name, {}) if v not in found}
                self.models[name] = {**old, **found}
                failed = failed or any(e["error_code"] != "OK" for e in found.values())
            changed = text != self.applied_text or json.dumps(self.models, sort_keys=True) != before
            self.applied_text, self.applied_config = text, config
            if failed:
                return 412, {"error": _FILE_INVALID}
            return (201 if changed else 200), self.answer()

    def _resolve(self, base_path: str) -> Path:
        path = Path(base_path)
        return path if path.is_absolute() else self.config_path.parent / path


def _state(state: str, error_code: str = "OK", error_message: str = "OK") -> dict[str, str]:
    return {"state": state, "error_code": error_code, "error_message": error_message}


def _parse_config(text: str) -> list[dict[str, str]] | None:
    """The config entries, or ``None`` when the file is not a valid config."""
    try:
        document = json.loads(text)
    except ValueError:
        return None
    entries = document.get("model_config_list") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        return None
    config = []
    for entry in entries:
        model = entry.get("config") if isinstance(entry, dict) else None
        if not isinstance(model, dict):
            return None
        name, base_path = model.get("name"), model.get("base_path")
        if not (isinstance(name, str) and name and isinstance(base_path, str) and base_path):
            return None
        config.append({"name": name, "base_path": base_path})
    if len({entry["name"] for entry in config}) != len(config):
        return None  # duplicated model names
    return config


def _scan(base_path: Path) -> Versions:
    """The latest version under ``base_path`` and its state; ``{}`` when there is none."""
    try:
        versions = [e for e in base_path.iterdir() if e.is_dir() and e.name.isdigit() and int(e.name) > 0]
    except OSError:
        return {}
    if not versions:
        return {}
    latest = max(versions, key=lambda e: int(e.name))
    version = str(int(latest.name))
    files = [e for e in latest.iterdir() if e.name != BROKEN_MARKER]
    marker = latest / BROKEN_MARKER
    if marker.exists():
        reason = marker.read_text(encoding="utf-8", errors="replace").strip() or "model is broken"
        return {version: _state("LOADING", "UNKNOWN", reason)}
    if not files:
        return {version: _state("LOADING", "UNKNOWN", f"no model files in {latest}")}
    return {version: _state("AVAILABLE")}


class _Handler(BaseHTTPRequestHandler):
    server: _DoubleServer

    def do_GET(self) -> None:
        states = self.server.states
        if self.path == "/v1/config":
            with states.lock:
                self._send(200, states.answer())
        elif self.path == "/v2/health/ready":
            self._send(200, None)
        elif self.path == "/v2":
            self._send(200, {"name": "OpenVINO Model Server (test double)", "version": VERSION})
        elif self.path == "/double/stats":
            with states.lock:
                self._send(200, {"reloads": states.reloads, "config": states.applied_config})
        else:
            self._send(404, {"error": f"no such endpoint: {self.path}"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path == "/v1/config/reload":
            self._send(*self.server.states.reload())
        else:
            self._send(404, {"error": f"no such endpoint: {self.path}"})

    def _send(self, status: int, body: dict[str, Any] | None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


class _DoubleServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, states: ModelStates) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.states = states


class OVMSDouble:
    """The double as a process serving ``config_path`` on 127.0.0.1."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        # imported here so that the module itself runs as a plain script
        from tests.servers.process import ManagedProcess, free_port

        self.config_path = Path(config_path).absolute()
        self.port = free_port()
        self.process = ManagedProcess(
            [
                sys.executable,
                str(Path(__file__).absolute()),
                "--config_path",
                str(self.config_path),
                "--rest_port",
                str(self.port),
            ],
            log_path,
        )
        self._direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, timeout: float = 30) -> None:
        from tests.servers.process import wait_until

        self.process.start()
        try:
            wait_until(lambda: self._get("/v2/health/ready") is not None, timeout, "OVMS double")
        except TimeoutError:
            self.process.stop()
            raise RuntimeError(f"the OVMS double did not start:\n{self.process.log_tail()}") from None

    def stop(self) -> None:
        self.process.stop()

    def stats(self) -> dict[str, Any]:
        """Reloads answered so far and the config they last applied."""
        stats = self._get("/double/stats")
        assert isinstance(stats, dict)
        return stats

    def reloads(self) -> int:
        return int(self.stats()["reloads"])

    def config_answer(self) -> dict[str, Any]:
        """What ``GET /v1/config`` answers."""
        answer = self._get("/v1/config")
        assert isinstance(answer, dict)
        return answer

    def _get(self, path: str) -> Any:
        with self._direct.open(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
            data = response.read()
        return json.loads(data) if data else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a test double of OVMS's config API")
    parser.add_argument("--config_path", type=Path, required=True)
    parser.add_argument("--rest_port", type=int, required=True)
    args = parser.parse_args(argv)
    server = _DoubleServer(args.rest_port, ModelStates(args.config_path.absolute()))
    sys.stderr.write(f"OVMS double serving {args.config_path} on 127.0.0.1:{args.rest_port}\n")
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
