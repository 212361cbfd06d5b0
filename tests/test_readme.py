"""The README's commands still match the code: every Python command it shows parses."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


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


def python_commands() -> list[tuple[str, list[str]]]:
    """(module, argv) for each `python scripts/X.py ...` command (or `python -m MODULE`)."""
    found = []
    for command in shell_commands(README):
        words = shlex.split(command)
        if not words or not words[0].endswith("python"):
            continue
        if words[1] == "-m":
            found.append((words[2], words[3:]))
        elif words[1].startswith("scripts/") and words[1].endswith(".py"):
            found.append((command_module(ROOT / words[1]), words[2:]))
    return found


def test_readme_shows_the_quick_start():
    commands = shell_commands(README)
    assert commands[:3] == ["make demo", "make test", "make test-images"]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("make ")]
    assert ci == ["make test", "make test-images"]  # CI runs the README's test commands, in order


@pytest.mark.parametrize("module, argv", python_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_readme_python_command_parses(module, argv):
    parser = importlib.import_module(module).get_args_parser()
    parser.exit_on_error = False
    try:
        parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on errors it raises itself
        pytest.fail(f"README command `{module} {' '.join(argv)}` does not parse (exit {e.code})")


def test_readme_documents_flags_that_exist():
    """Every `--flag` the README names beside a module exists in that module's parser."""
    sections = {"training.train": r"`training\.train` flags.*?\n\n",
                "client.classify_dir": r"\| flag \| default \| meaning \|.*?\n\n"}
    for module, pattern in sections.items():
        text = re.search(pattern, README, flags=re.S)
        assert text, f"README has no flag section for {module}"
        known = importlib.import_module(module).get_args_parser()._option_string_actions
        flags = set(re.findall(r"`(--[a-z][a-z-]*)", text.group(0)))
        assert flags, module
        assert flags <= set(known), f"{module}: README names unknown flags {sorted(flags - set(known))}"
