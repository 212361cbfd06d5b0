"""The README and docs/ still match the code: every Python command they show parses, every flag
they name exists, the README stays a five-minute read that links every page, and no relative link
points at nothing."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [ROOT / "README.md", *PAGES]
OUR_PACKAGES = {"core", "handler", "training", "client", "benchmarks"}
README_MAX_LINES = 160


def shell_commands(markdown: str) -> list[str]:
    """Lines of the ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def command_module(script: Path) -> str:
    """The module whose `cli` a thin scripts/*.py entry point runs."""
    match = re.search(r"^from (\S+) import cli$", script.read_text(encoding="utf-8"), flags=re.M)
    assert match, f"{script} is not a thin entry point (from MODULE import cli)"
    return match.group(1)


def python_commands() -> list[tuple[str, str, list[str]]]:
    """(page, module, argv) for each `python scripts/X.py ...` command (or `python -m MODULE` of
    ours) in the README and in docs/*.md, wherever a section moved to."""
    found = []
    for path in MARKDOWN:
        page = str(path.relative_to(ROOT))
        for command in shell_commands(path.read_text(encoding="utf-8")):
            words = shlex.split(command)
            if len(words) < 2 or not words[0].endswith("python"):
                continue
            if words[1] == "-m" and words[2].split(".")[0] in OUR_PACKAGES:
                found.append((page, words[2], words[3:]))
            elif words[1].startswith("scripts/") and words[1].endswith(".py"):
                found.append((page, command_module(ROOT / words[1]), words[2:]))
    return found


def prose(markdown: str) -> str:
    """The text outside fenced code blocks and inline code spans (where links are links)."""
    markdown = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", markdown)


def links(markdown: str) -> list[str]:
    """Targets of [text](target) and ![alt](target), outside code."""
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose(markdown))


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces
    to hyphens, a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for line in re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M).splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_readme_shows_the_quick_start():
    commands = shell_commands(README)
    assert commands[:3] == ["make demo", "make test", "make test-images"]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("make ")]
    assert ci == ["make test", "make test-images"]  # CI runs the README's test commands, in order


@pytest.mark.parametrize("page, module, argv", python_commands(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_documented_python_command_parses(page, module, argv):
    parser = importlib.import_module(module).get_args_parser()
    parser.exit_on_error = False
    try:
        parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on errors it raises itself
        pytest.fail(f"{page}: command `{module} {' '.join(argv)}` does not parse (exit {e.code})")


def test_docs_document_flags_that_exist():
    """Every `--flag` a flag section names beside a module exists in that module's parser."""
    sections = {"training.train": ("docs/training.md", r"`training\.train` flags.*?\n\n"),
                "client.classify_dir": ("docs/client.md", r"\| flag \| default \| meaning \|.*?\n\n")}
    for module, (page, pattern) in sections.items():
        text = re.search(pattern, (ROOT / page).read_text(encoding="utf-8"), flags=re.S)
        assert text, f"{page} has no flag section for {module}"
        known = importlib.import_module(module).get_args_parser()._option_string_actions
        flags = set(re.findall(r"`(--[a-z][a-z-]*)", text.group(0)))
        assert flags, module
        assert flags <= set(known), f"{page}: {module} has no flags {sorted(flags - set(known))}"


def test_readme_is_a_five_minute_read():
    lines = len(README.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {README_MAX_LINES})"


def test_readme_links_every_docs_page():
    linked = {(ROOT / target.split("#")[0]).resolve() for target in links(README)
              if not re.match(r"[a-z]+:", target) and not target.startswith("#")}
    missing = [str(page.relative_to(ROOT)) for page in PAGES if page.resolve() not in linked]
    assert not missing, f"README.md links no {missing}: each page must be one click from the README"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    """Every relative link of README.md and docs/*.md names an existing file, and its #anchor
    (or an in-page #anchor) a heading of that page."""
    broken = []
    for target in links(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{path.relative_to(ROOT)}: broken links {broken}"
