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
    """pyproject's pointer holds: each dependency, and each package of the extras a deployment
    installs (all but `test` and `deploy`), has a row in README's Dependencies; a row marked
    `(extra `X`)` names packages of extra X, and an unmarked row names base dependencies only
    (what `pip install loadwarden` brings)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["readme"] == "README.md"

    def names(specs: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[ ;]", spec)[0].lower() for spec in specs} - {"loadwarden"}

    extras = {name: names(specs) for name, specs in project["optional-dependencies"].items()}
    table = _section((ROOT / "README.md").read_text(), "Dependencies")
    rows = re.findall(r"^\| ([^|]+) \|", table, re.MULTILINE)[2:]  # after the header
    named: dict[str | None, set[str]] = {}
    for row in rows:
        marker = re.search(r"\(extra `([^`]+)`\)", row)
        packages = re.sub(r"\(extra `[^`]+`\)", "", row).split(",")
        extra = marker.group(1) if marker else None
        named.setdefault(extra, set()).update(name.strip().lower() for name in packages)
    assert named.pop(None) == names(project["dependencies"])
    # Every extra a deployment installs is explained whole; test and deploy are for us.
    for extra in set(extras) - {"test", "deploy"}:
        assert named.get(extra, set()) == extras[extra], extra
    for extra, packages in named.items():
        assert packages <= extras[extra], extra


def test_every_readme_section_a_comment_names_exists() -> None:
    """Comments that send a reader to a README section (`deploy/README.md, "Sizing"`,
    `README "High availability"`) name a heading that is there."""
    pointers = re.compile(r'(deploy/README\.md|README)(?:\.md)?,? "([^"]+)"')
    headings = {
        name: {
            h.strip("# ").strip() for h in (ROOT / path).read_text().splitlines() if h[:1] == "#"
        }
        for name, path in (("README", "README.md"), ("deploy/README.md", "deploy/README.md"))
    }
    found = 0
    for path in [
        *ROOT.glob("deploy/**/*.yaml"),
        *ROOT.glob("deploy/Dockerfile"),
        ROOT / "pyproject.toml",
    ]:
        for readme, section in pointers.findall(path.read_text()):
            found += 1
            assert any(h.startswith(section) for h in headings[readme]), (path, readme, section)
    assert found >= 5


def test_the_folder_map_matches_the_tree_and_its_imports() -> None:
    """README's "Where things live" names every folder of worker/, and imports run down it:
    no folder imports from one listed above it, and producer/ never imports the worker."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Where things live")
    rows = re.findall(r"^\| `worker/(\w+)/` \|", readme[start : readme.index("\n## ", start)], re.M)
    worker = ROOT / "worker"
    folders = {p.name for p in worker.iterdir() if (p / "__init__.py").exists()}
    assert sorted(rows) == sorted(folders), "README's map and worker/'s folders differ"
    rank = {name: i for i, name in enumerate(rows)}
    upward = []
    for folder in rows:
        for path in (worker / folder).rglob("*.py"):
            for used in re.findall(
                r"^\s*(?:from|import) loadwarden\.worker\.(\w+)", path.read_text(), re.M
            ):
                if used in rank and rank[used] < rank[folder]:
                    upward.append(f"{path.relative_to(ROOT)} imports worker/{used}/")
    for path in (ROOT / "producer").rglob("*.py"):
        if re.search(r"^\s*(?:from|import) loadwarden\.worker\b", path.read_text(), re.M):
            upward.append(f"{path.relative_to(ROOT)} imports the worker")
    assert upward == []
