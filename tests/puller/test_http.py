"""The http(s) backend against real local file servers (``tests/servers/https.py``):
the conformance kit over HTTPS with an inline CA and a header token, then headers,
TLS and mutual TLS, retries, dropped connections, servers without ranges, sizes or
HEAD, redirects, and secrets (header values, query strings) kept out of every message
and log line."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import stat
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
from structlog.testing import capture_logs

from adapter.errors import (
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
from puller.model_key import ModelKey
from puller.pull import Puller
from puller.request import LocalModel, PullRequest
from puller.storage.base import Blob
from puller.storage.http import HTTPStorage, parse_headers, status_error
from puller.storage.ranged_http import RangedHttp, without_query
from puller.testing.storage_conformance import ConformanceStore, StorageConformance
from tests.puller.conftest import make_settings
from tests.servers.https import Certificates, FileServer, make_pki
from tests.servers.process import free_port, running

pytestmark = pytest.mark.integration

TOKEN_HEADER = "X-Model-Token"
TOKEN = f"token-{secrets.token_hex(16)}"
PART = 64 * 1024


# --- servers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _serve(server: FileServer) -> Iterator[FileServer]:
    with running(server):
        yield server


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    """Plain HTTP, no authentication."""
    root = tmp_path_factory.mktemp("http-root")
    yield from _serve(FileServer(root, tmp_path_factory.mktemp("http-logs")))


@pytest.fixture(scope="module")
def tls_token(tmp_path_factory: pytest.TempPathFactory, pki: Certificates) -> Iterator[FileServer]:
    """HTTPS with the test CA; every request needs the header token."""
    root = tmp_path_factory.mktemp("https-root")
    server = FileServer(
        root, tmp_path_factory.mktemp("https-logs"), tls=pki, required_header=(TOKEN_HEADER, TOKEN)
    )
    yield from _serve(server)


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory, pki: Certificates) -> Iterator[FileServer]:
    """HTTPS that requires a client certificate signed by the test CA."""
    root = tmp_path_factory.mktemp("mtls-root")
    server = FileServer(root, tmp_path_factory.mktemp("mtls-logs"), tls=pki, client_cert_required=True)
    yield from _serve(server)


# --- the conformance kit ----------------------------------------------------------------


class HttpStore:
    """A folder of the HTTPS server, reached with the inline CA and the header token."""

    def __init__(self, server: FileServer, pki: Certificates, base: str) -> None:
        self.server, self.pki, self.base = server, pki, base
        self.wrong_token = f"wrong-{secrets.token_hex(16)}"

    def put(self, key: str, data: bytes) -> None:
        self.server.put(f"{self.base}/{key}", data)

    def config(self) -> Mapping[str, Any]:
        return {
            "type": "http",
            "url": self.server.base_url,
            "certificate": self.pki.ca_pem,
            "headers": {TOKEN_HEADER: TOKEN},
        }

    def model_path(self, key: str) -> str:
        return f"{self.base}/{key}"

    def bad_credentials_config(self) -> Mapping[str, Any] | None:
        return {**self.config(), "headers": {TOKEN_HEADER: self.wrong_token}}

    def secrets(self) -> list[str]:
        return [TOKEN, self.wrong_token]


class TestHttpConformance(StorageConformance):
    """The kit, adapted where it lists a prefix: a model over http is one file."""

    supports_dotdot_keys: ClassVar[bool] = False

    @pytest.fixture
    def store(self, tls_token: FileServer, pki: Certificates, base: str) -> HttpStore:
        return HttpStore(tls_token, pki, base)

    def test_prefix_with_nested_folders(self, store: ConformanceStore, workdir: Path) -> None:
        pytest.skip("HTTP has no listing: a model path names exactly one file")

    def test_keys_leading_outside_are_refused(self, store: ConformanceStore, workdir: Path) -> None:
        pytest.skip(
            "HTTP has no listing, so no listed key can lead outside; a model path with a '..' "
            "segment is refused (test_a_path_with_dot_segments_is_refused)"
        )

    def test_empty_object(self, store: ConformanceStore, workdir: Path) -> None:
        store.put("withempty/empty.txt", b"")
        model = self.pull(workdir, store.config(), store.model_path("withempty/empty.txt"))
        assert model.path.is_file()
        assert model.path.read_bytes() == b""
        assert model.disk_size_bytes == 0

    def test_unicode_and_spaces_in_names(self, store: ConformanceStore, workdir: Path) -> None:
        tree = {"odd/mödel wéights.bin": b"unicode", "odd/dir with space/a b.txt": b"spaces"}
        for key, data in tree.items():
            store.put(key, data)
        for index, (key, data) in enumerate(tree.items()):
            model = self.pull(workdir, store.config(), store.model_path(key), model_id=f"odd-{index}")
            assert model.path.name == key.rsplit("/", 1)[-1]
            assert model.path.read_bytes() == data

    @pytest.mark.slow
    def test_large_object_in_parallel_ranges(self, store: ConformanceStore, workdir: Path) -> None:
        data = os.urandom(self.large_object_bytes)
        store.put("large/weights.bin", data)
        model = self.pull(workdir, store.config(), store.model_path("large/weights.bin"))
        with model.path.open("rb") as f:
            assert f.read() == data
        assert isinstance(store, HttpStore)
        ranged = [
            r
            for r in store.server.requests(f"{store.base}/large/weights.bin")
            if r["method"] == "GET" and r["status"] == 206
        ]
        assert len(ranged) >= self.large_object_bytes // self.part_bytes


# --- helpers ----------------------------------------------------------------------------


def pull(
    tmp_path: Path, config: Mapping[str, Any], model_path: str, model_id: str = "m", **overrides: Any
) -> LocalModel:
    """Pull through the real Puller with ``config`` as the storage-config entry."""
    settings = make_settings(tmp_path, **overrides)
    settings.storage_config_dir.mkdir(parents=True, exist_ok=True)
    (settings.storage_config_dir / "store").write_text(json.dumps(dict(config)))
    puller = Puller(settings)
    puller.start()
    try:
        return asyncio.run(puller.pull(PullRequest(model_id, model_path, ModelKey(storage_key="store"))))
    finally:
        puller.close()


@pytest.fixture
def make_storage(tmp_path: Path) -> Iterator[Any]:
    made: list[HTTPStorage] = []

    def make(settings: Settings | None = None, **fields: Any) -> HTTPStorage:
        storage = HTTPStorage(StorageConfig("http", fields), settings or make_settings(tmp_path))
        made.append(storage)
        return storage

    yield make
    for storage in made:
        storage.close()


def header(entry: Mapping[str, Any], name: str) -> list[str]:
    return [v for k, v in entry["headers"] if k.lower() == name.lower()]


def assert_no_secret(error: BaseException, *secret_values: str) -> None:
    text = f"{error} {error!r}"
    for value in secret_values:
        assert value not in text


@pytest.fixture
def base() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


# --- headers ----------------------------------------------------------------------------


def test_headers_as_strings_and_lists(plain: FileServer, base: str, tmp_path: Path) -> None:
    plain.put(f"{base}/model.bin", b"weights")
    config = {
        "type": "http",
        "url": plain.base_url,
        "headers": {
            TOKEN_HEADER: TOKEN,
            "X-Multi": ["a", "b"],
            "Cookie": ["c=1", "d=2"],
            "Host": "ignored.example",
            "X-Empty-List": [],
        },
    }
    model = pull(tmp_path, config, f"{base}/model.bin")
    assert model.path.read_bytes() == b"weights"
    served = plain.requests(f"{base}/model.bin")
    assert served
    for entry in served:
        assert header(entry, TOKEN_HEADER) == [TOKEN]
        assert header(entry, "X-Multi") == ["a, b"]
        assert header(entry, "Cookie") == ["c=1; d=2"]
        assert header(entry, "Host") == [f"127.0.0.1:{plain.port}"]
        assert header(entry, "X-Empty-List") == []


def test_headers_given_as_a_json_string(plain: FileServer, base: str, tmp_path: Path) -> None:
    plain.put(f"{base}/model.bin", b"weights")
    config = {"type": "http", "url": plain.base_url, "headers": json.dumps({TOKEN_HEADER: [TOKEN]})}
    pull(tmp_path, config, f"{base}/model.bin")
    assert all(header(e, TOKEN_HEADER) == [TOKEN] for e in plain.requests(f"{base}/model.bin"))


@pytest.mark.parametrize(
    "headers",
    [
        {TOKEN_HEADER: 42},
        {TOKEN_HEADER: [TOKEN, 7]},
        {TOKEN_HEADER: f"{TOKEN}\r\nX-Injected: 1"},
        {"Bad Name": TOKEN},
        [TOKEN],
        "not json " + TOKEN,
    ],
)
def test_malformed_headers_are_refused_without_their_values(headers: Any) -> None:
    with pytest.raises(StorageConfigError) as info:
        parse_headers(headers)
    assert_no_secret(info.value, TOKEN)


def test_url_user_info_becomes_basic_auth_and_stays_out_of_identity(
    plain: FileServer, base: str, make_storage: Any
) -> None:
    plain.put(f"{base}/model.bin", b"x")
    password = f"pw-{secrets.token_hex(8)}"
    storage = make_storage(url=f"http://user:{password}@127.0.0.1:{plain.port}")
    storage.plan(f"{base}/model.bin")
    expected = "Basic " + base64.b64encode(f"user:{password}".encode()).decode()
    assert all(header(e, "Authorization") == [expected] for e in plain.requests(f"{base}/model.bin"))
    assert password not in storage.identity()
    assert storage.identity() == f"http:http://127.0.0.1:{plain.port}"


def test_base_path_and_both_query_strings_reach_the_server(
    plain: FileServer, base: str, make_storage: Any
) -> None:
    plain.put(f"{base}/sub/model.bin", b"x")
    storage = make_storage(url=f"{plain.base_url}/{base}?k=URLQ")
    plan = storage.plan("sub/model.bin?sig=PATHQ")
    assert plan.single_object
    (blob,) = plan.blobs
    assert "URLQ" not in blob.name and "PATHQ" not in blob.name
    targets = {e["target"] for e in plain.requests(f"{base}/sub/model.bin")}
    assert targets == {f"/{base}/sub/model.bin?k=URLQ&sig=PATHQ"}


def test_object_path_drops_the_query_and_decodes(make_storage: Any) -> None:
    storage = make_storage(url="http://127.0.0.1:1")
    assert storage.object_path("dir/a%20b.bin?sig=QSECRET#frag") == "dir/a b.bin"


def test_the_local_name_has_no_query_string(plain: FileServer, base: str, tmp_path: Path) -> None:
    plain.put(f"{base}/model.bin", b"x")
    model = pull(tmp_path, {"type": "http", "url": plain.base_url}, f"{base}/model.bin?sig=QSECRET")
    assert model.path.name == "model.bin"


# --- TLS --------------------------------------------------------------------------------


def test_https_with_the_wrong_ca_is_a_tls_failure(
    tls_token: FileServer, pki: Certificates, base: str, make_storage: Any
) -> None:
    tls_token.put(f"{base}/model.bin", b"x")
    headers = {TOKEN_HEADER: TOKEN}
    for certificate in (pki.other_ca_pem, None):
        storage = make_storage(url=tls_token.base_url, certificate=certificate, headers=headers)
        with pytest.raises(StorageError) as info:
            storage.plan(f"{base}/model.bin?sig=QSECRET")
        assert not isinstance(info.value, StorageUnavailable)
        assert "certificate" in str(info.value)
        assert_no_secret(info.value, TOKEN, "QSECRET")


def test_an_invalid_ca_is_a_config_error(tls_token: FileServer, base: str, make_storage: Any) -> None:
    storage = make_storage(url=tls_token.base_url, certificate="-----BEGIN CERTIFICATE-----\nnope\n")
    with pytest.raises(StorageConfigError):
        storage.plan(f"{base}/model.bin")


def test_mutual_tls(
    mtls: FileServer, pki: Certificates, base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(300_000)
    mtls.put(f"{base}/model.bin", data)
    seen: list[tuple[str, int, int]] = []
    original = RangedHttp.ssl_context
    certs = tmp_path / "models" / "_certs"

    def spy(self: RangedHttp) -> Any:
        for path in certs.iterdir():
            seen.append((path.name, stat.S_IMODE(path.stat().st_mode), stat.S_IMODE(certs.stat().st_mode)))
        return original(self)

    monkeypatch.setattr(RangedHttp, "ssl_context", spy)
    config = {
        "type": "https",
        "url": mtls.base_url,
        "certificate": pki.ca_pem,
        "client_certificate": pki.client_cert_pem,
        "client_key": pki.client_key_pem,
    }
    model = pull(tmp_path, config, f"{base}/model.bin")
    assert model.path.read_bytes() == data
    # the key pair was on disk only under _certs, 0600, while the context loaded it
    assert seen
    assert all(mode == 0o600 and folder_mode == 0o700 for _, mode, folder_mode in seen)
    assert all(name.endswith(".pem") for name, _, _ in seen)
    assert list(certs.iterdir()) == []


def test_mutual_tls_without_a_client_certificate_is_refused(
    mtls: FileServer, pki: Certificates, base: str, tmp_path: Path
) -> None:
    mtls.put(f"{base}/model.bin", b"x")
    config = {"type": "http", "url": mtls.base_url, "certificate": pki.ca_pem}
    with pytest.raises(StorageError) as info:
        pull(tmp_path, config, f"{base}/model.bin", pull_retries=1)
    assert mtls.base_url in str(info.value)
    assert not (tmp_path / "models" / "m").exists()


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"client_certificate": "CERT"}, "client_key is missing"),
        ({"client_key": "KEY"}, "client_certificate is missing"),
        (
            {"client_certificate": "CERT", "client_key": "-----BEGIN ENCRYPTED PRIVATE KEY-----\nx\n"},
            "encrypted",
        ),
    ],
)
def test_half_or_encrypted_client_key_pairs_are_config_errors(
    fields: dict[str, str], complaint: str, make_storage: Any
) -> None:
    with pytest.raises(StorageConfigError) as info:
        make_storage(url="https://127.0.0.1:1", **fields)
    assert complaint in str(info.value)
    assert_no_secret(info.value, "CERT", "KEY")


def test_a_client_key_that_does_not_load_is_a_config_error_and_leaves_no_file(
    pki: Certificates, tmp_path: Path, make_storage: Any
) -> None:
    with pytest.raises(StorageConfigError) as info:
        make_storage(url="https://127.0.0.1:1", client_certificate=pki.client_cert_pem, client_key="garbage")
    assert "garbage" not in str(info.value)
    assert list((tmp_path / "models" / "_certs").iterdir()) == []


# --- retries and broken connections -----------------------------------------------------


def test_500_then_success_is_retried(plain: FileServer, base: str, tmp_path: Path) -> None:
    data = os.urandom(5 * PART)
    plain.put(f"{base}/model.bin", data)
    config = {"type": "http", "url": plain.base_url}
    model = pull(tmp_path, config, f"_fail/2/{base}/model.bin", model_id="plan")
    assert model.path.read_bytes() == data
    model = pull(tmp_path, config, f"_failget/2/{base}/model.bin", model_id="ranges")
    assert model.path.read_bytes() == data
    statuses = [e["status"] for e in plain.requests(f"_fail/2/{base}/model.bin")]
    assert statuses[:3] == [500, 500, 200]
    assert [e["status"] for e in plain.requests(f"_failget/2/{base}/model.bin")].count(500) == 2


def test_500_every_time_is_unavailable(plain: FileServer, base: str, tmp_path: Path) -> None:
    with pytest.raises(StorageUnavailable) as info:
        pull(tmp_path, {"type": "http", "url": plain.base_url}, f"_status/503/{base}/model.bin?sig=QSECRET")
    assert "503" in str(info.value)
    assert_no_secret(info.value, "QSECRET")
    # plan tried pull_retries (3) times
    assert len(plain.requests(f"_status/503/{base}/")) == 3


@pytest.mark.parametrize("prefix", ["_cut/1", "_cut/1/_norange", "_cut/1/_nolength"])
def test_a_connection_closed_mid_body_is_resumed(
    plain: FileServer, base: str, tmp_path: Path, prefix: str
) -> None:
    data = os.urandom(4 * PART + 1234)
    plain.put(f"{base}/model.bin", data)
    model = pull(tmp_path, {"type": "http", "url": plain.base_url}, f"{prefix}/{base}/model.bin")
    assert model.path.read_bytes() == data
    if prefix == "_cut/1":
        ranges = [header(e, "Range")[0] for e in plain.requests(f"{prefix}/{base}") if header(e, "Range")]
        starts = {int(r.removeprefix("bytes=").split("-")[0]) for r in ranges}
        assert any(start % PART for start in starts), "a retry resumed mid-range"


# --- servers without ranges, sizes or HEAD ----------------------------------------------


def test_a_server_that_ignores_ranges(
    plain: FileServer, base: str, tmp_path: Path, make_storage: Any
) -> None:
    data = os.urandom(4 * PART + 10)
    plain.put(f"{base}/model.bin", data)
    blob = make_storage(url=plain.base_url).plan(f"_norange/{base}/model.bin").blobs[0]
    assert blob.size == len(data)
    model = pull(tmp_path, {"type": "http", "url": plain.base_url}, f"_norange/{base}/model.bin")
    assert model.path.read_bytes() == data
    gets = [e for e in plain.requests(f"_norange/{base}") if e["method"] == "GET"]
    assert gets and all(e["status"] == 200 for e in gets)
    # the plan's probes ask for byte 0; the read asks for no range at all, once
    assert all(header(e, "Range") in ([], ["bytes=0-0"]) for e in gets)
    assert sum(header(e, "Range") == [] for e in gets) == 1


def test_ranges_not_announced_are_probed_then_used(plain: FileServer, base: str, tmp_path: Path) -> None:
    data = os.urandom(4 * PART)
    plain.put(f"{base}/model.bin", data)
    model = pull(tmp_path, {"type": "http", "url": plain.base_url}, f"_quiet/{base}/model.bin")
    assert model.path.read_bytes() == data
    served = plain.requests(f"_quiet/{base}")
    assert [e["method"] for e in served[:2]] == ["HEAD", "GET"]
    assert header(served[1], "Range") == ["bytes=0-0"]
    assert sum(e["status"] == 206 for e in served[2:]) == 4


def test_a_body_without_length_is_counted_and_verified(
    plain: FileServer, base: str, tmp_path: Path, make_storage: Any
) -> None:
    data = os.urandom(3 * PART + 7)
    plain.put(f"{base}/model.bin", data)
    blob = make_storage(url=plain.base_url).plan(f"_nolength/{base}/model.bin").blobs[0]
    assert blob.size == len(data)
    assert blob.checksums == {"sha256": hashlib.sha256(data).hexdigest()}
    assert blob.version and blob.version.startswith('"')  # the ETag, when the server gives one
    model = pull(tmp_path, {"type": "http", "url": plain.base_url}, f"_nolength/{base}/model.bin")
    assert model.path.read_bytes() == data


def test_a_body_longer_than_planned_fails(plain: FileServer, base: str, make_storage: Any) -> None:
    plain.put(f"{base}/model.bin", b"0123456789")
    storage = make_storage(url=plain.base_url)
    blob = storage.plan(f"_nolength/{base}/model.bin").blobs[0]
    plain.put(f"{base}/model.bin", b"0123456789 and more")
    stream = storage.open_range(blob, 0, blob.size)
    try:
        with pytest.raises(SidecarError, match="longer than"):
            stream.readinto(memoryview(bytearray(64)))
    finally:
        stream.close()


@pytest.mark.parametrize("prefix", ["", "_nohead/", "_nolength/", "_quiet/"])
def test_empty_objects(plain: FileServer, base: str, tmp_path: Path, prefix: str) -> None:
    plain.put(f"{base}/empty.bin", b"")
    model = pull(tmp_path, {"type": "http", "url": plain.base_url}, f"{prefix}{base}/empty.bin")
    assert model.path.read_bytes() == b""


def test_head_refused_falls_back_to_get(plain: FileServer, base: str, tmp_path: Path) -> None:
    data = os.urandom(3 * PART)
    plain.put(f"{base}/model.bin", data)
    model = pull(tmp_path, {"type": "http", "url": plain.base_url}, f"_nohead/{base}/model.bin")
    assert model.path.read_bytes() == data
    assert [e["status"] for e in plain.requests(f"_nohead/{base}")][:2] == [405, 206]


# --- statuses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, StorageUnauthenticated),
        (403, StoragePermissionDenied),
        (404, StorageNotFound),
        (410, StorageNotFound),
        (408, StorageUnavailable),
        (429, StorageUnavailable),
        (500, StorageUnavailable),
        (503, StorageUnavailable),
        (418, StorageError),
    ],
)
def test_statuses_are_translated_without_the_query(
    plain: FileServer, base: str, tmp_path: Path, make_storage: Any, status: int, error: type[SidecarError]
) -> None:
    storage = make_storage(make_settings(tmp_path, pull_retries=1), url=plain.base_url)
    with pytest.raises(error) as info:
        storage.plan(f"_status/{status}/{base}/model.bin?sig=QSECRET")
    assert type(info.value) is error
    assert f"{plain.base_url}/_status/{status}/{base}/model.bin" in str(info.value)
    assert_no_secret(info.value, "QSECRET")
    assert type(status_error(status, "x")) is error


def test_wrong_or_missing_token(
    tls_token: FileServer, pki: Certificates, base: str, make_storage: Any
) -> None:
    tls_token.put(f"{base}/model.bin", b"x")
    missing = make_storage(url=tls_token.base_url, certificate=pki.ca_pem)
    with pytest.raises(StorageUnauthenticated):
        missing.plan(f"{base}/model.bin")
    wrong = make_storage(url=tls_token.base_url, certificate=pki.ca_pem, headers={TOKEN_HEADER: "nope-1234"})
    with pytest.raises(StoragePermissionDenied) as info:
        wrong.plan(f"{base}/model.bin?sig=QSECRET")
    assert_no_secret(info.value, "nope-1234", "QSECRET", TOKEN)


def test_a_closed_port_is_unavailable(tmp_path: Path, make_storage: Any) -> None:
    storage = make_storage(make_settings(tmp_path, pull_retries=2), url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnavailable) as info:
        storage.plan("model.bin?sig=QSECRET")
    assert_no_secret(info.value, "QSECRET")


# --- paths and config -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["../etc/passwd", "a/../../b", "a/%2e%2e/b", "./a"])
def test_a_path_with_dot_segments_is_refused(path: str, make_storage: Any) -> None:
    with pytest.raises(UnsafePath):
        make_storage(url="http://127.0.0.1:1").plan(path)


def test_names_are_percent_encoded_and_escapes_kept(plain: FileServer, base: str, make_storage: Any) -> None:
    plain.put(f"{base}/a b/ü%.bin", b"odd")
    storage = make_storage(url=plain.base_url)
    for path in (f"{base}/a b/ü%.bin", f"{base}/a%20b/%C3%BC%25.bin"):
        blob = storage.plan(path).blobs[0]
        assert blob.size == 3
        assert blob.relpath == "ü%.bin"
    assert {e["target"] for e in plain.requests(f"{base}/a")} == {f"/{base}/a%20b/%C3%BC%25.bin"}


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        (None, "has no url"),
        ("ftp://host/x", "url must look like"),
        ("127.0.0.1:8080", "url must look like"),
        ("ftp://user:hunter2-secret@host:99999/x?sig=s3cr3t", r"got ftp://host:99999/x$"),
        ("https://host:99999/x", "invalid port"),
    ],
)
def test_bad_urls_are_config_errors(url: str | None, complaint: str, make_storage: Any) -> None:
    with pytest.raises(StorageConfigError, match=complaint) as info:
        make_storage(url=url)
    assert "hunter2" not in str(info.value)
    assert "s3cr3t" not in str(info.value)


def test_a_url_in_a_message_has_no_query_and_no_user_info() -> None:
    assert without_query("https://u:p@[::1]:8080/a/b?sig=x#f") == "https://[::1]:8080/a/b"
    assert without_query("https://host/a?X-Amz-Signature=x") == "https://host/a"
    assert without_query("http://h:99999/p") == "http://h:99999/p"


# --- redirects --------------------------------------------------------------------------


def test_redirects_are_followed_and_keep_headers_on_the_same_host(
    plain: FileServer, base: str, tmp_path: Path
) -> None:
    data = os.urandom(3 * PART)
    plain.put(f"{base}/model.bin", data)
    config = {"type": "http", "url": plain.base_url, "headers": {TOKEN_HEADER: TOKEN}}
    model = pull(tmp_path, config, f"_redirect/3/{base}/model.bin")
    assert model.path.read_bytes() == data
    served = plain.requests(f"{base}/model.bin")
    assert sum(e["status"] == 302 for e in served) == 3
    assert all(header(e, TOKEN_HEADER) == [TOKEN] for e in served)


def test_headers_are_dropped_when_a_redirect_changes_the_host(
    plain: FileServer, base: str, tmp_path: Path
) -> None:
    data = os.urandom(2 * PART)
    plain.put(f"{base}/model.bin", data)
    config = {"type": "http", "url": plain.base_url, "headers": {TOKEN_HEADER: TOKEN, "Authorization": "B x"}}
    model = pull(tmp_path, config, f"_cross/{base}/model.bin")
    assert model.path.read_bytes() == data
    served = plain.requests(f"{base}/model.bin")
    moved = [e for e in served if header(e, "Host") == [f"localhost:{plain.port}"]]
    assert moved and len(moved) < len(served)
    for entry in served:
        sent = bool(header(entry, TOKEN_HEADER)) or bool(header(entry, "Authorization"))
        assert sent == (entry not in moved)


def test_a_redirect_loop_and_a_downgrade_are_refused(
    plain: FileServer, tls_token: FileServer, pki: Certificates, base: str, make_storage: Any
) -> None:
    storage = make_storage(url=plain.base_url)
    with pytest.raises(StorageError, match="more than 10") as info:
        storage.plan(f"_loop/{base}/model.bin?sig=QSECRET")
    assert_no_secret(info.value, "QSECRET")
    assert len(plain.requests(f"_loop/{base}/")) == 11

    secure = make_storage(url=tls_token.base_url, certificate=pki.ca_pem, headers={TOKEN_HEADER: TOKEN})
    with pytest.raises(StorageError, match="from https to http") as info:
        secure.plan(f"_to/{plain.port}/{base}/model.bin?sig=QSECRET")
    assert_no_secret(info.value, "QSECRET", TOKEN)
    assert [e for e in plain.requests(base) if e["target"].startswith(f"/{base}/")] == []


def test_a_stale_redirect_is_resolved_again(plain: FileServer, base: str, make_storage: Any) -> None:
    data = os.urandom(2 * PART)
    first = plain.put(f"{base}/v1/model.bin", data)
    plain.put(f"{base}/link", f"/{base}/v1/model.bin".encode())
    storage = make_storage(url=plain.base_url)
    blob = storage.plan(f"_via/{base}/link").blobs[0]
    # the object moves (same bytes, same ETag) and the redirect follows it
    second = plain.root / base / "v2" / "model.bin"
    second.parent.mkdir()
    first.rename(second)
    plain.put(f"{base}/link", f"/{base}/v2/model.bin".encode())
    stream = storage.open_range(blob, 0, blob.size)
    try:
        buffer = memoryview(bytearray(blob.size))
        got = 0
        for _ in range(1000):
            count = stream.readinto(buffer[got:])
            if not count:
                break
            got += count
    finally:
        stream.close()
    assert bytes(buffer[:got]) == data


def test_a_changed_object_behind_a_redirect_fails(plain: FileServer, base: str, make_storage: Any) -> None:
    plain.put(f"{base}/v1/model.bin", b"first version")
    plain.put(f"{base}/link", f"/{base}/v1/model.bin".encode())
    storage = make_storage(url=plain.base_url)
    blob = storage.plan(f"_via/{base}/link").blobs[0]
    plain.put(f"{base}/v2/model.bin", b"second, longer version")
    plain.put(f"{base}/link", f"/{base}/v2/model.bin".encode())
    (plain.root / base / "v1" / "model.bin").unlink()
    with pytest.raises(SidecarError, match="changed since it was planned"):
        storage.open_range(blob, 0, blob.size)


def test_open_range_of_an_unknown_blob(make_storage: Any) -> None:
    storage = make_storage(url="http://127.0.0.1:1")
    with pytest.raises(StorageError, match="not planned"):
        storage.open_range(Blob(name="http://127.0.0.1:1/x", relpath="x", size=1), 0, 1)


# --- secrets in logs --------------------------------------------------------------------


def test_no_secret_in_any_message_or_log_line(plain: FileServer, base: str, tmp_path: Path) -> None:
    plain.put(f"{base}/model.bin", os.urandom(3 * PART))
    config = {
        "type": "http",
        "url": f"{plain.base_url}?k=URLSECRET",
        "headers": {TOKEN_HEADER: TOKEN},
    }
    with capture_logs() as logs:
        pull(tmp_path, config, f"{base}/model.bin", model_id="ok")
        for index, path in enumerate(
            (f"{base}/missing.bin", f"_status/500/{base}/model.bin", f"_loop/{base}/model.bin")
        ):
            with pytest.raises(StorageError) as info:
                pull(tmp_path, config, path, model_id=f"bad-{index}", pull_retries=1)
            assert_no_secret(info.value, "URLSECRET", TOKEN)
    assert logs
    text = repr(logs)
    assert "URLSECRET" not in text
    assert TOKEN not in text
    assert all("URLSECRET" in e["target"] for e in plain.requests(f"{base}/model.bin"))
