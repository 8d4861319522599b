"""The documentation runs as written: README.md's Quickstart agrees with CI and its commands exist, its Python API
blocks run (on a tiny model in place of SmolLM2), and every relative link of README.md and docs/*.md resolves."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from mindskip_ext import cli
from mindskip_ext.testing import synthetic_instructions

from tiny import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
INDEX = REPO / "docs" / "README.md"  # the index of the documentation pages
DOCS = sorted(p for p in (REPO / "docs").glob("*.md") if p != INDEX)  # every page, those added later too
PAGES = [README, INDEX, *DOCS]
README_MAX_LINES = 250


def section(text: str, title: str) -> str:
    """The text of the ``## title`` section of a markdown page (up to the next ``## `` heading)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"no '## {title}' section"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a markdown page's headings (lower case, punctuation dropped, spaces to hyphens)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # a '# comment' in code is no heading
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    links = relative_links(page)
    assert links or page.name != "README.md", "the README links to its pages"
    for link in links:
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.relative_to(REPO)}: {link} -> {path} does not exist"
        assert REPO in path.parents or path == REPO, f"{page.relative_to(REPO)}: {link} leaves the repository"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page.relative_to(REPO)}: no heading for #{anchor} in {path.name}"


def linked_pages(page: Path) -> set[Path]:
    return {(page.parent / link.partition("#")[0]).resolve() for link in relative_links(page)}


def test_every_docs_page_is_in_the_index():
    missing = sorted(p.name for p in set(DOCS) - linked_pages(INDEX))
    assert not missing, f"docs/ pages not listed in {INDEX.relative_to(REPO)}: {missing}; give each a line there"


def test_every_docs_page_is_one_click_from_the_readme():
    missing = sorted(p.name for p in set(DOCS) - linked_pages(README))
    assert not missing, f"docs/ pages not linked from README.md: {missing}; give each a row in its Documentation table"
    assert INDEX in linked_pages(README)


def test_quickstart_commands_exist_and_match_ci():
    (block,) = code_blocks(section(README.read_text(), "Quickstart"), "bash")
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    subprocess.run(["bash", "-n"], input=block, text=True, check=True)  # the shell parses them
    install, test = commands
    steps = [shlex.split(part) for part in install.split("&&")]
    assert steps[0] == ["bash", "scripts/install.sh"] and (REPO / "scripts" / "install.sh").is_file()
    assert steps[1][0] == ".venv/bin/mindskip"
    assert cli.build_parser().parse_args(steps[1][1:]).func is not None  # `mindskip demo` is a command
    ci = (REPO / ".ci" / "run").read_text()
    assert test in ci, f"the Quickstart's test command {test!r} is not what .ci/run runs"


@pytest.mark.hf
def test_python_api_blocks_run_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    """The README's Python API blocks, in order and in one namespace, with a tiny saved model where they fetch
    SmolLM2 and the built-in instructions as their data file."""
    from mindskip_ext import offline_models

    blocks = code_blocks(section(README.read_text(), "The Python API"), "python")
    assert len(blocks) == 2
    model_dir = save_tiny_model(tmp_path / "model")
    monkeypatch.setattr(offline_models, "fetch_model", lambda name, **kwargs: model_dir)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alpaca.json").write_text(json.dumps(synthetic_instructions(96, seed=3)))
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "routers" / "mindskip_config.json").is_file()
    assert namespace["summary"]["heldout"]["perplexity"] > 1.0
    printed = capsys.readouterr().out
    assert "trainable params" in printed and str(namespace["summary"]["heldout"]["perplexity"]) in printed
