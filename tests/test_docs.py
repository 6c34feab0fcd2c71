"""The README is the five-minute read, the reference is in docs/: every page and image they link exists."""

from __future__ import annotations

import re

from tests.conftest import REPO


def _links(path) -> list[str]:
    return [target for target in re.findall(r"\]\(([^)#\s]+)", path.read_text()) if "://" not in target]


def test_the_readme_is_short_and_every_page_it_links_exists() -> None:
    readme = REPO / "README.md"
    assert len(readme.read_text().splitlines()) < 300
    links = _links(readme)
    pages = ("data", "train", "evaluate", "report", "configuration")
    assert {f"docs/{page}.md" for page in pages} <= set(links)
    missing = [link for link in links if not (REPO / link).exists()]
    assert not missing, missing


def test_every_link_between_the_docs_pages_exists() -> None:
    for page in sorted((REPO / "docs").glob("*.md")):
        missing = [link for link in _links(page) if not (page.parent / link).exists()]
        assert not missing, (page.name, missing)


def test_the_docs_give_the_reports_retime_command() -> None:
    # The README and docs/report.md write out the command the report prints for timing the models again;
    # `dvc repro -f evaluate report` (without -s) would train every model again.
    from pipeline.evaluation.decision import RETIME_COMMAND

    for page in (REPO / "README.md", REPO / "docs" / "report.md"):
        text = " ".join(page.read_text().split())
        assert f"`{RETIME_COMMAND}`" in text, page.name
        assert "`dvc repro -f evaluate report`" not in text, page.name
