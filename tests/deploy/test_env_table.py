"""docs/deploy.md's env-var table is the one the settings class generates, so the docs
cannot drift from the code: regenerated here and compared."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from adapter.settings import settings_table
from deploy.docs import env_table

GENERATOR = Path(env_table.__file__)


def table_lines(document: str) -> list[str]:
    _, _, rest = document.partition(env_table.START)
    table, _, _ = rest.partition(env_table.END)
    return [line for line in table.splitlines() if line.startswith("| `")]


def test_docs_table_is_the_generated_one():
    document = env_table.DOC.read_text()
    assert env_table.with_table(document) == document, (
        f"{env_table.DOC.relative_to(env_table.REPO)}: the env-var table differs from "
        f"adapter/settings.py; regenerate it with: {env_table.REGENERATE}"
    )


def test_every_setting_has_one_row_with_its_default():
    rows = table_lines(env_table.DOC.read_text())
    for env, default, _meaning in settings_table():
        matching = [row for row in rows if row.startswith(f"| `{env}` |")]
        assert len(matching) == 1, f"{env}: {len(matching)} rows in docs/deploy.md"
        if default:
            assert f"| `{env_table.ENV_SPELLING.get(default, default)}` |" in matching[0]
    assert len(rows) == len(settings_table())


def test_markers_appear_once_and_in_order():
    document = env_table.DOC.read_text()
    assert document.count(env_table.START) == 1
    assert document.count(env_table.END) == 1
    assert document.index(env_table.START) < document.index(env_table.END)
    with pytest.raises(env_table.MarkersError):
        env_table.with_table(document.replace(env_table.END, ""))
    swapped = document.replace(env_table.START, "@@").replace(env_table.END, env_table.START)
    with pytest.raises(env_table.MarkersError):
        env_table.with_table(swapped.replace("@@", env_table.END))


def test_render_escapes_pipes_and_marks_unset_defaults():
    table = env_table.render_table([("A_B", "", "x | y"), ("FLAG", "False", "on or off")])
    assert "| `A_B` | *unset* | x \\| y |" in table
    assert "| `FLAG` | `false` | on or off |" in table


def run_generator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATOR), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_fails_on_a_stale_table_and_write_repairs_it(tmp_path: Path):
    document = env_table.DOC.read_text()
    stale = tmp_path / "deploy.md"
    first_row = table_lines(document)[0]
    stale.write_text(document.replace(first_row + "\n", ""))
    checked = run_generator("--check", "--doc", str(stale))
    assert checked.returncode == 1
    assert "deploy/docs/env_table.py --write" in checked.stderr
    assert run_generator("--write", "--doc", str(stale)).returncode == 0
    assert stale.read_text() == document
    assert run_generator("--check", "--doc", str(stale)).returncode == 0


def test_without_markers_the_generator_refuses(tmp_path: Path):
    plain = tmp_path / "plain.md"
    plain.write_text("# no table here\n")
    result = run_generator("--write", "--doc", str(plain))
    assert result.returncode == 2
    assert plain.read_text() == "# no table here\n"
