"""What the README promises about the package itself, checked against the package."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _section(markdown: str, title: str) -> str:
    """The text of the ``## title`` section."""
    start = markdown.index(f"\n## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end >= 0 else None]


def test_every_runtime_dependency_is_explained_in_the_readme() -> None:
    """pyproject's pointer holds: each dependency has a row in README's Dependencies, and
    each row names a dependency."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["readme"] == "README.md"
    wanted = {re.split(r"[<>=!~\[ ;]", spec)[0].lower() for spec in project["dependencies"]}
    table = _section((ROOT / "README.md").read_text(), "Dependencies")
    rows = re.findall(r"^\| ([^|]+) \|", table, re.MULTILINE)
    named = {name.strip().lower() for row in rows[2:] for name in row.split(",")}
    assert named == wanted
