"""The Azure Blob backend: the conformance kit and every auth mode that can run here,
on Azurite (the emulator) started by the tests.

Entra ID itself cannot be reached from the test machine, so the service-principal and
default-credential modes are covered in two ways: unit tests check that the right
azure-identity class is built from the config and that no secret reaches a message;
and one end-to-end test runs a service principal against Azurite over HTTPS with
``--oauth basic`` (which checks a token's claims but not its signature), with
``ClientSecretCredential`` answering a locally made token instead of asking Entra ID.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
from azure.identity import ClientSecretCredential, CredentialUnavailableError, DefaultAzureCredential

from adapter.errors import (
    IntegrityError,
    SidecarError,
    StorageConfigError,
    StorageError,
    StorageNotFound,
    StoragePermissionDenied,
    StorageUnauthenticated,
    StorageUnavailable,
)
from adapter.settings import Settings
from puller.config import StorageConfig
from puller.model_key import ModelKey
from puller.pull import Puller
from puller.request import LocalModel, PullRequest
from puller.storage.azure import (
    STORAGE_SCOPE,
    AzureBlobStorage,
    parse_connection_string,
    translate_azure_error,
)
from puller.testing.storage_conformance import StorageConformance
from tests.servers.azurite import ACCOUNT_KEY, ACCOUNT_NAME, AzuriteServer
from tests.servers.https import make_pki
from tests.servers.process import free_port, running

TENANT = "0f5b1c3e-1d2a-4b6c-9e8f-123456789abc"


def random_key() -> str:
    """A well-formed account key that is not the account's."""
    return base64.b64encode(os.urandom(64)).decode()


def settings_for(tmp_path: Path) -> Settings:
    return Settings(
        root_model_dir=tmp_path / "models",
        storage_config_dir=tmp_path / "storage-config",
        pvc_mounts_dir=tmp_path / "pvc",
        pull_workers=4,
        pull_part_bytes=1024 * 1024,
        pull_retries=2,
        pull_timeout_seconds=10.0,
    )


def backend(tmp_path: Path, **fields: Any) -> AzureBlobStorage:
    return AzureBlobStorage(StorageConfig("azure", fields), settings_for(tmp_path))


def pull(tmp_path: Path, config: Mapping[str, Any], model_path: str) -> LocalModel:
    """One pull through the real Puller (registry, engine, placement)."""
    settings = settings_for(tmp_path)
    settings.storage_config_dir.mkdir(parents=True, exist_ok=True)
    (settings.storage_config_dir / "store").write_text(json.dumps({"type": "azure", **config}))
    puller = Puller(settings)
    puller.start()
    try:
        request = PullRequest("azure-model", model_path, ModelKey(storage_key="store"))
        return asyncio.run(puller.pull(request))
    finally:
        puller.close()


def read_all(storage: AzureBlobStorage, name: str) -> bytes:
    blob = storage.plan(name).blobs[0]
    stream = storage.open_range(blob, 0, blob.size)
    buffer = bytearray(blob.size + 1)
    view, got = memoryview(buffer), 0
    try:
        for _ in range(blob.size + 1):
            count = stream.readinto(view[got:])
            if not count:
                break
            got += count
    finally:
        stream.close()
    return bytes(buffer[:got])


def assert_clean(error: BaseException, *secrets: str) -> None:
    text = f"{error} {error!r}"
    for secret in secrets:
        assert secret not in text


def new_container(server: AzuriteServer, *, public: bool = False) -> str:
    name = f"c{uuid.uuid4().hex[:12]}"
    server.create_container(name, public=public)
    return name


# --- servers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    server = AzuriteServer(log_dir=tmp_path_factory.mktemp("azurite-logs"))
    with running(server):
        yield server


@pytest.fixture(scope="module")
def azurite_pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_pki(tmp_path_factory.mktemp("azurite-pki"))


@pytest.fixture(scope="module")
def azurite_oauth(tmp_path_factory: pytest.TempPathFactory, azurite_pki: Any) -> Iterator[AzuriteServer]:
    """Azurite over HTTPS accepting bearer tokens (claims checked, not signatures)."""
    server = AzuriteServer(
        log_dir=tmp_path_factory.mktemp("azurite-oauth-logs"),
        tls=(azurite_pki.server_cert_file, azurite_pki.server_key_file, azurite_pki.ca_file),
        oauth=True,
    )
    with running(server):
        yield server


# --- the conformance kit --------------------------------------------------------------


class AzuriteStore:
    def __init__(self, server: AzuriteServer, container: str, base: str) -> None:
        self.server, self.container, self.base = server, container, base
        self.wrong_key = random_key()

    def put(self, key: str, data: bytes) -> None:
        self.server.upload_blob(self.container, f"{self.base}/{key}", data)

    def config(self) -> Mapping[str, Any]:
        return {
            "type": "azure",
            "connection_string": self.server.connection_string,
            "container": self.container,
        }

    def model_path(self, key: str) -> str:
        return f"{self.base}/{key}"

    def bad_credentials_config(self) -> Mapping[str, Any] | None:
        return {
            "type": "azure",
            "connection_string": self.server.connection_string_with_key(self.wrong_key),
            "container": self.container,
        }

    def secrets(self) -> list[str]:
        return [ACCOUNT_KEY, self.wrong_key]


@pytest.mark.integration
class TestAzureOnAzurite(StorageConformance):
    # Azure resolves '.' and '..' segments of a blob URL; Azurite refuses such names
    # (InvalidResourceName), so no blob can be named through '..'
    supports_dotdot_keys = False

    @pytest.fixture
    def store(self, azurite: AzuriteServer, base: str) -> AzuriteStore:
        return AzuriteStore(azurite, new_container(azurite), base)


# --- auth modes on Azurite ------------------------------------------------------------


@pytest.mark.integration
class TestAuthModes:
    @pytest.mark.parametrize("leading", ["", "?"])
    def test_sas_token(self, azurite: AzuriteServer, tmp_path: Path, leading: str) -> None:
        container = new_container(azurite)
        azurite.upload_blob(container, "m/a.bin", b"alpha")
        azurite.upload_blob(container, "m/sub/b.bin", b"beta")
        sas = leading + azurite.container_sas(container, permission="rl")
        config = {"account_name": ACCOUNT_NAME, "endpoint": azurite.endpoint, "container": container}
        model = pull(tmp_path, {**config, "sas_token": sas}, "m")
        assert (model.path / "a.bin").read_bytes() == b"alpha"
        assert (model.path / "sub" / "b.bin").read_bytes() == b"beta"

    def test_sas_in_connection_string(self, azurite: AzuriteServer, tmp_path: Path) -> None:
        container = new_container(azurite)
        azurite.upload_blob(container, "model.bin", b"via connection string sas")
        sas = azurite.container_sas(container)
        conn = f"BlobEndpoint={azurite.endpoint};SharedAccessSignature={sas}"
        model = pull(tmp_path, {"connection_string": conn, "container": container}, "model.bin")
        assert model.path.read_bytes() == b"via connection string sas"

    def test_sas_without_list_permission_is_denied(self, azurite: AzuriteServer, tmp_path: Path) -> None:
        container = new_container(azurite)
        azurite.upload_blob(container, "m/a.bin", b"alpha")
        sas = azurite.container_sas(container, permission="r")
        storage = backend(tmp_path, endpoint=azurite.endpoint, container=container, sas_token=sas)
        with pytest.raises(StoragePermissionDenied) as info:
            storage.plan("m")
        assert container in str(info.value)
        assert_clean(info.value, sas, sas.split("sig=")[1])

    def test_tampered_sas_is_refused(self, azurite: AzuriteServer, tmp_path: Path) -> None:
        container = new_container(azurite)
        azurite.upload_blob(container, "m/a.bin", b"alpha")
        good = azurite.container_sas(container)
        other = azurite.container_sas(container, hours=2)  # same fields, another signature
        head, _, _ = good.partition("sig=")
        tampered = head + "sig=" + other.split("sig=")[1]
        storage = backend(tmp_path, endpoint=azurite.endpoint, container=container, sas_token=tampered)
        # Azure answers 403 AuthenticationFailed, Azurite 403 AuthorizationFailure
        with pytest.raises((StorageUnauthenticated, StoragePermissionDenied)) as info:
            storage.plan("m")
        assert_clean(info.value, tampered, other.split("sig=")[1])

    def test_account_key_with_explicit_endpoint(self, azurite: AzuriteServer, tmp_path: Path) -> None:
        container = new_container(azurite)
        azurite.upload_blob(container, "weights.bin", b"shared key")
        for field in ("endpoint", "endpoint_url"):
            config = {
                "account_name": ACCOUNT_NAME,
                "account_key": ACCOUNT_KEY,
                field: azurite.endpoint,
                "container": container,
            }
            storage = backend(tmp_path, **config)
            assert storage.auth_mode == "shared_key"
            assert read_all(storage, "weights.bin") == b"shared key"

    def test_anonymous_public_container(self, azurite: AzuriteServer, tmp_path: Path) -> None:
        container = new_container(azurite, public=True)
        azurite.upload_blob(container, "pub/model.bin", b"for everyone")
        config = {"account_name": ACCOUNT_NAME, "endpoint": azurite.endpoint, "container": container}
        assert backend(tmp_path, **config).auth_mode == "anonymous"
        model = pull(tmp_path, config, "pub")
        assert (model.path / "model.bin").read_bytes() == b"for everyone"

    def test_anonymous_private_container_is_refused(self, azurite: AzuriteServer, tmp_path: Path) -> None:
        container = new_container(azurite)
        azurite.upload_blob(container, "m/a.bin", b"private")
        storage = backend(tmp_path, endpoint=azurite.endpoint, container=container)
        with pytest.raises((StoragePermissionDenied, StorageNotFound)) as info:
            storage.plan("m")
        assert container in str(info.value)

    def test_missing_container_is_not_found(self, azurite: AzuriteServer, tmp_path: Path) -> None:
        name = f"missing{uuid.uuid4().hex[:8]}"
        with pytest.raises(StorageNotFound) as info:
            pull(tmp_path, {"connection_string": azurite.connection_string, "container": name}, "m")
        assert name in str(info.value)
        assert_clean(info.value, ACCOUNT_KEY)

    def test_unreachable_endpoint_is_unavailable(self, tmp_path: Path) -> None:
        endpoint = f"http://127.0.0.1:{free_port()}/{ACCOUNT_NAME}"
        storage = backend(tmp_path, endpoint=endpoint, container="models")
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as info:
            storage.plan("m")
        assert endpoint in str(info.value)
        assert time.monotonic() - started < 20


# --- listing, versions, checksums -----------------------------------------------------


@pytest.mark.integration
class TestListingAndBlobs:
    def test_content_md5_becomes_a_checksum(self, azurite: AzuriteServer, tmp_path: Path) -> None:
        container = new_container(azurite)
        data = os.urandom(3000)
        azurite.upload_blob(container, "m/w.bin", data, content_md5=hashlib.md5(data).digest())
        blob = backend(tmp_path, connection_string=azurite.connection_string, container=container).plan(
            "m/w.bin"
        )
        assert blob.single_object
        assert blob.blobs[0].checksums == {"md5": hashlib.md5(data).hexdigest()}

    def test_a_wrong_content_md5_fails_the_pull(self, azurite: AzuriteServer, tmp_path: Path) -> None:
        container = new_container(azurite)
        good, bad = os.urandom(5000), os.urandom(5000)
        azurite.upload_blob(container, "m/good.bin", good, content_md5=hashlib.md5(good).digest())
        azurite.upload_blob(container, "m/bad.bin", bad, content_md5=hashlib.md5(b"other bytes").digest())
        config = {"connection_string": azurite.connection_string, "container": container}
        assert pull(tmp_path / "ok", config, "m/good.bin").path.read_bytes() == good
        with pytest.raises(IntegrityError) as info:
            pull(tmp_path / "corrupt", config, "m/bad.bin")
        assert "m/bad.bin" in str(info.value)
        models = tmp_path / "corrupt" / "models"
        assert not [p for p in models.rglob("*") if p.is_file()]

    def test_version_is_the_etag(self, azurite: AzuriteServer, tmp_path: Path) -> None:
        container = new_container(azurite)
        azurite.upload_blob(container, "m.bin", b"one")
        storage = backend(tmp_path, connection_string=azurite.connection_string, container=container)
        props = azurite.service_client().get_blob_client(container, "m.bin").get_blob_properties()
        first = storage.plan("m.bin").blobs[0].version
        assert first == props.etag.strip('"')
        azurite.upload_blob(container, "m.bin", b"two")
        assert storage.plan("m.bin").blobs[0].version not in (None, first)

    def test_folder_markers_are_skipped(self, azurite: AzuriteServer, tmp_path: Path) -> None:
        container = new_container(azurite)
        azurite.upload_blob(container, "tree/", b"")
        azurite.upload_blob(container, "tree/sub", b"", metadata={"hdi_isfolder": "true"})
        azurite.upload_blob(container, "tree/sub/w.bin", b"weights")
        azurite.upload_blob(container, "tree/empty.txt", b"")
        storage = backend(tmp_path, connection_string=azurite.connection_string, container=container)
        plan = storage.plan("tree")
        assert not plan.single_object
        assert sorted(b.relpath for b in plan.blobs) == ["empty.txt", "sub/w.bin"]
        # a path naming a folder marker is the folder, not the marker
        marker = storage.plan("tree/sub")
        assert [(b.relpath, marker.single_object) for b in marker.blobs] == [("w.bin", False)]

    def test_whole_container_for_an_empty_path(self, azurite: AzuriteServer, tmp_path: Path) -> None:
        container = new_container(azurite)
        azurite.upload_blob(container, "a.bin", b"a")
        azurite.upload_blob(container, "d/b.bin", b"b")
        storage = backend(tmp_path, connection_string=azurite.connection_string, container=container)
        assert sorted(b.relpath for b in storage.plan("").blobs) == ["a.bin", "d/b.bin"]

    def test_blob_gone_after_listing_is_not_found(self, azurite: AzuriteServer, tmp_path: Path) -> None:
        container = new_container(azurite)
        azurite.upload_blob(container, "m/gone.bin", b"soon gone")
        storage = backend(tmp_path, connection_string=azurite.connection_string, container=container)
        blob = storage.plan("m/gone.bin").blobs[0]
        azurite.service_client().get_blob_client(container, "m/gone.bin").delete_blob()
        with pytest.raises(StorageNotFound) as info:
            storage.open_range(blob, 0, blob.size)
        assert "m/gone.bin" in str(info.value)
        assert_clean(info.value, ACCOUNT_KEY, "sig=")


# --- service principal end to end (Azurite over HTTPS with --oauth basic) -------------


def fake_jwt(lifetime: int = 3600) -> tuple[str, int]:
    """An unsigned token with the claims Azurite checks, and its expiry."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    now = int(time.time())
    claims = {
        "aud": "https://storage.azure.com",
        "iss": f"https://sts.windows.net/{TENANT}/",
        "tid": TENANT,
        "oid": str(uuid.uuid4()),
        "iat": now - 60,
        "nbf": now - 60,
        "exp": now + lifetime,
    }
    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.{part({'s': 0})}", now + lifetime


@pytest.mark.integration
def test_service_principal_token_on_azurite(
    azurite_oauth: AzuriteServer, azurite_pki: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # trust the test CA on both paths (the SDK's requests and our http.client)
    monkeypatch.setenv("SSL_CERT_FILE", str(azurite_pki.ca_file))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(azurite_pki.ca_file))
    token, expires = fake_jwt()
    calls: list[tuple[str, ...]] = []

    def get_token(self: ClientSecretCredential, *scopes: str, **kwargs: Any) -> AccessToken:
        calls.append(scopes)
        return AccessToken(token, expires)

    def get_token_info(self: ClientSecretCredential, *scopes: str, **kwargs: Any) -> AccessTokenInfo:
        calls.append(scopes)
        return AccessTokenInfo(token, expires)

    monkeypatch.setattr(ClientSecretCredential, "get_token", get_token)
    monkeypatch.setattr(ClientSecretCredential, "get_token_info", get_token_info)
    container = new_container(azurite_oauth)
    files = {f"m/f{i}.bin": os.urandom(300_000) for i in range(6)}
    for name, data in files.items():
        azurite_oauth.upload_blob(container, name, data)
    config = {
        "account_name": ACCOUNT_NAME,
        "endpoint": azurite_oauth.endpoint,
        "container": container,
        "client_id": str(uuid.uuid4()),
        "client_secret": "sp-secret-" + uuid.uuid4().hex,
        "tenant_id": TENANT,
    }
    model = pull(tmp_path, config, "m")
    assert {f"m/{p.name}": p.read_bytes() for p in model.path.iterdir()} == files
    assert calls and all(scopes == (STORAGE_SCOPE,) for scopes in calls)
    # one token for the listing, one for the byte path: not one per range
    assert len(calls) <= 2

    storage = backend(tmp_path, **config)
    monkeypatch.setattr(
        ClientSecretCredential, "get_token", lambda self, *s, **k: AccessToken("x.y.z", expires)
    )
    blob = storage.plan("m/f0.bin").blobs[0]
    with pytest.raises(StorageUnauthenticated) as info:
        storage.open_range(blob, 0, blob.size)
    assert_clean(info.value, config["client_secret"], "x.y.z")


# --- config and credentials, no server ------------------------------------------------


class TestConfig:
    def test_default_endpoint_and_anonymous(self, tmp_path: Path) -> None:
        storage = backend(tmp_path, account_name="acct", container="models")
        assert storage.identity() == "azure:https://acct.blob.core.windows.net/models"
        assert storage.auth_mode == "anonymous"
        assert storage.credential() is None

    def test_explicit_endpoint_wins(self, tmp_path: Path) -> None:
        conn = f"AccountName=acct;AccountKey={random_key()};EndpointSuffix=core.chinacloudapi.cn"
        storage = backend(
            tmp_path, connection_string=conn, endpoint="http://127.0.0.1:1/acct/", container="c"
        )
        assert storage.identity() == "azure:http://127.0.0.1:1/acct/c"
        assert storage.auth_mode == "shared_key"

    def test_identity_holds_no_secret(self, tmp_path: Path) -> None:
        key = random_key()
        conns = [
            f"AccountName=acct;AccountKey={key}",
            "BlobEndpoint=https://user:pw@x.example/?sv=1&sig=SIGSECRET;SharedAccessSignature=sv=1&sig=SIGSECRET",
        ]
        for conn in conns:
            identity = backend(tmp_path, connection_string=conn, container="c").identity()
            assert identity.startswith("azure:https://")
            for secret in (key, "SIGSECRET", "pw@"):
                assert secret not in identity

    def test_connection_string_forms(self) -> None:
        key = random_key()
        parsed = parse_connection_string(f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={key}")
        assert (parsed.endpoint, parsed.account_name, parsed.account_key) == (
            "https://acct.blob.core.windows.net",
            "acct",
            key,
        )
        parsed = parse_connection_string(
            f"accountname=a;accountkey={key};endpointsuffix=core.usgovcloudapi.net;"
        )
        assert parsed.endpoint == "https://a.blob.core.usgovcloudapi.net"
        parsed = parse_connection_string(
            "BlobEndpoint=https://x.example/;SharedAccessSignature=?sv=1&sig=abc"
        )
        assert (parsed.endpoint, parsed.sas, parsed.account_key) == (
            "https://x.example/",
            "sv=1&sig=abc",
            None,
        )
        parsed = parse_connection_string("UseDevelopmentStorage=true")
        assert (parsed.endpoint, parsed.account_name) == (
            "http://127.0.0.1:10000/devstoreaccount1",
            ACCOUNT_NAME,
        )

    @pytest.mark.parametrize(
        "conn",
        [
            "AccountKey=SECRETSECRET;this part has no equals sign",
            "Foo=bar;AccountKey=SECRETSECRET",
            "BlobEndpoint=https://x.example;AccountKey=SECRETSECRET",
            "BlobEndpoint=https://x.example;AccountName=a;Other=SECRETSECRET",
            "AccountName=a;AccountKey=SECRETSECRET!!not-base64",
        ],
    )
    def test_bad_connection_string(self, tmp_path: Path, conn: str) -> None:
        with pytest.raises(StorageConfigError) as info:
            backend(tmp_path, connection_string=conn, container="c")
        assert_clean(info.value, "SECRETSECRET", conn)

    def test_required_fields(self, tmp_path: Path) -> None:
        with pytest.raises(StorageConfigError, match="container"):
            backend(tmp_path, account_name="acct")
        with pytest.raises(StorageConfigError, match="account_name"):
            backend(tmp_path, container="c")
        with pytest.raises(StorageConfigError, match="account_name"):
            backend(tmp_path, container="c", endpoint="https://x.example", account_key=random_key())

    def test_incomplete_service_principal(self, tmp_path: Path) -> None:
        with pytest.raises(StorageConfigError) as info:
            backend(tmp_path, account_name="a", container="c", client_id="id", client_secret="SP-SECRET")
        assert "tenant_id" in str(info.value)
        assert_clean(info.value, "SP-SECRET")
        with pytest.raises(StorageConfigError, match="client_id"):
            backend(tmp_path, account_name="a", container="c", tenant_id=TENANT, client_secret="SP-SECRET")
        with pytest.raises(StorageConfigError, match="use_default_credential"):
            backend(tmp_path, account_name="a", container="c", client_id="id")

    def test_bearer_token_needs_https(self, tmp_path: Path) -> None:
        with pytest.raises(StorageConfigError, match="https"):
            backend(tmp_path, endpoint="http://127.0.0.1:1/acct", container="c", use_default_credential=True)

    def test_auth_mode_precedence(self, tmp_path: Path) -> None:
        key = random_key()
        sp = {"client_id": "id", "client_secret": "s", "tenant_id": TENANT}
        conn = f"AccountName=acct;AccountKey={key}"
        assert backend(tmp_path, account_name="a", container="c", connection_string=conn, **sp).auth_mode == (
            "shared_key"
        )
        assert backend(tmp_path, account_name="a", container="c", sas_token="sv=1", **sp).auth_mode == "token"
        assert backend(tmp_path, account_name="a", container="c", sas_token="?sv=1").auth_mode == "sas"
        assert backend(
            tmp_path, account_name="a", container="c", use_default_credential="true"
        ).auth_mode == ("token")


class TestCredentials:
    """Entra ID is out of reach here: these check which azure-identity class the config
    builds, and that a failing credential yields our error without the secret."""

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"account_name": "acct", "container": "models", **extra}

    def test_service_principal_builds_client_secret_credential(self, tmp_path: Path) -> None:
        secret = "sp-secret-" + uuid.uuid4().hex
        storage = backend(tmp_path, **self.config(client_id="app", client_secret=secret, tenant_id=TENANT))
        assert storage.auth_mode == "token"
        assert isinstance(storage.credential(), ClientSecretCredential)
        assert storage.credential() is storage.credential()
        storage.close()

    @pytest.mark.parametrize("extra", [{}, {"client_id": "user-assigned-id"}, {"tenant_id": TENANT}])
    def test_default_credential(self, tmp_path: Path, extra: dict[str, str]) -> None:
        storage = backend(tmp_path, **self.config(use_default_credential=True, **extra))
        assert isinstance(storage.credential(), DefaultAzureCredential)
        storage.close()

    def test_invalid_tenant_is_a_config_error(self, tmp_path: Path) -> None:
        secret = "sp-secret-" + uuid.uuid4().hex
        storage = backend(
            tmp_path, **self.config(client_id="app", client_secret=secret, tenant_id="bad tenant!")
        )
        with pytest.raises(StorageConfigError) as info:
            storage.credential()
        assert_clean(info.value, secret)

    @pytest.mark.parametrize(
        ("fields", "cls"),
        [
            (
                {"client_id": "app", "client_secret": "SP-SECRET-VALUE", "tenant_id": TENANT},
                ClientSecretCredential,
            ),
            ({"use_default_credential": "true"}, DefaultAzureCredential),
        ],
    )
    def test_token_failure_is_unauthenticated_without_secret(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fields: dict[str, str], cls: type
    ) -> None:
        leak = "SP-SECRET-VALUE"

        def refuse(self: Any, *scopes: str, **kwargs: Any) -> Any:
            raise (
                CredentialUnavailableError if cls is DefaultAzureCredential else ClientAuthenticationError
            )(message=f"AADSTS7000215: invalid client secret {leak}")

        monkeypatch.setattr(cls, "get_token", refuse)
        monkeypatch.setattr(cls, "get_token_info", refuse)
        storage = backend(tmp_path, **self.config(**fields))
        with pytest.raises(StorageUnauthenticated) as info:
            storage.plan("m")
        assert "models" in str(info.value)
        assert_clean(info.value, leak)
        from puller.storage.base import Blob

        with pytest.raises(StorageUnauthenticated) as info:
            storage.open_range(Blob(name="m/a.bin", relpath="a.bin", size=10), 0, 10)
        assert_clean(info.value, leak)
        storage.close()


class TestTranslation:
    @staticmethod
    def body(code: str) -> bytes:
        return f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code></Error>'.encode()

    @pytest.mark.parametrize(
        ("status", "code", "expected"),
        [
            (404, "BlobNotFound", StorageNotFound),
            (404, "ContainerNotFound", StorageNotFound),
            (404, "", StorageNotFound),
            (403, "AuthenticationFailed", StorageUnauthenticated),
            (401, "NoAuthenticationInformation", StorageUnauthenticated),
            (403, "AuthorizationFailure", StoragePermissionDenied),
            (403, "AuthorizationPermissionMismatch", StoragePermissionDenied),
            (409, "PublicAccessNotPermitted", StoragePermissionDenied),
            (503, "ServerBusy", StorageUnavailable),
            (500, "InternalError", StorageUnavailable),
            (429, "", StorageUnavailable),
            (416, "InvalidRange", IntegrityError),
            (400, "InvalidQueryParameterValue", StorageError),
        ],
    )
    def test_statuses(self, status: int, code: str, expected: type[SidecarError]) -> None:
        error = translate_azure_error(
            (status, self.body(code) if code else b""),
            container="models",
            name="m/a.bin",
            endpoint="https://acct.blob.core.windows.net",
            action="reading",
        )
        assert type(error) is expected
        assert "models" in str(error)

    def test_exceptions(self) -> None:
        where = {"container": "models", "name": "m", "endpoint": "https://a.example", "action": "listing"}
        secret = "AccountKey=SECRET"
        assert isinstance(translate_azure_error(ServiceRequestError(secret), **where), StorageUnavailable)
        assert isinstance(
            translate_azure_error(ClientAuthenticationError(message=secret), **where), StorageUnauthenticated
        )
        assert isinstance(translate_azure_error(ValueError(secret), **where), StorageConfigError)
        assert isinstance(translate_azure_error(RuntimeError(secret), **where), StorageError)
        for exc in (ServiceRequestError(secret), ValueError(secret), RuntimeError(secret)):
            assert_clean(translate_azure_error(exc, **where), secret)
