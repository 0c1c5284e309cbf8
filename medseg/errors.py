"""Errors a user can cause and fix. The CLI prints their message (which names the file or key,
the problem and the fix) instead of a traceback."""


class MedsegError(Exception):
    """Base class for problems with the user's input, data or environment."""


class UsageError(MedsegError, ValueError):
    """A config, argument or manifest that cannot be used as given (CLI exit code 2)."""
