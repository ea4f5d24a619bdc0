"""The README's model and alias tables are generated from the registry; this fails when they are stale."""

from __future__ import annotations

import re
from pathlib import Path

from vitfast.models._info import alias_table, markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", README.read_text(), re.DOTALL)
    assert match, f"README.md has no {name} block"
    return match.group(1)


def test_model_table_is_current() -> None:
    assert _block("model-table") == markdown_table(), "regenerate with `vitfast list --markdown`"


def test_alias_table_is_current() -> None:
    assert _block("alias-table") == alias_table(), "regenerate with `vitfast list --markdown`"


def test_readme_shows_the_test_command() -> None:
    assert "python -m pytest tests" in README.read_text()
