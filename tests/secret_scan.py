"""What a secret is and where it hides: the secret values of a storage config (or
model key, or docker config), the forms a secret takes in a text, and the scan of texts
for them. :mod:`tests.secrets_guard` feeds it through a pytest session.

A secret is looked for as it is, JSON- and repr-escaped, URL-encoded and base64-encoded (at
all three alignments, so inside a ``Basic`` header too); a PEM private key is looked
for line by line. Values shorter than :data:`MIN_LENGTH` are ignored: they would match
ordinary words.

Secret fields (:func:`secrets_in_fields`): every field whose name says so (``password``,
``secret_access_key``, ``client_secret``, ``private_key``, ``sas_token``, ``*token*``,
``auth``...), every HTTP header value, the keys and signatures inside an Azure
connection string or SAS, and the password and query string of URLs (``url``,
``endpoint``, ``registry``, proxies); nested maps and JSON texts included.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import stat
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

#: shorter values are not looked for: they would match ordinary text
MIN_LENGTH = 8

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
            text = read_small_file(path)
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


def read_small_file(path: Path, limit: int = 4 * 1024 * 1024) -> str | None:
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
