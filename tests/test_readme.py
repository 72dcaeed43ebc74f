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
def test_each_readme_command_parses(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    program, argv = argv_of(command)
    if program == "nextoken":
        module, args = parse_args(argv)  # argparse's SystemExit fails the test, with its message
        assert module is not None and args.command == argv[0]
        if args.command == "serve":  # and the checks `nextoken serve` makes before it starts
            from nextoken.serve.config import from_args

            if args.api_key_env:
                monkeypatch.setenv(args.api_key_env, "set")
            from_args(args).validate()
    elif program == "nextoken-loadtest":
        from nextoken_client.loadtest.cli import build_parser

        build_parser().parse_args(argv)
    else:
        pytest.fail(f"the README shows a command of a program this test does not know: {program}")


def readme_line(prefix: str) -> str:
    """The README's command line that starts with ``prefix`` (the test fails if the README drops it)."""
    found = [c for c in COMMANDS if c.startswith(prefix)]
    assert len(found) == 1, f"the README shows {len(found)} command lines starting with {prefix!r}"
    return found[0]


def readme_block_line(prefix: str) -> str:
    """A whole line of a fenced block (curl, a continuation joined) that starts with ``prefix``."""
    text = README.read_text(encoding="utf-8").replace("\\\n", " ")
    found = [line.strip() for line in text.splitlines() if line.strip().startswith(prefix)]
    assert len(found) == 1, f"the README shows {len(found)} lines starting with {prefix!r}"
    return found[0]


# Only the budget of the README's training run is made small; every other word is the README's.
BUDGET = ["--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2", "--sample-tokens", "0", "--threads", "1"]


def test_the_readme_from_training_to_serving_as_written(tmp_path: Path, tiny_corpus: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Train the README's model, continue it with the bare resume, inspect, export, score, serve it,
    and send the README's curl request, SDK calls and load test to it: every one succeeds."""
    import json
    import os
    import shutil
    import subprocess

    import httpx

    from nextoken.cli import main
    from tests.conftest import ServerProcess

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_corpus, tmp_path / "my_texts")
    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout" / "a.txt").write_text("the dog sat on the rug. hello there, how are you?\n" * 20)

    def nextoken(line: str, *extra: str) -> None:
        program, argv = argv_of(line)
        assert program == "nextoken" and main([*argv, *extra]) == 0, line

    nextoken(readme_line("nextoken train --data my_texts/"), *BUDGET)
    config = (tmp_path / "runs" / "mine" / "config.json").read_bytes()
    nextoken(readme_line("nextoken train --out-dir runs/mine --resume auto"))
    assert (tmp_path / "runs" / "mine" / "config.json").read_bytes() == config
    for prefix in ("nextoken generate runs/mine", "nextoken inspect runs/mine --prompt", "nextoken inspect runs/mine "
                   "--text", "nextoken attention runs/mine", "nextoken export runs/mine --out", "nextoken eval "):
        nextoken(readme_line(prefix))

    program, argv = argv_of(readme_line("nextoken serve artifacts/mine"))
    argv = [a for a in argv[2:] if a not in ("--device", "cuda")]  # no GPU here
    argv[argv.index("--port") + 1:argv.index("--port") + 2] = []  # ServerProcess picks a free port
    argv.remove("--port")
    server = ServerProcess(tmp_path / "artifacts" / "mine", *argv, env={"NEXTOKEN_API_KEY": "sekret"})
    try:
        auth = {"Authorization": "Bearer sekret"}
        curl = shlex.split(readme_block_line("curl -N http://127.0.0.1:8000/v1/completions"))
        r = httpx.post(server.url + "/v1/completions", content=curl[curl.index("-d") + 1], timeout=60,
                       headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        assert r.text.rstrip().endswith("data: [DONE]")

        loadtest = shlex.split(readme_block_line("nextoken-loadtest --base-url http://127.0.0.1:8000"))
        loadtest[loadtest.index("--base-url") + 1] = server.url
        done = subprocess.run([*loadtest, "--no-progress"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "NEXTOKEN_API_KEY": "sekret"})
        assert done.returncode == 0, done.stdout + done.stderr
        levels = json.loads((tmp_path / "sweep.json").read_text())["levels"]
        assert [lv["failed"] for lv in levels] == [0] * len(levels), levels
    finally:
        server.stop()
