"""A moto S3 server for the tests: ``moto_server -H 127.0.0.1 -p PORT`` from this
venv, in its own process group, stopped by PID; and :class:`CountingProxy`, the HTTP
proxy the S3 tests send boto3 and the byte path through."""

from __future__ import annotations

import http.client
import http.server
import os
import select
import socket
import ssl
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from tests.servers.process import ManagedProcess, free_port, wait_until

#: moto accepts any credentials unless told otherwise; these are what client() uses
DUMMY_KEY_ID = "testing-key-id"
DUMMY_SECRET = "testing-secret-key"


def _moto_server_binary() -> Path:
    path = Path(sys.executable).parent / "moto_server"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: pip install 'moto[server]' into this venv")
    return path


class MotoS3Server:
    """One moto server process. ``start()`` waits until GET / answers 200.

    With ``tls=(cert_file, key_file, ca_file)`` it serves HTTPS with that certificate;
    ``ca_file`` is what clients (and the readiness check) trust.
    """

    def __init__(self, log_dir: Path | None = None, tls: tuple[Path, Path, Path] | None = None) -> None:
        self.port = 0
        self.tls = tls
        self._log_dir = log_dir or Path(tempfile.mkdtemp(prefix="moto-logs."))
        self._process: ManagedProcess | None = None

    @property
    def endpoint_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.tls[2])) if self.tls else None

    def start(self, timeout: float = 30.0) -> None:
        self.port = free_port()
        env = dict(os.environ)
        env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
        argv = [str(_moto_server_binary()), "-H", "127.0.0.1", "-p", str(self.port)]
        if self.tls:
            argv += ["-s", "-c", str(self.tls[0]), "-k", str(self.tls[1])]
        self._process = ManagedProcess(argv, log_path=self._log_dir / f"moto-{self.port}.log", env=env)
        self._process.start()

        def ready() -> bool:
            assert self._process is not None
            if not self._process.alive():
                raise RuntimeError(f"moto_server exited:\n{self._process.log_tail()}")
            with urllib.request.urlopen(
                self.endpoint_url + "/", timeout=1, context=self._ssl_context()
            ) as resp:
                return bool(resp.status == 200)

        try:
            wait_until(ready, timeout, "moto_server")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None

    def log_tail(self, limit: int = 4000) -> str:
        """The last ``limit`` characters of its log (one line per request)."""
        return self._process.log_tail(limit) if self._process is not None else ""

    def _post(self, path: str, data: bytes) -> None:
        request = urllib.request.Request(
            self.endpoint_url + path, data=data, method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=10, context=self._ssl_context()) as resp:
            resp.read()

    def require_auth(self) -> None:
        """From now on every request needs credentials moto's IAM knows: what moto's
        ``INITIAL_NO_AUTH_ACTION_COUNT`` setting does, switched on at run time through
        ``/moto-api/reset-auth`` so that fixtures can be created first."""
        self._post("/moto-api/reset-auth", b"0")

    def allow_any_auth(self) -> None:
        """Back to moto's default: any credentials are accepted."""
        self._post("/moto-api/reset-auth", b"inf")

    def client(self, service: str = "s3", key_id: str = DUMMY_KEY_ID, secret: str = DUMMY_SECRET) -> Any:
        """A boto3 client for this server (dummy keys unless given)."""
        # imported here: tests/conftest.py imports this module before it registers the guard
        # as a plugin, and a plugin imported earlier cannot have its asserts rewritten
        from tests import secrets_guard

        secrets_guard.register_secret(secret, "the secret key of a MotoS3Server.client")
        session: Any = boto3.session.Session(
            aws_access_key_id=key_id, aws_secret_access_key=secret, region_name="us-east-1"
        )
        return session.client(
            service,
            endpoint_url=self.endpoint_url,
            verify=str(self.tls[2]) if self.tls else None,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def create_bucket(self, bucket: str) -> None:
        self.client().create_bucket(Bucket=bucket)

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def put_tree(self, bucket: str, prefix: str, local_dir: Path) -> list[str]:
        """Upload every file under ``local_dir`` to ``prefix/<relative path>``; return
        the keys written."""
        client = self.client()
        keys: list[str] = []
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            key = f"{prefix.rstrip('/')}/{rel}" if prefix else rel
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            keys.append(key)
        return keys


class CountingProxy(http.server.ThreadingHTTPServer):
    """A tiny HTTP proxy on 127.0.0.1 that records what goes through it.

    Plain HTTP requests (absolute URL in the request line) are forwarded, one upstream
    connection per request; ``CONNECT host:port`` opens a tunnel (HTTPS). Every name
    resolves to 127.0.0.1, so clients may use made-up host names (``bucket.localhost``
    for virtual-hosted S3) that only this proxy can reach. ``requests`` lists
    ``(method, target, Host header)`` of every request, in order. Stop with
    :meth:`close`.
    """

    daemon_threads = True
    #: a tunnel or upstream read idle for this long is closed
    idle_seconds = 30.0

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.requests: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)

    def record(self, method: str, target: str, host: str) -> None:
        with self._lock:
            self.requests.append((method, target, host))

    def seen(self) -> list[tuple[str, str, str]]:
        with self._lock:
            return list(self.requests)


_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer", "upgrade"}
)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CountingProxy

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_CONNECT(self) -> None:
        host, _, port = self.path.rpartition(":")
        self.server.record("CONNECT", self.path, host)
        try:
            upstream = socket.create_connection(("127.0.0.1", int(port)), timeout=5)
        except OSError:
            self.send_error(502)
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        self._pipe(self.connection, upstream)
        self.close_connection = True

    def _pipe(self, client: socket.socket, upstream: socket.socket) -> None:
        """Copy bytes both ways until one side closes or both stay idle too long."""
        with upstream:
            sockets = [client, upstream]
            while True:
                readable, _, broken = select.select(sockets, [], sockets, self.server.idle_seconds)
                if broken or not readable:
                    return
                for sock in readable:
                    data = sock.recv(256 * 1024)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)

    def _forward(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        host = self.headers.get("Host", parts.netloc)
        self.server.record(self.command, self.path, host)
        if not parts.scheme or not parts.hostname:
            self.send_error(400, "a proxy wants an absolute URL")
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        upstream = http.client.HTTPConnection("127.0.0.1", parts.port or 80, timeout=self.server.idle_seconds)
        try:
            upstream.putrequest(self.command, target, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                upstream.putheader(name, value)
            upstream.endheaders(body)
            resp = upstream.getresponse()
            self.send_response(resp.status, resp.reason)
            for name, value in resp.getheaders():
                if name.lower() not in _HOP_BY_HOP | {"transfer-encoding", "content-length"}:
                    self.send_header(name, value)
            if self.command == "HEAD":
                self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                self.end_headers()
                return
            declared = resp.getheader("Content-Length")
            if declared is not None:
                self.send_header("Content-Length", declared)
                self.end_headers()
                while chunk := resp.read(256 * 1024):
                    self.wfile.write(chunk)
            else:
                data = resp.read()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
        except OSError:
            self.close_connection = True
        finally:
            upstream.close()

    do_GET = _forward
    do_HEAD = _forward
    do_PUT = _forward
    do_POST = _forward
    do_DELETE = _forward
