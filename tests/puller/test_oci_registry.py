"""The registry client (``puller/oci_registry.py``): references, platforms, challenges,
credentials and the error table without a server; then against real registries
(``tests/servers/registry.py``): anonymous, Basic (htpasswd) and token authentication,
docker config credentials, TLS, manifests by tag and digest, a manifest whose bytes
do not match its digest, and the platform choice in an index."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapter.errors import (
    IntegrityError,
    InvalidRequest,
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
from puller.oci_registry import (
    DOCKER_LIST,
    OCI_INDEX,
    Platform,
    Reference,
    RegistryClient,
    choose_manifest,
    credentials_for,
    parse_challenge,
    parse_reference,
    registry_error,
)
from puller.storage.oci import OCIStorage
from puller.storage.ranged_http import RangedHttp
from tests.puller.conftest import make_settings
from tests.servers.https import Certificates, make_pki
from tests.servers.oci_images import (
    Image,
    ImagePusher,
    Index,
    IndexEntry,
    MultiArch,
    Sample,
    file,
    image_config,
    layer,
    modelcar_image,
    multiarch_index,
)
from tests.servers.process import free_port
from tests.servers.registry import DistributionRegistry

PASSWORD = "pa55-w0rd-Secret"
WRONG = "not-the-Password-42"
USERS = {"alice": PASSWORD}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# --- no server: references --------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("models/car:v1", Reference("r:5000", "models/car", "v1")),
        ("models/car", Reference("r:5000", "models/car", "latest")),
        ("car@sha256:" + "a" * 64, Reference("r:5000", "car", None, "sha256:" + "a" * 64)),
        ("a/b/c:v1@sha256:" + "b" * 64, Reference("r:5000", "a/b/c", "v1", "sha256:" + "b" * 64)),
        ("my_org/model-x.y__z:V1.2_rc-3", Reference("r:5000", "my_org/model-x.y__z", "V1.2_rc-3")),
    ],
)
def test_references_on_a_configured_registry(path: str, expected: Reference) -> None:
    assert parse_reference(path, "r:5000") == expected


def test_a_reference_names_its_registry_when_none_is_configured() -> None:
    assert parse_reference("ghcr.io/org/model:v1", None) == Reference("ghcr.io", "org/model", "v1")
    assert parse_reference("localhost/m", None) == Reference("localhost", "m", "latest")
    assert parse_reference("127.0.0.1:5000/m:t", None) == Reference("127.0.0.1:5000", "m", "t")
    assert parse_reference("docker.io/busybox", None) == Reference(
        "registry-1.docker.io", "library/busybox", "latest"
    )
    with pytest.raises(StorageConfigError, match="names no registry"):
        parse_reference("org/model:v1", None)


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("Models/Car:v1", InvalidRequest),
        ("models/car:-v1", InvalidRequest),
        ("models/car:" + "t" * 129, InvalidRequest),
        ("models/car@sha256:abc", InvalidRequest),
        ("models/car@md5:" + "a" * 32, InvalidRequest),
        ("models//car", InvalidRequest),
        ("", InvalidRequest),
        ("models/../etc:v1", UnsafePath),
        ("./models", UnsafePath),
    ],
)
def test_malformed_references_are_refused_naming_the_path(path: str, error: type[Exception]) -> None:
    with pytest.raises(error) as caught:
        parse_reference(path, "r:5000")
    assert repr(path) in str(caught.value)


# --- no server: platforms ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", "linux/amd64"),
        ("aarch64", "linux/arm64/v8"),
        ("armv7l", "linux/arm/v7"),
        ("armv6l", "linux/arm/v6"),
        ("ppc64le", "linux/ppc64le"),
        ("s390x", "linux/s390x"),
    ],
)
def test_the_machine_platform_in_go_names(
    monkeypatch: pytest.MonkeyPatch, machine: str, expected: str
) -> None:
    import platform

    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    assert str(Platform.of_machine()) == expected


def test_platform_settings_are_parsed_and_normalised() -> None:
    assert Platform.parse("linux/arm64") == Platform("linux", "arm64", "v8")
    assert Platform.parse("Linux/AMD64") == Platform("linux", "amd64")
    assert Platform.parse("linux/arm/7") == Platform("linux", "arm", "v7")
    for bad in ("linux", "linux/amd64/v2/x", "linux/am d64"):
        with pytest.raises(StorageConfigError, match="os/architecture"):
            Platform.parse(bad)


def _entry(
    platform: dict[str, str] | None, digest: str = "sha256:" + "1" * 64, **annotations: str
) -> dict[str, Any]:
    found: dict[str, Any] = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest,
        "size": 1,
    }
    if platform is not None:
        found["platform"] = platform
    if annotations:
        found["annotations"] = {k.replace("_", "."): v for k, v in annotations.items()}
    return found


def test_the_best_variant_wins_and_older_variants_run_on_newer_cpus() -> None:
    v6 = _entry({"os": "linux", "architecture": "arm", "variant": "v6"}, "sha256:" + "6" * 64)
    v7 = _entry({"os": "linux", "architecture": "arm", "variant": "v7"}, "sha256:" + "7" * 64)
    v8 = _entry({"os": "linux", "architecture": "arm64"}, "sha256:" + "8" * 64)
    assert choose_manifest([v6, v7, v8], Platform.parse("linux/arm/v7"), "x")["digest"] == v7["digest"]
    assert choose_manifest([v6, v8], Platform.parse("linux/arm/v7"), "x")["digest"] == v6["digest"]
    assert choose_manifest([v6, v7, v8], Platform.parse("linux/arm64/v8"), "x")["digest"] == v8["digest"]
    with pytest.raises(StorageNotFound):
        choose_manifest([v7], Platform.parse("linux/arm/v6"), "x")


def test_attestations_are_skipped_and_a_lone_platformless_entry_is_taken() -> None:
    attestation = _entry(
        {"os": "unknown", "architecture": "unknown"},
        "sha256:" + "a" * 64,
        vnd_docker_reference_type="attestation-manifest",
    )
    image = _entry(None, "sha256:" + "b" * 64)
    assert (
        choose_manifest([attestation, image], Platform.parse("linux/amd64"), "x")["digest"] == image["digest"]
    )
    tagged = _entry(
        {"os": "linux", "architecture": "amd64"},
        "sha256:" + "c" * 64,
        vnd_docker_reference_type="attestation-manifest",
    )
    with pytest.raises(StorageNotFound, match=r"offers: none"):
        choose_manifest([tagged, attestation], Platform.parse("linux/amd64"), "x")


# --- no server: challenges, credentials, errors -----------------------------------------


def test_challenges_are_parsed() -> None:
    bearer = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push",error="insufficient_scope"'
    )
    assert bearer is not None
    assert bearer.scheme == "bearer"
    assert bearer.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
        "error": "insufficient_scope",
    }
    basic = parse_challenge('Basic realm="Registry Realm"')
    assert basic is not None
    assert (basic.scheme, basic.params) == ("basic", {"realm": "Registry Realm"})
    both = parse_challenge('Basic realm="x", Bearer realm="https://t/", service=s')
    assert both is not None
    assert (both.scheme, both.params) == ("bearer", {"realm": "https://t/", "service": "s"})
    assert parse_challenge(None) is None
    assert parse_challenge("") is None


def test_explicit_credentials_come_first_and_hide_their_values() -> None:
    found = credentials_for(
        {"username": "u", "password": PASSWORD, "docker_config": {"auths": {"r": {"auth": _b64("x:y")}}}}, "r"
    )
    assert found is not None
    assert (found.username, found.password) == ("u", PASSWORD)
    assert PASSWORD not in repr(found)
    with pytest.raises(StorageConfigError, match="go together"):
        credentials_for({"username": "u"}, "r")


@pytest.mark.parametrize(
    "key", ["r.example:5000", "https://r.example:5000", "http://r.example:5000/v2/", "R.Example:5000"]
)
def test_docker_config_auths_keys_name_the_registry(key: str) -> None:
    config = {"auths": {"other.example": {"auth": _b64("no:no")}, key: {"auth": _b64(f"alice:{PASSWORD}")}}}
    found = credentials_for({"docker_config": json.dumps(config)}, "r.example:5000")
    assert found is not None
    assert (found.username, found.password) == ("alice", PASSWORD)
    assert "docker_config" in found.source


def test_docker_config_forms() -> None:
    fields_entry = {"auths": {"r": {"username": "bob", "password": PASSWORD}}}
    found = credentials_for({"docker_config": fields_entry}, "r")
    assert found is not None
    assert (found.username, found.password) == ("bob", PASSWORD)
    identity = credentials_for(
        {"docker_config": {"auths": {"r": {"auth": _b64("<token>:"), "identitytoken": "refresh-me"}}}}, "r"
    )
    assert identity is not None
    assert identity.identity_token == "refresh-me"
    hub = credentials_for(
        {"docker_config": {"auths": {"https://index.docker.io/v1/": {"auth": _b64("h:p")}}}},
        "registry-1.docker.io",
    )
    assert hub is not None
    assert hub.username == "h"
    old_layout = credentials_for({"docker_config": {"r": {"auth": _b64("o:p")}}}, "r")
    assert old_layout is not None
    assert old_layout.username == "o"
    assert credentials_for({"docker_config": {"auths": {"other": {"auth": _b64("a:b")}}}}, "r") is None
    assert credentials_for({}, "r") is None


def test_docker_config_mistakes_are_clear_and_secret_free(tmp_path: Path) -> None:
    with pytest.raises(StorageConfigError, match="not base64 of user:password") as caught:
        credentials_for({"docker_config": {"auths": {"r": {"auth": _b64(PASSWORD)}}}}, "r")
    assert PASSWORD not in str(caught.value)
    with pytest.raises(StorageConfigError, match="credential helper"):
        credentials_for({"docker_config": {"credHelpers": {"r": "ecr-login"}}}, "r")
    with pytest.raises(StorageConfigError, match="not JSON"):
        credentials_for({"docker_config": "{" + PASSWORD}, "r")
    with pytest.raises(StorageConfigError, match="cannot read docker_config_path"):
        credentials_for({"docker_config_path": str(tmp_path / "missing.json")}, "r")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {"r": {"auth": _b64(f"carol:{PASSWORD}")}}}))
    found = credentials_for({"docker_config_path": str(path)}, "r")
    assert found is not None
    assert found.username == "carol"


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"x"}]}', StorageNotFound),
        (400, b'{"errors":[{"code":"NAME_UNKNOWN","message":"x"}]}', StorageNotFound),
        (404, b"", StorageNotFound),
        (401, b"", StorageUnauthenticated),
        (403, b'{"errors":[{"code":"DENIED"}]}', StoragePermissionDenied),
        (429, b'{"errors":[{"code":"TOOMANYREQUESTS"}]}', StorageUnavailable),
        (503, b"", StorageUnavailable),
        (400, b"<html>", StorageError),
    ],
)
def test_registry_errors_are_translated_in_one_table(
    status: int, body: bytes, error: type[Exception]
) -> None:
    found = registry_error(status, body, "manifest r/x:v1")
    assert type(found) is error
    assert "manifest r/x:v1" in str(found)


def test_error_messages_quote_codes_never_registry_messages() -> None:
    found = registry_error(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"token abc.def.ghi"}]}', "x")
    assert "UNAUTHORIZED" in str(found)
    assert "abc.def.ghi" not in str(found)


# --- registries -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_pki(tmp_path_factory.mktemp("oci-pki"))


def _run(registry: DistributionRegistry) -> Iterator[DistributionRegistry]:
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()


def _pusher(registry: DistributionRegistry) -> ImagePusher:
    return ImagePusher(registry.url, credentials=registry.credentials(), context=registry.ssl_context())


@pytest.fixture(scope="module")
def open_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    yield from _run(DistributionRegistry(tmp_path_factory.mktemp("oci-open")))


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    yield from _run(DistributionRegistry(tmp_path_factory.mktemp("oci-basic"), auth="htpasswd", users=USERS))


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    yield from _run(DistributionRegistry(tmp_path_factory.mktemp("oci-token"), auth="token", users=USERS))


@pytest.fixture(scope="module")
def tls_registry(
    tmp_path_factory: pytest.TempPathFactory, pki: Certificates
) -> Iterator[DistributionRegistry]:
    yield from _run(DistributionRegistry(tmp_path_factory.mktemp("oci-tls"), tls=pki))


@pytest.fixture(scope="module")
def modelcar() -> Sample:
    return modelcar_image()


@pytest.fixture(scope="module")
def multiarch() -> MultiArch:
    return multiarch_index()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


def _store(settings: Settings, registry: DistributionRegistry, **fields: Any) -> OCIStorage:
    base: dict[str, Any] = {"registry": registry.host}
    if registry.tls is None:
        base["insecure"] = "true"
    return OCIStorage(StorageConfig("oci", {**base, **fields}), settings)


def _client(settings: Settings, registry: DistributionRegistry, **fields: Any) -> RegistryClient:
    ranged = RangedHttp(settings, "oci registry", cadata=fields.pop("certificate", None))
    return RegistryClient(
        registry.host,
        ranged,
        insecure=registry.tls is None,
        credentials=credentials_for(fields, registry.host),
        timeout=5.0,
    )


def _image_digest(store: OCIStorage, path: str) -> str:
    source = store.plan(path).source
    assert source is not None
    return source.rsplit("@", 1)[1]


@pytest.mark.integration
class TestAnonymous:
    def test_a_tag_and_a_digest_name_the_same_manifest(
        self, settings: Settings, open_registry: DistributionRegistry, modelcar: Sample
    ) -> None:
        digest = _pusher(open_registry).push("anon/car", modelcar.artifact, "v1")
        client = _client(settings, open_registry)
        by_tag = client.manifest("anon/car", "v1")
        by_digest = client.manifest("anon/car", digest)
        assert by_tag.digest == by_digest.digest == digest
        assert by_tag.document == json.loads(modelcar.artifact.manifest_bytes)
        assert not by_tag.is_index

    def test_missing_tag_and_repository_are_not_found(
        self, settings: Settings, open_registry: DistributionRegistry, modelcar: Sample
    ) -> None:
        _pusher(open_registry).push("anon/present", modelcar.artifact, "v1")
        store = _store(settings, open_registry)
        with pytest.raises(StorageNotFound, match=r"anon/present:nope.*MANIFEST_UNKNOWN"):
            store.plan("anon/present:nope")
        with pytest.raises(StorageNotFound, match=r"anon/absent:v1"):
            store.plan("anon/absent:v1")
        with pytest.raises(StorageNotFound):
            store.plan("anon/present@sha256:" + "0" * 64)

    def test_a_manifest_whose_bytes_do_not_match_its_digest_is_refused(
        self, settings: Settings, open_registry: DistributionRegistry
    ) -> None:
        image = Image(
            image_config(),
            (layer([file("models/m.bin", b"weights")]),),
            annotations={"padding": "xxxxxxxxxxxxxxxx"},
        )
        digest = _pusher(open_registry).push("anon/tampered", image, "v1")
        offset = image.manifest_bytes.index(b"xxxxxxxx")
        open_registry.corrupt_blob(digest, offset, b"y")
        client = _client(settings, open_registry)
        with pytest.raises(IntegrityError, match="digest"):
            client.manifest("anon/tampered", digest)
        with pytest.raises(IntegrityError, match="hash to"):
            client.manifest("anon/tampered", "v1")

    def test_an_index_gives_the_image_of_the_platform_asked(
        self, settings: Settings, open_registry: DistributionRegistry, multiarch: MultiArch
    ) -> None:
        _pusher(open_registry).push("anon/multi", multiarch.index, "v1")
        arm = _store(settings, open_registry, platform="linux/arm64/v8")
        amd = _store(settings, open_registry, platform="linux/amd64")
        assert _image_digest(arm, "anon/multi:v1") == multiarch.arm64.artifact.digest
        assert _image_digest(amd, "anon/multi:v1") == multiarch.amd64.artifact.digest
        # arm64 without a variant means v8
        assert _image_digest(_store(settings, open_registry, platform="linux/arm64"), "anon/multi:v1") == (
            multiarch.arm64.artifact.digest
        )

    def test_the_default_platform_is_this_machine(
        self, settings: Settings, open_registry: DistributionRegistry, multiarch: MultiArch
    ) -> None:
        _pusher(open_registry).push("anon/multi-default", multiarch.index, "v1")
        machine = Platform.of_machine()
        expected = {"amd64": multiarch.amd64, "arm64": multiarch.arm64}.get(machine.architecture)
        if expected is None:
            pytest.skip(f"no sample image for {machine}")
        assert (
            _image_digest(_store(settings, open_registry), "anon/multi-default:v1")
            == expected.artifact.digest
        )

    def test_no_image_for_the_platform_lists_what_is_offered(
        self, settings: Settings, open_registry: DistributionRegistry, multiarch: MultiArch
    ) -> None:
        _pusher(open_registry).push("anon/multi-none", multiarch.index, "v1")
        store = _store(settings, open_registry, platform="linux/s390x")
        with pytest.raises(StorageNotFound) as caught:
            store.plan("anon/multi-none:v1")
        message = str(caught.value)
        assert "linux/s390x" in message
        assert "(it offers: linux/amd64, linux/arm64/v8)" in message
        assert "unknown" not in message

    def test_docker_manifest_lists_and_nested_indexes(
        self, settings: Settings, open_registry: DistributionRegistry
    ) -> None:
        docker_list = multiarch_index(DOCKER_LIST)
        pusher = _pusher(open_registry)
        pusher.push("anon/list", docker_list.index, "v1")
        store = _store(settings, open_registry, platform="linux/arm64")
        assert _image_digest(store, "anon/list:v1") == docker_list.arm64.artifact.digest
        inner = multiarch_index()
        nested = Index((IndexEntry(inner.index, {"os": "linux", "architecture": "arm64"}),), OCI_INDEX)
        pusher.push("anon/nested", nested, "v1")
        assert _image_digest(store, "anon/nested:v1") == inner.arm64.artifact.digest
        too_deep = Index((IndexEntry(nested, {"os": "linux", "architecture": "arm64"}),), OCI_INDEX)
        pusher.push("anon/too-deep", too_deep, "v1")
        with pytest.raises(StorageError, match="nested more than 2"):
            store.plan("anon/too-deep:v1")

    def test_a_registry_that_is_not_there_is_unavailable(self, settings: Settings) -> None:
        store = OCIStorage(
            StorageConfig("oci", {"registry": f"127.0.0.1:{free_port()}", "insecure": True}), settings
        )
        with pytest.raises(StorageUnavailable, match="cannot reach"):
            store.plan("any/model:v1")


@pytest.mark.integration
class TestBasicAuth:
    def test_right_credentials_from_every_source(
        self, settings: Settings, basic_registry: DistributionRegistry, modelcar: Sample, tmp_path: Path
    ) -> None:
        digest = _pusher(basic_registry).push("basic/car", modelcar.artifact, "v1")
        auth = {"auths": {basic_registry.host: {"auth": _b64(f"alice:{PASSWORD}")}}}
        config_file = tmp_path / "docker-config.json"
        config_file.write_text(json.dumps(auth))
        for fields in (
            {"username": "alice", "password": PASSWORD},
            {"docker_config": json.dumps(auth)},
            {"docker_config": auth},
            {"docker_config_path": str(config_file)},
        ):
            assert _image_digest(_store(settings, basic_registry, **fields), "basic/car:v1") == digest

    def test_a_wrong_password_is_unauthenticated_without_the_secret(
        self, settings: Settings, basic_registry: DistributionRegistry, modelcar: Sample
    ) -> None:
        _pusher(basic_registry).push("basic/car2", modelcar.artifact, "v1")
        store = _store(settings, basic_registry, username="alice", password=WRONG)
        with pytest.raises(StorageUnauthenticated) as caught:
            store.plan("basic/car2:v1")
        message = str(caught.value)
        assert "refused the credentials from the username/password fields" in message
        assert WRONG not in message
        assert _b64(f"alice:{WRONG}") not in message
        assert "Basic " not in message

    def test_no_credentials_says_none_are_configured(
        self, settings: Settings, basic_registry: DistributionRegistry
    ) -> None:
        with pytest.raises(StorageUnauthenticated, match="none are configured"):
            _store(settings, basic_registry).plan("basic/car:v1")


@pytest.mark.integration
class TestTokenAuth:
    def test_one_token_per_repository_while_it_is_fresh(
        self, settings: Settings, token_registry: DistributionRegistry, modelcar: Sample
    ) -> None:
        assert token_registry.token_server is not None
        _pusher(token_registry).push("token/car", modelcar.artifact, "v1")
        scope = "repository:token/car:pull"
        before = token_registry.token_server.requests[scope]
        store = _store(settings, token_registry, username="alice", password=PASSWORD)
        plan = store.plan("token/car:v1")
        for blob in plan.blobs:
            stream = store.open_range(blob, 0, blob.size)
            stream.close()
        store.plan("token/car:v1")
        assert token_registry.token_server.requests[scope] - before == 1

    def test_an_expired_token_is_replaced(
        self, settings: Settings, tmp_path_factory: pytest.TempPathFactory, modelcar: Sample
    ) -> None:
        registry = DistributionRegistry(
            tmp_path_factory.mktemp("oci-token-short"), auth="token", users=USERS, token_expires_in=1
        )
        registry.start()
        try:
            assert registry.token_server is not None
            _pusher(registry).push("token/short", modelcar.artifact, "v1")
            store = _store(settings, registry, username="alice", password=PASSWORD)
            store.plan("token/short:v1")
            first = registry.token_server.requests["repository:token/short:pull"]
            time.sleep(1.1)
            store.plan("token/short:v1")
            assert registry.token_server.requests["repository:token/short:pull"] == first + 1
        finally:
            registry.stop()

    def test_a_refused_token_is_replaced_once(
        self, settings: Settings, token_registry: DistributionRegistry, modelcar: Sample
    ) -> None:
        assert token_registry.token_server is not None
        digest = _pusher(token_registry).push("token/retry", modelcar.artifact, "v1")
        store = _store(settings, token_registry, username="alice", password=PASSWORD)
        token_registry.token_server.deny_next = 1
        assert _image_digest(store, "token/retry:v1") == digest
        token_registry.token_server.deny_next = 5
        store2 = _store(settings, token_registry, username="alice", password=PASSWORD)
        with pytest.raises(StorageUnauthenticated, match="HTTP 401"):
            store2.plan("token/retry:v1")
        token_registry.token_server.deny_next = 0

    def test_a_token_refused_while_reading_a_layer_is_replaced(
        self, settings: Settings, tmp_path_factory: pytest.TempPathFactory, modelcar: Sample
    ) -> None:
        registry = DistributionRegistry(
            tmp_path_factory.mktemp("oci-token-rotate"), auth="token", users=USERS
        )
        registry.start()
        try:
            server = registry.token_server
            assert server is not None
            assert isinstance(modelcar.artifact, Image)
            _pusher(registry).push("token/rotate", modelcar.artifact, "v1")
            store = _store(settings, registry, username="alice", password=PASSWORD)
            plan = store.plan("token/rotate:v1")
            scope = "repository:token/rotate:pull"
            before = server.requests[scope]
            server.rotate_key()
            registry.restart()  # the cached token's signer is no longer trusted
            blob = plan.blobs[1]
            stream = store.open_range(blob, 0, 100)
            buffer = bytearray(100)
            assert stream.readinto(memoryview(buffer)) == 100
            stream.close()
            assert bytes(buffer) == modelcar.artifact.layers[1].data[:100]
            assert server.requests[scope] == before + 1
        finally:
            registry.stop()

    def test_a_docker_identity_token_is_exchanged_by_oauth2(
        self, settings: Settings, token_registry: DistributionRegistry, modelcar: Sample
    ) -> None:
        server = token_registry.token_server
        assert server is not None
        digest = _pusher(token_registry).push("token/identity", modelcar.artifact, "v1")
        refresh = "identity-" + PASSWORD
        server.identity_tokens[refresh] = "alice"
        posts = server.posts
        auth = {"auths": {token_registry.host: {"auth": _b64("<token>:"), "identitytoken": refresh}}}
        assert (
            _image_digest(_store(settings, token_registry, docker_config=auth), "token/identity:v1") == digest
        )
        assert server.posts == posts + 1
        wrong = {"auths": {token_registry.host: {"auth": _b64("<token>:"), "identitytoken": WRONG}}}
        with pytest.raises(StorageUnauthenticated) as caught:
            _store(settings, token_registry, docker_config=wrong).plan("token/identity:v1")
        assert WRONG not in str(caught.value)

    def test_a_wrong_password_is_unauthenticated_without_the_secret(
        self, settings: Settings, token_registry: DistributionRegistry
    ) -> None:
        auth = {"auths": {token_registry.host: {"auth": _b64(f"alice:{WRONG}")}}}
        store = _store(settings, token_registry, docker_config=auth)
        with pytest.raises(StorageUnauthenticated) as caught:
            store.plan("token/car:v1")
        message = str(caught.value)
        assert "token service" in message
        assert "docker_config" in message
        assert WRONG not in message
        assert _b64(f"alice:{WRONG}") not in message

    def test_anonymous_callers_get_a_pull_token_when_allowed(
        self, settings: Settings, tmp_path_factory: pytest.TempPathFactory, modelcar: Sample
    ) -> None:
        registry = DistributionRegistry(
            tmp_path_factory.mktemp("oci-token-anon"), auth="token", users=USERS, anonymous_pull=True
        )
        registry.start()
        try:
            digest = _pusher(registry).push("public/car", modelcar.artifact, "v1")
            assert _image_digest(_store(settings, registry), "public/car:v1") == digest
        finally:
            registry.stop()

    def test_a_failing_token_service_is_unavailable(
        self, settings: Settings, token_registry: DistributionRegistry
    ) -> None:
        assert token_registry.token_server is not None
        server = token_registry.token_server
        store = _store(settings, token_registry, username="alice", password=PASSWORD)
        server.fail_next = settings.pull_retries
        with pytest.raises(StorageUnavailable, match="token service"):
            store.plan("token/anything:v1")
        assert server.fail_next == 0
        server.fail_next = settings.pull_retries - 1  # plan retries what is transient
        with pytest.raises(StorageNotFound):
            store.plan("token/anything:v1")


@pytest.mark.integration
class TestTransport:
    def test_tls_with_the_configured_ca(
        self, settings: Settings, tls_registry: DistributionRegistry, pki: Certificates, modelcar: Sample
    ) -> None:
        digest = _pusher(tls_registry).push("tls/car", modelcar.artifact, "v1")
        store = _store(settings, tls_registry, certificate=pki.ca_pem)
        assert _image_digest(store, "tls/car:v1") == digest
        plan = store.plan("tls/car:v1")
        stream = store.open_range(plan.blobs[0], 0, 10)
        buffer = bytearray(10)
        assert stream.readinto(memoryview(buffer)) == 10
        stream.close()

    def test_tls_without_the_ca_or_with_another_fails(
        self, settings: Settings, tls_registry: DistributionRegistry, pki: Certificates
    ) -> None:
        with pytest.raises(StorageError, match="TLS"):
            _store(settings, tls_registry).plan("tls/car:v1")
        with pytest.raises(StorageError, match="TLS"):
            _store(settings, tls_registry, certificate=pki.other_ca_pem).plan("tls/car:v1")

    def test_plain_http_only_for_a_registry_named_insecure(
        self, settings: Settings, tls_registry: DistributionRegistry, open_registry: DistributionRegistry
    ) -> None:
        with pytest.raises(StorageError):
            _store(settings, tls_registry, insecure=True).plan("tls/car:v1")
        # an http-only registry not named insecure is spoken to over TLS, which fails
        secure = OCIStorage(StorageConfig("oci", {"registry": open_registry.host}), settings)
        with pytest.raises(StorageError):
            secure.plan("anon/car:v1")

    def test_bad_storage_config_fields_are_refused_early(self, settings: Settings) -> None:
        for fields, match in (
            ({"registry": "not a host"}, "host"),
            ({"registry": "r", "insecure": "maybe"}, "insecure"),
            ({"registry": "r", "platform": "amd64"}, "platform"),
            ({"registry": "r", "include": "code,weights"}, "include"),
            ({"registry": "r", "username": "u"}, "go together"),
        ):
            with pytest.raises(StorageConfigError, match=match):
                OCIStorage(StorageConfig("oci", fields), settings)
