"""The S3 backend against real servers: moto (listing, ranged reads, errors, TLS,
checksums, addressing, proxies) and ``rclone serve s3``, which checks credentials on
every request (static keys, the default chain, profiles, anonymous); and against a
small HTTP server of our own for answers moto never gives (rclone's 200 +
Content-Range, 5xx, dropped connections, stale keep-alive)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import http.server
import ipaddress
import json
import os
import subprocess
import sys
import threading
import time
import uuid
import zlib
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
from puller.storage.s3 import (
    CHECKSUM_HEAD_MIN_BYTES,
    S3Storage,
    boto_proxies,
    etag_is_opaque,
    full_object_checksums,
    is_md5_etag,
)
from tests.puller.conftest import make_settings
from tests.servers.process import free_port, running
from tests.servers.rclone import RcloneS3Server
from tests.servers.s3 import CountingProxy, MotoS3Server

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
    assert plan.blobs[0].checksums["md5"] == hashlib.md5(data).hexdigest()
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
    with running(server):
        yield server


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


def test_https_with_a_ca_file(
    moto_tls: MotoS3Server, make_s3: S3Factory, settings: Settings, tmp_path: Path
) -> None:
    assert moto_tls.tls is not None
    moto_tls.create_bucket("tls-file-bucket")
    moto_tls.put_object("tls-file-bucket", "m.bin", b"over tls")
    storage = make_s3(
        "tls-file-bucket", endpoint_url=moto_tls.endpoint_url, certificate_file=str(moto_tls.tls[2])
    )
    (blob,) = storage.plan("m.bin").blobs
    assert read_all(storage, blob) == b"over tls"
    assert not (settings.root_model_dir / "_certs").exists(), "a CA file is used where it is"

    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(StorageConfigError, match=r"no-such-ca\.pem"):
        make_s3("tls-file-bucket", endpoint_url=moto_tls.endpoint_url, certificate_file=str(missing)).plan(
            "m.bin"
        )
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate")
    with pytest.raises(StorageConfigError, match="certificate"):
        make_s3("tls-file-bucket", endpoint_url=moto_tls.endpoint_url, certificate_file=str(not_pem)).plan(
            "m.bin"
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


# --- the storage config ----------------------------------------------------------------------


def s3_config(**fields: Any) -> StorageConfig:
    return StorageConfig(type="s3", fields=fields)


def test_fields_are_checked_before_anything_is_contacted(settings: Settings) -> None:
    with pytest.raises(StorageConfigError, match="secret_access_key is missing"):
        S3Storage(s3_config(bucket="b", access_key_id="AKIAONLYTHEKEY"), settings)
    with pytest.raises(StorageConfigError, match="access_key_id is missing"):
        S3Storage(s3_config(bucket="b", secret_access_key="lonely-secret"), settings)
    with pytest.raises(StorageConfigError, match="not both"):
        S3Storage(s3_config(bucket="b", certificate="PEM", certificate_file="/ca.pem"), settings)
    with pytest.raises(StorageConfigError, match="addressing_style 'sideways'"):
        S3Storage(s3_config(bucket="b", addressing_style="sideways"), settings)
    # anonymous ignores whatever keys are left in the entry
    S3Storage(s3_config(bucket="b", anonymous="true", access_key_id="AKIAONLYTHEKEY"), settings)


def test_options_never_show_secrets(settings: Settings) -> None:
    storage = S3Storage(
        s3_config(
            bucket="b",
            access_key_id=" AKIAKEYWITHSPACE ",
            secret_access_key="the-secret-value\n",
            session_token="the-session-token",
            certificate="-----BEGIN CERTIFICATE-----",
        ),
        settings,
    )
    assert storage.options.access_key_id == "AKIAKEYWITHSPACE"  # a pasted newline is harmless
    assert storage.options.secret_access_key == "the-secret-value"
    text = repr(storage.options) + repr(storage.config)
    for secret in ("AKIAKEYWITHSPACE", "the-secret-value", "the-session-token", "BEGIN CERTIFICATE"):
        assert secret not in text


def test_empty_fields_count_as_absent(settings: Settings) -> None:
    options = S3Storage(
        s3_config(
            bucket="b",
            access_key_id="",
            secret_access_key="  ",
            session_token="",
            profile="",
            endpoint_url="",
        ),
        settings,
    ).options
    assert (options.access_key_id, options.secret_access_key, options.session_token, options.profile) == (
        None,
        None,
        None,
        None,
    )
    assert options.endpoint_url is None
    assert options.addressing_style == "auto"


def test_default_addressing_style(settings: Settings) -> None:
    def style(**fields: Any) -> str:
        return S3Storage(s3_config(bucket="b", **fields), settings).options.addressing_style

    assert style(endpoint_url="http://minio:9000") == "path"
    assert style() == "auto"
    assert style(endpoint_url="http://minio:9000", addressing_style="Virtual") == "virtual"
    assert style(addressing_style="path") == "path"


# --- credentials: static keys, the default chain, profiles, anonymous (rclone checks keys) -------


RCLONE_KEY_ID = "rclone-test-key-id"


@pytest.fixture(scope="module")
def rclone_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3Server]:
    server = RcloneS3Server(
        tmp_path_factory.mktemp("rclone-root"),
        access_key=RCLONE_KEY_ID,
        secret_key=f"rclone-secret-{uuid.uuid4().hex}",
        log_dir=tmp_path_factory.mktemp("rclone-logs"),
    )
    with running(server):
        yield server


@pytest.fixture
def rclone_bucket(rclone_s3: RcloneS3Server) -> str:
    name = f"bkt-{uuid.uuid4().hex[:12]}"
    rclone_s3.create_bucket(name)
    return name


def write_credentials_file(path: Path, profiles: dict[str, tuple[str, str]]) -> Path:
    """A shared credentials file (the ``~/.aws/credentials`` format)."""
    lines = []
    for name, (key_id, secret) in profiles.items():
        lines += [f"[{name}]", f"aws_access_key_id = {key_id}", f"aws_secret_access_key = {secret}", ""]
    path.write_text("\n".join(lines))
    return path


def chain_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment for a child process with no AWS settings of the caller's: only
    ``extra`` (and no instance-metadata lookups, which would wait for timeouts here)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    empty_config = tmp_path / "aws-config"
    empty_config.write_text("")
    env.update(AWS_CONFIG_FILE=str(empty_config), AWS_EC2_METADATA_DISABLED="true", LOG_FORMAT="json")
    env.update(extra)
    return env


def run_mesh_puller(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "mesh-puller"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_default_chain_finds_a_shared_credentials_file(
    rclone_s3: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    """A store config without keys: ``mesh-puller pull`` finds them where boto3's
    default chain looks, here AWS_SHARED_CREDENTIALS_FILE."""
    rclone_s3.put_object(rclone_bucket, "chain/model.bin", b"pulled with the default chain")
    good = write_credentials_file(
        tmp_path / "credentials", {"default": (rclone_s3.access_key, rclone_s3.secret_key)}
    )
    config_dir = tmp_path / "storage-config"
    config_dir.mkdir()
    uri = f"s3://{rclone_bucket}/chain"
    endpoint = f"endpoint_url={rclone_s3.endpoint_url}"

    result = run_mesh_puller(
        ["pull", uri, str(tmp_path / "out"), "--param", endpoint],
        chain_env(tmp_path, AWS_SHARED_CREDENTIALS_FILE=str(good), STORAGE_CONFIG_DIR=str(config_dir)),
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "chain" / "model.bin").read_bytes() == b"pulled with the default chain"

    wrong_secret = f"wrong-{uuid.uuid4().hex}"
    wrong = write_credentials_file(tmp_path / "wrong", {"default": (rclone_s3.access_key, wrong_secret)})
    result = run_mesh_puller(
        ["pull", uri, str(tmp_path / "out2"), "--param", endpoint],
        chain_env(tmp_path, AWS_SHARED_CREDENTIALS_FILE=str(wrong), STORAGE_CONFIG_DIR=str(config_dir)),
    )
    assert result.returncode == 1
    assert "StorageUnauthenticated" in result.stderr
    assert wrong_secret not in result.stderr + result.stdout
    assert not (tmp_path / "out2").exists()

    # nothing anywhere in the chain: a clear error, not a hang on instance metadata
    result = run_mesh_puller(
        ["pull", uri, str(tmp_path / "out3"), "--param", endpoint],
        chain_env(
            tmp_path,
            AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "absent"),
            STORAGE_CONFIG_DIR=str(config_dir),
        ),
    )
    assert result.returncode == 1
    assert "no complete s3 credentials" in result.stderr


def test_the_default_chain_uses_web_identity(moto_s3: MotoS3Server, bucket: str, tmp_path: Path) -> None:
    """IRSA's setup (a role and a projected token file in the environment): the child's
    only credential source is web identity, through STS (served by moto here). The
    reads are signed with the temporary key and carry its session token."""
    moto_s3.put_object(bucket, "irsa/model.bin", b"pulled with a web identity")
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6bTpzIn0.c2ln")
    config_dir = tmp_path / "storage-config"
    config_dir.mkdir()
    env = chain_env(
        tmp_path,
        AWS_ROLE_ARN="arn:aws:iam::123456789012:role/model-reader",
        AWS_WEB_IDENTITY_TOKEN_FILE=str(token),
        AWS_ENDPOINT_URL_STS=moto_s3.endpoint_url,
        AWS_REGION="us-east-1",
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "absent"),
        STORAGE_CONFIG_DIR=str(config_dir),
    )
    result = run_mesh_puller(
        [
            "pull",
            f"s3://{bucket}/irsa",
            str(tmp_path / "out"),
            "--param",
            f"endpoint_url={moto_s3.endpoint_url}",
        ],
        env,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "irsa" / "model.bin").read_bytes() == b"pulled with a web identity"
    reads = [
        line
        for line in moto_s3.log_tail(limit=200_000).splitlines()
        if f"GET /{bucket}/irsa/model.bin?" in line
    ]
    assert reads
    assert all("X-Amz-Credential=ASIA" in line and "X-Amz-Security-Token=" in line for line in reads)


def test_profile_and_credentials_file_fields(
    rclone_s3: RcloneS3Server, rclone_bucket: str, tmp_path: Path, settings: Settings
) -> None:
    rclone_s3.put_object(rclone_bucket, "m.bin", b"profile bytes")
    credentials = write_credentials_file(
        tmp_path / "credentials",
        {
            "default": ("AKIANOTTHERIGHTONE00", "not-the-right-secret"),
            "models": (rclone_s3.access_key, rclone_s3.secret_key),
        },
    )
    base = {
        "bucket": rclone_bucket,
        "endpoint_url": rclone_s3.endpoint_url,
        "credentials_file": str(credentials),
    }

    storage = S3Storage(s3_config(**base, profile="models", access_key_id="", secret_access_key=""), settings)
    try:
        (blob,) = storage.plan("m.bin").blobs
        assert read_all(storage, blob) == b"profile bytes"
    finally:
        storage.close()

    default_profile = S3Storage(s3_config(**base), settings)
    with pytest.raises(StorageUnauthenticated) as info:
        default_profile.plan("m.bin")
    assert_no_secret(info.value, "not-the-right-secret", rclone_s3.secret_key)

    # static keys win over the file
    keys = S3Storage(
        s3_config(**base, access_key_id=rclone_s3.access_key, secret_access_key=rclone_s3.secret_key),
        settings,
    )
    assert [b.relpath for b in keys.plan("m.bin").blobs] == ["m.bin"]

    with pytest.raises(StorageConfigError, match="profile 'nosuchprofile'"):
        S3Storage(s3_config(**base, profile="nosuchprofile"), settings).plan("m.bin")
    for made in (default_profile, keys):
        made.close()


def test_static_keys_with_a_session_token(
    rclone_s3: RcloneS3Server, rclone_bucket: str, settings: Settings
) -> None:
    """The token travels with the request (rclone ignores it; a wrong secret still fails)."""
    rclone_s3.put_object(rclone_bucket, "t.bin", b"token")
    config = s3_config(
        bucket=rclone_bucket,
        endpoint_url=rclone_s3.endpoint_url,
        access_key_id=rclone_s3.access_key,
        secret_access_key=rclone_s3.secret_key,
        session_token="a-session-token",
    )
    storage = S3Storage(config, settings)
    try:
        (blob,) = storage.plan("t.bin").blobs
        assert read_all(storage, blob) == b"token"
    finally:
        storage.close()


def test_anonymous_requests_are_unsigned(
    rclone_s3: RcloneS3Server, rclone_bucket: str, settings: Settings
) -> None:
    """rclone refuses unsigned requests: with ``anonymous`` the keys of the entry are
    not used, so the listing is refused."""
    rclone_s3.put_object(rclone_bucket, "a.bin", b"private")
    storage = S3Storage(
        s3_config(
            bucket=rclone_bucket,
            endpoint_url=rclone_s3.endpoint_url,
            access_key_id=rclone_s3.access_key,
            secret_access_key=rclone_s3.secret_key,
            anonymous=True,
        ),
        settings,
    )
    try:
        with pytest.raises((StoragePermissionDenied, StorageUnauthenticated)):
            storage.plan("a.bin")
    finally:
        storage.close()


# --- checksums ---------------------------------------------------------------------------------


def test_a_single_part_etag_is_announced_as_md5(
    moto_s3: MotoS3Server, bucket: str, make_s3: S3Factory
) -> None:
    small = {f"m/{i}.bin": os.urandom(1000 + i) for i in range(5)}
    for key, data in small.items():
        moto_s3.put_object(bucket, key, data)
    for blob in make_s3(bucket).plan("m").blobs:
        assert blob.checksums["md5"] == hashlib.md5(small[blob.name]).hexdigest()
    assert "md5" not in make_s3(bucket, verify_etag="false").plan("m").blobs[0].checksums


def test_full_object_checksums_come_from_a_head(
    moto_s3: MotoS3Server, bucket: str, make_s3: S3Factory
) -> None:
    data = os.urandom(CHECKSUM_HEAD_MIN_BYTES + 10)
    moto_s3.client().put_object(Bucket=bucket, Key="big.bin", Body=data, ChecksumAlgorithm="SHA256")
    (blob,) = make_s3(bucket).plan("big.bin").blobs
    assert blob.checksums == {
        "md5": hashlib.md5(data).hexdigest(),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def test_multipart_objects_have_no_md5_and_composite_checksums_are_skipped(
    moto_s3: MotoS3Server, bucket: str, make_s3: S3Factory
) -> None:
    client = moto_s3.client()
    parts = [os.urandom(5 * 1024 * 1024), os.urandom(3 * 1024 * 1024)]
    upload = client.create_multipart_upload(Bucket=bucket, Key="mp.bin", ChecksumAlgorithm="SHA256")
    done = []
    for number, body in enumerate(parts, start=1):
        part = client.upload_part(
            Bucket=bucket,
            Key="mp.bin",
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=body,
            ChecksumAlgorithm="SHA256",
        )
        done.append({"PartNumber": number, "ETag": part["ETag"], "ChecksumSHA256": part["ChecksumSHA256"]})
    client.complete_multipart_upload(
        Bucket=bucket, Key="mp.bin", UploadId=upload["UploadId"], MultipartUpload={"Parts": done}
    )
    (blob,) = make_s3(bucket).plan("mp.bin").blobs
    assert blob.version is not None
    assert blob.version.endswith("-2")
    # moto sends the checksum of the part checksums without the "-2": not of the bytes
    assert blob.checksums == {}


def test_kms_encrypted_objects_have_no_md5(moto_s3: MotoS3Server, bucket: str, make_s3: S3Factory) -> None:
    data = b"encrypted with a KMS key"
    moto_s3.client().put_object(
        Bucket=bucket, Key="kms/m.bin", Body=data, ServerSideEncryption="aws:kms", ChecksumAlgorithm="SHA256"
    )
    moto_s3.client().put_object(Bucket=bucket, Key="kms/n.bin", Body=b"x", ServerSideEncryption="aws:kms")
    blobs = {b.relpath: b for b in make_s3(bucket).plan("kms").blobs}
    # the probe (the largest object) is asked and keeps its full-object checksum
    assert blobs["m.bin"].checksums == {"sha256": hashlib.sha256(data).hexdigest()}
    # its neighbour, stored alike, is not taken for MD5 either
    assert "md5" not in blobs["n.bin"].checksums


def test_etags_from_rclone_are_md5(rclone_s3: RcloneS3Server, rclone_bucket: str, settings: Settings) -> None:
    data = os.urandom(100_000)
    rclone_s3.put_object(rclone_bucket, "r/m.bin", data)
    storage = S3Storage(
        s3_config(
            bucket=rclone_bucket,
            endpoint_url=rclone_s3.endpoint_url,
            access_key_id=rclone_s3.access_key,
            secret_access_key=rclone_s3.secret_key,
        ),
        settings,
    )
    try:
        (blob,) = storage.plan("r/m.bin").blobs
    finally:
        storage.close()
    assert blob.checksums == {"md5": hashlib.md5(data).hexdigest()}


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def test_full_object_checksums_of_a_head_answer() -> None:
    data = b"model bytes"
    sha = hashlib.sha256(data).digest()
    crc = zlib.crc32(data).to_bytes(4, "big")
    head = {
        "ChecksumSHA256": _b64(sha),
        "ChecksumCRC32": _b64(crc),
        "ChecksumCRC32C": _b64(b"\x01\x02\x03\x04"),
    }
    assert full_object_checksums(head, "0" * 32) == {
        "sha256": sha.hex(),
        "crc32": f"{zlib.crc32(data):08x}",
        "crc32c": "01020304",
    }
    # composite: "-N" on the value, or said by ChecksumType
    assert full_object_checksums({"ChecksumSHA256": _b64(sha) + "-3"}, "a" * 32 + "-3") == {}
    assert full_object_checksums({"ChecksumCRC32": _b64(crc), "ChecksumType": "COMPOSITE"}, "0" * 32) == {}
    # a multipart object: only what is marked FULL_OBJECT counts
    assert full_object_checksums({"ChecksumCRC32": _b64(crc)}, "a" * 32 + "-3") == {}
    assert full_object_checksums(
        {"ChecksumCRC32": _b64(crc), "ChecksumType": "FULL_OBJECT"}, "a" * 32 + "-3"
    ) == {"crc32": crc.hex()}
    # garbage and wrong lengths are ignored
    assert full_object_checksums({"ChecksumSHA256": "not base64!", "ChecksumCRC32": _b64(sha)}, None) == {}


def test_md5_etags_and_opaque_encryption() -> None:
    assert is_md5_etag("0123456789abcdef0123456789ABCDEF")
    assert not is_md5_etag("0123456789abcdef0123456789abcdef-2")
    assert not is_md5_etag("W/xyz")
    assert not is_md5_etag(None)
    assert etag_is_opaque({"ServerSideEncryption": "aws:kms"})
    assert etag_is_opaque({"ServerSideEncryption": "aws:kms:dsse"})
    assert etag_is_opaque({"SSECustomerAlgorithm": "AES256"})
    assert not etag_is_opaque({"ServerSideEncryption": "AES256"})


# --- addressing and proxies ----------------------------------------------------------------------


@pytest.fixture
def proxy() -> Iterator[CountingProxy]:
    server = CountingProxy()
    server.start()
    try:
        yield server
    finally:
        server.close()


def pull_with(settings: Settings, config: dict[str, Any], model_path: str) -> Path:
    """Pull ``model_path`` through a real Puller; return the model's local path."""
    settings.storage_config_dir.mkdir(parents=True, exist_ok=True)
    (settings.storage_config_dir / "store").write_text(json.dumps({"type": "s3", **config}))
    puller = Puller(settings)
    puller.start()
    try:
        request = PullRequest("m1", model_path, ModelKey(storage_key="store"))
        return asyncio.run(puller.pull(request)).path
    finally:
        puller.close()


def test_listing_and_bytes_go_through_the_http_proxy(
    moto_s3: MotoS3Server, bucket: str, proxy: CountingProxy, tmp_path: Path
) -> None:
    files = {f"model/{i}.bin": os.urandom(100_000 + i) for i in range(3)}
    for key, data in files.items():
        moto_s3.put_object(bucket, key, data)
    config = {
        "bucket": bucket,
        "endpoint_url": moto_s3.endpoint_url,
        "access_key_id": "k",
        "secret_access_key": "s",
    }

    settings = make_settings(tmp_path / "a", http_proxy=proxy.url)
    path = pull_with(settings, config, "model")
    assert tree(path) == {k.removeprefix("model/"): v for k, v in files.items()}
    seen = proxy.seen()
    assert all(target.startswith(moto_s3.endpoint_url + "/") for _, target, _ in seen)
    gets = [target for method, target, _ in seen if method == "GET" and "list-type=2" not in target]
    lists = [target for method, target, _ in seen if method == "GET" and "list-type=2" in target]
    heads = [target for method, target, _ in seen if method == "HEAD"]
    assert len(lists) >= 1
    assert len(heads) == 1, "small objects with MD5 ETags: one HEAD (the encryption probe), no more"
    assert len(gets) >= len(files)
    assert all("X-Amz-Signature=" in target for target in gets)

    # NO_PROXY names the endpoint: nothing goes through the proxy
    before = len(proxy.seen())
    settings = make_settings(tmp_path / "b", http_proxy=proxy.url, no_proxy="localhost,127.0.0.0/8")
    assert tree(pull_with(settings, config, "model")) == tree(path)
    assert len(proxy.seen()) == before


def test_https_goes_through_a_connect_tunnel(
    moto_tls: MotoS3Server, proxy: CountingProxy, tmp_path: Path
) -> None:
    assert moto_tls.tls is not None
    moto_tls.create_bucket("tunnelled")
    data = os.urandom(300_000)
    moto_tls.put_object("tunnelled", "m/w.bin", data)
    settings = make_settings(tmp_path, https_proxy=proxy.url)
    config = {
        "bucket": "tunnelled",
        "endpoint_url": moto_tls.endpoint_url,
        "access_key_id": "k",
        "secret_access_key": "s",
        "certificate_file": str(moto_tls.tls[2]),
    }
    assert (pull_with(settings, config, "m") / "w.bin").read_bytes() == data
    seen = proxy.seen()
    assert seen
    assert {(method, target) for method, target, _ in seen} == {("CONNECT", f"127.0.0.1:{moto_tls.port}")}


def test_virtual_hosted_addressing(moto_s3: MotoS3Server, proxy: CountingProxy, tmp_path: Path) -> None:
    """``bucket.localhost`` resolves nowhere here but in the test proxy, which sends
    every name to 127.0.0.1: the requests reach moto, which reads the bucket from the
    Host header."""
    bucket = f"vhost-{uuid.uuid4().hex[:10]}"
    moto_s3.create_bucket(bucket)
    data = os.urandom(200_000)
    moto_s3.put_object(bucket, "m/w.bin", data)
    endpoint = f"http://localhost:{moto_s3.port}"
    config = {
        "bucket": bucket,
        "endpoint_url": endpoint,
        "addressing_style": "virtual",
        "access_key_id": "k",
        "secret_access_key": "s",
    }
    settings = make_settings(tmp_path, http_proxy=proxy.url)
    assert (pull_with(settings, config, "m") / "w.bin").read_bytes() == data
    seen = proxy.seen()
    assert seen
    for _, target, host in seen:
        assert target.startswith(f"http://{bucket}.localhost:{moto_s3.port}/")
        assert host == f"{bucket}.localhost:{moto_s3.port}"


def test_aws_defaults_to_virtual_hosted_addressing(proxy: CountingProxy, tmp_path: Path) -> None:
    """Without endpoint_url the client talks to AWS, bucket in the host name. Nothing
    leaves this machine: the test proxy sends the CONNECT to 127.0.0.1:443, where
    nothing listens, and the listing fails as unavailable."""
    settings = make_settings(tmp_path, https_proxy=proxy.url, pull_timeout_seconds=2.0)
    storage = S3Storage(
        s3_config(bucket="some-models", region="eu-west-1", access_key_id="k", secret_access_key="s"),
        settings,
    )
    try:
        with pytest.raises(StorageUnavailable):
            storage.plan("m")
    finally:
        storage.close()
    targets = {target for _, target, _ in proxy.seen()}
    assert targets == {"some-models.s3.eu-west-1.amazonaws.com:443"}


def test_boto_proxies_follow_the_settings(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, http_proxy="proxy.local:3128", https_proxy="https://user:pw@p:8443")
    assert boto_proxies(settings, "minio.local") == {
        "http": "http://proxy.local:3128",
        "https": "https://user:pw@p:8443",
    }
    bypass = make_settings(tmp_path, http_proxy="proxy.local:3128", no_proxy=".local,10.0.0.0/8")
    assert boto_proxies(bypass, "minio.local") == {}
    assert boto_proxies(bypass, "10.1.2.3") == {}
    assert boto_proxies(bypass, "s3.amazonaws.com") == {"http": "http://proxy.local:3128"}
    assert boto_proxies(make_settings(tmp_path), "s3.amazonaws.com") == {}
