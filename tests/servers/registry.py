"""A real OCI registry for the tests: Debian's ``docker-registry`` (distribution 2.8).

:class:`DistributionRegistry` writes a config file and starts
``/usr/bin/docker-registry serve CONFIG.yml`` on 127.0.0.1 on a free port, with
filesystem storage in a temp folder and deletes enabled, in its own process group, and
stops it by PID. ``start()`` waits until ``GET /v2/`` answers (200, or 401 when it asks
for credentials). :func:`ensure_registry` installs the package with apt when the binary
is missing (``python -m tests.servers.registry install`` does it up front).

Authentication modes:

``open``
    anyone may pull and push.
``htpasswd``
    HTTP Basic against an htpasswd file of bcrypt entries (``users``).
``token``
    the bearer-token flow: the registry answers 401 with
    ``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` and trusts JWTs signed
    by the key of ``rootcertbundle``. :class:`TokenServer` (a thread in the test
    process, on its own free port) issues them: RS256, the signing certificate in the
    ``x5c`` header, which distribution 2.8 checks against ``rootcertbundle``
    (``registry/auth/token/token.go``: ``x5c``, else ``jwk``, else ``kid`` looked up
    as a libtrust key ID). It grants what was asked to ``users`` with the right
    password, ``pull`` to anonymous callers when ``anonymous_pull`` is set, and
    counts its requests per scope (for the token-cache tests).

With ``tls`` (a :class:`tests.servers.https.Certificates`), the registry serves HTTPS
with the test PKI's server certificate.

:meth:`DistributionRegistry.corrupt_blob` flips a byte of a stored blob on disk
(``docker/registry/v2/blobs/sha256/<aa>/<hex>/data``): the registry then serves bytes
whose sha256 is not their digest.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

from tests import secrets_guard
from tests.servers.https import Certificates
from tests.servers.process import ManagedProcess, free_port, wait_until

REGISTRY_BINARY = Path("/usr/bin/docker-registry")
SERVICE = "modelmesh-sidecar-test-registry"
ISSUER = "modelmesh-sidecar-test-token-issuer"

AuthMode = Literal["open", "htpasswd", "token"]


def ensure_registry() -> Path:
    """The ``docker-registry`` binary, installed with apt when missing (needs root)."""
    if REGISTRY_BINARY.exists():
        return REGISTRY_BINARY
    apt = shutil.which("apt-get")
    if apt is None:
        raise FileNotFoundError(f"{REGISTRY_BINARY} is missing and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run([apt, "install", "-y", "docker-registry"], env=env, check=False, timeout=600)
    if done.returncode != 0:
        subprocess.run([apt, "update"], env=env, check=True, timeout=600)
        subprocess.run([apt, "install", "-y", "docker-registry"], env=env, check=True, timeout=600)
    if not REGISTRY_BINARY.exists():
        raise FileNotFoundError(f"apt installed docker-registry but {REGISTRY_BINARY} is missing")
    return REGISTRY_BINARY


# --- the token server -------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenServer:
    """The registry's token service: ``GET /token?service=&scope=`` (Basic auth
    optional) answers ``{"token", "access_token", "expires_in", "issued_at"}``; an
    OAuth2 ``POST /token`` with ``grant_type=refresh_token`` and one of
    ``identity_tokens`` answers the same for that token's user.

    ``expires_in`` is what it announces (the JWT itself stays valid for ten minutes, so
    a client that ignores the announced lifetime is not caught by the registry but by
    :attr:`requests`). ``fail_next`` makes the next N requests answer 500;
    ``deny_next`` makes the next N tokens grant nothing (the registry then answers 401
    to the request that carries one)."""

    def __init__(
        self,
        folder: Path,
        *,
        users: Mapping[str, str],
        anonymous_pull: bool = False,
        expires_in: int = 300,
    ) -> None:
        self.users = dict(users)
        for password in self.users.values():
            secrets_guard.register_secret(password, "a password of a registry TokenServer user")
        #: docker ``identitytoken`` values accepted as OAuth2 refresh tokens: token -> user
        self.identity_tokens: dict[str, str] = {}
        self.posts = 0
        self.anonymous_pull = anonymous_pull
        self.expires_in = expires_in
        self.requests: Counter[str] = Counter()
        self.refused = 0
        self.fail_next = 0
        self.deny_next = 0
        self.port = 0
        folder.mkdir(parents=True, exist_ok=True)
        self.root_cert_file = folder / "token-signer.pem"
        self.rotate_key()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def rotate_key(self) -> None:
        """Sign with a new key from now on and write its certificate to
        ``root_cert_file`` (a registry restarted then refuses the older tokens)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test token signer")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        self._key = key
        self._cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.root_cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def sign(self, access: list[dict[str, Any]], subject: str) -> str:
        """A JWT the registry accepts, granting ``access``."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self._cert_der).decode()]}
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + 600,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        token = f"{signing_input}.{_b64url(signature)}"
        secrets_guard.register_secret(token, "a token the registry's TokenServer issued")
        return token

    def answer(self, query: Mapping[str, list[str]], authorization: str | None) -> tuple[int, dict[str, Any]]:
        """Status and JSON body for one token request."""
        scopes = query.get("scope", [])
        with self._lock:
            for scope in scopes or [""]:
                self.requests[scope] += 1
            if self.fail_next > 0:
                self.fail_next -= 1
                return 500, {"error": "failing as asked"}
        subject = ""
        if authorization:
            kind, _, value = authorization.partition(" ")
            user, _, password = (
                base64.b64decode(value).decode().partition(":") if kind == "Basic" else ("", "", "")
            )
            if kind != "Basic" or self.users.get(user) != password or not user:
                with self._lock:
                    self.refused += 1
                return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}
            subject = user
        elif not self.anonymous_pull:
            with self._lock:
                self.refused += 1
            return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "credentials required"}]}
        if query.get("service", [""])[0] != SERVICE:
            return 400, {"errors": [{"code": "DENIED", "message": "unknown service"}]}
        with self._lock:
            deny = self.deny_next > 0
            self.deny_next -= int(deny)
        access = []
        for scope in scopes if not deny else []:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = [a for a in actions.split(",") if a and (subject or a == "pull")]
            access.append({"type": kind, "name": name, "actions": granted})
        token = self.sign(access, subject)
        issued = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        return 200, {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": issued,
        }

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                if parts.path != "/token":
                    status, body = 404, {"error": "not here"}
                else:
                    status, body = owner.answer(
                        urllib.parse.parse_qs(parts.query), self.headers.get("Authorization")
                    )
                self._send(status, body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                owner.posts += 1
                user = owner.identity_tokens.get(form.get("refresh_token", [""])[0])
                if urllib.parse.urlsplit(self.path).path != "/token":
                    self._send(404, {"error": "not here"})
                elif form.get("grant_type") != ["refresh_token"] or user is None:
                    self._send(401, {"error": "invalid_grant"})
                else:
                    authorization = (
                        "Basic " + base64.b64encode(f"{user}:{owner.users[user]}".encode()).decode()
                    )
                    status, body = owner.answer(form, authorization)
                    self._send(status, {"access_token": body.get("access_token"), **body})

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="test-token-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


# --- the registry -----------------------------------------------------------------------


class DistributionRegistry:
    """One ``docker-registry`` process; see the module docstring.

    ``users`` maps user names to passwords (htpasswd and token modes). The storage
    folder is ``workdir/storage``; the log is ``workdir/registry-PORT.log``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        auth: AuthMode = "open",
        users: Mapping[str, str] | None = None,
        anonymous_pull: bool = False,
        token_expires_in: int = 300,
        tls: Certificates | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.auth = auth
        self.users = dict(users or {})
        for password in self.users.values():
            secrets_guard.register_secret(password, "a password of a DistributionRegistry user")
        self.tls = tls
        self.port = 0
        self.token_server: TokenServer | None = None
        if auth == "token":
            self.token_server = TokenServer(
                self.workdir / "token",
                users=self.users,
                anonymous_pull=anonymous_pull,
                expires_in=token_expires_in,
            )
        self._process: ManagedProcess | None = None

    # --- addresses --------------------------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def storage_dir(self) -> Path:
        return self.workdir / "storage"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"registry-{self.port}.log"

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client TLS context trusting the registry (None for plain HTTP)."""
        if self.tls is None:
            return None
        return ssl.create_default_context(cafile=str(self.tls.ca_file))

    def credentials(self) -> tuple[str, str] | None:
        """The first user and password, if any (what the image pushers use)."""
        return next(iter(self.users.items()), None)

    # --- life cycle -------------------------------------------------------------------

    def _config(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {json.dumps(str(self.storage_dir))}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: {self.host}",
            f"  secret: {secrets.token_hex(16)}",
        ]
        if self.tls is not None:
            lines += [
                "  tls:",
                f"    certificate: {json.dumps(str(self.tls.server_cert_file))}",
                f"    key: {json.dumps(str(self.tls.server_key_file))}",
            ]
        if self.auth == "htpasswd":
            lines += [
                "auth:",
                "  htpasswd:",
                "    realm: test-registry",
                f"    path: {json.dumps(str(self._write_htpasswd()))}",
            ]
        elif self.auth == "token":
            assert self.token_server is not None
            lines += [
                "auth:",
                "  token:",
                f"    realm: {json.dumps(self.token_server.realm)}",
                f"    service: {SERVICE}",
                f"    issuer: {ISSUER}",
                f"    rootcertbundle: {json.dumps(str(self.token_server.root_cert_file))}",
            ]
        return "\n".join(lines) + "\n"

    def _write_htpasswd(self) -> Path:
        import bcrypt

        path = self.workdir / "htpasswd"
        entries = [
            f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}"
            for user, password in self.users.items()
        ]
        path.write_text("\n".join(entries) + "\n")
        return path

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        if self.token_server is not None:
            self.token_server.start()
        self.port = free_port()
        self._config_path.write_text(self._config())
        self._launch(timeout)

    @property
    def _config_path(self) -> Path:
        return self.workdir / f"config-{self.port}.yml"

    def restart(self, timeout: float = 30.0) -> None:
        """Stop the registry process and start it again on the same port and storage
        (after :meth:`TokenServer.rotate_key`, the tokens issued before are refused)."""
        if self._process is not None:
            self._process.stop()
            self._process = None
        self._launch(timeout)

    def _launch(self, timeout: float) -> None:
        binary = ensure_registry()
        self._process = ManagedProcess(
            [str(binary), "serve", str(self._config_path)], log_path=self.log_path, cwd=self.workdir
        )
        self._process.start()
        try:
            wait_until(self._ready, timeout, "the test registry")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        assert self._process is not None
        if not self._process.alive():
            raise RuntimeError(f"docker-registry exited:\n{self._process.log_tail()}")
        try:
            with urllib.request.urlopen(self.url + "/v2/", timeout=1, context=self.ssl_context()) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError as exc:
            return exc.code == 401

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
        if self.token_server is not None:
            self.token_server.stop()

    # --- faults -----------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        algorithm, _, hexdigest = digest.partition(":")
        return self.storage_dir / "docker/registry/v2/blobs" / algorithm / hexdigest[:2] / hexdigest / "data"

    def corrupt_blob(self, digest: str, offset: int = 0, replacement: bytes | None = None) -> None:
        """Overwrite one byte of the stored blob (its size stays the same): with
        ``replacement``, else with the byte's complement."""
        path = self.blob_path(digest)
        with path.open("r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(replacement[:1] if replacement else bytes([byte[0] ^ 0xFF]))

    def access_log(self) -> list[str]:
        """The registry's request log lines so far."""
        try:
            return [
                line for line in self.log_path.read_text(errors="replace").splitlines() if '"GET ' in line
            ]
        except OSError:
            return []


class BlobRedirector:
    """A front for a registry, as registries backed by object storage behave: every
    request is passed to the registry as it is (headers included), except ``GET`` and
    ``HEAD`` of a blob, answered ``307`` to ``target_base + "/" + blob_paths[digest]``
    (default ``blobs/<hex>``). A thread in the test process, on 127.0.0.1.
    ``blob_requests`` counts the blob requests it redirected."""

    def __init__(self, registry_url: str, target_base: str) -> None:
        self.registry_url = registry_url.rstrip("/")
        self.target_base = target_base.rstrip("/")
        self.blob_paths: dict[str, str] = {}
        self.blob_requests: Counter[str] = Counter()
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        import http.client

        owner = self
        registry = urllib.parse.urlsplit(self.registry_url)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _relay(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                if "/blobs/sha256:" in path and "/uploads/" not in path:
                    digest = path.rsplit("/", 1)[-1]
                    owner.blob_requests[digest] += 1
                    target = owner.blob_paths.get(digest, f"blobs/{digest.removeprefix('sha256:')}")
                    self.send_response(307)
                    self.send_header("Location", f"{owner.target_base}/{target}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection(registry.hostname or "", registry.port or 80, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                try:
                    conn.request(self.command, self.path, headers=headers)
                    resp = conn.getresponse()
                    body = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for name, value in resp.getheaders():
                    if name.lower() not in ("content-length", "connection", "transfer-encoding", "date"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = _relay
            do_HEAD = _relay

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="test-blob-redirector", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


if __name__ == "__main__":
    if sys.argv[1:] == ["install"]:
        print(ensure_registry())
    else:
        sys.exit("usage: python -m tests.servers.registry install")
