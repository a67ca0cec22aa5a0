"""The secrets guard: no configured secret may reach a log line or an error message.

A pytest plugin, registered in ``tests/conftest.py``. Through the whole session it
gathers two things, and at the end it looks for every secret in every text; one hit
fails the run (exit status 1) and the summary says which secret (by origin, never by
value) turned up where.

**Secrets** (:func:`register_secret`, :func:`register_fields`):

- in this process: every :class:`puller.config.StorageConfig` built, whichever way (a
  storage-config entry, a model key's ``storage_params``, a test building one), every
  storage-config entry read (even one refused as invalid) and every model key parsed:
  the fields that hold secrets (:func:`tests.secret_scan.secrets_in_fields`); and the credentials in
  the proxy URLs of every :class:`adapter.settings.Settings`;
- the storage-config folders and proxy variables of sidecar processes, and the model
  keys the mesh client sends them (``tests/servers/adapter.py``);
- what the test servers hand out or require (``tests/servers/*``): S3 secret keys, the
  Azurite account key and the SAS tokens signed with it, registry passwords and the
  tokens its token service and the GCS token endpoint issue, HTTP header tokens, TLS
  private keys;
- :data:`WELL_KNOWN`: secret constants of test modules, by reference.

Which field names hold secrets, the forms each secret is looked for in, and the scan
itself are in :mod:`tests.secret_scan`.

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
well under a second for the whole suite (about 4 MB of text, some 200 secrets).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.secret_scan import Leak, SecretGuard, read_small_file

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

#: commands of ours whose output ``subprocess.run`` returns
_OUR_COMMANDS = frozenset({"mesh-adapter", "mesh-puller", "puller"})


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
                text = read_small_file(Path(path))
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
