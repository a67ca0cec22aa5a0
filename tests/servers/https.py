"""A local HTTP(S) file server for the ``http`` storage tests, and the certificates it
uses.

:class:`FileServer` starts ``python -m tests.servers.https serve DIR ...`` (this very
module) on 127.0.0.1 on a free port, in its own process group, and stops it by PID. The
server serves the files under ``DIR`` over HTTP/1.1 with keep-alive, ``HEAD``, single
byte ranges (``206``, ``416``), ``ETag`` and ``Last-Modified``; plain HTTP bodies go out
with ``sendfile``, so a 200 MiB object is served at disk speed.

Behaviour fixed for the whole process comes from flags: ``--tls CERT KEY`` (HTTPS),
``--client-ca CA`` (mutual TLS: a client certificate signed by CA is required at the
handshake), ``--require-header 'Name: value'`` (a missing header answers 401, a wrong
value 403). Faults are chosen per request by directives at the start of the URL path,
so one session-wide server serves every test without any state shared between tests
(each test uses paths of its own)::

    /_fail/N/...       the first N requests (any method) for this URL answer 500
    /_failget/N/...    the first N GETs for this URL answer 500
    /_status/CODE/...  always answer CODE
    /_cut/N/...        the first N GETs send half of their body, then close the connection
    /_norange/...      ignore Range headers, never send Accept-Ranges
    /_quiet/...        honour ranges without announcing Accept-Ranges
    /_nolength/...     GET bodies are chunked, without Content-Length (HEAD: no length)
    /_nohead/...       HEAD answers 405
    /_redirect/N/...   302 to the same URL with N-1 (0: the rest of the path)
    /_loop/...         302 to itself
    /_cross/...        302 to the rest of the path on host ``localhost`` (same server)
    /_to/PORT/...      302 to ``http://127.0.0.1:PORT/`` + the rest of the path
    /_via/...          302 to the URL written in the file the rest of the path names

Directives combine (``/_fail/2/_norange/model.bin``); counters are per URL path, query
included. ``--request-log FILE`` appends one JSON line per request (method, target,
headers, status) for the tests to inspect.

:func:`make_pki` writes a test CA, a server certificate for 127.0.0.1 and localhost, a
client certificate, and a second CA nobody trusts, with ``cryptography``.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import http.server
import json
import os
import socket
import ssl
import sys
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.servers.process import ManagedProcess, free_port, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
_CHUNK = 256 * 1024

# --- certificates -----------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """PEM files and texts of the test certificates (all under one folder)."""

    folder: Path
    ca_file: Path
    ca_pem: str
    server_cert_file: Path
    server_key_file: Path
    client_cert_pem: str
    client_key_pem: str
    other_ca_pem: str


def make_pki(folder: Path) -> Certificates:
    """Create a CA, a server certificate (IP 127.0.0.1, DNS localhost) and a client
    certificate signed by it, and an unrelated CA, as PEM files under ``folder``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()

    def cert_pem(cert: x509.Certificate) -> str:
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    def make_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def make_leaf(
        ca_key: ec.EllipticCurvePrivateKey,
        ca_cert: x509.Certificate,
        name: str,
        usage: x509.ObjectIdentifier,
        san: list[x509.GeneralName] | None,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = make_ca("modelmesh-sidecar test CA")
    server_key, server_cert = make_leaf(
        ca_key,
        ca_cert,
        "127.0.0.1",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
    )
    client_key, client_cert = make_leaf(
        ca_key, ca_cert, "modelmesh-sidecar test client", ExtendedKeyUsageOID.CLIENT_AUTH, None
    )
    _, other_ca = make_ca("an unrelated CA")

    pki = Certificates(
        folder=folder,
        ca_file=folder / "ca.pem",
        ca_pem=cert_pem(ca_cert),
        server_cert_file=folder / "server.pem",
        server_key_file=folder / "server-key.pem",
        client_cert_pem=cert_pem(client_cert),
        client_key_pem=key_pem(client_key),
        other_ca_pem=cert_pem(other_ca),
    )
    # imported here: this module also runs as the file server process, which needs no pytest
    from tests import secrets_guard

    secrets_guard.register_secret(key_pem(server_key), "the test server's TLS private key (make_pki)")
    secrets_guard.register_secret(pki.client_key_pem, "the test client's TLS private key (make_pki)")
    pki.ca_file.write_text(pki.ca_pem)
    pki.server_cert_file.write_text(cert_pem(server_cert))
    pki.server_key_file.write_text(key_pem(server_key))
    pki.server_key_file.chmod(0o600)
    return pki


# --- the launcher -----------------------------------------------------------------------


class FileServer:
    """One file server process serving ``root``; see the module docstring.

    ``start()`` waits until ``GET /_health`` answers. With ``tls`` it serves HTTPS
    with the PKI's server certificate; ``client_cert_required`` asks for a client
    certificate signed by the PKI's CA.
    """

    def __init__(
        self,
        root: Path,
        log_dir: Path,
        *,
        tls: Certificates | None = None,
        client_cert_required: bool = False,
        required_header: tuple[str, str] | None = None,
    ) -> None:
        self.root = root
        self.tls = tls
        self.client_cert_required = client_cert_required
        self.required_header = required_header
        if required_header is not None:
            from tests import secrets_guard

            secrets_guard.register_secret(required_header[1], "the header token a FileServer requires")
        self.port = 0
        self._log_dir = log_dir
        self._process: ManagedProcess | None = None

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def request_log_path(self) -> Path:
        return self._log_dir / f"requests-{self.port}.jsonl"

    def put(self, key: str, data: bytes) -> Path:
        """Write ``data`` at ``key`` (``/``-separated, relative to the root)."""
        path = self.root.joinpath(*key.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def requests(self, path_contains: str = "") -> list[dict[str, Any]]:
        """The requests served so far whose target contains ``path_contains``."""
        try:
            lines = self.request_log_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        entries = [json.loads(line) for line in lines if line.strip()]
        return [e for e in entries if path_contains in e["target"]]

    def start(self, timeout: float = 20.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        argv = [
            sys.executable,
            "-m",
            "tests.servers.https",
            "serve",
            str(self.root),
            "--port",
            str(self.port),
        ]
        argv += ["--request-log", str(self.request_log_path)]
        if self.tls is not None:
            argv += ["--tls", str(self.tls.server_cert_file), str(self.tls.server_key_file)]
            if self.client_cert_required:
                argv += ["--client-ca", str(self.tls.ca_file)]
        if self.required_header is not None:
            argv += ["--require-header", f"{self.required_header[0]}: {self.required_header[1]}"]
        self._process = ManagedProcess(
            argv, log_path=self._log_dir / f"file-server-{self.port}.log", cwd=REPO_ROOT
        )
        self._process.start()
        try:
            wait_until(self._ready, timeout, "the test file server")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        assert self._process is not None
        if not self._process.alive():
            raise RuntimeError(f"the file server exited:\n{self._process.log_tail()}")
        if self.tls is None:
            context = None
        else:
            context = ssl.create_default_context(cafile=str(self.tls.ca_file))
            if self.client_cert_required:
                cert = self._log_dir / "health-client.pem"
                cert.write_text(self.tls.client_cert_pem + self.tls.client_key_pem)
                cert.chmod(0o600)
                context.load_cert_chain(str(cert))
        with urllib.request.urlopen(self.base_url + "/_health", timeout=1, context=context) as resp:
            return bool(resp.status == 200)

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None


# --- the server (runs in the subprocess) -----------------------------------------------


class _Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int], int] = {}

    def next(self, target: str, index: int) -> int:
        """How many times this directive of this URL fired before (then count one)."""
        with self._lock:
            seen = self._seen.get((target, index), 0)
            self._seen[(target, index)] = seen + 1
            return seen


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        port: int,
        root: Path,
        *,
        context: ssl.SSLContext | None,
        required_header: tuple[str, str] | None,
        request_log: Path | None,
    ) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.root = root.resolve()
        self.context = context
        self.required_header = required_header
        self.counters = _Counters()
        self.log_lock = threading.Lock()
        self.request_log = request_log.open("a", encoding="utf-8") if request_log else None

    def handle_error(self, request: Any, client_address: Any) -> None:
        kind, value = sys.exc_info()[:2]
        print(f"request from {client_address} failed: {kind.__name__ if kind else '?'}: {value}", flush=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        if self.server.context is not None:
            self.request = self.server.context.wrap_socket(self.request, server_side=True)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # --- plumbing ---------------------------------------------------------------------

    def _log(self, status: int) -> None:
        if self.server.request_log is None:
            return
        entry = {"method": self.command, "target": self.path, "headers": list(self.headers.items())}
        entry["status"] = status
        with self.server.log_lock:
            self.server.request_log.write(json.dumps(entry) + "\n")
            self.server.request_log.flush()

    def _answer(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self._log(status)
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    # --- one request ------------------------------------------------------------------

    def _serve(self) -> None:
        target = self.path
        raw_path, _, query = target.partition("?")
        segments = raw_path.lstrip("/").split("/")
        if segments == ["_health"]:
            self._answer(200, body=b"ok")
            return
        required = self.server.required_header
        if required is not None:
            got = self.headers.get(required[0])
            if got is None:
                self._answer(401, {"WWW-Authenticate": "Token"}, b"a token is required")
                return
            if got != required[1]:
                self._answer(403, body=b"wrong token")
                return
        flags: set[str] = set()
        cut = False
        index = 0
        while segments and segments[0].startswith("_"):
            directive = segments.pop(0)
            index += 1
            rest = "/" + "/".join(segments) + (f"?{query}" if query else "")
            if directive in ("_norange", "_quiet", "_nolength", "_nohead"):
                flags.add(directive)
            elif directive == "_loop":
                self._answer(302, {"Location": target})
                return
            elif directive == "_cross":
                scheme = "https" if self.server.context is not None else "http"
                self._answer(302, {"Location": f"{scheme}://localhost:{self.server.server_address[1]}{rest}"})
                return
            elif directive == "_via":
                link = self.server.root / urllib.parse.unquote("/".join(segments))
                try:
                    location = link.read_text().strip()
                except OSError:
                    self._answer(404, body=b"no such link")
                    return
                self._answer(302, {"Location": location})
                return
            elif directive == "_to":
                port = segments.pop(0)
                rest = "/" + "/".join(segments) + (f"?{query}" if query else "")
                self._answer(302, {"Location": f"http://127.0.0.1:{port}{rest}"})
                return
            elif directive in ("_fail", "_failget", "_status", "_cut", "_redirect"):
                number = int(segments.pop(0))
                rest = "/" + "/".join(segments) + (f"?{query}" if query else "")
                if directive == "_status":
                    self._answer(number, body=b"as asked")
                    return
                if directive == "_redirect":
                    location = f"/_redirect/{number - 1}{rest}" if number > 1 else rest
                    self._answer(302, {"Location": location})
                    return
                counts = directive == "_fail" or (directive == "_failget" and self.command == "GET")
                if counts and self.server.counters.next(target, index) < number:
                    self._answer(500, body=b"failing as asked")
                    return
                if directive == "_cut" and self.command == "GET":
                    cut = self.server.counters.next(target, index) < number
            else:
                self._answer(400, body=b"unknown directive")
                return
        if "_nohead" in flags and self.command == "HEAD":
            self._answer(405, {"Allow": "GET"})
            return
        self._send_file(urllib.parse.unquote("/".join(segments)), flags, cut)

    def _send_file(self, relpath: str, flags: set[str], cut: bool) -> None:
        path = (self.server.root / relpath).resolve()
        if not path.is_relative_to(self.server.root) or not path.is_file():
            self._answer(404, body=b"no such file")
            return
        st = path.stat()
        size = st.st_size
        headers = {
            "ETag": f'"{st.st_ino:x}-{size:x}-{st.st_mtime_ns:x}"',
            "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
            "Content-Type": "application/octet-stream",
        }
        ranges = not flags & {"_norange", "_nolength"}
        if ranges and "_quiet" not in flags:
            headers["Accept-Ranges"] = "bytes"
        status, start, end = 200, 0, size
        asked = self.headers.get("Range")
        if ranges and asked:
            parsed = _parse_range(asked, size)
            if parsed is None:
                self._answer(416, {**headers, "Content-Range": f"bytes */{size}"})
                return
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        chunked = "_nolength" in flags
        self._log(status)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if chunked:
            if self.command == "GET":
                self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        count = end - start
        if cut:
            count //= 2
        with path.open("rb") as f:
            if chunked:
                self._send_chunked(f, start, count)
            else:
                self._send_body(f, start, count)
        if cut:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        elif chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _send_body(self, f: Any, offset: int, count: int) -> None:
        self.wfile.flush()
        if self.server.context is None:
            sock_fd = self.connection.fileno()
            while count > 0:
                sent = os.sendfile(sock_fd, f.fileno(), offset, min(count, 64 * 1024 * 1024))
                if sent <= 0:
                    return
                offset += sent
                count -= sent
            return
        f.seek(offset)
        buffer = memoryview(bytearray(_CHUNK))
        while count > 0:
            got = f.readinto(buffer[: min(count, _CHUNK)])
            if not got:
                return
            self.connection.sendall(buffer[:got])
            count -= got

    def _send_chunked(self, f: Any, offset: int, count: int) -> None:
        f.seek(offset)
        while count > 0:
            data = f.read(min(count, 64 * 1024))
            if not data:
                return
            self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
            count -= len(data)


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``[start, end)`` of a single ``bytes=`` range, or None when unsatisfiable."""
    unit, _, spec = value.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    if not first:
        suffix = int(last)
        if suffix <= 0 or size == 0:
            return None
        return max(0, size - suffix), size
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if start >= size or end <= start:
        return None
    return start, end


def _serve(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.servers.https serve")
    parser.add_argument("root", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument("--client-ca")
    parser.add_argument("--require-header")
    parser.add_argument("--request-log", type=Path)
    args = parser.parse_args(argv)
    context = None
    if args.tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls[0], args.tls[1])
        if args.client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(args.client_ca)
    required = None
    if args.require_header:
        name, _, value = args.require_header.partition(":")
        required = (name.strip(), value.strip())
    server = _Server(
        args.port, args.root, context=context, required_header=required, request_log=args.request_log
    )
    print(f"serving {args.root} on port {args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "serve":
        sys.exit("usage: python -m tests.servers.https serve ROOT --port PORT [options]")
    _serve(sys.argv[2:])
