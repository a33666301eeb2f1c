"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class JobError(Exception):
    """A problem the user must fix; the message names the file, key or request and the fix."""
