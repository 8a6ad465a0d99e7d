"""The README's "Your own cross-domain data" tutorial, run as written on the generated fixture:
every command in its block, and every line it quotes as printed is printed."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from p2pmoe.cli import main

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def tutorial_commands() -> list[list[str]]:
    block = README.split("<!-- tutorial:own-data -->", 1)[1].split("<!-- /tutorial -->", 1)[0]
    lines = [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("```")]
    return [shlex.split(line) for line in lines]


def quoted_output() -> list[str]:
    """Lines the tutorial says a command prints (backticked after it)."""
    section = README.split("## Your own cross-domain data", 1)[1].split("\n## ", 1)[0]
    section = re.sub(r"```.*?```", "", section, flags=re.S)  # code blocks are commands, not output
    return [q for q in re.findall(r"`([^`]+)`", section) if q.startswith(("999 sampled", "targets never seen", "random ranking with"))]


@pytest.mark.slow
def test_the_tutorial_runs_as_written_and_prints_what_it_quotes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = tutorial_commands()
    assert [c[0] for c in commands] == ["python", "p2pmoe", "p2pmoe", "p2pmoe", "p2pmoe", "p2pmoe"]
    codes = []
    for argv in commands:
        if argv[0] == "python":
            assert subprocess.run([sys.executable, str(ROOT / argv[1]), str(tmp_path / argv[2])], check=False).returncode == 0
            continue
        try:
            codes.append(main([*argv[1:], "--quiet"] if argv[1] == "simulate" else argv[1:]))
        except SystemExit as done:  # --help
            codes.append(int(done.code or 0))
    assert codes == [0, 2, 0, 0, 0]  # the first FMoE-CDSR command stops on its negatives, as the text says
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert len(quoted_output()) == 3
    for line in quoted_output():
        assert line in printed
    assert (tmp_path / "runs" / "shop-report" / "index.html").exists()
