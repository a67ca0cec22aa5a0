"""The environment-variable table of docs/deploy.md, generated from the settings class.

    .venv/bin/python deploy/docs/env_table.py            # print the table
    .venv/bin/python deploy/docs/env_table.py --write    # rewrite it in docs/deploy.md
    .venv/bin/python deploy/docs/env_table.py --check    # exit 1 if docs/deploy.md differs

The table sits between the lines ``<!-- env-table:start -->`` and
``<!-- env-table:end -->``; everything else in the file is left as it is. Rows come from
``adapter.settings.settings_table()`` in the order the settings are declared, so a
setting added, renamed or re-documented there shows up here (and tests/deploy/
test_env_table.py fails until the table is regenerated).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from adapter.settings import settings_table

DOC = REPO / "docs" / "deploy.md"
START = "<!-- env-table:start -->"
END = "<!-- env-table:end -->"
REGENERATE = ".venv/bin/python deploy/docs/env_table.py --write  (or: make docs)"


class MarkersError(ValueError):
    """The document does not hold exactly one start marker followed by one end marker."""


#: Python's spelling of a boolean default -> the one the environment takes
ENV_SPELLING = {"True": "true", "False": "false"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(rows: list[tuple[str, str, str]] | None = None) -> str:
    """The Markdown table: one row per setting, in declaration order."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for env, default, meaning in settings_table() if rows is None else rows:
        shown = f"`{_cell(ENV_SPELLING.get(default, default))}`" if default else "*unset*"
        lines.append(f"| `{_cell(env)}` | {shown} | {_cell(meaning)} |")
    return "\n".join(lines) + "\n"


def with_table(document: str, table: str | None = None) -> str:
    """``document`` with the text between the markers replaced by the table."""
    if document.count(START) != 1 or document.count(END) != 1:
        raise MarkersError(f"expected one {START} and one {END} line")
    head, _, rest = document.partition(START)
    _, _, tail = rest.partition(END)
    if END in head:
        raise MarkersError(f"{END} comes before {START}")
    return f"{head}{START}\n{render_table() if table is None else table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the env-var table of docs/deploy.md.")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="rewrite the table in the document")
    action.add_argument("--check", action="store_true", help="exit 1 if the document's table is stale")
    parser.add_argument("--doc", type=Path, default=DOC, help="the document (default docs/deploy.md)")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        print(render_table(), end="")
        return 0
    document = args.doc.read_text()
    try:
        updated = with_table(document)
    except MarkersError as exc:
        print(f"{args.doc}: {exc}", file=sys.stderr)
        return 2
    if args.write:
        if updated != document:
            args.doc.write_text(updated)
        return 0
    if updated != document:
        print(
            f"{args.doc}: the env-var table differs from adapter/settings.py; regenerate it with\n"
            f"    {REGENERATE}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
