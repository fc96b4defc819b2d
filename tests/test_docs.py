"""The README and the manual in docs/: every relative link resolves, the README stays a README, and
``mkdocs build --strict`` passes."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify, unique

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300
QUICKSTART = ["./run.sh pipeline", "./run.sh test"]

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
EXTERNAL = ("http://", "https://", "mailto:")


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text()))


def anchors(path: Path) -> set[str]:
    """The ids Python-Markdown's toc extension (what mkdocs uses) gives the page's headings."""
    ids: set[str] = set()
    for _, title in HEADING.findall(FENCE.sub("", path.read_text())):
        title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading: its text
        title = re.sub(r"[`*_]", "", title)
        unique(slugify(title, "-"), ids)  # adds the id, with _1, _2 for a repeated heading
    return ids


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        if target.startswith(EXTERNAL):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {dest.relative_to(ROOT)}")
    return broken


def section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"no '## {title}' section"
    return m.group(1)


def test_the_link_checker_sees_links_and_anchors_and_skips_code():
    """The helpers above, on known text (so that the tests below cannot pass by finding nothing)."""
    assert LINK.findall("see [a](docs/x.md#b), ![p](plots/f.png) and [c](https://e.org)") == [
        "docs/x.md#b", "plots/f.png", "https://e.org"]
    assert LINK.findall(prose("`[--set k=v](x)` and\n```\n[a](b)\n```\n")) == []
    assert slugify("The frontier: how far each method compresses within a budget", "-") == \
        "the-frontier-how-far-each-method-compresses-within-a-budget"
    assert slugify("Presets: the paper's settings", "-") == "presets-the-papers-settings"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert links(page) or page.name != "README.md", "README.md has no links: the link check found nothing"
    assert broken_links(page) == []


def test_the_docs_and_the_readme_link_each_page():
    pages = {p.name for p in PAGES if p.parent.name == "docs"}
    assert {"index.md", "results.md", "reliability.md", "layout.md"} <= pages
    for name, linker in (("README.md", ROOT / "README.md"), ("index.md", ROOT / "docs" / "index.md")):
        linked = {(linker.parent / t.partition("#")[0]).resolve().name for t in links(linker)}
        assert pages - {"index.md"} <= linked, f"{name} does not link {sorted(pages - {'index.md'} - linked)}"


def test_readme_is_short_and_its_quickstart_has_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", section(text, "Quickstart"), re.M | re.S)
    commands = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    assert [c for c in commands if c] == QUICKSTART


def test_every_mlflow_server_in_the_readme_and_the_docs_binds_to_loopback():
    """tests/test_security.py checks the README; the team-server commands moved to docs/scaling-out.md."""
    commands = [(p.name, c) for p in PAGES for c in re.findall(r"mlflow (?:ui|server)[^`\n]*", p.read_text())]
    assert any(name == "scaling-out.md" for name, _ in commands)
    for name, cmd in commands:
        assert "--host 127.0.0.1" in cmd, f"{name}: an MLflow server must bind to loopback: {cmd}"
    assert not [p.name for p in PAGES if "0.0.0.0" in p.read_text()]


def test_mkdocs_build_is_strict_clean(tmp_path):
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    assert (tmp_path / "site" / "plots" / "frontier.png").is_file(), "the plots did not reach the site"
