"""Every command line the README shows is one the real command-line parsers accept.

The README is read as a new user reads it: each fenced block's shell lines (continuations joined,
``&&`` chains split, comments dropped, ``[--optional flags]`` taken as written, ``...`` left out)
go through ``nextoken``'s own parser or ``nextoken-loadtest``'s; a flag the README names and the
parser does not know fails here with argparse's message.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from nextoken.cli import parse_args

README = Path(__file__).resolve().parents[1] / "README.md"


def shell_commands(markdown: str) -> list[str]:
    """The command lines of the README's fenced blocks (python blocks and output excluded)."""
    commands = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", markdown, flags=re.S | re.M):
        if lang not in ("", "bash", "sh"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()  # a comment, not a `#` inside a word
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith(("nextoken", "torchrun")):
                    commands.append(part)
    return commands


def argv_of(command: str) -> tuple[str, list[str]]:
    """(program, arguments) with optional groups opened and ``...`` dropped."""
    words = [w for w in shlex.split(command.replace("[", " ").replace("]", " ")) if w != "..."]
    if words[0] == "torchrun":
        words = words[words.index("-m") + 1:]
    return words[0], words[1:]


COMMANDS = shell_commands(README.read_text(encoding="utf-8"))


def test_the_readme_shows_commands_for_every_stage() -> None:
    shown = {argv_of(c)[1][0] for c in COMMANDS if argv_of(c)[0] == "nextoken" and argv_of(c)[1]}
    assert {"train", "export", "serve", "generate", "inspect", "eval", "retrain", "models", "up"} <= shown, shown
    assert any(argv_of(c)[0] == "nextoken-loadtest" for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_readme_command_parses(command: str) -> None:
    program, argv = argv_of(command)
    if program == "nextoken":
        module, args = parse_args(argv)  # argparse's SystemExit fails the test, with its message
        assert module is not None and args.command == argv[0]
    elif program == "nextoken-loadtest":
        from nextoken_client.loadtest.cli import build_parser

        build_parser().parse_args(argv)
    else:
        pytest.fail(f"the README shows a command of a program this test does not know: {program}")
