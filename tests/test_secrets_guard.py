"""The secrets guard (``tests/secrets_guard.py``, ``tests/secret_scan.py``) catches what it
is there to catch: the scanner on its own, and whole pytest sessions with a leak planted
in them."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from adapter.errors import StorageConfigError
from puller.oci_registry import check_registry
from tests.secret_scan import SecretGuard, secrets_in_fields, secrets_in_text
from tests.secrets_guard import is_our_command

REPO = Path(__file__).resolve().parents[1]
PLANTED = "planted-Secret-6f1d0c2b"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# --- the scanner ----------------------------------------------------------------------


SPECIAL = 'p@ss/w0rd+"key"=1'


@pytest.mark.parametrize(
    ("secret", "text"),
    [
        (PLANTED, f'{{"event": "connecting", "password": "{PLANTED}"}}'),
        # inside base64 at each of the three alignments (user names of 2, 3, 4 letters)
        (PLANTED, f"Authorization: Basic {_b64('ab:' + PLANTED)}"),
        (PLANTED, f"Authorization: Basic {_b64('abc:' + PLANTED)}"),
        (PLANTED, f"Authorization: Basic {_b64('abcd:' + PLANTED)}"),
        (SPECIAL, "GET /m?key=p%40ss%2Fw0rd%2B%22key%22%3D1 HTTP/1.1"),
        (SPECIAL, json.dumps({"event": "x", "key": SPECIAL})),
    ],
)
def test_the_secret_is_found_as_is_escaped_urlencoded_and_inside_base64(secret: str, text: str) -> None:
    guard = SecretGuard()
    guard.register(secret, "the planted secret")
    guard.record(text, "a log line")
    leaks, scanned = guard.scan()
    assert {(leak.origin, leak.where) for leak in leaks} == {("the planted secret", "a log line")}
    assert scanned == len(text)
    assert all(secret not in leak.context for leak in leaks)


def test_a_pem_key_is_found_by_any_line_even_json_escaped(tmp_path: Path) -> None:
    body = ["MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg" + "A" * 16, "hRANCAAQ" + "B" * 56]
    pem = "-----BEGIN PRIVATE KEY-----\n" + "\n".join(body) + "\n-----END PRIVATE KEY-----\n"
    guard = SecretGuard()
    guard.register(pem.replace("\n", "\\n"), "a TLS key")  # as a storage config may hold it
    log = tmp_path / "adapter.log"
    log.write_text(json.dumps({"event": "bad key", "start": pem[:95]}) + "\n")  # its first line
    guard.watch_log_file(log, "the log of mesh-adapter")
    leaks, _ = guard.scan()
    assert [leak.origin for leak in leaks] == ["a TLS key (a line of a PEM private key)"]
    assert leaks[0].where == f"the log of mesh-adapter ({log})"


def test_short_values_and_clean_texts_raise_nothing() -> None:
    guard = SecretGuard()
    guard.register("secret", "too short to look for")
    guard.register(PLANTED, "the planted secret")
    guard.record('{"event": "secret_access_key missing"}', "a log line")
    guard.record(PLANTED[:-1], "almost")
    assert guard.scan()[0] == []


def test_secrets_are_taken_from_every_kind_of_storage_config() -> None:
    docker = {"auths": {"r.example": {"auth": _b64("alice:docker-Pass-1234")}}}
    fields = {
        "type": "s3",
        "bucket": "public-bucket-name",
        "access_key_id": "AKIAPUBLICKEYID00001",
        "secret_access_key": "s3-Secret-0001",
        "token_uri": "https://oauth2.example/token",
        "connection_string": (
            "AccountName=a;AccountKey=azure-Key-0001==;SharedAccessSignature=sv=1&sig=azure-Sig-0001"
        ),
        "sas_token": "?sv=2024&sp=rl&sig=sas-Sig-00000001",
        "client_secret": "sp-Secret-0001",
        "private_key": "-----BEGIN PRIVATE KEY-----\\nlong-enough-key-line-0001\\n-----END PRIVATE KEY-----",
        "url": "https://user:url-Pass-0001@host/models?token=url-Token-0001",
        "headers": json.dumps({"X-Model-Token": ["header-Token-0001"]}),
        "docker_config": json.dumps(docker),
        "headers.Authorization": "Bearer param-Token-0001",
        "password": "oci-Pass-00001",
        "anonymous": True,
    }
    found = set(secrets_in_fields(fields))
    for expected in [
        "s3-Secret-0001",
        "azure-Key-0001==",
        "azure-Sig-0001",
        "sas-Sig-00000001",
        "sp-Secret-0001",
        "url-Pass-0001",
        "url-Token-0001",
        "header-Token-0001",
        "docker-Pass-1234",
        "Bearer param-Token-0001",
        "oci-Pass-00001",
    ]:
        assert expected in found
    assert not found & {"public-bucket-name", "AKIAPUBLICKEYID00001", "https://oauth2.example/token", "s3"}


def test_secrets_are_taken_from_json_text_even_broken() -> None:
    assert list(secrets_in_text('{"type": "s3", "secret_access_key": "whole-Secret-01"}')) == [
        "whole-Secret-01"
    ]
    broken = '{"type": "s3", "bucket": "b", "secret_access_key": "broken-Secret-01", "password": "x\\"y-0123'
    assert list(secrets_in_text(broken)) == ["broken-Secret-01"]


def test_credentials_in_a_registry_or_proxy_url_are_secrets() -> None:
    fields = {
        "registry": "u:registry-Pass-01@reg.example:5000",
        "https_proxy": "https://u:proxy-Pass-0001@proxy.example:3128",
        "http_proxy": "proxy.example:3128",
    }
    assert set(secrets_in_fields(fields)) == {"registry-Pass-01", "proxy-Pass-0001"}


def test_a_registry_with_credentials_is_named_without_them() -> None:
    """A leak the guard found: an oci config whose ``registry`` is not ``host[:port]``
    was quoted whole in the error, user info and password included."""
    guard = SecretGuard()
    for registry in ["http://alice:registry-Pass-01@127.0.0.1:9", "alice:registry-Pass-01@bad host"]:
        guard.register_fields({"registry": registry}, "the registry password")
        with pytest.raises(StorageConfigError, match="<user-info>@") as info:
            check_registry(registry)
        guard.record(str(info.value), "the error")
    assert guard.scan()[0] == []


def test_only_our_commands_count_as_ours() -> None:
    assert is_our_command(["/venv/bin/mesh-adapter", "--runtime", "mlserver"])
    assert is_our_command(["/opt/app/triton-adapter"])
    assert is_our_command(["/opt/app/puller"])
    assert is_our_command(["/venv/bin/python", "-m", "puller.cli", "pull"])
    assert not is_our_command(["/venv/bin/moto_server", "-p", "1"])
    assert not is_our_command("mesh-adapter --runtime x")  # a shell line: not ours to parse


# --- whole sessions -----------------------------------------------------------------------

INNER = f'''
import structlog

from adapter.errors import StorageUnauthenticated
from tests import secrets_guard

PLANTED = "{PLANTED}"


def test_registers_it():
    secrets_guard.register_secret(PLANTED, "the planted secret")


def test_logs_it():
    structlog.get_logger("leaky").info("connecting", password=PLANTED)


def test_puts_it_in_an_error():
    secrets_guard.register_secret(PLANTED + "-two", "the second planted secret")
    StorageUnauthenticated(f"the store refused {{PLANTED}}-two")
'''


@pytest.fixture
def inner_session(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    return pytester


def test_a_planted_leak_fails_the_session_and_says_where(inner_session: pytest.Pytester) -> None:
    inner_session.makepyfile(test_leaky=INNER)
    result = inner_session.runpytest_subprocess("-p", "tests.secrets_guard", "-q")
    result.assert_outcomes(passed=3)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*secrets guard*",
            "LEAK of the planted secret (as is)",
            "    in captured stdout call of test_leaky.py::test_logs_it",
            "*password=<SECRET>*",
            "LEAK of the second planted secret (as is)",
            "    in the message of a StorageUnauthenticated in test_leaky.py::test_puts_it_in_an_error",
        ]
    )
    assert PLANTED not in result.stdout.str()  # the report masks the value itself


def test_a_clean_session_passes(inner_session: pytest.Pytester) -> None:
    inner_session.makepyfile(
        test_clean=INNER.split("def test_logs_it", maxsplit=1)[0]  # registers the secret, never says it
    )
    result = inner_session.runpytest_subprocess("-p", "tests.secrets_guard", "-q")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["secrets guard: 1 secrets, none in *"])
