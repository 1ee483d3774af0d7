"""How every command line ends: one line on stderr and an exit status that says whose it was.

2: the user's input (a config key, a file, a record, an argument) - fix it and run again.
1: the run failed (a loss that diverged, a process that died, a checkpoint that cannot be
   read). Anything unexpected is a bug: one line, exit 1, and the traceback with `--debug`
   (or JAXFACE_DEBUG=1), never by default.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

from jaxface.config import ConfigError
from jaxface.fileio import ConvertError

# Input errors common to every command; each command adds its own.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ConvertError, FileExistsError)

DEBUG_FLAG = "--debug"


def debugging(args: Sequence[str] | None = None) -> bool:
    """True when the user asked for tracebacks and the runtime's own messages: `--debug`
    among the command's arguments (sys.argv by default) or JAXFACE_DEBUG=1."""
    args = sys.argv[1:] if args is None else args
    return DEBUG_FLAG in args or os.environ.get("JAXFACE_DEBUG", "") not in ("", "0")


def run(
    prog: str,
    body: Callable[[list[str]], int | None],
    argv: Sequence[str] | None,
    codes: Sequence[tuple[type[BaseException], int]] = (),
) -> int:
    """Call `body(argv)` and turn what it raises into one line and an exit status.

    `codes` maps the command's own exception types to 1 or 2 (first match wins, before the
    common INPUT_ERRORS)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debugging(args)
    args = [a for a in args if a != DEBUG_FLAG]
    table = [*codes, *((kind, 2) for kind in INPUT_ERRORS)]
    try:
        return body(args) or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise  # argparse's own usage errors (exit 2) and explicit exits
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        if debug:
            traceback.print_exc()
        code = next((c for kind, c in table if isinstance(exc, kind)), None)
        if code is None:
            hint = "" if debug else f" (run again with {DEBUG_FLAG} for the traceback)"
            print(f"{prog}: internal error: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
            return 1
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return code
