"""The GCS backend on real servers: the conformance kit on fake-gcs-server and on
gcp-storage-emulator, then checksums, credential modes (anonymous, service-account key,
application default credentials), token refresh and error translation.

Neither server checks credentials, so the credential tests put :class:`GuardedGCS` (a
proxy that admits only tokens our :class:`TokenEndpoint` issued) in front of
fake-gcs-server; the service-account keys are RSA keys made here."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from adapter.errors import (
    IntegrityError,
    StorageConfigError,
    StorageError,
    StorageNotFound,
    StoragePermissionDenied,
    StorageUnauthenticated,
    StorageUnavailable,
)
from adapter.settings import Settings
from puller.config import StorageConfig
from puller.storage.base import Blob
from puller.storage.gcs import GCSStorage, translate_gcs_error
from puller.testing.storage_conformance import ConformanceStore, StorageConformance
from tests.puller.conftest import make_settings
from tests.servers.gcs import FakeGCSServer, GCPStorageEmulator, GuardedGCS, TokenEndpoint
from tests.servers.process import free_port, running

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


# --- servers and keys, once per session ----------------------------------------------------


@dataclass(frozen=True)
class ServiceAccount:
    email: str
    private_key: str  # PEM
    public_key: bytes  # PEM

    def key_fields(self, token_uri: str) -> dict[str, str]:
        return {"private_key": self.private_key, "client_email": self.email, "token_uri": token_uri}


def make_service_account(name: str) -> ServiceAccount:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return ServiceAccount(f"{name}@test-project.iam.gserviceaccount.com", private, public)


def key_material(account: ServiceAccount) -> list[str]:
    """The whole key and each of its base64 lines: none may appear in a message."""
    lines = [line for line in account.private_key.splitlines() if line and not line.startswith("-----")]
    return [account.private_key, *lines]


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGCSServer]:
    server = FakeGCSServer(log_dir=tmp_path_factory.mktemp("fake-gcs-logs"))
    with running(server):
        yield server


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GCPStorageEmulator]:
    server = GCPStorageEmulator(log_dir=tmp_path_factory.mktemp("gcs-emulator-logs"))
    with running(server):
        yield server


@pytest.fixture(scope="session")
def token_endpoint() -> Iterator[TokenEndpoint]:
    endpoint = TokenEndpoint()
    endpoint.start()
    try:
        yield endpoint
    finally:
        endpoint.stop()


@pytest.fixture(scope="session")
def service_account(token_endpoint: TokenEndpoint) -> ServiceAccount:
    """A key the token endpoint knows."""
    account = make_service_account("puller")
    token_endpoint.add_account(account.email, account.public_key)
    return account


@pytest.fixture(scope="session")
def stranger() -> ServiceAccount:
    """A well-formed key the token endpoint does not know."""
    return make_service_account("stranger")


# --- the conformance kit ---------------------------------------------------------------------


class GCSStore:
    """A fresh bucket on a GCS server, reached with a service-account key."""

    def __init__(
        self,
        server: FakeGCSServer | GCPStorageEmulator,
        tokens: TokenEndpoint,
        account: ServiceAccount,
        stranger: ServiceAccount,
        base: str,
    ) -> None:
        self.server, self.tokens, self.account, self.stranger, self.base = (
            server,
            tokens,
            account,
            stranger,
            base,
        )
        self.bucket = f"conf-{uuid.uuid4().hex[:12]}"
        server.create_bucket(self.bucket)

    def put(self, key: str, data: bytes) -> None:
        self.server.put_object(self.bucket, f"{self.base}/{key}", data)

    def config(self) -> Mapping[str, Any]:
        return {
            "type": "gcs",
            "bucket": self.bucket,
            "endpoint": self.server.endpoint,
            **self.account.key_fields(self.tokens.token_uri),
        }

    def model_path(self, key: str) -> str:
        return f"{self.base}/{key}"

    def bad_credentials_config(self) -> Mapping[str, Any] | None:
        # the servers take any token; the token endpoint refuses a key it does not know
        return {**self.config(), **self.stranger.key_fields(self.tokens.token_uri)}

    def secrets(self) -> list[str]:
        return [*key_material(self.account), *key_material(self.stranger), *self.tokens.issued]


class TestGCSOnFakeServer(StorageConformance):
    large_object_bytes = 200 * MiB

    @pytest.fixture
    def store(
        self,
        fake_gcs: FakeGCSServer,
        token_endpoint: TokenEndpoint,
        service_account: ServiceAccount,
        stranger: ServiceAccount,
        base: str,
    ) -> ConformanceStore:
        return GCSStore(fake_gcs, token_endpoint, service_account, stranger, base)


class TestGCSOnEmulator(StorageConformance):
    large_object_bytes = 200 * MiB
    supports_dotdot_keys = False  # the emulator refuses to store a name with '..' segments

    @pytest.fixture
    def store(
        self,
        gcs_emulator: GCPStorageEmulator,
        token_endpoint: TokenEndpoint,
        service_account: ServiceAccount,
        stranger: ServiceAccount,
        base: str,
    ) -> ConformanceStore:
        return GCSStore(gcs_emulator, token_endpoint, service_account, stranger, base)


# --- the backend on its own ------------------------------------------------------------------

GCSFactory = Callable[..., GCSStorage]


@pytest.fixture
def make_gcs(settings: Settings) -> Iterator[GCSFactory]:
    made: list[GCSStorage] = []

    def make(settings: Settings = settings, **fields: Any) -> GCSStorage:
        storage = GCSStorage(StorageConfig("gcs", fields), settings)
        made.append(storage)
        return storage

    yield make
    for storage in made:
        storage.close()


@pytest.fixture
def bucket(fake_gcs: FakeGCSServer) -> str:
    name = f"bkt-{uuid.uuid4().hex[:12]}"
    fake_gcs.create_bucket(name)
    return name


@pytest.fixture
def guarded(fake_gcs: FakeGCSServer, token_endpoint: TokenEndpoint) -> Iterator[GuardedGCS]:
    front = GuardedGCS(fake_gcs.endpoint, token_endpoint)
    front.start()
    try:
        yield front
    finally:
        front.stop()


def read_all(storage: GCSStorage, blob: Blob, start: int = 0, end: int | None = None) -> bytes:
    end = blob.size if end is None else end
    stream = storage.open_range(blob, start, end)
    buffer = bytearray(64 * 1024)
    view = memoryview(buffer)
    out = bytearray()
    try:
        for _ in range(1 + (end - start) // len(buffer) + 1):
            count = stream.readinto(view)
            if not count:
                break
            out += view[:count]
    finally:
        stream.close()
    return bytes(out)


def crc32c_hex(data: bytes) -> str:
    import google_crc32c

    return google_crc32c.Checksum(data).digest().hex()


@pytest.mark.parametrize("server_name", ["fake_gcs", "gcs_emulator"])
def test_listing_carries_generation_and_checksums(
    server_name: str, request: pytest.FixtureRequest, make_gcs: GCSFactory
) -> None:
    # gcp-storage-emulator sends no X-Goog-Hash with the bytes, but its listing has
    # crc32c and md5 like fake-gcs-server's: we take them from the listing
    server: FakeGCSServer | GCPStorageEmulator = request.getfixturevalue(server_name)
    bucket = f"sums-{uuid.uuid4().hex[:10]}"
    server.create_bucket(bucket)
    data = os.urandom(100_000)
    written = server.put_object(bucket, "m/weights.bin", data)
    storage = make_gcs(bucket=bucket, endpoint=server.endpoint)
    plan = storage.plan("m/weights.bin")
    assert plan.single_object
    (blob,) = plan.blobs
    assert blob.size == len(data)
    assert blob.version == str(written["generation"])
    assert dict(blob.checksums) == {"crc32c": crc32c_hex(data), "md5": hashlib.md5(data).hexdigest()}
    assert read_all(storage, blob) == data
    assert read_all(storage, blob, 1000, 70_000) == data[1000:70_000]


def test_prefix_listing_skips_folder_markers(
    fake_gcs: FakeGCSServer, bucket: str, make_gcs: GCSFactory
) -> None:
    fake_gcs.put_object(bucket, "model/", b"")
    fake_gcs.put_object(bucket, "model/sub/", b"")
    fake_gcs.put_object(bucket, "model/sub/a.bin", b"a")
    fake_gcs.put_object(bucket, "model/b.json", b"{}")
    fake_gcs.put_object(bucket, "model-other/c", b"c")
    storage = make_gcs(bucket=bucket, endpoint=fake_gcs.endpoint)
    plan = storage.plan("/model/")
    assert not plan.single_object
    assert sorted(b.relpath for b in plan.blobs) == ["b.json", "sub/a.bin"]
    whole = storage.plan("")
    assert sorted(b.relpath for b in whole.blobs) == ["model-other/c", "model/b.json", "model/sub/a.bin"]


def test_a_replaced_object_is_not_read_at_its_new_generation(
    fake_gcs: FakeGCSServer, bucket: str, make_gcs: GCSFactory
) -> None:
    fake_gcs.put_object(bucket, "m.bin", b"first version")
    storage = make_gcs(bucket=bucket, endpoint=fake_gcs.endpoint)
    (listed,) = storage.plan("m.bin").blobs
    fake_gcs.put_object(bucket, "m.bin", b"second version")
    assert "generation=" in storage.media_url(listed)
    with pytest.raises(StorageNotFound, match=re.escape("m.bin")):
        read_all(storage, listed)


@pytest.mark.parametrize("server_name", ["fake_gcs", "gcs_emulator"])
def test_missing_bucket_is_not_found(
    server_name: str, request: pytest.FixtureRequest, make_gcs: GCSFactory
) -> None:
    server: FakeGCSServer | GCPStorageEmulator = request.getfixturevalue(server_name)
    storage = make_gcs(bucket="no-such-bucket-here", endpoint=server.endpoint)
    with pytest.raises(StorageNotFound) as info:
        storage.plan("some/model")
    assert "no-such-bucket-here" in str(info.value)
    assert "some/model" in str(info.value)


def test_a_config_without_bucket(make_gcs: GCSFactory) -> None:
    with pytest.raises(StorageConfigError, match="no bucket"):
        make_gcs().plan("x")


def test_identity_names_endpoint_and_bucket_only(
    make_gcs: GCSFactory, service_account: ServiceAccount
) -> None:
    storage = make_gcs(
        bucket="b1", endpoint="storage.example.com/storage/v1/", **service_account.key_fields("x")
    )
    assert storage.identity() == "gcs:https://storage.example.com/b1"
    assert make_gcs(bucket="b2").identity() == "gcs:https://storage.googleapis.com/b2"


def test_bytes_corrupted_on_the_server_fail_the_pull(
    fake_gcs: FakeGCSServer,
    guarded: GuardedGCS,
    token_endpoint: TokenEndpoint,
    service_account: ServiceAccount,
    bucket: str,
    tmp_path: Path,
) -> None:
    # the listing announces crc32c and md5 of the true bytes; the front flips one byte
    data = os.urandom(3 * MiB)
    fake_gcs.put_object(bucket, "c/model.bin", data)
    config = {
        "type": "gcs",
        "bucket": bucket,
        "endpoint": guarded.endpoint,
        **service_account.key_fields(token_endpoint.token_uri),
    }
    kit = StorageConformance()
    assert kit.pull(tmp_path / "ok", config, "c/model.bin").path.read_bytes() == data
    guarded.corrupt_media = True
    with pytest.raises(IntegrityError) as info:
        kit.pull(tmp_path / "bad", config, "c/model.bin")
    assert "c/model.bin" in str(info.value)
    assert kit.leftovers(tmp_path / "bad") == []


# --- credential modes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "mode"),
    [
        ({}, "anonymous"),
        ({"anonymous": "true"}, "anonymous"),
        ({"private_key": "k", "client_email": "e"}, "service_account"),
        ({"private_key": "k", "client_email": "e", "anonymous": True}, "anonymous"),
        ({"use_default_credentials": "true"}, "default"),
        ({"anonymous": "false"}, "default"),
        ({"anonymous": False}, "default"),
    ],
)
def test_which_config_selects_which_credentials(
    fields: dict[str, Any], mode: str, make_gcs: GCSFactory
) -> None:
    assert make_gcs(bucket="b", **fields).mode == mode


@pytest.mark.parametrize("fields", [{"private_key": "k"}, {"client_email": "e@x"}])
def test_key_and_email_go_together(fields: dict[str, Any], make_gcs: GCSFactory) -> None:
    with pytest.raises(StorageConfigError, match="together"):
        make_gcs(bucket="b", **fields)


def test_anonymous_access(
    fake_gcs: FakeGCSServer, guarded: GuardedGCS, bucket: str, make_gcs: GCSFactory
) -> None:
    fake_gcs.put_object(bucket, "public/model.bin", b"public bytes")
    storage = make_gcs(bucket=bucket, endpoint=fake_gcs.endpoint)
    assert storage.mode == "anonymous"
    (blob,) = storage.plan("public/model.bin").blobs
    assert read_all(storage, blob) == b"public bytes"
    # no Authorization header is sent: a guarded bucket refuses it
    refused = make_gcs(bucket=bucket, endpoint=guarded.endpoint)
    with pytest.raises(StorageUnauthenticated, match=bucket):
        refused.plan("public/model.bin")
    with pytest.raises(StorageUnauthenticated, match=re.escape("public/model.bin")):
        read_all(refused, blob)
    assert guarded.seen and all(header is None for header in guarded.seen)


def test_service_account_key_gets_and_sends_tokens(
    fake_gcs: FakeGCSServer,
    guarded: GuardedGCS,
    token_endpoint: TokenEndpoint,
    service_account: ServiceAccount,
    bucket: str,
    make_gcs: GCSFactory,
) -> None:
    data = os.urandom(300_000)
    fake_gcs.put_object(bucket, "sa/model.bin", data)
    storage = make_gcs(
        bucket=bucket, endpoint=guarded.endpoint, **service_account.key_fields(token_endpoint.token_uri)
    )
    (blob,) = storage.plan("sa/model.bin").blobs
    assert read_all(storage, blob) == data
    issued = set(token_endpoint.tokens_of(service_account.email))
    assert guarded.seen
    assert {header.removeprefix("Bearer ") for header in guarded.seen if header} <= issued
    assert None not in guarded.seen
    assert "https://www.googleapis.com/auth/devstorage.read_only" in token_endpoint.scopes


def test_escaped_newlines_in_the_key_are_accepted(
    fake_gcs: FakeGCSServer,
    guarded: GuardedGCS,
    token_endpoint: TokenEndpoint,
    service_account: ServiceAccount,
    bucket: str,
    make_gcs: GCSFactory,
) -> None:
    fake_gcs.put_object(bucket, "m.bin", b"x")
    fields = service_account.key_fields(token_endpoint.token_uri)
    fields["private_key"] = fields["private_key"].replace("\n", "\\n")
    storage = make_gcs(bucket=bucket, endpoint=guarded.endpoint, **fields)
    assert [b.name for b in storage.plan("m.bin").blobs] == ["m.bin"]


@pytest.fixture
def own_guard(
    fake_gcs: FakeGCSServer, service_account: ServiceAccount
) -> Iterator[Callable[[int], GuardedGCS]]:
    """A token endpoint (tokens valid for the given seconds) and a guarded front of
    fake-gcs-server, both fresh, so a test can count tokens and refusals alone."""
    started: list[TokenEndpoint | GuardedGCS] = []

    def make(expires_in: int) -> GuardedGCS:
        tokens = TokenEndpoint(expires_in=expires_in)
        tokens.start()
        started.append(tokens)
        tokens.add_account(service_account.email, service_account.public_key)
        front = GuardedGCS(fake_gcs.endpoint, tokens)
        front.start()
        started.append(front)
        return front

    yield make
    for server in reversed(started):
        server.stop()


def read_in_threads(storage: GCSStorage, blob: Blob, count: int) -> list[bytes]:
    results: list[bytes] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            results.append(read_all(storage, blob))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    return results


def test_a_rejected_token_is_refreshed_once_on_401(
    fake_gcs: FakeGCSServer,
    own_guard: Callable[[int], GuardedGCS],
    service_account: ServiceAccount,
    bucket: str,
    make_gcs: GCSFactory,
) -> None:
    front = own_guard(3600)
    tokens = front.tokens
    fake_gcs.put_object(bucket, "r.bin", b"refreshed")
    storage = make_gcs(bucket=bucket, endpoint=front.endpoint, **service_account.key_fields(tokens.token_uri))
    (blob,) = storage.plan("r.bin").blobs
    assert len(tokens.issued) == 1
    tokens.revoke_all()
    # four reads present the revoked token at once: one refresh serves them all
    assert read_in_threads(storage, blob, 4) == [b"refreshed"] * 4
    assert 1 <= front.unauthorized <= 4
    assert len(tokens.issued) == 1


def test_an_expired_token_is_refreshed_before_a_read(
    fake_gcs: FakeGCSServer,
    own_guard: Callable[[int], GuardedGCS],
    service_account: ServiceAccount,
    bucket: str,
    make_gcs: GCSFactory,
) -> None:
    # google-auth counts a token as expired minutes before it is: 1 s is always stale
    front = own_guard(1)
    tokens = front.tokens
    fake_gcs.put_object(bucket, "e.bin", b"0123456789")
    storage = make_gcs(bucket=bucket, endpoint=front.endpoint, **service_account.key_fields(tokens.token_uri))
    (blob,) = storage.plan("e.bin").blobs
    before = len(tokens.issued)
    assert read_in_threads(storage, blob, 4) == [b"0123456789"] * 4
    assert len(tokens.issued) >= before + 4
    assert front.unauthorized == 0


def test_a_denied_account_is_permission_denied(
    fake_gcs: FakeGCSServer,
    guarded: GuardedGCS,
    token_endpoint: TokenEndpoint,
    service_account: ServiceAccount,
    bucket: str,
    make_gcs: GCSFactory,
) -> None:
    fake_gcs.put_object(bucket, "d.bin", b"denied")
    allowed = make_gcs(
        bucket=bucket, endpoint=guarded.endpoint, **service_account.key_fields(token_endpoint.token_uri)
    )
    (blob,) = allowed.plan("d.bin").blobs
    guarded.denied.add(service_account.email)
    try:
        denied = make_gcs(
            bucket=bucket, endpoint=guarded.endpoint, **service_account.key_fields(token_endpoint.token_uri)
        )
        with pytest.raises(StoragePermissionDenied, match=bucket) as listing:
            denied.plan("d.bin")
        with pytest.raises(StoragePermissionDenied, match=re.escape("d.bin")) as reading:
            read_all(allowed, blob)
    finally:
        guarded.denied.discard(service_account.email)
    for error in (listing.value, reading.value):
        text = f"{error} {error!r}"
        assert all(secret not in text for secret in [*key_material(service_account), *token_endpoint.issued])


def test_an_unknown_key_is_unauthenticated_without_leaking(
    fake_gcs: FakeGCSServer,
    token_endpoint: TokenEndpoint,
    stranger: ServiceAccount,
    bucket: str,
    make_gcs: GCSFactory,
) -> None:
    storage = make_gcs(
        bucket=bucket, endpoint=fake_gcs.endpoint, **stranger.key_fields(token_endpoint.token_uri)
    )
    refusals = token_endpoint.refusals
    with pytest.raises(StorageUnauthenticated) as info:
        storage.plan("anything")
    assert token_endpoint.refusals > refusals
    text = f"{info.value} {info.value!r}"
    assert "invalid_grant" in text
    assert bucket in text
    assert all(secret not in text for secret in key_material(stranger))


@pytest.mark.parametrize(
    "mangle",
    [
        lambda pem: "not a key at all",
        lambda pem: pem[:120] + "!!!!" + pem[124:],
        lambda pem: pem.replace("PRIVATE KEY", "PUBLIC KEY"),
        lambda pem: pem[: len(pem) // 2],
    ],
)
def test_a_malformed_private_key_is_a_config_error_without_the_key(
    mangle: Callable[[str], str], service_account: ServiceAccount, tmp_path: Path
) -> None:
    fields = {"private_key": mangle(service_account.private_key), "client_email": service_account.email}
    config = {"type": "gcs", "bucket": "b", **fields}
    with pytest.raises(StorageConfigError) as info:
        StorageConformance().pull(tmp_path, config, "model")
    text = f"{info.value} {info.value!r}"
    assert "private_key" in text
    for secret in [fields["private_key"], *key_material(service_account)]:
        assert secret not in text
    # nor through the exception chain a traceback would print
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_application_default_credentials(
    fake_gcs: FakeGCSServer,
    guarded: GuardedGCS,
    token_endpoint: TokenEndpoint,
    service_account: ServiceAccount,
    bucket: str,
    make_gcs: GCSFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "adc.json"
    key_file.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "test-project",
                "private_key_id": "k1",
                **service_account.key_fields(token_endpoint.token_uri),
            }
        )
    )
    # what a pod's environment would hold; google.auth.default reads it, not our code
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    fake_gcs.put_object(bucket, "adc/model.bin", b"through ADC")
    for opt_in in ({"use_default_credentials": "true"}, {"anonymous": "false"}):
        storage = make_gcs(bucket=bucket, endpoint=guarded.endpoint, **opt_in)
        assert storage.mode == "default"
        (blob,) = storage.plan("adc/model.bin").blobs
        assert read_all(storage, blob) == b"through ADC"
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(StorageUnauthenticated, match="application default credentials"):
        make_gcs(bucket=bucket, endpoint=guarded.endpoint, use_default_credentials=True).plan("adc")


# --- transient failures ----------------------------------------------------------------------


def test_an_unreachable_endpoint_is_unavailable(make_gcs: GCSFactory, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, pull_timeout_seconds=1.5)
    storage = make_gcs(settings=settings, bucket="b", endpoint=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="gcs"):
        storage.plan("m")
    assert time.monotonic() - started < 30
    blob = Blob(name="m", relpath="m", size=3, version="1")
    with pytest.raises(StorageUnavailable, match="'m'"):
        read_all(storage, blob)


def test_an_unreachable_token_endpoint_is_unavailable(
    fake_gcs: FakeGCSServer, service_account: ServiceAccount, bucket: str, make_gcs: GCSFactory
) -> None:
    storage = make_gcs(
        bucket=bucket,
        endpoint=fake_gcs.endpoint,
        **service_account.key_fields(f"http://127.0.0.1:{free_port()}/token"),
    )
    with pytest.raises(StorageUnavailable, match="token endpoint"):
        storage.plan("m")


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, StorageNotFound),
        (401, StorageUnauthenticated),
        (403, StoragePermissionDenied),
        (429, StorageUnavailable),
        (500, StorageUnavailable),
        (503, StorageUnavailable),
    ],
)
def test_statuses_are_translated(status: int, error: type[Exception]) -> None:
    body = json.dumps({"error": {"code": status, "errors": [{"reason": "someReason"}]}}).encode()
    translated = translate_gcs_error(status, bucket="bkt", name="a/b.bin", action="reading", body=body)
    assert type(translated) is error
    assert "bkt" in str(translated)
    assert "a/b.bin" in str(translated)
    assert "someReason" in str(translated)


def test_sdk_errors_are_translated() -> None:
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions

    secret = base64.b64encode(os.urandom(24)).decode()
    cases: list[tuple[BaseException, type[Exception]]] = [
        (api_exceptions.NotFound(f"GET ...?token={secret}"), StorageNotFound),
        (api_exceptions.Unauthorized(secret), StorageUnauthenticated),
        (api_exceptions.Forbidden(secret), StoragePermissionDenied),
        (api_exceptions.TooManyRequests(secret), StorageUnavailable),
        (api_exceptions.ServiceUnavailable(secret), StorageUnavailable),
        (api_exceptions.RetryError(secret, api_exceptions.InternalServerError(secret)), StorageUnavailable),
        (auth_exceptions.RefreshError(secret, {"error": "invalid_grant"}), StorageUnauthenticated),
        (auth_exceptions.RefreshError(secret, retryable=True), StorageUnavailable),
        (auth_exceptions.TransportError(secret), StorageUnavailable),
        (ConnectionResetError(secret), StorageUnavailable),
        (ValueError(secret), StorageError),
    ]
    for exc, expected in cases:
        translated = translate_gcs_error(exc, bucket="bkt", name="p", action="listing")
        assert type(translated) is expected, exc
        assert secret not in f"{translated} {translated!r}"
    assert "does not exist" in str(translate_gcs_error(404, bucket="bkt", name="p", action="listing"))
