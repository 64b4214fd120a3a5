"""How every command line refuses: one line on stderr naming the file and field, exit code 2, no traceback.

A refused config, plan or argument surfaces as a ValueError (PlanError, PackageError, a config's
check), an OSError (a missing or unreadable file), a YAML / JSON / protobuf-JSON parse error, or a
`SystemExit("message")` raised by the command itself. `run_command` turns each into `refuse(...)`:
the line is printed, then `SystemExit` with code 2 (its message kept, for callers that match it).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import NoReturn

import yaml
from google.protobuf import json_format

REFUSED = (ValueError, OSError, yaml.YAMLError, json.JSONDecodeError, json_format.ParseError)
EXIT_REFUSED = 2  # as argparse exits on a bad argument


def one_line(prog: str, message: str) -> str:
    """`prog: message` on one line (a message that already names the command keeps its own prefix)."""
    text = " ".join(str(message).split())
    if text.startswith(prog.split()[0]):
        return text
    sub = prog.split()[-1]
    return f"{prog}: {text.removeprefix(f'{sub}: ')}"  # "export: ..." from `trainer export` once, not twice


def quiet_library_info() -> None:
    """Drops fbgemm_gpu's INFO lines (one per .so it loads, on the root logger) from the root handlers, so
    a command that imports it and then refuses still prints one line."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: r.levelno > logging.INFO or "fbgemm_gpu" not in r.pathname)


def refuse(prog: str, message: str) -> NoReturn:
    line = one_line(prog, message)
    print(line, file=sys.stderr, flush=True)
    exc = SystemExit(line)
    exc.code = EXIT_REFUSED
    raise exc


def run_command(prog: str, command: Callable[..., int | None], *args) -> int | None:
    """Runs one subcommand; what it refuses becomes one line and exit code 2."""
    try:
        return command(*args)
    except SystemExit as e:
        if isinstance(e.code, str):
            refuse(prog, e.code)
        raise
    except REFUSED as e:
        refuse(prog, str(e))


def file_error(path: object, e: Exception) -> ValueError:
    """`e` as a ValueError that names the file it came from (once)."""
    text = " ".join(str(e).split())
    return ValueError(text if text.startswith(str(path)) else f"{path}: {text}")
