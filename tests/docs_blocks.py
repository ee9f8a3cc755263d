"""Fenced code blocks of the docs: parsed with markdown-it, their bnexport calls checked against the
CLI's options, run in a scratch folder as a reader would, and their shown output compared with
what was printed (tests/test_docs.py says the conventions of the info string)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

RUNNABLE = {"sh", "python", "console"}
BLOCK_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, its info-string attributes, its text, where it is."""

    page: Path
    line: int
    lang: str
    text: str
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def runs(self) -> bool:
        return self.lang in RUNNABLE and "norun" not in self.attrs

    def __str__(self) -> str:
        return f"{self.page.name}:{self.line}:{self.lang}"


def markdown_parser() -> Any:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table")


@cache
def tokens(page: Path) -> list[Any]:
    return markdown_parser().parse(page.read_text(encoding="utf-8"))


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page``, in order."""
    out = []
    for tok in tokens(page):
        if tok.type != "fence":
            continue
        lang, *rest = shlex.split(tok.info) or [""]
        attrs = dict(item.partition("=")[::2] for item in rest)
        out.append(Block(page, tok.map[0] + 1, lang, tok.content, attrs))
    return out


# ---- the bnexport commands a block runs exist with those options ---------------------------------


def logical_lines(script: str) -> list[str]:
    """Shell lines with backslash continuations joined and ``$ `` prompts dropped."""
    joined = re.sub(r"\\\n\s*", " ", script)
    lines = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        lines.append(line)
    return lines


def bnexport_calls(script: str) -> list[list[str]]:
    """Every ``bnexport …`` (or ``python -m bnexport …``) call in a shell script, as arguments."""
    calls = []
    for line in logical_lines(script):
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        command: list[str] = []
        for word in [*words, ";"]:
            if word in {";", "&&", "||", "|", "&"}:
                if command:
                    calls.append(command)
                command = []
            elif command or word == "bnexport" or word.endswith("/bnexport"):
                command.append(word)  # `python -m bnexport …` starts at its `bnexport` too
    return [c[1:] for c in calls]


@cache
def cli_options() -> dict[str, set[str]]:
    """Each command's option names (and the group's own under ``""``), from the Typer app."""
    from typer.main import get_command

    from bnexport.cli.app import app

    group = get_command(app)
    names = {"": {o for p in group.params for o in (*p.opts, *p.secondary_opts)}}
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        names[name] = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    return names


def unknown_options(args: list[str]) -> list[str]:
    """What in one bnexport call the CLI would not take: an unknown command or option."""
    options = cli_options()
    i = 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] not in options[""]:
            return [args[i]]
        i += 1
    if i == len(args):
        return []
    if args[i] not in options:
        return [f"command {args[i]}"]
    flags = [a.split("=", 1)[0] for a in args[i + 1 :] if re.match(r"^--?[A-Za-z]", a)]
    return [f"{args[i]} {flag}" for flag in flags if flag not in options[args[i]]]


@dataclass(frozen=True)
class Ran:
    """What one command of a block did."""

    command: str
    returncode: int
    stdout: str
    stderr: str


def bin_dir(work: Path) -> Path:
    """The folder whose ``bnexport`` the blocks run: this interpreter's, or a wrapper around it."""
    here = Path(sys.executable).parent
    if (here / "bnexport").exists():
        return here
    wrapper = work / "bin" / "bnexport"
    wrapper.parent.mkdir(exist_ok=True)
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m bnexport "$@"\n')
    wrapper.chmod(0o755)
    return wrapper.parent


def scratch(work: Path) -> dict[str, str]:
    """A folder laid out like a clone (``models/`` linked in), and the blocks' environment."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "models").symlink_to(ROOT / "models", target_is_directory=True)
    path = f"{bin_dir(work)}{os.pathsep}{os.environ.get('PATH', '')}"
    # the output shown is a CPU machine's: a GPU would add the CUDA runners' rows
    env = {"PATH": path, "COLUMNS": "100", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return {**os.environ, **env}


def run_command(command: list[str], work: Path, env: dict[str, str]) -> Ran:
    proc = subprocess.run(
        command, cwd=work, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
    )
    return Ran(command[-1], proc.returncode, proc.stdout, proc.stderr)


def run_block(block: Block, work: Path, env: dict[str, str]) -> list[Ran]:
    """Run one block in ``work`` as a reader would: write it, run it, or run its prompts."""
    if block.lang == "python" and "file" in block.attrs:
        (work / block.attrs["file"]).write_text(block.text)
        return []
    if block.lang == "python":
        script = work / f"_block_{block.line}.py"
        script.write_text(block.text)
        return [run_command([sys.executable, script.name], work, env)]
    if block.lang == "sh":
        return [run_command(["bash", "-euo", "pipefail", "-c", block.text], work, env)]
    joined = re.sub(r"\\\n\s*", " ", block.text)
    prompts = [line[2:] for line in joined.splitlines() if line.startswith("$ ")]
    return [run_command(["bash", "-c", p], work, env) for p in prompts]


def norm_line(line: str) -> str:
    """A line with its numbers and spacing aside: what stays when figures move run to run."""
    return " ".join(re.sub(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?", "#", line).split())


def shown_output_mismatch(shown: list[str], printed: list[str]) -> str | None:
    """Why ``shown`` (with ``…`` for lines cut) is not what was ``printed``, or None."""
    printed = [norm_line(line) for line in printed]
    while printed and not printed[-1]:
        printed.pop()
    segments: list[list[str]] = [[]]
    for line in shown:
        if line.strip() == "…":
            segments.append([])
        else:
            segments[-1].append(norm_line(line))
    pos = 0
    for k, segment in enumerate(segments):
        if not segment:
            continue
        starts = [
            j
            for j in range(pos, len(printed) - len(segment) + 1)
            if printed[j : j + len(segment)] == segment
        ]
        if not starts or (k == 0 and starts[0] != 0):
            return f"not printed (in this order): {segment[0]!r}"
        pos = starts[0] + len(segment)
    if segments[-1] and pos != len(printed):
        return f"printed more after {segments[-1][-1]!r}"
    return None


def shown_lines(block: Block) -> list[str]:
    """The output lines a console block shows under its prompt."""
    lines = block.text.rstrip("\n").splitlines()
    return [line for line in lines if not line.startswith("$ ")]
