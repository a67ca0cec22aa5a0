"""The S3 backend against a real moto server (listing, ranged reads, errors, TLS,
credentials) and against a small HTTP server of our own for answers moto never gives
(rclone's 200 + Content-Range, 5xx, dropped connections, stale keep-alive)."""

from __future__ import annotations

import datetime
import hashlib
import http.server
import ipaddress
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from adapter.errors import (
    IntegrityError,
    SidecarError,
    StorageConfigError,
    StorageError,
    StorageNotFound,
    StoragePermissionDenied,
    StorageUnauthenticated,
    StorageUnavailable,
    UnsafePath,
)
from adapter.settings import Settings
from puller.config import StorageConfig
from puller.engine import PullEngine
from puller.model_key import ModelKey
from puller.pull import Puller
from puller.request import PullRequest
from puller.storage.base import Blob
from puller.storage.s3 import S3Storage
from tests.puller.conftest import make_settings
from tests.servers.process import free_port
from tests.servers.s3 import MotoS3Server

pytestmark = pytest.mark.integration

S3Factory = Callable[..., S3Storage]


@pytest.fixture
def make_s3(moto_s3: MotoS3Server, settings: Settings) -> Iterator[S3Factory]:
    made: list[S3Storage] = []

    def make(
        bucket: str | None, endpoint_url: str | None = None, settings: Settings = settings, **fields: Any
    ) -> S3Storage:
        config: dict[str, Any] = {
            "endpoint_url": endpoint_url or moto_s3.endpoint_url,
            "access_key_id": "some-key-id",
            "secret_access_key": "some-secret",
            "region": "us-east-1",
        }
        if bucket is not None:
            config["bucket"] = bucket
        config.update(fields)
        storage = S3Storage(StorageConfig(type="s3", fields=config), settings)
        made.append(storage)
        return storage

    yield make
    for storage in made:
        storage.close()


@pytest.fixture
def engine(settings: Settings) -> Iterator[PullEngine]:
    eng = PullEngine(settings)
    yield eng
    eng.close()


def read_all(storage: S3Storage, blob: Blob, start: int = 0, end: int | None = None) -> bytes:
    stop = blob.size if end is None else end
    stream = storage.open_range(blob, start, stop)
    out = bytearray()
    buffer = memoryview(bytearray(4096))
    try:
        while True:
            count = stream.readinto(buffer)
            if not count:
                break
            out += buffer[:count]
    finally:
        stream.close()
    return bytes(out)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- listing and fetching ----------------------------------------------------------------


def test_single_object(
    moto_s3: MotoS3Server,
    bucket: str,
    make_s3: S3Factory,
    engine: PullEngine,
    settings: Settings,
    tmp_path: Path,
) -> None:
    data = os.urandom(5 * settings.pull_part_bytes + 777)
    moto_s3.put_object(bucket, "models/m.bin", data)
    moto_s3.put_object(bucket, "models/m.bin.bak", b"not me")
    moto_s3.put_object(bucket, "models/m.bin/inner", b"nor me: the exact key wins")
    storage = make_s3(bucket)

    plan = storage.plan("models/m.bin")

    assert plan.single_object
    assert [(b.name, b.relpath, b.size) for b in plan.blobs] == [("models/m.bin", "m.bin", len(data))]
    assert plan.blobs[0].version == hashlib.md5(data).hexdigest()
    assert storage.plan("/models/m.bin") == plan
    engine.fetch(storage, plan, tmp_path / "out", threading.Event())
    assert hashlib.sha256((tmp_path / "out" / "m.bin").read_bytes()).digest() == hashlib.sha256(data).digest()


def test_prefix_with_nested_folders_markers_and_odd_names(
    moto_s3: MotoS3Server, bucket: str, make_s3: S3Factory, engine: PullEngine, tmp_path: Path
) -> None:
    files = {
        "a.txt": b"alpha",
        "sub/b.bin": os.urandom(200_000),
        "sub/deeper/c.bin": os.urandom(1000),
        "empty.txt": b"",
        "dir with space/ü ñ 模型.txt": b"unicode",
        "plus+percent%20.txt": b"odd",
    }
    for rel, data in files.items():
        moto_s3.put_object(bucket, f"model/{rel}", data)
    moto_s3.put_object(bucket, "model/sub/", b"")  # folder marker
    moto_s3.put_object(bucket, "model/old_$folder$", b"")  # hadoop folder marker
    moto_s3.put_object(bucket, "model-other/z.txt", b"sibling")
    moto_s3.put_object(bucket, "modelx", b"sibling")
    storage = make_s3(bucket)

    plan = storage.plan("model")

    assert not plan.single_object
    assert sorted(b.relpath for b in plan.blobs) == sorted(files)
    assert storage.plan("model/") == plan
    engine.fetch(storage, plan, tmp_path / "out", threading.Event())
    assert tree(tmp_path / "out") == files


def test_whole_bucket(moto_s3: MotoS3Server, bucket: str, make_s3: S3Factory) -> None:
    moto_s3.put_object(bucket, "x.txt", b"x")
    moto_s3.put_object(bucket, "d/y.txt", b"y")
    storage = make_s3(bucket)
    for path in ("", "/"):
        plan = storage.plan(path)
        assert not plan.single_object
        assert sorted(b.relpath for b in plan.blobs) == ["d/y.txt", "x.txt"]


def test_ranges_are_checked_and_connections_reused(
    moto_s3: MotoS3Server, bucket: str, make_s3: S3Factory
) -> None:
    data = os.urandom(10_000)
    moto_s3.put_object(bucket, "m.bin", data)
    storage = make_s3(bucket)
    (blob,) = storage.plan("m.bin").blobs
    assert read_all(storage, blob, 1000, 3000) == data[1000:3000]
    assert read_all(storage, blob, 9999) == data[9999:]
    assert read_all(storage, blob) == data

    # the object changed after it was listed: its size no longer matches
    moto_s3.put_object(bucket, "m.bin", data + b"more")
    with pytest.raises(IntegrityError, match="changed"):
        read_all(storage, blob)
    moto_s3.client().delete_object(Bucket=bucket, Key="m.bin")
    with pytest.raises(StorageNotFound, match=bucket):
        read_all(storage, blob)


def test_missing_bucket_and_missing_path(moto_s3: MotoS3Server, bucket: str, make_s3: S3Factory) -> None:
    with pytest.raises(StorageNotFound, match="no-such-bucket-here"):
        make_s3("no-such-bucket-here").plan("models/m")
    moto_s3.put_object(bucket, "models/other.bin", b"x")
    with pytest.raises(StorageNotFound) as info:
        make_s3(bucket).plan("models/m")
    assert bucket in str(info.value)
    assert "models/m" in str(info.value)
    # only folder markers under the prefix: nothing to fetch
    moto_s3.put_object(bucket, "markers/", b"")
    moto_s3.put_object(bucket, "markers/sub/", b"")
    with pytest.raises(StorageNotFound):
        make_s3(bucket).plan("markers")


def test_a_config_without_bucket(make_s3: S3Factory) -> None:
    with pytest.raises(StorageConfigError, match="s3 storage config has no bucket"):
        make_s3(None).plan("m")


def test_identity_names_endpoint_and_bucket_only(make_s3: S3Factory) -> None:
    storage = make_s3("bkt", endpoint_url="http://user:pw@minio.local:9000/")
    assert storage.identity() == "s3:http://minio.local:9000/bkt"
    assert make_s3("bkt", endpoint_url="minio.local:9000").identity() == "s3:https://minio.local:9000/bkt"


def test_anonymous_access(moto_s3: MotoS3Server, bucket: str, make_s3: S3Factory) -> None:
    moto_s3.client().put_object(Bucket=bucket, Key="public/m.bin", Body=b"public bytes", ACL="public-read")
    storage = make_s3(bucket, anonymous="true", access_key_id="", secret_access_key="")
    (blob,) = storage.plan("public/m.bin").blobs
    assert read_all(storage, blob) == b"public bytes"


def test_unreachable_endpoint_is_unavailable(make_s3: S3Factory, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, pull_timeout_seconds=1.0)
    storage = make_s3("bkt", endpoint_url=f"http://127.0.0.1:{free_port()}", settings=settings)
    with pytest.raises(StorageUnavailable):
        storage.plan("m")
    with pytest.raises(StorageUnavailable):
        storage.open_range(Blob("m", "m", 10), 0, 10)


# --- an object key leading outside ROOT_MODEL_DIR ------------------------------------------


async def test_a_key_with_dotdot_is_refused_and_nothing_is_written(
    moto_s3: MotoS3Server, bucket: str, tmp_path: Path
) -> None:
    moto_s3.put_object(bucket, "model/ok.txt", b"ok")
    moto_s3.put_object(bucket, "model/../../../evil.txt", b"evil")
    settings = make_settings(tmp_path / "box")
    settings.storage_config_dir.mkdir(parents=True)
    (settings.storage_config_dir / "default").write_text(
        json.dumps(
            {
                "type": "s3",
                "endpoint_url": moto_s3.endpoint_url,
                "access_key_id": "k",
                "secret_access_key": "s",
                "bucket": bucket,
            }
        )
    )
    puller = Puller(settings)
    puller.start()
    try:
        with pytest.raises(UnsafePath, match="evil"):
            await puller.pull(PullRequest(model_id="m1", model_path="model", model_key=ModelKey()))
    finally:
        puller.close()
    assert not list(tmp_path.rglob("evil.txt"))
    assert not (settings.root_model_dir / "m1").exists()
    assert list((settings.root_model_dir / "_tmp").iterdir()) == []


# --- credentials -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A second moto server that checks credentials, with a bucket, a user allowed to
    use S3 and a user allowed nothing."""
    server = MotoS3Server(log_dir=tmp_path_factory.mktemp("moto-auth-logs"))
    server.start()
    try:
        server.create_bucket("locked")
        server.put_object("locked", "m.bin", b"secret model")
        iam = server.client("iam")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps(policy))
        reader = iam.create_access_key(UserName="reader")["AccessKey"]
        iam.create_user(UserName="nobody")
        nobody = iam.create_access_key(UserName="nobody")["AccessKey"]
        server.require_auth()
        yield {"server": server, "reader": reader, "nobody": nobody}
    finally:
        server.stop()


def assert_no_secret(exc: SidecarError, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in str(exc)
        assert secret not in repr(exc.args)


def test_wrong_credentials(moto_auth: dict[str, Any], make_s3: S3Factory) -> None:
    server: MotoS3Server = moto_auth["server"]
    reader, nobody = moto_auth["reader"], moto_auth["nobody"]
    endpoint = server.endpoint_url

    good = make_s3(
        "locked",
        endpoint_url=endpoint,
        access_key_id=reader["AccessKeyId"],
        secret_access_key=reader["SecretAccessKey"],
    )
    assert [b.relpath for b in good.plan("m.bin").blobs] == ["m.bin"]

    unknown = make_s3(
        "locked",
        endpoint_url=endpoint,
        access_key_id="AKIAUNKNOWNKEY000000",
        secret_access_key="unknown-secret-value",
    )
    with pytest.raises(StorageUnauthenticated) as info:
        unknown.plan("m.bin")
    assert "InvalidAccessKeyId" in str(info.value)
    assert_no_secret(info.value, "unknown-secret-value", "AKIAUNKNOWNKEY000000")

    wrong_secret = make_s3(
        "locked",
        endpoint_url=endpoint,
        access_key_id=reader["AccessKeyId"],
        secret_access_key="not-the-right-secret",
    )
    with pytest.raises(StorageUnauthenticated) as info:
        wrong_secret.plan("m.bin")
    assert "SignatureDoesNotMatch" in str(info.value)
    assert_no_secret(info.value, "not-the-right-secret", reader["SecretAccessKey"], reader["AccessKeyId"])

    denied = make_s3(
        "locked",
        endpoint_url=endpoint,
        access_key_id=nobody["AccessKeyId"],
        secret_access_key=nobody["SecretAccessKey"],
    )
    with pytest.raises(StoragePermissionDenied) as refused:
        denied.plan("m.bin")
    assert "locked" in str(refused.value)
    assert_no_secret(refused.value, nobody["SecretAccessKey"], nobody["AccessKeyId"])


# --- TLS with an inline CA certificate ----------------------------------------------------------


def _make_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelmesh-sidecar test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_file, key_file, ca_file = folder / "server.pem", folder / "server.key", folder / "ca.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return cert_file, key_file, ca_file


@pytest.fixture(scope="module")
def moto_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3Server]:
    folder = tmp_path_factory.mktemp("tls")
    server = MotoS3Server(log_dir=folder, tls=_make_tls(folder / "certs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_https_with_an_inline_ca_certificate(
    moto_tls: MotoS3Server, make_s3: S3Factory, engine: PullEngine, settings: Settings, tmp_path: Path
) -> None:
    assert moto_tls.tls is not None
    moto_tls.create_bucket("tls-bucket")
    data = os.urandom(3 * settings.pull_part_bytes + 5)
    moto_tls.put_object("tls-bucket", "m/weights.bin", data)
    pem = moto_tls.tls[2].read_text()

    storage = make_s3("tls-bucket", endpoint_url=moto_tls.endpoint_url, certificate=pem)
    plan = storage.plan("m")
    engine.fetch(storage, plan, tmp_path / "out", threading.Event())
    assert (tmp_path / "out" / "weights.bin").read_bytes() == data
    # boto3 got the CA as a file, written under ROOT_MODEL_DIR/_certs only
    digest = hashlib.sha256(pem.strip().encode()).hexdigest()
    assert (settings.root_model_dir / "_certs" / f"{digest}.pem").is_file()
    assert [p.name for p in (settings.root_model_dir / "_certs").iterdir()] == [f"{digest}.pem"]

    untrusting = make_s3("tls-bucket", endpoint_url=moto_tls.endpoint_url)
    with pytest.raises(StorageError, match=r"TLS|certificate") as info:
        untrusting.plan("m")
    assert not isinstance(info.value, StorageUnavailable), "an untrusted certificate is not transient"
    with pytest.raises(StorageError, match="TLS") as info:
        untrusting.open_range(plan.blobs[0], 0, 10)
    assert not isinstance(info.value, StorageUnavailable)

    with pytest.raises(StorageConfigError, match="certificate"):
        make_s3("tls-bucket", endpoint_url=moto_tls.endpoint_url, certificate="not a pem").open_range(
            plan.blobs[0], 0, 10
        )


# --- the byte path against answers moto does not give ------------------------------------------


class ScriptedS3(http.server.ThreadingHTTPServer):
    """Answers each GET with ``self.answer(handler, range_start, range_end)``."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.answer: Callable[[_ScriptedHandler, int, int], None] = _answer_206
        self.data = b""
        self.connections: set[tuple[str, int]] = set()
        self.requests = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ScriptedHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ScriptedS3

    def do_GET(self) -> None:
        self.server.connections.add(self.client_address)
        self.server.requests += 1
        first, last = self.headers["Range"].removeprefix("bytes=").split("-")
        self.server.answer(self, int(first), int(last) + 1)

    def send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


def _answer_206(h: _ScriptedHandler, start: int, end: int) -> None:
    data = h.server.data
    h.send(206, data[start:end], {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"})


@pytest.fixture
def scripted() -> Iterator[ScriptedS3]:
    server = ScriptedS3()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _error_body(code: str) -> bytes:
    return f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>m</Message></Error>".encode()


def test_rclone_style_200_with_content_range(scripted: ScriptedS3, make_s3: S3Factory) -> None:
    scripted.data = os.urandom(5000)

    def answer(h: _ScriptedHandler, start: int, end: int) -> None:
        h.send(
            200, scripted.data[start:end], {"Content-Range": f"bytes {start}-{end - 1}/{len(scripted.data)}"}
        )

    scripted.answer = answer
    storage = make_s3("bkt", endpoint_url=scripted.endpoint_url)
    blob = Blob("m.bin", "m.bin", len(scripted.data))
    assert read_all(storage, blob, 100, 2000) == scripted.data[100:2000]
    assert read_all(storage, blob, 2000) == scripted.data[2000:]
    assert len(scripted.connections) == 1, "one keep-alive connection serves every range"


def test_a_server_ignoring_ranges(scripted: ScriptedS3, make_s3: S3Factory) -> None:
    scripted.data = os.urandom(5000)
    scripted.answer = lambda h, start, end: h.send(200, scripted.data)
    storage = make_s3("bkt", endpoint_url=scripted.endpoint_url)
    blob = Blob("m.bin", "m.bin", len(scripted.data))
    assert read_all(storage, blob) == scripted.data  # the whole object was asked: fine
    with pytest.raises(StorageError, match="ignored the byte range"):
        storage.open_range(blob, 10, 20)


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        (403, "AccessDenied", StoragePermissionDenied),
        (403, "SignatureDoesNotMatch", StorageUnauthenticated),
        (403, "InvalidAccessKeyId", StorageUnauthenticated),
        (404, "NoSuchKey", StorageNotFound),
        (404, "NoSuchBucket", StorageNotFound),
        (416, "InvalidRange", IntegrityError),
        (500, "InternalError", StorageUnavailable),
        (503, "SlowDown", StorageUnavailable),
        (400, "BadRequest", StorageError),
    ],
)
def test_http_errors_are_translated(
    scripted: ScriptedS3, make_s3: S3Factory, status: int, code: str, error: type[SidecarError]
) -> None:
    scripted.answer = lambda h, start, end: h.send(status, _error_body(code))
    storage = make_s3("bkt", endpoint_url=scripted.endpoint_url, secret_access_key="very-secret-value")
    with pytest.raises(error) as info:
        storage.open_range(Blob("m.bin", "m.bin", 100), 0, 100)
    assert type(info.value) is error or issubclass(type(info.value), error)
    assert "bkt" in str(info.value)
    assert "very-secret-value" not in str(info.value)
    # the connection was in an unknown state: the next request opens a new one
    scripted.data = b"x" * 100
    scripted.answer = _answer_206
    assert read_all(storage, Blob("m.bin", "m.bin", 100)) == scripted.data


def test_bad_range_answers(scripted: ScriptedS3, make_s3: S3Factory) -> None:
    scripted.data = os.urandom(1000)
    storage = make_s3("bkt", endpoint_url=scripted.endpoint_url)
    blob = Blob("m.bin", "m.bin", 1000)
    scripted.answer = lambda h, start, end: h.send(
        206, scripted.data[start + 1 : end + 1], {"Content-Range": f"bytes {start + 1}-{end}/1000"}
    )
    with pytest.raises(StorageUnavailable, match="were asked"):
        storage.open_range(blob, 0, 100)
    scripted.answer = lambda h, start, end: h.send(206, scripted.data[start:end])
    with pytest.raises(StorageUnavailable, match="without Content-Range"):
        storage.open_range(blob, 0, 100)
    scripted.answer = lambda h, start, end: h.send(
        206,
        scripted.data[start:end],
        {"Content-Range": f"bytes {start}-{end - 1}/1000", "Content-Length": "5"},
    )
    with pytest.raises(StorageUnavailable, match="announced 5 bytes"):
        storage.open_range(blob, 0, 100)


def test_a_connection_dropped_mid_body(scripted: ScriptedS3, make_s3: S3Factory) -> None:
    scripted.data = os.urandom(10_000)

    def answer(h: _ScriptedHandler, start: int, end: int) -> None:
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(scripted.data)}")
        h.send_header("Content-Length", str(end - start))
        h.end_headers()
        h.wfile.write(scripted.data[start : start + 100])
        h.wfile.flush()
        h.close_connection = True

    scripted.answer = answer
    storage = make_s3("bkt", endpoint_url=scripted.endpoint_url)
    with pytest.raises(StorageUnavailable):
        read_all(storage, Blob("m.bin", "m.bin", len(scripted.data)))


def test_a_stale_keep_alive_connection_is_replaced(scripted: ScriptedS3, make_s3: S3Factory) -> None:
    scripted.data = os.urandom(1000)

    def answer_then_hang_up(h: _ScriptedHandler, start: int, end: int) -> None:
        _answer_206(h, start, end)
        h.close_connection = True  # closes without saying "Connection: close"

    scripted.answer = answer_then_hang_up
    storage = make_s3("bkt", endpoint_url=scripted.endpoint_url)
    blob = Blob("m.bin", "m.bin", 1000)
    for _ in range(3):
        time.sleep(0.05)  # let the server's close reach us
        assert read_all(storage, blob) == scripted.data
    assert scripted.requests == 3


def test_a_silent_server_times_out(scripted: ScriptedS3, make_s3: S3Factory, tmp_path: Path) -> None:
    release = threading.Event()

    def hang(h: _ScriptedHandler, start: int, end: int) -> None:
        release.wait(5)

    scripted.answer = hang
    settings = make_settings(tmp_path, pull_timeout_seconds=0.5)
    storage = make_s3("bkt", endpoint_url=scripted.endpoint_url, settings=settings)
    started = time.monotonic()
    try:
        with pytest.raises(StorageUnavailable, match="Timeout"):
            storage.open_range(Blob("m.bin", "m.bin", 10), 0, 10)
    finally:
        release.set()
    assert time.monotonic() - started < 3
