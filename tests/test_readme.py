"""The README and docs stay true: every setting documented with its real default, the
quickstart commands the ones CI runs, every cited document present, every link resolving."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from exporter import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
README_MAX_LINES = 300
"""A newcomer reads the README in ten minutes; the details live in docs/ and bench/."""


def shell_block_after(text: str, sentence: str) -> str:
    """The first ``sh`` code block after ``sentence`` in ``text``, without the fences."""
    assert sentence in text, f"no {sentence!r}"
    match = re.search(r"```sh\n(.*?)```", text.split(sentence, 1)[1], re.S)
    assert match, f"no sh block after {sentence!r}"
    return match.group(1).strip()


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^a-z0-9 -]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading fragment of the Markdown file ``path``."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_every_setting_is_documented_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `(EXPORTER_[A-Z_]+)` \| ([^|]+) \|", README.read_text(), re.M))
    for name, field in Settings.model_fields.items():
        variable = f"EXPORTER_{name.upper()}"
        assert variable in rows, f"{variable} is missing from the README"
        default = field.get_default(call_default_factory=True)
        shown = rows[variable].strip()
        if default is None:
            assert shown == "unset", variable
        else:
            value = getattr(default, "value", default)
            assert shown == f"`{value}`", f"{variable}: README says {shown}, default is {value}"
    documented = set(rows) - {f"EXPORTER_{n.upper()}" for n in Settings.model_fields}
    assert not documented, f"README documents unknown settings: {documented}"


def test_readme_is_short() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines"


def test_the_test_command_is_the_one_ci_runs() -> None:
    command = shell_block_after(README.read_text(), "Install and run the whole test suite")
    ci_lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert command == ci_lines[-1]
    assert "rm -rf .venv" in ci_lines, "CI must install from scratch"


def test_the_quickstart_installs_and_serves_the_embedded_default() -> None:
    command = shell_block_after(README.read_text(), "Install and run the exporter")
    assert command == (
        "python3 -m venv .venv && .venv/bin/pip install . "
        "&& .venv/bin/facilitator-exporter serve --demo"
    )


def test_the_lock_command_is_the_one_that_made_the_lock() -> None:
    command = shell_block_after(README.read_text(), "regenerate it with:")
    header = (ROOT / "requirements.lock").read_text().split("#    ", 1)[1].splitlines()[0]
    assert command == ".venv/bin/" + header.strip()


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document: Path) -> None:
    text = re.sub(r"```.*?```", "", document.read_text(encoding="utf-8"), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, fragment = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        assert linked.exists(), f"{document.name} links to missing {target}"
        if fragment and linked.suffix == ".md":
            assert fragment in anchors(linked), f"{document.name}: no heading for {target}"


def cited_documents(text: str) -> set[str]:
    """The documents ``text`` names: ``docs/*.md`` paths and any DESIGN document."""
    return set(re.findall(r"docs/[\w.-]+\.md|\bDESIGN\b(?:\.md)?|\.\./shared", text))


def python_sources() -> list[Path]:
    """The package's modules, the tests and the benchmarks (not this file)."""
    files = [*(ROOT / "exporter").rglob("*.py")]
    files += [*(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")]
    return [path for path in files if path != Path(__file__).resolve()]


def test_code_cites_only_documents_the_repository_holds() -> None:
    for path in python_sources():
        for cited in cited_documents(path.read_text(encoding="utf-8")):
            assert (ROOT / cited).is_file(), f"{path.relative_to(ROOT)} cites {cited}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_cite_only_documents_the_repository_holds(document: Path) -> None:
    for cited in cited_documents(document.read_text(encoding="utf-8")):
        assert (ROOT / cited).is_file(), f"{document.name} cites {cited}"


def test_architecture_sections_cited_by_the_code_exist() -> None:
    headings = re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "architecture.md").read_text(), re.M)
    sources = "".join(p.read_text() for p in (ROOT / "exporter").rglob("*.py"))
    cited = set(re.findall(r"docs/architecture\.md section (\d+)", sources))
    assert cited, "the code cites no section: the pattern is wrong"
    assert cited <= set(headings), f"cited sections without a heading: {cited - set(headings)}"
