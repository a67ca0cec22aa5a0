"""Triton's ``config.pbtxt``: a protobuf text-format ``ModelConfig``.

Two operations, both on the text itself (no protobuf schema of Triton's is needed):
:func:`without_top_level_name` removes the model's own ``name`` from a config and keeps
every other byte, and :func:`generated_config` writes a config from a ModelMesh schema
file. The tokenizer knows just enough text format for that: fields, ``:``, string
literals, scalars, nested ``{}``/``<>`` messages, ``[]`` lists, ``,``/``;``
separators and ``#`` comments.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from adapter.errors import InvalidRequest
from runtimes.mlserver import schema_tensors

#: the file Triton reads a model's configuration from
CONFIG_FILE = "config.pbtxt"

#: KServe v2 tensor datatype (as schema files carry them) -> Triton's config data type
TRITON_DATA_TYPES: Mapping[str, str] = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}


def generated_config(schema_path: Path, backend: str, platform: str = "") -> str:
    """A ``config.pbtxt`` carrying ``backend`` (and ``platform``) and the schema's
    inputs and outputs with Triton data types. No ``name``: Triton takes the
    directory's. ``backend`` empty: Triton's auto-complete picks it from the files."""
    tensors = schema_tensors(schema_path)
    lines = [f"# from the model's schema {schema_path.name}"]
    if backend:
        lines.append(f"backend: {_quote(backend)}")
    if platform:
        lines.append(f"platform: {_quote(platform)}")
    for key, field_name in (("inputs", "input"), ("outputs", "output")):
        entries = tensors.get(key)
        if not entries:
            continue
        lines.append(f"{field_name} [")
        blocks = []
        for tensor in entries:
            shape = [int(d) for d in tensor["shape"]]
            block = [
                "  {",
                f"    name: {_quote(str(tensor['name']))}",
                f"    data_type: {TRITON_DATA_TYPES[str(tensor['datatype'])]}",
            ]
            if shape:
                block.append(f"    dims: [ {', '.join(str(d) for d in shape)} ]")
            else:  # a scalar: Triton's dims cannot be empty
                block += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
            block.append("  }")
            blocks.append("\n".join(block))
        lines.append(",\n".join(blocks))
        lines.append("]")
    return "\n".join(lines) + "\n"


def _quote(value: str) -> str:
    """A protobuf text-format string literal (UTF-8 kept as it is)."""
    escaped = []
    for ch in value:
        if ch in "\\\"'":
            escaped.append("\\" + ch)
        elif ch == "\n":
            escaped.append("\\n")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            escaped.append(f"\\{ord(ch):03o}")
        else:
            escaped.append(ch)
    return '"' + "".join(escaped) + '"'


@dataclass(frozen=True)
class _Token:
    kind: str  # "word", "string" or "punct"
    text: str
    start: int
    end: int


_WORD = re.compile(r"[A-Za-z0-9_.+\-]+")
_OPEN, _CLOSE = "{[<", "}]>"


def _tokens(text: str, where: Path) -> Iterator[_Token]:
    """The tokens of a protobuf text-format message; whitespace and ``#`` comments
    are skipped."""
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch == "#":
            newline = text.find("\n", i)
            i = n if newline < 0 else newline + 1
        elif ch in "\"'":
            j = i + 1
            while j < n and text[j] != ch:
                if text[j] == "\n":
                    break
                j += 2 if text[j] == "\\" else 1
            if j >= n or text[j] != ch:
                line = text.count("\n", 0, i) + 1
                raise InvalidRequest(f"{where}: unterminated string on line {line}")
            yield _Token("string", text[i : j + 1], i, j + 1)
            i = j + 1
        elif ch in "{}[]<>:,;":
            yield _Token("punct", ch, i, i + 1)
            i += 1
        else:
            match = _WORD.match(text, i)
            if match is None:
                line = text.count("\n", 0, i) + 1
                raise InvalidRequest(f"{where}: unexpected {ch!r} on line {line}")
            yield _Token("word", match.group(), i, match.end())
            i = match.end()


def without_top_level_name(text: str, where: Path) -> str:
    """``text`` (a ``config.pbtxt``) with every top-level ``name`` field removed and
    every other byte kept: nested ``name`` fields (of inputs, outputs...), comments
    and layout stay. A line left empty by the removal goes with it (with a comment
    that ended it). ``InvalidRequest`` when the text is not a text-format message."""
    tokens = list(_tokens(text, where))
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(tokens):
        field_token = tokens[i]
        if field_token.kind != "word":
            raise InvalidRequest(f"{where}: expected a field name, found {field_token.text!r}")
        i += 1
        if i < len(tokens) and tokens[i].text == ":":
            i += 1
        if i >= len(tokens):
            raise InvalidRequest(f"{where}: field {field_token.text!r} has no value")
        value = tokens[i]
        scalar = True
        if value.kind == "punct" and value.text in _OPEN:
            scalar = False
            i = _after_balanced(tokens, i, where)
        elif value.kind == "string":
            while i < len(tokens) and tokens[i].kind == "string":
                i += 1  # adjacent literals are one string
        elif value.kind == "word":
            i += 1
        else:
            raise InvalidRequest(f"{where}: field {field_token.text!r} has no value")
        end = tokens[i - 1].end
        if i < len(tokens) and tokens[i].text in ",;":
            end = tokens[i].end
            i += 1
        if field_token.text == "name":
            if not scalar:
                raise InvalidRequest(f"{where}: the top-level 'name' must be a string")
            spans.append((field_token.start, end))
    for start, end in reversed(spans):
        text = _cut(text, start, end)
    return text


def _after_balanced(tokens: list[_Token], i: int, where: Path) -> int:
    """The index after the bracket that closes the one at ``tokens[i]``."""
    stack: list[str] = []
    while i < len(tokens):
        token = tokens[i]
        if token.kind == "punct" and token.text in _OPEN:
            stack.append(_CLOSE[_OPEN.index(token.text)])
        elif token.kind == "punct" and token.text in _CLOSE:
            if not stack or stack.pop() != token.text:
                raise InvalidRequest(f"{where}: unbalanced {token.text!r}")
            if not stack:
                return i + 1
        i += 1
    raise InvalidRequest(f"{where}: unclosed {''.join(reversed(stack))!r} at the end")


def _cut(text: str, start: int, end: int) -> str:
    """Remove ``text[start:end]``; the whole line when nothing else is on it but
    blanks and a trailing comment, else the span and the blanks after it."""
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    line_end = len(text) if line_end < 0 else line_end
    rest = text[end:line_end].strip()
    if not text[line_start:start].strip() and (not rest or rest.startswith("#")):
        return text[:line_start] + text[min(line_end + 1, len(text)) :]
    after = end
    while after < line_end and text[after] in " \t":
        after += 1
    return text[:start] + text[after:]
