"""The secrets guard: no configured secret may reach a log line or an error message.

A pytest plugin, registered in ``tests/conftest.py``. Through the whole session it
gathers two things, and at the end it looks for every secret in every text; one hit
fails the run (exit status 1) and the summary says which secret (by origin, never by
value) turned up where.

**Secrets** (:func:`register_secret`, :func:`register_fields`):

- in this process: every :class:`puller.config.StorageConfig` built, whichever way (a
  storage-config entry, a model key's ``storage_params``, a test building one), every
  storage-config entry read (even one refused as invalid) and every model key parsed:
  the fields whose names say secret (:func:`secrets_in_fields`); and the credentials in
  the proxy URLs of every :class:`adapter.settings.Settings`;
- the storage-config folders and proxy variables of sidecar processes, and the model
  keys the mesh client sends them (``tests/servers/adapter.py``);
- what the test servers hand out or require (``tests/servers/*``): S3 secret keys, the
  Azurite account key and the SAS tokens signed with it, registry passwords and the
  tokens its token service and the GCS token endpoint issue, HTTP header tokens, TLS
  private keys;
- :data:`WELL_KNOWN`: secret constants of test modules, by reference.

A secret is also looked for JSON- and repr-escaped, URL-encoded and base64-encoded (at
all three alignments, so inside a ``Basic`` header too); a PEM private key is looked
for line by line. Values shorter than :data:`MIN_LENGTH` are ignored: they would match
ordinary words.

**Texts** (:func:`record_text`, :func:`watch_log_file`):

- in-process output, for every test phase and collection: captured stdout and stderr
  (structlog's print logger, the stdlib handler ``adapter.logs`` installs) and captured
  log records (library loggers), as pytest reports them;
- event dicts held by ``structlog.testing.capture_logs``;
- the message of every :class:`adapter.errors.SidecarError` constructed, raised or not;
- the report of every failed test;
- gRPC status details the mesh client receives;
- the log files of our own processes (``mesh-adapter``, ``mesh-puller``, the drop-in
  commands) started through ``SidecarProcess``, and the output of ``subprocess.run`` of
  those commands.

**Deliberately not scanned:** the logs of third-party servers the tests start (moto,
Azurite, fake-gcs-server, the distribution registry, rclone, MLServer, Triton,
TorchServe) and of the test file server (``tests/servers/https.py``): they print the
requests they receive, credentials included, which is their business, not a leak of
ours. Nor output that pytest does not capture (``-s``), nor subprocesses of ours that a
test starts with ``Popen`` itself.

Texts are kept in memory and log files read at the end (the secrets registered late,
such as a token issued in the last test, are then known); the scan is one substring
search per form over all texts joined, then a search of each text for the forms found:
well under a second for the whole suite (about 2 MB of text, some 200 secrets).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import stat
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

#: shorter values are not looked for: they would match ordinary text
MIN_LENGTH = 8

#: secret constants of test modules, by (module, attribute); checked when the module was
#: imported, and a reference that no longer resolves fails the run (the guard would
#: silently lose it otherwise)
WELL_KNOWN: tuple[tuple[str, str], ...] = (
    ("tests.e2e.test_mlserver_s3", "SECRET_KEY"),
    ("tests.e2e.test_standalone_puller", "SECRET"),
    ("tests.e2e.test_oci", "PASSWORD"),
    ("tests.puller.test_oci_registry", "PASSWORD"),
    ("tests.puller.test_oci_registry", "WRONG"),
    ("tests.puller.test_oci_storage", "PASSWORD"),
    ("tests.puller.test_registry", "SECRET"),
    ("tests.puller.test_config", "SECRET"),
    # used under made-up field names, which no name rule recognises
    ("tests.faults.test_hostile_model_key", "SECRET"),
    ("tests.faults.test_hostile_storage_config", "SECRET"),
)

#: field names that hold secrets (storage configs, docker configs, model-key params)
_SECRET_NAME = re.compile(
    r"secret|password|passwd|token|private_key|client_key|account_?key|connection_string|sas|"
    r"signature|credential|^auth$|^sig$",
    re.IGNORECASE,
)
#: names the pattern matches that hold no secret
_PUBLIC_NAMES = frozenset({"token_uri", "use_default_credential"})
#: fields whose every value is a secret (HTTP headers carry tokens)
_ALL_SECRET = frozenset({"headers"})
#: fields holding a URL (or host) whose password and query string are secrets
_URL_NAMES = frozenset({"url", "endpoint", "endpoint_url", "registry", "http_proxy", "https_proxy"})
#: commands of ours whose output ``subprocess.run`` returns
_OUR_COMMANDS = frozenset({"mesh-adapter", "mesh-puller", "puller"})


@dataclasses.dataclass(frozen=True)
class Leak:
    """One secret found in one text."""

    origin: str
    form: str
    where: str
    context: str


class SecretGuard:
    """The registry of secrets and texts, and the scan. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.secrets: dict[str, str] = {}
        self.texts: list[tuple[str, str]] = []
        self.log_files: dict[Path, str] = {}
        self.current = "session start"

    # --- gathering ----------------------------------------------------------------------

    def register(self, value: object, origin: str) -> None:
        """Remember ``value`` as a secret (ignored unless a string of MIN_LENGTH or more)."""
        if not isinstance(value, str):
            return
        value = value.strip()
        if "PRIVATE KEY-----" in value:
            # a PEM key: any line of its body gives it away, however the text is escaped
            for line in value.replace("\\n", "\n").splitlines():
                if not line.startswith("-----") and len(line.strip()) >= 16:
                    self.register(line, f"{origin} (a line of a PEM private key)")
            return
        if len(value) < MIN_LENGTH:
            return
        with self._lock:
            self.secrets.setdefault(value, origin)

    def register_fields(self, fields: Mapping[str, Any], origin: str) -> None:
        for value in secrets_in_fields(fields):
            self.register(value, origin)

    def register_text(self, text: str, origin: str) -> None:
        """The secrets of JSON text (a storage-config entry, a model key), even broken."""
        for value in secrets_in_text(text):
            self.register(value, origin)

    def register_config_dir(self, directory: Path, origin: str) -> None:
        """Every secret of the entries of a storage-config folder."""
        try:
            entries = [p for p in directory.iterdir() if not p.name.startswith(".")]
        except OSError:
            return
        for path in entries:
            text = _read_small_file(path)
            if text is not None:
                self.register_text(text, f"{origin}, entry {path.name!r}")

    def record(self, text: object, where: str) -> None:
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        if isinstance(text, str) and text:
            with self._lock:
                self.texts.append((where, text))

    def watch_log_file(self, path: Path, label: str) -> None:
        """Read the file at the end of the session (whatever it holds by then)."""
        with self._lock:
            self.log_files.setdefault(Path(path), label)

    # --- the scan -----------------------------------------------------------------------

    def forms(self) -> dict[str, tuple[str, str]]:
        """Every text form of every secret -> (origin, name of the form)."""
        with self._lock:
            secrets = dict(self.secrets)
        found: dict[str, tuple[str, str]] = {}
        for value, origin in secrets.items():
            for form, kind in encodings(value):
                found.setdefault(form, (origin, kind))
        return found

    def all_texts(self) -> list[tuple[str, str]]:
        with self._lock:
            texts = list(self.texts)
            files = dict(self.log_files)
        for path, label in files.items():
            try:
                texts.append((f"{label} ({path})", path.read_text(errors="replace")))
            except OSError:
                continue  # removed with its test's folder; nothing to read
        return texts

    def scan(self) -> tuple[list[Leak], int]:
        """Every leak, and how many characters were searched."""
        forms = self.forms()
        texts = self.all_texts()
        # one search per form over everything, then only the hits are located
        everything = "\0".join(text for _, text in texts)
        leaks = []
        for form, (origin, kind) in forms.items():
            if form not in everything:
                continue
            for where, text in texts:
                at = text.find(form)
                if at >= 0:
                    leaks.append(Leak(origin, kind, where, _context(text, at, form)))
        return leaks, len(everything)

    def size(self) -> tuple[int, int]:
        """(number of secrets, number of texts and log files) gathered so far."""
        with self._lock:
            return len(self.secrets), len(self.texts) + len(self.log_files)


def _read_small_file(path: Path, limit: int = 4 * 1024 * 1024) -> str | None:
    """The text of a regular file of at most ``limit`` bytes, else None (never blocks on
    a FIFO: the hostile storage-config tests make some)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        return os.read(fd, limit + 1).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _context(text: str, at: int, form: str) -> str:
    """Up to 60 characters either side of a hit, the secret itself masked."""
    before = text[max(0, at - 60) : at]
    after = text[at + len(form) : at + len(form) + 60]
    return f"{before}<SECRET>{after}".replace("\n", "\\n")


def _base64_inner(data: bytes) -> Iterator[str]:
    """For each of the three alignments a value can take inside a longer base64 text,
    the part of its encoding that does not depend on the bytes around it."""
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + data).decode()
        start = 4 if pad else 0
        end = (pad + len(data)) // 3 * 4
        inner = encoded[start:end]
        if len(inner) >= MIN_LENGTH:
            yield inner
            yield inner.replace("+", "-").replace("/", "_")


def encodings(value: str) -> Iterator[tuple[str, str]]:
    """``value`` and the forms it takes when logged escaped or encoded."""
    yield value, "as is"
    yield json.dumps(value)[1:-1], "JSON-escaped"
    yield repr(value)[1:-1], "repr-escaped"
    yield urllib.parse.quote(value, safe=""), "URL-encoded"
    yield urllib.parse.quote_plus(value), "URL-encoded"
    for inner in _base64_inner(value.encode()):
        yield inner, "base64"


def _connection_string_secrets(text: str) -> Iterator[str]:
    """The account key, the SAS, and the credentials in the endpoint URLs of an Azure
    connection string."""
    for part in text.split(";"):
        name, _, value = part.partition("=")
        name = name.strip().lower()
        if name == "accountkey":
            yield value
        elif name == "sharedaccesssignature":
            yield from _sas_secrets(value)
        elif name.endswith("endpoint"):
            yield from _url_secrets(value)


def _sas_secrets(text: str) -> Iterator[str]:
    """A SAS or any query string: the whole, and its signature alone."""
    query = text.strip().lstrip("?")
    yield query
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if _SECRET_NAME.search(name) or name.lower() == "sig":
            yield value


def _url_secrets(text: str) -> Iterator[str]:
    text = text.strip()
    try:
        parts = urllib.parse.urlsplit(text if "://" in text else f"//{text}")
        password = parts.password
    except ValueError:
        return
    if password:
        yield urllib.parse.unquote(password)
    if parts.query:
        yield from _sas_secrets(parts.query)


def _docker_auth_secrets(text: str) -> Iterator[str]:
    """A docker config ``auth`` (base64 of ``user:password``): it, and the password."""
    yield text
    try:
        decoded = base64.b64decode(text, validate=False).decode(errors="replace")
    except ValueError:
        return
    yield decoded.partition(":")[2]


#: a ``"name": "value"`` pair in JSON text that does not parse
_JSON_PAIR = re.compile(r'"([^"\\]{1,200})"\s*:\s*"((?:[^"\\]|\\.){1,20000})"')


def secrets_in_text(text: str) -> Iterator[str]:
    """The secrets of a storage-config entry or model key given as JSON text; when the
    text is not valid JSON, of its ``"name": "value"`` pairs."""
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, Mapping):
        yield from secrets_in_fields(parsed)
        return
    pairs: dict[str, Any] = {}
    for name, raw in _JSON_PAIR.findall(text):
        try:
            pairs[name] = json.loads(f'"{raw}"')
        except ValueError:
            pairs[name] = raw
    yield from secrets_in_fields(pairs)


def secrets_in_fields(fields: Mapping[str, Any], *, all_secret: bool = False) -> Iterator[str]:
    """The secret values of a storage config (or docker config, or storage params):
    the fields named like secrets, header values, passwords and query strings of URLs,
    the keys inside connection strings and docker ``auth`` values, nested maps and
    JSON texts included."""
    for raw_name, value in fields.items():
        name = str(raw_name)
        segments = name.lower().split(".")  # storage_params reach nested fields by dots
        whole = all_secret or segments[0] in _ALL_SECRET
        secret = whole or (
            name.lower() not in _PUBLIC_NAMES and any(_SECRET_NAME.search(s) for s in segments)
        )
        if isinstance(value, Mapping):
            yield from secrets_in_fields(value, all_secret=whole)
            continue
        if isinstance(value, list):
            for item in value:
                if isinstance(item, Mapping):
                    yield from secrets_in_fields(item, all_secret=whole)
                elif secret:
                    yield str(item)
            continue
        if not isinstance(value, str):
            continue
        if value.lstrip().startswith("{"):  # a docker config, or headers, as JSON text
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if isinstance(parsed, Mapping):
                yield from secrets_in_fields(parsed, all_secret=whole)
                continue
        if segments[-1] == "connection_string":
            yield from _connection_string_secrets(value)
        elif segments[-1] == "auth":
            yield from _docker_auth_secrets(value)
        elif segments[-1] in _URL_NAMES:
            yield from _url_secrets(value)
            continue
        if segments[-1] in ("sas_token", "sas", "sharedaccesssignature"):
            yield from _sas_secrets(value)
        if secret:
            yield value


# --- the one guard of this process, and what test code calls ---------------------------

GUARD = SecretGuard()


def register_secret(value: object, origin: str) -> None:
    """Remember ``value`` as a secret that must appear in no log line or error message."""
    GUARD.register(value, origin)


def register_fields(fields: Mapping[str, Any], origin: str) -> None:
    """Remember the secrets of a storage config (or model-key params)."""
    GUARD.register_fields(fields, origin)


def register_text(text: str, origin: str) -> None:
    """Remember the secrets of JSON text: a storage-config entry or a model key."""
    GUARD.register_text(text, origin)


def register_config_dir(directory: Path, origin: str) -> None:
    """Remember the secrets of every entry of a storage-config folder."""
    GUARD.register_config_dir(directory, origin)


def record_text(text: object, where: str) -> None:
    """Scan ``text`` (a log line, an error message) at the end of the session."""
    GUARD.record(text, f"{where} in {GUARD.current}")


def watch_log_file(path: Path, label: str) -> None:
    """Scan the log file of one of our processes at the end of the session."""
    GUARD.watch_log_file(path, f"{label}, started in {GUARD.current}")


def is_our_command(argv: object) -> bool:
    """True for ``mesh-adapter``, ``mesh-puller``, ``puller`` and ``<runtime>-adapter``,
    and for ``python -m adapter.cli`` or ``puller.cli``."""
    if isinstance(argv, str | bytes | Path):
        return False
    args = [str(a) for a in argv] if isinstance(argv, list | tuple) else []
    if not args:
        return False
    name = Path(args[0]).name
    if name in _OUR_COMMANDS or name.endswith("-adapter"):
        return True
    return args[1:2] == ["-m"] and args[2:3] in (["adapter.cli"], ["puller.cli"])


# --- the plugin ---------------------------------------------------------------------------


class _Patches:
    """The hooks into code under test and libraries: each records, then does exactly
    what the original did. Undone when the session ends."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def replace(self, owner: Any, name: str, wrapper: Callable[[Any], Any]) -> None:
        stored = vars(owner)[name]  # as stored: a classmethod stays one when put back
        setattr(owner, name, wrapper(getattr(owner, name)))
        self._undo.append(lambda: setattr(owner, name, stored))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


_PATCHES = _Patches()


def _install_patches() -> None:
    from structlog.testing import LogCapture

    import puller.config
    from adapter.errors import SidecarError
    from adapter.settings import Settings
    from puller.config import StorageConfig
    from puller.model_key import ModelKey

    def settings_init(original: Any) -> Any:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            proxies = {"http_proxy": self.http_proxy, "https_proxy": self.https_proxy}
            GUARD.register_fields(proxies, f"a proxy of Settings built in {GUARD.current}")

        return __init__

    def config_init(original: Any) -> Any:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            GUARD.register_fields(self.fields, f"a {self.type} StorageConfig built in {GUARD.current}")

        return __init__

    def read_entry(original: Any) -> Any:
        def _read_entry(path: Path) -> Any:
            entry = original(path)
            if isinstance(entry, Mapping):
                GUARD.register_fields(
                    entry, f"storage-config entry {Path(path).name!r} read in {GUARD.current}"
                )
            elif entry is not None:  # an entry refused as invalid may still hold secrets
                text = _read_small_file(Path(path))
                if text is not None:
                    GUARD.register_text(text, f"invalid storage-config entry read in {GUARD.current}")
            return entry

        return _read_entry

    def key_parse(original: Any) -> Any:
        def parse(cls: Any, text: Any) -> Any:
            if isinstance(text, str):
                GUARD.register_text(text, f"a model key parsed in {GUARD.current}")
            return original.__func__(cls, text)

        return classmethod(parse)

    def error_init(original: Any) -> Any:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            record_text(getattr(self, "message", None), f"the message of a {type(self).__name__}")

        return __init__

    def capture_call(original: Any) -> Any:
        def __call__(self: Any, logger: Any, method_name: str, event_dict: Any) -> Any:
            try:
                text = " ".join(f"{key}={value}" for key, value in event_dict.items())
            except Exception:  # a value whose str() fails: its repr then
                text = repr(event_dict)
            record_text(text, "a structlog event captured by capture_logs")
            return original(self, logger, method_name, event_dict)

        return __call__

    def run(original: Any) -> Any:
        def recording_run(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            if is_our_command(result.args):
                command = Path(str(result.args[0])).name
                record_text(result.stdout, f"stdout of {command} (subprocess.run)")
                record_text(result.stderr, f"stderr of {command} (subprocess.run)")
            return result

        return recording_run

    _PATCHES.replace(StorageConfig, "__init__", config_init)
    _PATCHES.replace(Settings, "__init__", settings_init)
    _PATCHES.replace(puller.config, "_read_entry", read_entry)
    _PATCHES.replace(ModelKey, "parse", key_parse)
    _PATCHES.replace(SidecarError, "__init__", error_init)
    _PATCHES.replace(LogCapture, "__call__", capture_call)
    _PATCHES.replace(subprocess, "run", run)


def _resolve_well_known() -> list[str]:
    """Register the :data:`WELL_KNOWN` constants; return the references that broke."""
    broken = []
    for module_name, attribute in WELL_KNOWN:
        module = sys.modules.get(module_name)
        if module is None:
            continue  # its tests did not run
        value = getattr(module, attribute, None)
        if not isinstance(value, str):
            broken.append(f"{module_name}.{attribute}")
            continue
        GUARD.register(value, f"{module_name}.{attribute}")
    return broken


_KEY = pytest.StashKey[tuple[list[Leak], list[str], int]]()


def pytest_configure(config: pytest.Config) -> None:
    _install_patches()


def pytest_unconfigure(config: pytest.Config) -> None:
    _PATCHES.undo()


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    GUARD.current = nodeid


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for title, content in report.sections:
        GUARD.record(content, f"{title.lower()} of {report.nodeid}")
    if report.failed:
        GUARD.record(report.longreprtext, f"the failure report of {report.nodeid} ({report.when})")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    for title, content in report.sections:
        GUARD.record(content, f"{title.lower()} collecting {report.nodeid or 'the session'}")
    if report.failed:
        GUARD.record(report.longreprtext, f"the collection error of {report.nodeid}")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After every fixture is torn down (every process stopped): scan, and fail the
    run on a leak."""
    GUARD.current = "session teardown"
    broken = _resolve_well_known()
    leaks, scanned = GUARD.scan()
    session.config.stash[_KEY] = (leaks, broken, scanned)
    if (leaks or broken) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    found = config.stash.get(_KEY, None)
    if found is None:
        return
    leaks, broken, scanned = found
    secrets, texts = GUARD.size()
    if not leaks and not broken:
        terminalreporter.write_line(
            f"secrets guard: {secrets} secrets, none in {texts} logs and messages ({scanned:,} characters)"
        )
        return
    terminalreporter.section("secrets guard", red=True, bold=True)
    for leak in leaks:
        terminalreporter.write_line(f"LEAK of {leak.origin} ({leak.form})", red=True)
        terminalreporter.write_line(f"    in {leak.where}")
        terminalreporter.write_line(f"    ...{leak.context}...")
    for reference in broken:
        terminalreporter.write_line(
            f"WELL_KNOWN names {reference}, which is not a string constant: update tests/secrets_guard.py",
            red=True,
        )
