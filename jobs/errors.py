"""The one exception type the CLI turns into a one-line message instead of a traceback, and how the
hints in those messages name the program."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


class JobError(Exception):
    """A problem the user must fix; the message names the file, key or request and the fix."""


# Messages name the program this way; the CLI shows them with the command that really runs here.
GENERIC_COMMAND = "python -m jobs"


def shown_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies below it, else as it is."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def shown_program(program: str | os.PathLike) -> str:
    """``program`` as a user would type it here: its bare name when that is what PATH finds, else
    ``shown_path`` (``.venv/bin/python`` in the repository, an absolute path elsewhere)."""
    path = Path(program)
    if path.is_absolute() and shutil.which(path.name) == str(path):
        return path.name
    return shown_path(path)


def jobs_command() -> str:
    """How to run this program again here: ``jobs`` (the console script), ``.venv/bin/python -m jobs``, ..."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "jobs" and argv0.is_file():
        return shown_program(argv0.absolute())
    return f"{shown_program(sys.executable)} -m jobs"


def with_real_command(message: str) -> str:
    """``message`` with each ```python -m jobs ...``` hint naming the command that runs here."""
    return message.replace(f"`{GENERIC_COMMAND} ", f"`{jobs_command()} ")
