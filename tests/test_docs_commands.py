"""Every command the README and docs/ show exists as written: its module, its flags, its
config keys, the files and make targets it names. Docs drifted from the code before (flags
renamed, pages describing what the code no longer does); this fails on the next drift."""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import sys
import warnings
from functools import cache

import pytest
from conftest import REPO

from jaxface.config import FIELDS

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:python3? -m |make |bash )")


def _commands() -> list[tuple[str, str]]:
    """(page, command) for every shell line of a code block and every inline `python -m ...`."""
    found = []
    for page in PAGES:
        text = page.read_text()
        blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S)
        for block in blocks:
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = line.strip()
                if COMMAND.match(line):
                    found.append((page.name, line))
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`([^`]+)`", prose):
            span = " ".join(span.split())
            if re.match(r"python3? -m \w", span):
                found.append((page.name, span))
    return found


def _words(command: str) -> list[str]:
    command = command.split(" #", 1)[0]  # a trailing comment
    command = re.split(r"\s(?:&&|\||;|>|2>)\s", command, maxsplit=1)[0]  # the first command
    try:
        return shlex.split(command)
    except ValueError:  # an ellipsis inside quotes and the like: plain words are enough
        return command.split()


@cache
def _help(module: str, *sub: str) -> str:
    """`python -m MODULE [SUB] --help`, run in this process (jax and torch already loaded)."""
    saved_argv, saved_env, out = sys.argv, dict(os.environ), io.StringIO()
    sys.argv = [module, *sub, "--help"]
    try:
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(out),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")  # runpy's "found in sys.modules"
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as exc:
                assert exc.code in (0, None), f"{module} {' '.join(sub)} --help exited {exc.code}"
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    return out.getvalue()


def _subcommands(help_text: str) -> set[str]:
    match = re.search(r"\{([\w,-]+)\}", help_text)
    return set(match.group(1).split(",")) if match else set()


def _check_python_module(words: list[str]) -> list[str]:
    module, args = words[2], words[3:]
    text = _help(module)
    assert "usage:" in text, f"python -m {module} --help printed no usage"
    subs = _subcommands(text)
    if args and args[0] in subs:
        text = _help(module, args[0])
        args = args[1:]
    problems = []
    for arg in args:
        if arg.startswith("--config."):
            key = arg[len("--config.") :].split("=", 1)[0]
            if key not in FIELDS:
                problems.append(f"--config.{key}: no such config key")
        elif arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            if not re.search(re.escape(flag) + r"(?![\w-])", text):
                problems.append(f"{flag}: not an option of python -m {module}")
        elif arg.startswith("configs/") and arg.endswith(".py"):
            problems += [f"{path}: no such config file" for path in _config_files(arg)]
    return problems


def _config_files(arg: str) -> list[str]:
    """The config files `arg` names that do not exist; `{r50,r100}` is expanded as bash does,
    and a placeholder (`configs/CFG.py`) names none."""
    match = re.search(r"\{(.*?)\}", arg)
    names = [arg.replace(match.group(0), n) for n in match.group(1).split(",")] if match else [arg]
    return [n for n in names if not n[8:-3].isupper() and not (REPO / n).is_file()]


def _check(words: list[str]) -> list[str]:
    if words[:2] in (["python", "-m"], ["python3", "-m"]):
        return _check_python_module(words)
    if words[0] == "make":
        targets = re.findall(r"(?m)^([\w-]+):", (REPO / "Makefile").read_text())
        return [f"make {t}: no such target" for t in words[1:2] if t not in targets]
    if words[0] == "bash":
        return [] if (REPO / words[1]).is_file() else [f"{words[1]}: no such script"]
    return []


def test_the_docs_show_commands():
    pages = {page for page, _ in _commands()}
    assert len(_commands()) > 40 and {"README.md", "training.md", "data.md"} <= pages


def test_every_documented_command_exists_as_written():
    problems = []
    for page, command in _commands():
        words = _words(command)
        if len(words) < 2 or "pytest" in words:
            continue
        problems += [f"{page}: {command[:80]}: {p}" for p in _check(words)]
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_renamed_flag():
    assert _check(["python", "-m", "jaxface.plan", "--devices", "8", "--target", "h200"]) == []
    assert _check(["python", "-m", "jaxface.plan", "--gpus", "8"]) == [
        "--gpus: not an option of python -m jaxface.plan"
    ]
    assert _check(["python", "-m", "jaxface.train", "--config.batchsize=2"]) == [
        "--config.batchsize: no such config key"
    ]
    assert _check(["python", "-m", "jaxface.convert", "torch2jax", "--network", "r50"]) == []
    assert _check(["make", "tests"]) == ["make tests: no such target"]
    assert _config_files("configs/{r50,r51}.py") == ["configs/r51.py"]
    assert _config_files("configs/CFG.py") == []


@pytest.mark.parametrize("module", ["jaxface.train", "jaxface.plan"])
def test_help_runs_in_process_without_side_effects(module):
    before = dict(os.environ)
    assert "usage:" in _help(module)
    assert dict(os.environ) == before
