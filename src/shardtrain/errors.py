"""UserError: a mistake in the user's input, reported as one line on stderr with exit code 2.

Everything else (bugs, crashes) keeps its traceback. Data corruption found by `verify` exits 1.
"""


class UserError(Exception):
    """A bad command line, recipe, key, path or dataset: shown without a traceback."""

    exit_code = 2


class DataError(UserError):
    """Corrupt or inconsistent shards/index (exit 1, like `verify`)."""

    exit_code = 1
