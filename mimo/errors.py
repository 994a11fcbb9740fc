"""One exception type for every user-facing failure: the CLI prints it as one line and exits non-zero."""


class MimoError(Exception):
    """A problem with the user's input (a file, a config, a flag, a request) stated in one line."""
