"""The two kinds of failure the CLI tells apart (exit 2 and exit 1)."""


class InputError(ValueError):
    """Bad user input: the message names the file, row, key or flag and what to do. Exit 2."""


class StageError(RuntimeError):
    """A stage failed while running: the message names the stage and its log. Exit 1."""
